//! The soak: opens and abandons sessions against duplex-chat's `/mirror` and
//! `/chat` in every way a peer can, then checks that the server is back
//! where it started: no session left (the `duplex_sessions` gauge of
//! `/metrics`) and its resident memory within a bound of the baseline.
//!
//! Each way of leaving is a phase of its own, so a leak is pinned to it:
//!
//! | mode | what the peer does |
//! |---|---|
//! | `rst` | a message, then `SO_LINGER` 0 and drop: a reset |
//! | `half-close` | a message, then shuts its write side and keeps the socket, reading |
//! | `close-then-drop` | a message, a Close frame, and drop without waiting for the answer |
//! | `never-read` | a 4 KiB receive buffer, never reads, and sends until the server's replies pile up |
//! | `no-pong` | keeps the socket, reads, never answers a ping |
//! | `mid-frame` | a frame header announcing 1000 bytes, 10 of them, drop |
//! | `mid-handshake` | half the upgrade request (or all of it, not waiting for the 101), drop |
//!
//! The peers of `half-close`, `never-read` and `no-pong` keep their sockets
//! for up to `--settle-secs`: the server must end those sessions itself
//! (FIN read, write timeout, ping timeout). If it does not, the peers drop
//! their sockets and the phase reports how long the rest took.
//!
//! Exits 0 only if every phase got back to zero sessions while its peers
//! still held their sockets, the gauge is 0 at the end, the resident memory
//! is within `--rss-bound-mib` of the baseline, the server holds no more
//! file descriptors than then (give or take a few), and all this took less
//! than `--time-limit-secs`. All traffic goes to 127.0.0.1 (or `--addr`).

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Parser;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::{Semaphore, watch},
    task::JoinSet,
};

use duplex_bench::{
    client::{self, OP_BINARY, OP_CLOSE, OP_TEXT},
    vm_rss_kib,
};

/// Opens and abandons sessions against duplex-chat in every way a peer can,
/// then checks that no session and no memory is left behind.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The duplex-chat binary to start (on a free loopback port).
    #[arg(long, conflicts_with = "addr", required_unless_present = "addr")]
    server: Option<PathBuf>,
    /// An argument for the server, e.g. `--server-arg=--ping-period=2`
    /// (repeat for several).
    #[arg(long = "server-arg", allow_hyphen_values = true)]
    server_args: Vec<String>,
    /// A running server instead of `--server`.
    #[arg(long)]
    addr: Option<SocketAddr>,
    /// The running server's pid, for its memory (with `--addr`).
    #[arg(long, requires = "addr")]
    pid: Option<u32>,
    /// Sessions in all, shared between the modes.
    #[arg(long, default_value_t = 10_000)]
    sessions: usize,
    /// Sessions being opened at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Seconds a phase may take to get back to zero sessions (while the
    /// peers that keep their sockets still hold them, and again after).
    #[arg(long, default_value_t = 60.0)]
    settle_secs: f64,
    /// How far above the baseline the server's resident memory may end.
    #[arg(long, default_value_t = 8.0)]
    rss_bound_mib: f64,
    /// How long, after the last session has ended, the server's memory may
    /// take to come back within the bound (it gives freed memory back to
    /// the system every few seconds).
    #[arg(long, default_value_t = 12.0)]
    memory_settle_secs: f64,
    /// The whole run must end within this many seconds.
    #[arg(long, default_value_t = 1800.0)]
    time_limit_secs: f64,
    /// Times to run every phase: memory that keeps growing round after
    /// round is a leak, memory that stays where the first round left it is
    /// the allocator keeping what it was given.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Only these modes (comma-separated); default every one.
    #[arg(long, value_delimiter = ',')]
    modes: Vec<String>,
    /// Where the started server's output goes.
    #[arg(long)]
    server_log: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Rst,
    HalfClose,
    CloseThenDrop,
    NeverRead,
    NoPong,
    MidFrame,
    MidHandshake,
}

