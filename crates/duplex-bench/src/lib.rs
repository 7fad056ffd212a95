//! The benchmark harness shared by the load generator, the peer servers and
//! the runner: the server runtime every peer uses, a minimal WebSocket client
//! (handshake, pre-masked frames, a frame reader that skips payloads), the
//! result records and `/proc` readings.
//!
//! The binaries:
//! - `duplex-bench`: runs the scenarios over every server and prints the
//!   table (see `BENCHMARKS.md`), and writes `results.json` and SVG charts
//!   ([`charts`]) from the same numbers; `--replot` redraws them from a
//!   saved file; `--smoke` checks that every peer and mode still works, in
//!   seconds.
//! - `load`: the load generator (`echo`, `connections`, `broadcast`; with
//!   `--deflate`, permessage-deflate as a browser offers it, see
//!   [`deflate`]), one JSON result line on stdout.
//! - `server-duplex`, `server-tungstenite`, `server-fastwebsockets`,
//!   `server-axum`, `server-rawtcp`: the servers, each with `/mirror` (every
//!   message back unchanged) and `/broadcast` (every message to every
//!   connection of `/broadcast`, the sender included), on `--addr`.

pub mod charts;
pub mod client;
pub mod deflate;
pub mod report;
pub mod server;

use std::io;

/// The resident memory of process `pid` in KiB (`VmRSS` of
/// `/proc/PID/status`).
///
/// # Errors
/// The process is gone or `/proc` is not there.
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .ok_or_else(|| io::Error::other("no VmRSS in /proc/PID/status"))
}

/// CPU time counters, in clock ticks (`USER_HZ`, 100 a second on Linux).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSnapshot {
    /// When it was taken.
    pub at: Option<std::time::Instant>,
    /// Busy ticks of the whole machine, every CPU added up.
    pub system_busy: u64,
    /// User and system ticks of this process.
    pub own: u64,
    /// User and system ticks of the server, if its pid is known.
    pub server: u64,
}

/// Ticks a second of `/proc` CPU counters.
const TICKS_PER_SECOND: f64 = 100.0;

impl CpuSnapshot {
    /// Reads the counters now; missing files read as zero.
    pub fn take(server_pid: Option<u32>) -> Self {
        Self::take_all(server_pid.as_slice())
    }

    /// As [`CpuSnapshot::take`], with the ticks of every process in
    /// `server_pids` added up as the server's (a server made of several
    /// processes: chat nodes and their redis-server).
    pub fn take_all(server_pids: &[u32]) -> Self {
        CpuSnapshot {
            at: Some(std::time::Instant::now()),
            system_busy: system_busy_ticks().unwrap_or(0),
            own: process_ticks("self").unwrap_or(0),
            server: server_pids
                .iter()
                .filter_map(|pid| process_ticks(&pid.to_string()))
                .sum(),
        }
    }

    /// CPU use between `self` and `later`, in percent of one CPU:
    /// (server, this process, everything else on the machine).
    pub fn usage(&self, later: &CpuSnapshot) -> (f64, f64, f64) {
        let seconds = match (self.at, later.at) {
            (Some(a), Some(b)) => b.duration_since(a).as_secs_f64().max(1e-3),
            _ => return (0.0, 0.0, 0.0),
        };
        let pct = |ticks: u64| ticks as f64 / TICKS_PER_SECOND / seconds * 100.0;
        let server = later.server.saturating_sub(self.server);
        let own = later.own.saturating_sub(self.own);
        let busy = later.system_busy.saturating_sub(self.system_busy);
        (
            pct(server),
            pct(own),
            pct(busy.saturating_sub(server + own)),
        )
    }
}

fn system_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait.
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some(total - idle)
}

fn process_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may contain spaces: fields count from after its ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15, i.e. 12 and 13 after the state.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}