const MODES: [Mode; 7] = [
    Mode::Rst,
    Mode::HalfClose,
    Mode::CloseThenDrop,
    Mode::NeverRead,
    Mode::NoPong,
    Mode::MidFrame,
    Mode::MidHandshake,
];

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Rst => "rst",
            Mode::HalfClose => "half-close",
            Mode::CloseThenDrop => "close-then-drop",
            Mode::NeverRead => "never-read",
            Mode::NoPong => "no-pong",
            Mode::MidFrame => "mid-frame",
            Mode::MidHandshake => "mid-handshake",
        }
    }

    /// Whether the peer keeps its socket until released.
    fn holds(self) -> bool {
        matches!(self, Mode::HalfClose | Mode::NeverRead | Mode::NoPong)
    }
}

/// Descriptors the server may hold above the baseline at the end (the
/// `/metrics` connection being served, a listener's accept in flight).
const FD_SLACK: usize = 4;

/// The server under test.
struct Target {
    addr: SocketAddr,
    pid: Option<u32>,
    child: Option<Child>,
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the peers of one phase saw.
#[derive(Default)]
struct Seen {
    /// Sessions opened as the mode wants (handshake done where it needs one).
    opened: AtomicUsize,
    /// Connections or handshakes that failed.
    failed: AtomicUsize,
    /// Held sockets the server closed (EOF or reset) while they were held.
    closed_by_server: AtomicUsize,
    /// `never-read` sockets that were quiet, not closed, when read at last.
    quiet: AtomicUsize,
    /// `never-read` sockets still receiving 10 s after being read at last.
    still_sending: AtomicUsize,
    /// Bytes the peers wrote.
    written: AtomicU64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: {e}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> Result<bool, String> {
    let started = Instant::now();
    let modes: Vec<Mode> = if args.modes.is_empty() {
        MODES.to_vec()
    } else {
        args.modes
            .iter()
            .map(|m| {
                MODES
                    .into_iter()
                    .find(|mode| mode.name() == m)
                    .ok_or_else(|| format!("unknown mode {m:?}"))
            })
            .collect::<Result<_, _>>()?
    };
    let target = start_target(&args).await?;
    let settle = Duration::from_secs_f64(args.settle_secs);
    println!(
        "soak: server {} (pid {}), {} sessions over {} modes, /mirror and /chat alternating",
        target.addr,
        target.pid.map_or("unknown".into(), |p| p.to_string()),
        args.sessions,
        modes.len()
    );
    let start_rss = rss_kib(&target);

    // Warm-up: clean sessions, so the baseline holds what any session costs
    // the allocator and the runtime once, not what a leak would add.
    let warm = clean_sessions(target.addr, 200.min(args.sessions.max(20))).await;
    let warm_zero = wait_zero(target.addr, settle, &target, &mut 0).await?;
    if warm_zero.is_none() {
        println!("soak: FAILED: the warm-up's clean sessions did not end");
        return Ok(false);
    }
    settle_allocator().await;
    let baseline = rss_kib(&target);
    let baseline_fds = fd_count(&target);
    println!(
        "soak: warm-up {warm} clean sessions; RSS {} KiB at start, baseline {} KiB, {} open fds",
        fmt_opt(start_rss),
        fmt_opt(baseline),
        fmt_opt(baseline_fds)
    );

    let per_mode = (args.sessions / modes.len()).max(1);
    let mut peak = baseline.unwrap_or(0);
    let mut ok = true;
    let mut after_rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        if args.rounds > 1 {
            println!("soak: round {round}");
        }
        for &mode in &modes {
            let seen = Arc::new(Seen::default());
            let (release, released) = watch::channel(false);
            let phase_start = Instant::now();
            let mut held = JoinSet::new();
            {
                let gate = Arc::new(Semaphore::new(args.concurrency.max(1)));
                let mut opening = JoinSet::new();
                for i in 0..per_mode {
                    let permit = gate.clone().acquire_owned().await.expect("semaphore");
                    let (seen, released, addr) = (seen.clone(), released.clone(), target.addr);
                    opening.spawn(async move {
                        let hold = abandon(addr, mode, i, &seen).await;
                        drop(permit);
                        hold.map(|h| (h, seen, released))
                    });
                    while let Some(done) = opening.try_join_next() {
                        if let Ok(Some((hold, seen, released))) = done {
                            held.spawn(hold_until_released(hold, mode, seen, released));
                        }
                    }
                }
                while let Some(done) = opening.join_next().await {
                    if let Ok(Some((hold, seen, released))) = done {
                        held.spawn(hold_until_released(hold, mode, seen, released));
                    }
                }
            }
            let opened_in = phase_start.elapsed();
            let mut phase_peak = 0;
            let zero_held = wait_zero(target.addr, settle, &target, &mut phase_peak).await?;
            let _ = release.send(true);
            while held.join_next().await.is_some() {}
            let zero_after = match zero_held {
                Some(_) => None,
                None => Some(wait_zero(target.addr, settle, &target, &mut phase_peak).await?),
            };
            peak = peak.max(phase_peak);
            let opened = seen.opened.load(Ordering::Relaxed);
            let failed = seen.failed.load(Ordering::Relaxed);
            let by_server = seen.closed_by_server.load(Ordering::Relaxed);
            let verdict = match (zero_held, zero_after) {
                (Some(t), _) => format!(
                    "0 sessions {:.1} s after the last was opened",
                    t.as_secs_f64()
                ),
                (None, Some(Some(t))) => {
                    ok = false;
                    format!(
                        "NOT CLEANED while the peers held their sockets ({} s); 0 sessions {:.1} s after they dropped them",
                        args.settle_secs,
                        t.as_secs_f64()
                    )
                }
                (None, _) => {
                    ok = false;
                    format!(
                        "NOT CLEANED: sessions left {} s after the peers dropped their sockets",
                        args.settle_secs
                    )
                }
            };
            let held_note = if mode == Mode::NeverRead {
                format!(
                    ", when read at last {by_server} closed by the server, {} quiet (open), {} still sending",
                    seen.quiet.load(Ordering::Relaxed),
                    seen.still_sending.load(Ordering::Relaxed)
                )
            } else if mode.holds() {
                format!(", {by_server}/{opened} held sockets closed by the server")
            } else {
                String::new()
            };
            if failed > 0 {
                ok = false;
            }
            println!(
                "soak: {:<15} {opened} opened in {:.1} s, {failed} failed, {} KiB written{held_note}; {verdict}; peak RSS {} KiB",
                mode.name(),
                opened_in.as_secs_f64(),
                seen.written.load(Ordering::Relaxed) >> 10,
                phase_peak
            );
        }

        settle_allocator().await;
        after_rounds.push(rss_kib(&target).unwrap_or(0));
    }
    if args.rounds > 1 {
        println!("soak: RSS after each round (KiB): {after_rounds:?}");
    }
    let final_count = sessions(target.addr).await?;
    settle_allocator().await;
    // The server gives freed memory back a few seconds after its sessions
    // end (duplex-chat trims every 5 s after a fall): wait for it, within
    // a bound.
    let mut after = rss_kib(&target);
    let settle_until = Instant::now() + Duration::from_secs_f64(args.memory_settle_secs);
    while let (Some(base), Some(now)) = (baseline, after)
        && now.saturating_sub(base) as f64 / 1024.0 > args.rss_bound_mib
        && Instant::now() < settle_until
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = rss_kib(&target);
    }
    let after_fds = fd_count(&target);
    let hwm = hwm_kib(&target);
    let elapsed = started.elapsed();
    println!(
        "soak: after: {final_count} sessions; RSS baseline {} KiB, peak {} KiB sampled ({} KiB VmHWM), after {} KiB; fds {} -> {}; {:.1} s in all",
        fmt_opt(baseline),
        peak,
        fmt_opt(hwm),
        fmt_opt(after),
        fmt_opt(baseline_fds),
        fmt_opt(after_fds),
        elapsed.as_secs_f64()
    );
    if let (Some(before), Some(after)) = (baseline_fds, after_fds)
        && after > before + FD_SLACK
    {
        println!("soak: FAILED: the server holds {after} fds, {before} at the baseline");
        ok = false;
    }
    if final_count != 0 {
        println!("soak: FAILED: {final_count} sessions left");
        ok = false;
    }
    if let (Some(base), Some(after)) = (baseline, after) {
        let grown_mib = after.saturating_sub(base) as f64 / 1024.0;
        if grown_mib > args.rss_bound_mib {
            println!(
                "soak: FAILED: RSS grew by {grown_mib:.1} MiB over the baseline (bound {} MiB)",
                args.rss_bound_mib
            );
            ok = false;
        }
    } else {
        println!("soak: RSS not checked (no pid: pass --pid with --addr)");
    }
    if elapsed.as_secs_f64() > args.time_limit_secs {
        println!(
            "soak: FAILED: took {:.0} s, over --time-limit-secs {}",
            elapsed.as_secs_f64(),
            args.time_limit_secs
        );
        ok = false;
    }
    println!("soak: {}", if ok { "ok" } else { "FAILED" });
    Ok(ok)
}

fn fmt_opt(v: Option<impl std::fmt::Display>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}

/// Freed memory goes back to the system a moment after the last session's
/// buffers are dropped (glibc trims on free, the runtime's tasks finish).
async fn settle_allocator() {
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn start_target(args: &Args) -> Result<Target, String> {
    if let Some(addr) = args.addr {
        return Ok(Target {
            addr,
            pid: args.pid,
            child: None,
        });
    }
    let program = args
        .server
        .as_ref()
        .expect("clap requires --server or --addr");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let log = match &args.server_log {
        Some(path) => Stdio::from(
            std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?,
        ),
        None => Stdio::null(),
    };
    // Through sh, to raise the open-file limit to the hard limit; sh execs
    // the server, so the pid is the server's.
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$@\"")
        .arg("sh")
        .arg(program)
        .args(["--addr", &addr.to_string()])
        .args(&args.server_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .map_err(|e| format!("{} did not start: {e}", program.display()))?;
    let mut target = Target {
        addr,
        pid: Some(child.id()),
        child: Some(child),
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(target);
        }
        if let Some(child) = &mut target.child
            && let Ok(Some(status)) = child.try_wait()
        {
            return Err(format!("{} exited: {status}", program.display()));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not listen on {addr} in 15 s",
                program.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rss_kib(target: &Target) -> Option<u64> {
    target.pid.and_then(|pid| vm_rss_kib(pid).ok())
}

fn hwm_kib(target: &Target) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", target.pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn fd_count(target: &Target) -> Option<usize> {
    Some(
        std::fs::read_dir(format!("/proc/{}/fd", target.pid?))
            .ok()?
            .count(),
    )
}

/// The server's `duplex_sessions` gauge (0 before any session).
async fn sessions(addr: SocketAddr) -> Result<i64, String> {
    let fetch = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: soak\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&body).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| "GET /metrics timed out".to_owned())?
        .map_err(|e| format!("GET /metrics: {e}"))?;
    if !text.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "GET /metrics: {}",
            text.lines().next().unwrap_or_default()
        ));
    }
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("duplex_sessions "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as i64))
}

/// Polls the gauge until it reads 0 (returns how long that took) or
/// `limit` passes (`None`); keeps the highest resident memory seen.
async fn wait_zero(
    addr: SocketAddr,
    limit: Duration,
    target: &Target,
    peak: &mut u64,
) -> Result<Option<Duration>, String> {
    let start = Instant::now();
    // Twice in a row: a session whose 101 the peer has read may not be
    // counted yet when the gauge is read the first time.
    let mut zero_since: Option<Duration> = None;
    loop {
        *peak = (*peak).max(rss_kib(target).unwrap_or(0));
        if sessions(addr).await? == 0 {
            match zero_since {
                Some(first) => return Ok(Some(first)),
                None => zero_since = Some(start.elapsed()),
            }
        } else {
            zero_since = None;
        }
        if start.elapsed() >= limit {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn upgrade_request(addr: SocketAddr, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        client::KEY
    )
}

fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    client::push_frame(&mut out, opcode, payload);
    out
}

/// Sessions that open, send a message, and close properly (Close, the
/// server's Close, EOF); returns how many did.
async fn clean_sessions(addr: SocketAddr, count: usize) -> usize {
    let mut set = JoinSet::new();
    for i in 0..count {
        set.spawn(async move {
            let path = if i.is_multiple_of(2) {
                "/mirror"
            } else {
                "/chat"
            };
            let (mut stream, _) =
                client::connect(addr, None, path, Duration::from_secs(10), "").await?;
            stream.write_all(&first_messages(path, "warm", i)).await?;
            stream
                .write_all(&frame(OP_CLOSE, &1000u16.to_be_bytes()))
                .await?;
            let mut sink = vec![0u8; 4096];
            tokio::time::timeout(Duration::from_secs(10), async {
                while stream.read(&mut sink).await? > 0 {}
                Ok::<_, std::io::Error>(())
            })
            .await
            .map_err(|_| std::io::Error::other("no EOF"))??;
            Ok::<_, std::io::Error>(())
        });
    }
    let mut ok = 0;
    while let Some(done) = set.join_next().await {
        if matches!(done, Ok(Ok(()))) {
            ok += 1;
        }
    }
    ok
}

/// What a session sends first: on /chat a name, a room and a line to it
/// (so the room's other members get it too), on /mirror a text to echo.
fn first_messages(path: &str, phase: &str, i: usize) -> Vec<u8> {
    let mut out = Vec::new();
    if path == "/chat" {
        for text in [
            format!(r#"{{"type":"hello","name":"{phase}-{i}"}}"#),
            r#"{"type":"join","room":"soak"}"#.to_owned(),
            format!(r#"{{"type":"message","room":"soak","text":"soak {phase} {i}"}}"#),
        ] {
            client::push_frame(&mut out, OP_TEXT, text.as_bytes());
        }
    } else {
        client::push_frame(&mut out, OP_TEXT, format!("soak {phase} {i}").as_bytes());
    }
    out
}

/// A socket the peer keeps until released.
struct Hold {
    stream: TcpStream,
}

/// Opens session `i` and leaves it the way `mode` says; returns the socket
/// if the mode keeps it.
async fn abandon(addr: SocketAddr, mode: Mode, i: usize, seen: &Seen) -> Option<Hold> {
    let path = if i.is_multiple_of(2) {
        "/mirror"
    } else {
        "/chat"
    };
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        abandon_inner(addr, mode, i, path, seen),
    )
    .await;
    match result {
        Ok(Ok(hold)) => {
            seen.opened.fetch_add(1, Ordering::Relaxed);
            hold
        }
        Ok(Err(e)) => {
            if seen.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("soak: {} session {i} on {path}: {e}", mode.name());
            }
            None
        }
        Err(_) => {
            if seen.failed.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("soak: {} session {i} on {path}: timed out", mode.name());
            }
            None
        }
    }
}

async fn abandon_inner(
    addr: SocketAddr,
    mode: Mode,
    i: usize,
    path: &str,
    seen: &Seen,
) -> std::io::Result<Option<Hold>> {
    let phase = mode.name();
    match mode {
        Mode::MidHandshake => {
            let mut stream = TcpStream::connect(addr).await?;
            let request = upgrade_request(addr, path).into_bytes();
            // Half the request, or all of it with no wait for the 101.
            let cut = if i % 4 < 2 {
                request.len() / 2
            } else {
                request.len()
            };
            send(seen, &mut stream, request[..cut].to_vec()).await?;
            if !i.is_multiple_of(2) {
                stream.set_zero_linger()?;
            }
            return Ok(None);
        }
        Mode::NeverRead => {
            let socket = TcpSocket::new_v4()?;
            socket.set_recv_buffer_size(4096)?;
            let mut stream = socket.connect(addr).await?;
            send(seen, &mut stream, upgrade_request(addr, path).into_bytes()).await?;
            read_101(&mut stream).await?;
            send(seen, &mut stream, first_messages(path, phase, i)).await?;
            // Replies the peer never reads: on /mirror 1 MiB echoed back, on
            // /chat the room's lines and answers to pings (rate limited, so
            // errors too). Written until the server stops reading, briefly.
            let mut burst = Vec::new();
            if path == "/mirror" {
                let chunk = vec![0x5a; 64 << 10];
                for _ in 0..16 {
                    client::push_frame(&mut burst, OP_BINARY, &chunk);
                }
            } else {
                for _ in 0..50 {
                    client::push_frame(&mut burst, OP_TEXT, br#"{"type":"ping"}"#);
                }
            }
            let _ =
                tokio::time::timeout(Duration::from_secs(2), send(seen, &mut stream, burst)).await;
            return Ok(Some(Hold { stream }));
        }
        _ => {}
    }
    let (mut stream, _) = client::connect(addr, None, path, Duration::from_secs(10), "").await?;
    send(seen, &mut stream, first_messages(path, phase, i)).await?;
    match mode {
        Mode::Rst => stream.set_zero_linger()?,
        Mode::HalfClose => {
            stream.shutdown().await?;
            return Ok(Some(Hold { stream }));
        }
        Mode::CloseThenDrop => {
            send(seen, &mut stream, frame(OP_CLOSE, &1000u16.to_be_bytes())).await?;
        }
        Mode::NoPong => return Ok(Some(Hold { stream })),
        Mode::MidFrame => {
            // FIN, binary, masked, 16-bit length 1000; 10 bytes follow.
            let mut partial = vec![0x82, 0x80 | 126, 0x03, 0xe8];
            partial.extend_from_slice(&client::MASK);
            partial.extend_from_slice(&[0u8; 10]);
            send(seen, &mut stream, partial).await?;
        }
        Mode::MidHandshake | Mode::NeverRead => unreachable!("handled above"),
    }
    Ok(None)
}

/// Writes `bytes`, counting them.
async fn send(seen: &Seen, stream: &mut TcpStream, bytes: Vec<u8>) -> std::io::Result<()> {
    seen.written
        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    stream.write_all(&bytes).await
}

async fn read_101(stream: &mut TcpStream) -> std::io::Result<()> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::Error::other("EOF during the handshake"));
        }
        head.push(byte[0]);
        if head.len() > 16 << 10 {
            return Err(std::io::Error::other("handshake response too long"));
        }
    }
    if head.starts_with(b"HTTP/1.1 101") {
        Ok(())
    } else {
        Err(std::io::Error::other("upgrade refused"))
    }
}

/// Keeps a held socket until `released`: reads and discards what comes
/// (never answering a ping), except in `never-read`, and counts it as
/// closed by the server on EOF or a reset.
async fn hold_until_released(
    mut hold: Hold,
    mode: Mode,
    seen: Arc<Seen>,
    mut released: watch::Receiver<bool>,
) {
    let mut sink = vec![0u8; 16 << 10];
    if mode == Mode::NeverRead {
        let _ = released.wait_for(|r| *r).await;
        // Now read: a socket the server closed ends (EOF or reset) once
        // the backlog its kernel still holds is drained; one it still keeps
        // goes quiet; one still sending after 10 s is neither.
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match tokio::time::timeout(Duration::from_millis(500), hold.stream.read(&mut sink))
                    .await
                {
                    Ok(Ok(0) | Err(_)) => return &seen.closed_by_server,
                    Ok(Ok(_)) => {}
                    Err(_) => return &seen.quiet,
                }
            }
        })
        .await
        .unwrap_or(&seen.still_sending);
        outcome.fetch_add(1, Ordering::Relaxed);
        return;
    }
    loop {
        tokio::select! {
            read = hold.stream.read(&mut sink) => match read {
                Ok(0) | Err(_) => {
                    seen.closed_by_server.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(_) => {}
            },
            _ = released.wait_for(|r| *r) => return,
        }
    }
}
