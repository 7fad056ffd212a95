//! The benchmark runner: starts each server pinned to one core, runs the load
//! generator pinned to the other, alternates the servers over rounds, and
//! prints one markdown table of medians and ratios, then the goals. The
//! same results go to `results.json` and SVG charts in `--charts DIR`;
//! `--replot` redraws both from such a file.
//!
//! ```text
//! cargo run --release -p duplex-bench -- --rounds 3 --duration 5
//! cargo run --release -p duplex-bench -- --smoke
//! cargo run --release -p duplex-bench -- --replot docs/bench/results.json
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use clap::Parser;
use serde::{Deserialize, Serialize};

use duplex_bench::{
    CpuSnapshot,
    charts::{self, BarChart, Series},
    report::{Outcome, median},
};

/// Runs the scenarios over every server and prints the table.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// Rounds; each runs every scenario over every server, in an order that
    /// rotates from round to round.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds measured per echo and broadcast run.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Seconds of warm-up before each measured run.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Idle connections of scenarios 5 and 8.
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Subscribers of scenarios 6 and 9.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Scenarios to run (1-11), comma-separated. 7-9 compare duplex with
    /// permessage-deflate against duplex without it: echo, idle
    /// connections, hub broadcast. 10: duplex-chat, one publisher and
    /// `--chat-subscribers` in one room, on one node without Redis, one
    /// with, and two nodes on Redis (needs `redis-server` on the PATH).
    /// 11: duplex's echo, 100 WebSockets on one HTTP/2 connection (RFC
    /// 8441) against 100 TCP connections of HTTP/1.1.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4,5,6,7,8,9,10,11")]
    scenarios: Vec<usize>,
    /// Subscribers of scenario 10.
    #[arg(long, default_value_t = 1000)]
    chat_subscribers: usize,
    /// Chat messages of scenario 10 in flight: sent and not yet delivered
    /// to every subscriber.
    #[arg(long, default_value_t = 16)]
    chat_window: u64,
    /// Servers to run, comma-separated: duplex, tokio-tungstenite,
    /// fastwebsockets, axum, raw-tcp, duplex-hub (broadcast only),
    /// duplex-deflate (scenarios 7 and 8), duplex-hub-deflate (scenario 9),
    /// chat-1-node, chat-1-node-redis, chat-2-nodes-redis (scenario 10;
    /// the two Redis ones start a redis-server of their own),
    /// duplex-http1, duplex-http2 (scenario 11).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "duplex,tokio-tungstenite,fastwebsockets,axum,raw-tcp,duplex-hub,duplex-deflate,duplex-hub-deflate,duplex-http1,duplex-http2,chat-1-node,chat-1-node-redis,chat-2-nodes-redis"
    )]
    servers: Vec<String>,
    /// Where the charts (SVG) and `results.json` go. Default: `docs/bench`,
    /// or a temporary folder for `--smoke`.
    #[arg(long)]
    charts: Option<PathBuf>,
    /// Write no charts and no `results.json`.
    #[arg(long)]
    no_charts: bool,
    /// Run nothing: read a `results.json` written by an earlier run, print
    /// its table and goals again and redraw its charts (into `--charts`,
    /// default the file's folder).
    #[arg(long, value_name = "FILE")]
    replot: Option<PathBuf>,
    /// Every server in every mode for about a second, tiny counts, no
    /// pinning; exits non-zero on any failure.
    #[arg(long)]
    smoke: bool,
    /// Do not run `cargo build` for the server and load binaries first.
    #[arg(long)]
    no_build: bool,
    /// Do not pin with taskset (server on CPU 0, load on CPU 1).
    #[arg(long)]
    no_pin: bool,
    /// The first port; every run listens on a port of its own from there.
    #[arg(long, default_value_t = 19_100)]
    base_port: u16,
    /// A run during which other processes used more than this much CPU
    /// (percent of one CPU) is noisy and run again, up to `--retries` times;
    /// the least noisy try counts.
    #[arg(long, default_value_t = 30.0)]
    max_other_cpu: f64,
    /// Tries beyond the first for a noisy run.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Seconds to wait, before each run, for other processes to use less
    /// than `--max-other-cpu` (the machine is shared).
    #[arg(long, default_value_t = 60.0)]
    quiet_wait: f64,
}

/// A server under test.
struct Server {
    name: &'static str,
    bin: &'static str,
    args: &'static [&'static str],
    echo: bool,
    broadcast: bool,
    /// Takes part in the deflate echo and idle scenarios (7, 8): duplex
    /// with and without permessage-deflate.
    deflate: bool,
    /// Takes part in the deflate broadcast (9): the hub with and without.
    deflate_hub: bool,
    /// The server without deflate that the "vs no deflate" column compares
    /// this one against.
    plain: Option<&'static str>,
    /// A duplex-chat cluster instead of one bench server (scenario 10).
    chat: Option<Chat>,
    /// Takes part in the echo over HTTP/2 (scenario 11): `Some(true)` has
    /// its WebSockets on one HTTP/2 connection, `Some(false)` one TCP
    /// connection (HTTP/1.1) each.
    http2: Option<bool>,
    /// The configuration the comparison table (scenarios 10 and up)
    /// compares this one against, measured in the same round.
    baseline: Option<&'static str>,
}

/// `duplex-chat` processes, on a redis-server of their own or not.
#[derive(Debug, Clone, Copy)]
struct Chat {
    /// Chat nodes: the subscribers on the last, the publisher on the first.
    nodes: usize,
    /// Every node gets `--redis-url` of one redis-server started for the run.
    redis: bool,
}

impl Server {
    /// Negotiates permessage-deflate.
    fn offers_deflate(&self) -> bool {
        self.args.contains(&"--deflate")
    }
}

const SERVERS: &[Server] = &[
    Server {
        name: "duplex",
        bin: "server-duplex",
        args: &[],
        echo: true,
        broadcast: true,
        deflate: true,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "tokio-tungstenite",
        bin: "server-tungstenite",
        args: &[],
        echo: true,
        broadcast: true,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "fastwebsockets",
        bin: "server-fastwebsockets",
        args: &[],
        echo: true,
        broadcast: true,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "axum",
        bin: "server-axum",
        args: &[],
        echo: true,
        broadcast: true,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "raw-tcp",
        bin: "server-rawtcp",
        args: &[],
        echo: true,
        broadcast: false,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "duplex-deflate",
        bin: "server-duplex",
        args: &["--deflate"],
        echo: false,
        broadcast: false,
        deflate: true,
        deflate_hub: false,
        plain: Some("duplex"),
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "duplex-hub",
        bin: "server-duplex",
        args: &["--hub"],
        echo: false,
        broadcast: true,
        deflate: false,
        deflate_hub: true,
        plain: None,
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "duplex-hub-deflate",
        bin: "server-duplex",
        args: &["--hub", "--deflate"],
        echo: false,
        broadcast: false,
        deflate: false,
        deflate_hub: true,
        plain: Some("duplex-hub"),
        chat: None,
        http2: None,
        baseline: None,
    },
    Server {
        name: "duplex-http1",
        bin: "server-duplex",
        args: &[],
        echo: false,
        broadcast: false,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: Some(false),
        baseline: None,
    },
    Server {
        name: "duplex-http2",
        bin: "server-duplex",
        args: &[],
        echo: false,
        broadcast: false,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: None,
        http2: Some(true),
        baseline: Some("duplex-http1"),
    },
    Server {
        name: "chat-1-node",
        bin: "duplex-chat",
        args: &[],
        echo: false,
        broadcast: false,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: Some(Chat {
            nodes: 1,
            redis: false,
        }),
        http2: None,
        baseline: None,
    },
    Server {
        name: "chat-1-node-redis",
        bin: "duplex-chat",
        args: &[],
        echo: false,
        broadcast: false,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: Some(Chat {
            nodes: 1,
            redis: true,
        }),
        http2: None,
        baseline: Some("chat-1-node"),
    },
    Server {
        name: "chat-2-nodes-redis",
        bin: "duplex-chat",
        args: &[],
        echo: false,
        broadcast: false,
        deflate: false,
        deflate_hub: false,
        plain: None,
        chat: Some(Chat {
            nodes: 2,
            redis: true,
        }),
        http2: None,
        baseline: Some("chat-1-node"),
    },
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Kind {
    Echo,
    Connections,
    Broadcast,
    /// An echo offering permessage-deflate: duplex with it against without.
    DeflateEcho,
    /// Idle connections that negotiated permessage-deflate and used it.
    DeflateIdle,
    /// The hub's broadcast to subscribers that negotiated permessage-deflate.
    DeflateBroadcast,
    /// duplex-chat's `/chat`: one publisher, N subscribers in one room, on
    /// one node or two.
    Chat,
    /// An echo of WebSockets on one HTTP/2 connection against as many TCP
    /// connections.
    Http2Echo,
}

/// A scenario: a title and the load generator's arguments.
struct Scenario {
    id: usize,
    title: String,
    kind: Kind,
    load_args: Vec<String>,
}

impl Scenario {
    /// The number that ratios compare.
    fn primary(&self) -> (&'static str, &'static str) {
        match self.kind {
            Kind::Echo | Kind::DeflateEcho | Kind::Http2Echo => ("msgs_per_s", "msg/s"),
            Kind::Connections | Kind::DeflateIdle => ("handshakes_per_s", "handshakes/s"),
            Kind::Broadcast | Kind::DeflateBroadcast | Kind::Chat => {
                ("deliveries_per_s", "deliveries/s")
            }
        }
    }

    fn runs_on(&self, server: &Server) -> bool {
        match self.kind {
            Kind::Echo | Kind::Connections => server.echo,
            Kind::Broadcast => server.broadcast,
            Kind::DeflateEcho | Kind::DeflateIdle => server.deflate,
            Kind::DeflateBroadcast => server.deflate_hub,
            Kind::Chat => server.chat.is_some(),
            Kind::Http2Echo => server.http2.is_some(),
        }
    }

    /// Reported in the comparison table (configurations against a
    /// baseline) instead of the table of peers.
    fn compares_configurations(&self) -> bool {
        matches!(self.kind, Kind::Chat | Kind::Http2Echo)
    }

    /// Compares servers with permessage-deflate against the same without.
    fn compares_deflate(&self) -> bool {
        matches!(
            self.kind,
            Kind::DeflateEcho | Kind::DeflateIdle | Kind::DeflateBroadcast
        )
    }

    /// Whether the load generator reports whether deflate was agreed.
    fn checks_deflate(&self) -> bool {
        matches!(self.kind, Kind::DeflateIdle | Kind::DeflateBroadcast)
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn scenarios(args: &Args) -> Vec<Scenario> {
    let (warmup, duration) = (args.warmup.to_string(), args.duration.to_string());
    let timed = |mut v: Vec<String>| {
        v.extend(strings(&["--warmup", &warmup, "--duration", &duration]));
        v
    };
    let echo = |c: &str, s: &str, binary: bool, p: &str| {
        let mut v = strings(&["echo", "--connections", c, "--size", s, "--in-flight", p]);
        if binary {
            v.push("--binary".to_owned());
        }
        timed(v)
    };
    let deflate_echo = |c: &str, s: &str, p: &str| {
        let mut v = echo(c, s, false, p);
        v.push("--deflate".to_owned());
        v
    };
    let broadcast = |n: &str, window: &str| {
        timed(strings(&[
            "broadcast",
            "--subscribers",
            n,
            "--size",
            "64",
            "--window",
            window,
        ]))
    };
    let deflate_broadcast = |n: &str, size: &str, every: &str| {
        timed(strings(&[
            "broadcast",
            "--subscribers",
            n,
            "--size",
            size,
            "--window",
            "64",
            "--deflate",
            "--inflate-every",
            every,
        ]))
    };
    let chat =
        |n: &str, window: &str| timed(strings(&["chat", "--subscribers", n, "--window", window]));
    let all: Vec<(usize, String, Kind, Vec<String>)> = if args.smoke {
        vec![
            (
                1,
                "echo 2 conns, 20 B text, 2 in flight".into(),
                Kind::Echo,
                echo("2", "20", false, "2"),
            ),
            (
                3,
                "echo 2 conns, 64 KiB binary, 2 in flight".into(),
                Kind::Echo,
                echo("2", "65536", true, "2"),
            ),
            (
                5,
                "50 idle connections".into(),
                Kind::Connections,
                strings(&[
                    "connections",
                    "--count",
                    "50",
                    "--settle-ms",
                    "100",
                    "--check",
                ]),
            ),
            (
                6,
                "broadcast 1 to 10 subscribers, 64 B".into(),
                Kind::Broadcast,
                broadcast("10", "8"),
            ),
            (
                7,
                "echo 2 conns, 4 KiB text, permessage-deflate offered".into(),
                Kind::DeflateEcho,
                deflate_echo("2", "4096", "2"),
            ),
            (
                8,
                "50 idle connections after 3 x 4 KiB text, permessage-deflate offered".into(),
                Kind::DeflateIdle,
                strings(&[
                    "connections",
                    "--count",
                    "50",
                    "--settle-ms",
                    "100",
                    "--check",
                    "--deflate",
                ]),
            ),
            (
                9,
                "broadcast 1 to 10 subscribers, 1 KiB compressible text, permessage-deflate offered"
                    .into(),
                Kind::DeflateBroadcast,
                deflate_broadcast("10", "1024", "2"),
            ),
            (
                10,
                "duplex-chat: 1 publisher, 20 subscribers in one room".into(),
                Kind::Chat,
                chat("20", "4"),
            ),
            (
                11,
                "echo 4 WebSockets, 20 B text, 2 in flight: HTTP/1.1 or HTTP/2".into(),
                Kind::Http2Echo,
                echo("4", "20", false, "2"),
            ),
        ]
    } else {
        let n = args.connections.to_string();
        let subs = args.subscribers.to_string();
        vec![
            (
                1,
                "echo 100 conns, 20 B text, 1 in flight".into(),
                Kind::Echo,
                echo("100", "20", false, "1"),
            ),
            (
                2,
                "echo 100 conns, 20 B text, 16 in flight".into(),
                Kind::Echo,
                echo("100", "20", false, "16"),
            ),
            (
                3,
                "echo 10 conns, 16 KiB binary, 4 in flight".into(),
                Kind::Echo,
                echo("10", "16384", true, "4"),
            ),
            (
                4,
                "echo 4 conns, 1 MiB binary, 1 in flight".into(),
                Kind::Echo,
                echo("4", "1048576", true, "1"),
            ),
            (
                5,
                format!("{n} idle connections"),
                Kind::Connections,
                strings(&["connections", "--count", &n]),
            ),
            (
                6,
                format!("broadcast 1 to {subs} subscribers, 64 B"),
                Kind::Broadcast,
                broadcast(&subs, "64"),
            ),
            (
                7,
                "echo 10 conns, 4 KiB compressible text, 4 in flight, permessage-deflate offered"
                    .into(),
                Kind::DeflateEcho,
                deflate_echo("10", "4096", "4"),
            ),
            (
                8,
                format!(
                    "{n} idle connections after 3 x 4 KiB compressible text, permessage-deflate offered"
                ),
                Kind::DeflateIdle,
                strings(&["connections", "--count", &n, "--deflate"]),
            ),
            (
                9,
                format!(
                    "broadcast 1 to {subs} subscribers, 1 KiB compressible text, permessage-deflate offered"
                ),
                Kind::DeflateBroadcast,
                deflate_broadcast(&subs, "1024", "8"),
            ),
            (
                10,
                format!(
                    "duplex-chat: 1 publisher, {} subscribers in one room, {} in flight",
                    args.chat_subscribers, args.chat_window
                ),
                Kind::Chat,
                chat(
                    &args.chat_subscribers.to_string(),
                    &args.chat_window.to_string(),
                ),
            ),
            (
                11,
                "echo 100 WebSockets, 20 B text, 1 in flight: 100 TCP connections (HTTP/1.1) or one HTTP/2 connection"
                    .into(),
                Kind::Http2Echo,
                echo("100", "20", false, "1"),
            ),
        ]
    };
    all.into_iter()
        .filter(|(id, ..)| args.smoke || args.scenarios.contains(id))
        .map(|(id, title, kind, load_args)| Scenario {
            id,
            title,
            kind,
            load_args,
        })
        .collect()
}

/// One run's result.
type Runs = BTreeMap<(usize, &'static str), Vec<Option<Outcome>>>;

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.smoke {
        args.rounds = 1;
        args.warmup = args.warmup.min(0.1);
        args.duration = args.duration.min(0.2);
        args.no_pin = true;
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(err) => {
            eprintln!("duplex-bench: {err}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    if let Some(file) = &args.replot {
        return replot(file, args);
    }
    let started = Instant::now();
    let dir = bin_dir()?;
    if !args.no_build {
        build(&dir)?;
    }
    let servers: Vec<&Server> = SERVERS
        .iter()
        .filter(|s| args.servers.iter().any(|n| n == s.name))
        .collect();
    if servers.is_empty() {
        return Err("no known server selected".into());
    }
    let scenarios = scenarios(args);
    let pin = !args.no_pin && can_pin();
    if !args.no_pin && !pin {
        eprintln!("note: taskset or a second CPU is missing; running unpinned");
    }
    let mut runs: Runs = BTreeMap::new();
    let mut port = args.base_port;
    let mut all_ok = true;
    for round in 0..args.rounds {
        for scenario in &scenarios {
            let mut order: Vec<&Server> = servers
                .iter()
                .copied()
                .filter(|s| scenario.runs_on(s))
                .collect();
            if order.is_empty() {
                continue;
            }
            // Alternate: rotate by the round, and reverse every other round.
            let len = order.len();
            order.rotate_left(round % len);
            if round % 2 == 1 {
                order.reverse();
            }
            for server in order {
                let result = run_quietly(&dir, server, scenario, &mut port, pin, args);
                match &result {
                    Ok(outcome) => {
                        let (key, unit) = scenario.primary();
                        let c = |k: &str| outcome.get(k).unwrap_or(f64::NAN);
                        eprintln!(
                            "round {} scenario {} {:<18} {:>12.0} {unit}  (CPU % server {:.0}, load {:.0}, others {:.0})",
                            round + 1,
                            scenario.id,
                            server.name,
                            c(key),
                            c("server_cpu"),
                            c("load_cpu"),
                            c("other_cpu"),
                        );
                    }
                    Err(err) => {
                        all_ok = false;
                        eprintln!(
                            "round {} scenario {} {:<18} FAILED: {err}",
                            round + 1,
                            scenario.id,
                            server.name
                        );
                    }
                }
                runs.entry((scenario.id, server.name))
                    .or_default()
                    .push(result.ok());
            }
        }
    }
    let results = Results {
        machine: machine(),
        command: command_line(),
        rounds: args.rounds,
        seconds: started.elapsed().as_secs_f64(),
        smoke: args.smoke,
        scenarios: scenarios
            .iter()
            .map(|s| ScenarioInfo {
                id: s.id,
                title: s.title.clone(),
                kind: s.kind,
            })
            .collect(),
        servers: servers.iter().map(|s| s.name.to_owned()).collect(),
        runs: runs
            .iter()
            .map(|(&(scenario, server), outcomes)| RunRecord {
                scenario,
                server: server.to_owned(),
                outcomes: outcomes.clone(),
            })
            .collect(),
    };
    print!("{}", report(&results));
    let charts_ok = match charts_dir(args, None) {
        Some(dir) => match write_results(&results, &dir) {
            Ok(()) => {
                eprintln!("charts and results.json in {}", dir.display());
                true
            }
            Err(err) => {
                eprintln!("duplex-bench: {err}");
                false
            }
        },
        None => true,
    };
    if args.smoke {
        println!(
            "smoke: {} in {:.1} s",
            if all_ok && charts_ok { "ok" } else { "FAILED" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(all_ok && charts_ok)
}

/// Everything a run measured, as `results.json` keeps it.
#[derive(Debug, Serialize, Deserialize)]
struct Results {
    /// The machine line of the table (model, CPUs, memory, kernel, rustc, date).
    machine: String,
    command: String,
    rounds: usize,
    seconds: f64,
    smoke: bool,
    scenarios: Vec<ScenarioInfo>,
    servers: Vec<String>,
    runs: Vec<RunRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ScenarioInfo {
    id: usize,
    title: String,
    kind: Kind,
}

/// One scenario on one server: an outcome per round, `None` where it failed.
#[derive(Debug, Serialize, Deserialize)]
struct RunRecord {
    scenario: usize,
    server: String,
    outcomes: Vec<Option<Outcome>>,
}

impl Results {
    fn scenarios(&self) -> Vec<Scenario> {
        self.scenarios
            .iter()
            .map(|s| Scenario {
                id: s.id,
                title: s.title.clone(),
                kind: s.kind,
                load_args: Vec::new(),
            })
            .collect()
    }

    /// The servers, in the run's order; names this runner does not know
    /// are left out.
    fn servers(&self) -> Vec<&'static Server> {
        self.servers
            .iter()
            .filter_map(|n| SERVERS.iter().find(|s| s.name == n))
            .collect()
    }

    fn runs(&self) -> Runs {
        self.runs
            .iter()
            .filter_map(|r| Some(((r.scenario, leak_name(&r.server)?), r.outcomes.clone())))
            .collect()
    }
}

/// The markdown: machine, command, table, goals.
fn report(results: &Results) -> String {
    let runs = results.runs();
    let mut out = results.machine.clone();
    let _ = writeln!(
        out,
        "Command: `{}` ({} round(s), {:.0} s, rounds alternate the servers; medians)\n",
        results.command, results.rounds, results.seconds
    );
    let (configurations, peers): (Vec<Scenario>, Vec<Scenario>) = results
        .scenarios()
        .into_iter()
        .partition(Scenario::compares_configurations);
    if !peers.is_empty() {
        out.push_str(&table(&peers, &results.servers(), &runs));
    }
    if !configurations.is_empty() {
        out.push_str(&configurations_table(
            &configurations,
            &results.servers(),
            &runs,
        ));
    }
    if !results.smoke && !peers.is_empty() {
        out.push_str(&goals(&runs));
    }
    out
}

/// Where charts go: `--charts`, else the replotted file's folder, else
/// `docs/bench` (a temporary folder for the smoke run); `None` with
/// `--no-charts`.
fn charts_dir(args: &Args, replotted: Option<&Path>) -> Option<PathBuf> {
    if args.no_charts {
        return None;
    }
    if let Some(dir) = &args.charts {
        return Some(dir.clone());
    }
    if let Some(file) = replotted {
        return Some(
            file.parent()
                .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        );
    }
    Some(if args.smoke {
        // One folder, overwritten by every smoke run, so that CI's runs do
        // not pile up.
        std::env::temp_dir().join("duplex-bench-smoke")
    } else {
        PathBuf::from("docs/bench")
    })
}

/// Writes `results.json` and the charts into `dir`.
fn write_results(results: &Results, dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = serde_json::to_string_pretty(results).map_err(|e| e.to_string())?;
    let file = dir.join("results.json");
    std::fs::write(&file, json + "\n").map_err(|e| format!("{}: {e}", file.display()))?;
    draw_charts(results, dir)
}

/// `--replot FILE`: the table, the goals and the charts of a saved run.
fn replot(file: &Path, args: &Args) -> Result<bool, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let results: Results =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    print!("{}", report(&results));
    if let Some(dir) = charts_dir(args, Some(file)) {
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        draw_charts(&results, &dir)?;
        eprintln!("charts in {}", dir.display());
    }
    Ok(true)
}

/// The charts' caption: the CPU, the kernel and the date of the run.
fn caption(results: &Results) -> String {
    let line = results.machine.trim().trim_start_matches("Machine: ");
    let (what, date) = line.rsplit_once("; ").unwrap_or((line, ""));
    let what = what.split(", rustc").next().unwrap_or(what);
    format!(
        "duplex-bench, {} round(s) · {what} · {date}",
        results.rounds
    )
}

/// The peers of the ratio chart, in its legend's order.
const PEERS: [&str; 4] = ["tokio-tungstenite", "fastwebsockets", "axum", "raw-tcp"];

/// The three charts: `ratios.svg`, `latency.svg`, `memory.svg`.
fn draw_charts(results: &Results, dir: &Path) -> Result<(), String> {
    let runs = results.runs();
    let scenarios = results.scenarios();
    let servers = results.servers();
    let caption = caption(results);
    let write = |name: &str, charts: &[BarChart], columns: usize, panel: (u32, u32)| {
        let path = dir.join(name);
        charts::write_svg(&path, &caption, charts, columns, panel)
            .map_err(|e| format!("{}: {e}", path.display()))
    };

    // (a) duplex's throughput over each peer's, per scenario.
    let compared: Vec<&Scenario> = scenarios
        .iter()
        .filter(|s| matches!(s.kind, Kind::Echo | Kind::Connections | Kind::Broadcast))
        .collect();
    let series: Vec<Series> = PEERS
        .iter()
        .map(|peer| Series {
            name: format!("vs {peer}"),
            values: compared
                .iter()
                .map(|s| ratio(&runs, s.id, "duplex", &[peer], s.primary().0))
                .collect(),
        })
        .filter(|s| s.values.iter().any(Option::is_some))
        .collect();
    let ratios = BarChart {
        title: "duplex's throughput over each peer's (median of per-round ratios)".into(),
        y_label: "ratio, x (log scale)".into(),
        x_label: "scenario (msg/s; S5 handshakes/s; S6 deliveries/s)".into(),
        groups: compared.iter().map(|s| format!("S{}", s.id)).collect(),
        series,
        reference: Some((1.0, "1.0x: as fast as the peer".into())),
        value_labels: true,
    };
    write("ratios.svg", &[ratios], 1, (1000, 520))?;

    // (b) round-trip latency percentiles, one panel per echo scenario.
    let panels: Vec<BarChart> = scenarios
        .iter()
        .filter(|s| matches!(s.kind, Kind::Echo | Kind::DeflateEcho))
        .map(|s| {
            let ran: Vec<&&Server> = servers
                .iter()
                .filter(|srv| runs.contains_key(&(s.id, srv.name)))
                .collect();
            let percentile = |label: &str, key: &str| Series {
                name: label.into(),
                values: ran
                    .iter()
                    .map(|srv| median_of(&runs, s.id, srv.name, key))
                    .collect(),
            };
            BarChart {
                title: format!("S{}: {}", s.id, s.title),
                y_label: "round-trip latency, µs (log scale)".into(),
                x_label: "server".into(),
                groups: ran.iter().map(|srv| srv.name.to_owned()).collect(),
                series: vec![
                    percentile("p50", "p50_us"),
                    percentile("p99", "p99_us"),
                    percentile("p99.9", "p999_us"),
                ],
                reference: None,
                value_labels: false,
            }
        })
        .collect();
    if !panels.is_empty() {
        write("latency.svg", &panels, 2, (720, 420))?;
    }

    // (c) server memory per idle connection: S5 per server, S8 duplex with
    // and without permessage-deflate; a series per scenario.
    let mut groups = Vec::new();
    let mut series = Vec::new();
    for s in scenarios
        .iter()
        .filter(|s| matches!(s.kind, Kind::Connections | Kind::DeflateIdle))
    {
        let mut values = vec![None; groups.len()];
        for srv in servers.iter().filter(|srv| s.runs_on(srv)) {
            if let Some(v) = median_of(&runs, s.id, srv.name, "kib_per_conn") {
                let name = match (s.kind, srv.name) {
                    (Kind::DeflateIdle, "duplex") => "duplex (no deflate)",
                    (_, name) => name,
                };
                groups.push(format!("S{} {name}", s.id));
                values.push(Some(v.max(0.01)));
            }
        }
        let name = match s.kind {
            Kind::DeflateIdle => format!("S{}: idle after 3 x 4 KiB each way", s.id),
            _ => format!("S{}: idle after the handshake", s.id),
        };
        series.push(Series { name, values });
    }
    for s in &mut series {
        s.values.resize(groups.len(), None);
    }
    if !groups.is_empty() {
        let memory = BarChart {
            title: "server memory per idle connection: (VmRSS after - before) / N".into(),
            y_label: "KiB per connection (log scale)".into(),
            x_label: "scenario and server".into(),
            groups,
            series,
            reference: None,
            value_labels: true,
        };
        write("memory.svg", &[memory], 1, (1100, 520))?;
    }
    Ok(())
}

/// The command that reproduces this run (the script passes `--no-build`).
fn command_line() -> String {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--no-build")
        .collect();
    format!("cargo run --release -p duplex-bench -- {}", args.join(" "))
        .trim_end()
        .to_owned()
}

/// The directory of this binary, where the server and load binaries are.
fn bin_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("no current exe: {e}"))?;
    exe.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| "the current exe has no directory".into())
}

/// Builds the other binaries of this package with the profile of this one.
fn build(dir: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    // duplex-chat for scenario 10.
    command.args([
        "build",
        "--quiet",
        "-p",
        "duplex-bench",
        "-p",
        "duplex-chat",
        "--bins",
    ]);
    if dir.file_name().is_some_and(|n| n == "release") {
        command.arg("--release");
    }
    if std::env::var_os("CARGO_TARGET_DIR").is_none()
        && let Some(target) = dir.parent()
    {
        command.env("CARGO_TARGET_DIR", target);
    }
    let status = command
        .status()
        .map_err(|e| format!("cargo build did not start: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build failed: {status}"))
    }
}

fn can_pin() -> bool {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    cpus >= 2
        && Command::new("taskset")
            .args(["-c", "0", "true"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// A command that raises the open-file limit to the hard limit, then runs
/// `program` (pinned to `cpu` if given).
fn command(program: &Path, args: &[String], cpu: Option<usize>) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("ulimit -n \"$(ulimit -Hn)\" 2>/dev/null; exec \"$@\"")
        .arg("sh");
    if let Some(cpu) = cpu {
        command.args(["taskset", "-c", &cpu.to_string()]);
    }
    command.arg(program).args(args);
    command
}

/// Kills the child on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for a quiet machine, runs, and runs again (up to `--retries`
/// times) while other processes took more CPU than `--max-other-cpu`.
fn run_quietly(
    dir: &Path,
    server: &Server,
    scenario: &Scenario,
    port: &mut u16,
    pin: bool,
    args: &Args,
) -> Result<Outcome, String> {
    let mut best: Option<Outcome> = None;
    for attempt in 0..=args.retries {
        if !args.smoke {
            wait_quiet(args);
        }
        *port = next_free_port(*port, args.base_port);
        let outcome = match server.chat {
            Some(chat) => run_chat(dir, chat, scenario, port, pin, args)?,
            None => run_one(dir, server, scenario, *port, pin, args)?,
        };
        let other = outcome.get("other_cpu").unwrap_or(0.0);
        let best_other = best
            .as_ref()
            .and_then(|b| b.get("other_cpu"))
            .unwrap_or(f64::INFINITY);
        if other < best_other {
            best = Some(outcome);
        }
        if args.smoke || other <= args.max_other_cpu {
            break;
        }
        if attempt < args.retries {
            eprintln!(
                "  noisy: other processes used {other:.0}% CPU during {} on scenario {}; again",
                server.name, scenario.id
            );
        }
    }
    best.ok_or_else(|| "no run".into())
}

/// Waits up to `--quiet-wait` seconds until the machine is idle.
fn wait_quiet(args: &Args) {
    let deadline = Instant::now() + Duration::from_secs_f64(args.quiet_wait);
    let mut told = false;
    loop {
        let before = CpuSnapshot::take(None);
        std::thread::sleep(Duration::from_millis(300));
        let (_, _, busy) = before.usage(&CpuSnapshot::take(None));
        if busy <= args.max_other_cpu || Instant::now() >= deadline {
            if told {
                eprintln!("  quiet again ({busy:.0}% CPU busy)");
            }
            return;
        }
        if !told {
            eprintln!("  waiting for a quiet machine ({busy:.0}% CPU busy)");
            told = true;
        }
    }
}

fn run_one(
    dir: &Path,
    server: &Server,
    scenario: &Scenario,
    port: u16,
    pin: bool,
    args: &Args,
) -> Result<Outcome, String> {
    let addr = format!("127.0.0.1:{port}");
    let mut server_args = strings(server.args);
    server_args.extend(["--addr".to_owned(), addr.clone()]);
    let mut child = command(&dir.join(server.bin), &server_args, pin.then_some(0))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("{} did not start: {e}", server.bin))?;
    let stdout = child.stdout.take().expect("piped");
    let mut guard = Guard(child);
    // `sh` execs the server (and taskset execs it too): same pid.
    let server_pid = guard.0.id();
    wait_listening(stdout, Duration::from_secs(10))?;
    if let Ok(Some(status)) = guard.0.try_wait() {
        return Err(format!("{} exited: {status}", server.bin));
    }

    let mut load_args = vec!["--addr".to_owned(), addr];
    let mut scenario_args = scenario.load_args.clone();
    if server.http2 == Some(true)
        && let Some(mode) = scenario_args.first_mut()
    {
        // The same echo, its WebSockets on one HTTP/2 connection.
        "echo-h2".clone_into(mode);
    }
    load_args.extend(scenario_args);
    load_args.extend(["--server-pid".to_owned(), server_pid.to_string()]);
    let path = if matches!(scenario.kind, Kind::Broadcast | Kind::DeflateBroadcast) {
        "/broadcast"
    } else {
        "/mirror"
    };
    load_args.extend(["--path".to_owned(), path.to_owned()]);
    let load = command(&dir.join("load"), &load_args, pin.then_some(1))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("load did not start: {e}"))?;
    let limit = Duration::from_secs_f64(args.warmup + args.duration + 120.0);
    let output = wait_output(load, limit)?;
    if let Ok(Some(status)) = guard.0.try_wait() {
        return Err(format!("{} died during the run: {status}", server.bin));
    }
    drop(guard);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "load failed ({}): {}",
            output.status,
            stderr.trim()
        ));
    }
    let line = stdout.lines().last().unwrap_or_default();
    let outcome: Outcome =
        serde_json::from_str(line).map_err(|e| format!("unreadable load output {line:?}: {e}"))?;
    if scenario.checks_deflate() {
        // A deflate server that stopped negotiating would otherwise pass as
        // a cheap one.
        let agreed = outcome.get("deflate").unwrap_or(0.0);
        let expected = if server.offers_deflate() { 1.0 } else { 0.0 };
        if agreed != expected {
            return Err(format!(
                "permessage-deflate agreed on {:.0}% of the connections, expected {:.0}%",
                agreed * 100.0,
                expected * 100.0
            ));
        }
        let compressed = outcome
            .get("compressed_echoes")
            .or_else(|| outcome.get("compressed_share"))
            .unwrap_or(0.0);
        if server.offers_deflate() && compressed <= 0.0 {
            return Err("permessage-deflate agreed, but nothing came back compressed".into());
        }
    }
    Ok(outcome)
}

/// Scenario 10 on one configuration: a redis-server of its own (if the
/// configuration has one), the chat nodes, then the load generator with
/// the publisher on the first node and the subscribers on the last. Every
/// server-side process runs on CPU 0 (pinned), so that each configuration
/// has the same CPU to spend; the load's CPU figure for the server is their
/// sum. Takes ports from `port` on.
fn run_chat(
    dir: &Path,
    chat: Chat,
    scenario: &Scenario,
    port: &mut u16,
    pin: bool,
    args: &Args,
) -> Result<Outcome, String> {
    let server_cpu = pin.then_some(0);
    let mut guards = Vec::new();
    let mut redis_pid = None;
    let mut node_args = strings(&[
        // The bench connections all come from 127.0.0.1 and send as fast as
        // the window lets them: lift /chat's per-connection rate limit and
        // the per-address and per-room caps (all on by default).
        "--rate",
        "0",
        "--max-members",
        "100000",
        "--max-users",
        "100000",
        "--max-sessions",
        "100000",
        "--max-sessions-per-ip",
        "0",
        "--handshake-rate",
        "0",
        // No server pings: the load generator does not answer them.
        "--ping-period",
        "0",
    ]);
    if chat.redis {
        let redis_port = *port;
        let child = command(
            Path::new("redis-server"),
            &strings(&[
                "--port",
                &redis_port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]),
            server_cpu,
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("redis-server did not start: {e}"))?;
        let mut guard = Guard(child);
        wait_redis(&mut guard.0, redis_port, Duration::from_secs(10))?;
        redis_pid = Some(guard.0.id());
        guards.push(guard);
        node_args.extend([
            "--redis-url".to_owned(),
            format!("redis://127.0.0.1:{redis_port}/"),
        ]);
        *port = next_free_port(*port, args.base_port);
    }
    let mut nodes = Vec::new();
    for i in 0..chat.nodes.max(1) {
        if i > 0 {
            *port = next_free_port(*port, args.base_port);
        }
        let addr = format!("127.0.0.1:{port}");
        let mut own = vec!["--addr".to_owned(), addr.clone()];
        own.extend(node_args.iter().cloned());
        let child = command(&dir.join("duplex-chat"), &own, server_cpu)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("duplex-chat did not start: {e}"))?;
        let mut guard = Guard(child);
        wait_tcp(&mut guard.0, "duplex-chat", *port, Duration::from_secs(10))?;
        nodes.push((addr, guard.0.id()));
        guards.push(guard);
    }
    let (first, first_pid) = nodes.first().cloned().expect("one node at least");
    let (last, _) = nodes.last().cloned().expect("one node at least");
    let mut load_args = vec![
        "--addr".to_owned(),
        first,
        "--server-pid".to_owned(),
        first_pid.to_string(),
    ];
    for pid in nodes.iter().skip(1).map(|(_, pid)| *pid).chain(redis_pid) {
        load_args.extend(["--also-pid".to_owned(), pid.to_string()]);
    }
    load_args.extend(scenario.load_args.iter().cloned());
    load_args.extend(["--subscribe-addr".to_owned(), last]);
    let load = command(&dir.join("load"), &load_args, pin.then_some(1))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("load did not start: {e}"))?;
    let limit = Duration::from_secs_f64(args.warmup + args.duration + 120.0);
    let output = wait_output(load, limit)?;
    for guard in &mut guards {
        if let Ok(Some(status)) = guard.0.try_wait() {
            return Err(format!(
                "a server process (pid {}) died during the run: {status}",
                guard.0.id()
            ));
        }
    }
    drop(guards);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "load failed ({}): {}",
            output.status,
            stderr.trim()
        ));
    }
    let line = stdout.lines().last().unwrap_or_default();
    let outcome: Outcome =
        serde_json::from_str(line).map_err(|e| format!("unreadable load output {line:?}: {e}"))?;
    if outcome.get("dropped").unwrap_or(0.0) > 0.0 {
        // The chat promises every member every message: a loss is a
        // failure, not a figure.
        return Err(format!(
            "{:.0} chat message(s) never reached a subscriber",
            outcome.get("dropped").unwrap_or(0.0)
        ));
    }
    Ok(outcome)
}

/// Waits until something accepts TCP connections on 127.0.0.1:`port`,
/// failing if `child` exits first.
fn wait_tcp(child: &mut Child, what: &str, port: u16, limit: Duration) -> Result<(), String> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("{what} exited before listening: {status}"));
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{what} did not listen on port {port} in time"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the redis-server on `port` answers `PING`.
fn wait_redis(child: &mut Child, port: u16, limit: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "redis-server exited before listening ({status}); is it installed?"
            ));
        }
        let pong = std::net::TcpStream::connect(("127.0.0.1", port))
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                s.write_all(b"PING\r\n")?;
                let mut buf = [0u8; 7];
                s.read_exact(&mut buf)?;
                Ok(buf == *b"+PONG\r\n")
            })
            .unwrap_or(false);
        if pong {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "redis-server did not answer PING on port {port} in time"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_listening(stdout: std::process::ChildStdout, limit: Duration) -> Result<(), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .any(|l| l.starts_with("listening on"));
        let _ = tx.send(ready);
        // Keep draining so the server never blocks on a full pipe.
        for _ in lines {}
    });
    match rx.recv_timeout(limit) {
        Ok(true) => Ok(()),
        Ok(false) => Err("the server exited before listening".into()),
        Err(_) => Err("the server did not listen in time".into()),
    }
}

fn wait_output(mut child: Child, limit: Duration) -> Result<std::process::Output, String> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => {
                return child
                    .wait_with_output()
                    .map_err(|e| format!("load output: {e}"));
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "load ran past {:.0} s; killed",
                    limit.as_secs_f64()
                ));
            }
            Err(e) => return Err(format!("waiting for load: {e}")),
        }
    }
}

/// The next port after `port` that nothing on 127.0.0.1 listens on (a
/// port still held by another process would make the server fail to start).
fn next_free_port(mut port: u16, base: u16) -> u16 {
    for _ in 0..1000 {
        port = if port >= 60_000 { base } else { port + 1 };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    port
}

// ---- the report ----

/// The median over rounds of a metric.
fn median_of(runs: &Runs, scenario: usize, server: &str, key: &str) -> Option<f64> {
    let values: Vec<f64> = runs
        .get(&(scenario, leak_name(server)?))?
        .iter()
        .flatten()
        .filter_map(|o| o.get(key))
        .collect();
    median(&values)
}

/// The `&'static` name of a known server.
fn leak_name(name: &str) -> Option<&'static str> {
    SERVERS.iter().map(|s| s.name).find(|n| *n == name)
}

/// Per round: `a`'s metric over the largest of `bs`' in that same round;
/// the median of those ratios.
fn ratio(runs: &Runs, scenario: usize, a: &str, bs: &[&str], key: &str) -> Option<f64> {
    let of =
        |name: &str| -> Option<&Vec<Option<Outcome>>> { runs.get(&(scenario, leak_name(name)?)) };
    let a_runs = of(a)?;
    let b_runs: Vec<&Vec<Option<Outcome>>> = bs.iter().filter_map(|b| of(b)).collect();
    if b_runs.is_empty() {
        return None;
    }
    let ratios: Vec<f64> = (0..a_runs.len())
        .filter_map(|round| {
            let a = a_runs.get(round)?.as_ref()?.get(key)?;
            let b = b_runs
                .iter()
                .filter_map(|r| r.get(round)?.as_ref()?.get(key))
                .fold(f64::NAN, f64::max);
            (b > 0.0).then(|| a / b)
        })
        .collect();
    median(&ratios)
}

fn num(v: Option<f64>) -> String {
    let Some(v) = v else {
        return "—".into();
    };
    if v.abs() >= 1000.0 {
        let digits = format!("{:.0}", v.abs());
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if v < 0.0 { format!("-{out}") } else { out }
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn times(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.2}x"))
}

fn table(scenarios: &[Scenario], servers: &[&Server], runs: &Runs) -> String {
    let mut out = String::new();
    out.push_str(
        "| # | Scenario | Server | Result | MB/s | p50 µs | p99 µs | p99.9 µs | KiB/conn \
         | vs tokio-tungstenite | vs fastwebsockets | vs raw TCP | vs no deflate | spread | CPU % srv/load/other | srv µs/op |\n",
    );
    out.push_str(
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for scenario in scenarios {
        let (key, unit) = scenario.primary();
        for server in servers.iter().filter(|s| scenario.runs_on(s)) {
            let Some(outcomes) = runs.get(&(scenario.id, server.name)) else {
                continue;
            };
            let m = |k: &str| median_of(runs, scenario.id, server.name, k);
            let primary: Vec<f64> = outcomes
                .iter()
                .flatten()
                .filter_map(|o| o.get(key))
                .collect();
            let failed = outcomes.iter().filter(|o| o.is_none()).count();
            let result = match m(key) {
                Some(v) if failed == 0 => format!("{} {unit}", num(Some(v))),
                Some(v) => format!("{} {unit} ({failed} failed)", num(Some(v))),
                None => "FAILED".into(),
            };
            let spread = match (median(&primary), primary.len()) {
                (Some(mid), 2..) if mid > 0.0 => {
                    let max = primary.iter().copied().fold(f64::MIN, f64::max);
                    let min = primary.iter().copied().fold(f64::MAX, f64::min);
                    format!("±{:.0}%", (max - min) / mid * 50.0)
                }
                _ => "—".into(),
            };
            let pct = |k: &str| m(k).map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"));
            let cpu = format!(
                "{}/{}/{}",
                pct("server_cpu"),
                pct("load_cpu"),
                pct("other_cpu")
            );
            // Server CPU per message, handshake or delivery: steadier than
            // throughput on a shared machine.
            let per_op = match (m("server_cpu"), m(key)) {
                (Some(cpu), Some(v)) if v > 0.0 => format!("{:.2}", cpu * 1e4 / v),
                _ => "—".into(),
            };
            let vs = |peer: &str| times(ratio(runs, scenario.id, server.name, &[peer], key));
            let plain = match (server.plain, server.offers_deflate()) {
                (Some(plain), _) => vs(plain),
                (None, false)
                    if scenario.compares_deflate()
                        && servers.iter().any(|s| s.plain == Some(server.name)) =>
                {
                    "1.00x".to_owned()
                }
                _ => "—".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                scenario.id,
                scenario.title,
                server.name,
                result,
                num(m("mb_per_s")),
                num(m("p50_us")),
                num(m("p99_us")),
                num(m("p999_us")),
                num(m("kib_per_conn")),
                vs("tokio-tungstenite"),
                vs("fastwebsockets"),
                vs("raw-tcp"),
                plain,
                spread,
                cpu,
                per_op,
            );
        }
    }
    out.push('\n');
    out
}

/// Scenarios that compare configurations of one server (duplex-chat on
/// one node or two): each against its baseline, measured in the same round.
fn configurations_table(scenarios: &[Scenario], servers: &[&Server], runs: &Runs) -> String {
    let mut out = String::from(
        "| # | Scenario | Configuration | Result | p50 µs | p99 µs | p99.9 µs | vs baseline \
         | spread | dropped | CPU % srv/load/other | srv µs/op |\n\
         |---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for scenario in scenarios {
        let (key, unit) = scenario.primary();
        for server in servers.iter().filter(|s| scenario.runs_on(s)) {
            let Some(outcomes) = runs.get(&(scenario.id, server.name)) else {
                continue;
            };
            let m = |k: &str| median_of(runs, scenario.id, server.name, k);
            let primary: Vec<f64> = outcomes
                .iter()
                .flatten()
                .filter_map(|o| o.get(key))
                .collect();
            let failed = outcomes.iter().filter(|o| o.is_none()).count();
            let result = match m(key) {
                Some(v) if failed == 0 => format!("{} {unit}", num(Some(v))),
                Some(v) => format!("{} {unit} ({failed} failed)", num(Some(v))),
                None => "FAILED".into(),
            };
            let range = |k: &str| {
                let values: Vec<f64> = outcomes.iter().flatten().filter_map(|o| o.get(k)).collect();
                let max = values.iter().copied().fold(f64::MIN, f64::max);
                let min = values.iter().copied().fold(f64::MAX, f64::min);
                match values.len() {
                    0 => "—".to_owned(),
                    1 => num(Some(min)),
                    _ => format!("{} ({}–{})", num(m(k)), num(Some(min)), num(Some(max))),
                }
            };
            let spread = match (median(&primary), primary.len()) {
                (Some(mid), 2..) if mid > 0.0 => {
                    let max = primary.iter().copied().fold(f64::MIN, f64::max);
                    let min = primary.iter().copied().fold(f64::MAX, f64::min);
                    format!("±{:.0}%", (max - min) / mid * 50.0)
                }
                _ => "—".into(),
            };
            let vs = match server.baseline {
                Some(base) => format!(
                    "{} {base}",
                    times(ratio(runs, scenario.id, server.name, &[base], key))
                ),
                None => "baseline".to_owned(),
            };
            let pct = |k: &str| m(k).map_or_else(|| "—".to_owned(), |v| format!("{v:.0}"));
            let per_op = match (m("server_cpu"), m(key)) {
                (Some(cpu), Some(v)) if v > 0.0 => format!("{:.2}", cpu * 1e4 / v),
                _ => "—".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{}/{} | {} |",
                scenario.id,
                scenario.title,
                server.name,
                result,
                range("p50_us"),
                range("p99_us"),
                num(m("p999_us")),
                vs,
                spread,
                num(m("dropped")),
                pct("server_cpu"),
                pct("load_cpu"),
                pct("other_cpu"),
                per_op,
            );
        }
    }
    out.push('\n');
    out
}

fn goals(runs: &Runs) -> String {
    let mut rows: Vec<(String, String, Option<bool>)> = Vec::new();
    let check = |v: Option<f64>, ok: &dyn Fn(f64) -> bool| v.map(ok);
    for s in 1..=4 {
        let key = "msgs_per_s";
        let fws = ratio(runs, s, "duplex", &["fastwebsockets"], key);
        let tt = ratio(runs, s, "duplex", &["tokio-tungstenite"], key);
        rows.push((
            format!("S{s}: duplex ≥ 1.0x fastwebsockets"),
            times(fws),
            check(fws, &|v| v >= 1.0),
        ));
        rows.push((
            format!("S{s}: duplex ≥ 1.3x tokio-tungstenite"),
            times(tt),
            check(tt, &|v| v >= 1.3),
        ));
        let (bound, applies) = match s {
            2 => (0.8, true),
            3 | 4 => (0.8, true),
            _ => (0.0, false),
        };
        if applies {
            let raw = ratio(runs, s, "duplex", &["raw-tcp"], key);
            rows.push((
                format!("S{s}: duplex ≥ {bound}x raw TCP echo"),
                times(raw),
                check(raw, &|v| v >= bound),
            ));
        }
    }
    let mem = median_of(runs, 5, "duplex", "kib_per_conn");
    rows.push((
        "S5: duplex ≤ 5 KiB per idle connection".into(),
        mem.map_or_else(|| "—".into(), |v| format!("{v:.2} KiB")),
        check(mem, &|v| v <= 5.0),
    ));
    let hs = ratio(runs, 5, "duplex", &["fastwebsockets"], "handshakes_per_s");
    rows.push((
        "S5: duplex handshakes/s ≥ fastwebsockets'".into(),
        times(hs),
        check(hs, &|v| v >= 1.0),
    ));
    let peers = ["tokio-tungstenite", "fastwebsockets", "axum"];
    let bc = ratio(runs, 6, "duplex", &peers, "deliveries_per_s");
    rows.push((
        "S6: duplex ≥ 2x the best peer's deliveries/s".into(),
        times(bc),
        check(bc, &|v| v >= 2.0),
    ));
    let hub = ratio(runs, 6, "duplex-hub", &peers, "deliveries_per_s");
    if hub.is_some() {
        rows.push((
            "S6 (hub): duplex::Hub ≥ 2x the best peer's deliveries/s".into(),
            times(hub),
            check(hub, &|v| v >= 2.0),
        ));
    }
    let deflate = ratio(runs, 7, "duplex-deflate", &["duplex"], "msgs_per_s");
    rows.push((
        "S7: duplex-deflate ≥ 0.6x duplex".into(),
        times(deflate),
        check(deflate, &|v| v >= 0.6),
    ));
    let idle = median_of(runs, 8, "duplex-deflate", "kib_per_conn");
    rows.push((
        "S8: duplex-deflate ≤ 8 KiB per idle connection".into(),
        idle.map_or_else(|| "—".into(), |v| format!("{v:.2} KiB")),
        check(idle, &|v| v <= 8.0),
    ));
    // No bound: what compressing once for every subscriber costs.
    let hub = ratio(
        runs,
        9,
        "duplex-hub-deflate",
        &["duplex-hub"],
        "deliveries_per_s",
    );
    rows.push((
        "S9: deflate hub broadcast, ratio to plain hub (measured)".into(),
        times(hub),
        hub.map(|_| true),
    ));
    let mut out = String::from("| Goal | Measured | Met |\n|---|---:|---|\n");
    for (goal, measured, met) in rows {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(out, "| {goal} | {measured} | {met} |");
    }
    out.push('\n');
    out
}

/// A line about the machine the numbers come from.
fn machine() -> String {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, v)| v.trim())
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1 << 20) as f64);
    let kernel = read("/proc/sys/kernel/osrelease");
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "Machine: {model}, {cpus} CPUs, {mem_gib:.0} GiB, Linux {}, {rustc}; {date}\n\n",
        kernel.trim()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(pairs: &[(&str, f64)]) -> Option<Outcome> {
        let mut o = Outcome::new("test");
        for (k, v) in pairs {
            o.set(k, *v);
        }
        Some(o)
    }

    fn results() -> Results {
        let info = |id, kind| ScenarioInfo {
            id,
            title: format!("scenario {id}"),
            kind,
        };
        let record = |scenario, server: &str, outcomes| RunRecord {
            scenario,
            server: server.into(),
            outcomes,
        };
        let echo = |v| {
            outcome(&[
                ("msgs_per_s", v),
                ("p50_us", 90.0),
                ("p99_us", 300.0),
                ("p999_us", 900.0),
            ])
        };
        let idle = |kib| outcome(&[("handshakes_per_s", 20_000.0), ("kib_per_conn", kib)]);
        Results {
            machine:
                "Machine: Test CPU, 2 CPUs, 1 GiB, Linux 6, rustc 1.95.0; 2026-12-02 04:00 UTC\n\n"
                    .into(),
            command: "cargo run --release -p duplex-bench -- --rounds 2".into(),
            rounds: 2,
            seconds: 10.0,
            smoke: false,
            scenarios: vec![
                info(1, Kind::Echo),
                info(5, Kind::Connections),
                info(8, Kind::DeflateIdle),
            ],
            servers: vec![
                "duplex".into(),
                "fastwebsockets".into(),
                "duplex-deflate".into(),
                "gone".into(),
            ],
            runs: vec![
                record(1, "duplex", vec![echo(200.0), echo(100.0)]),
                record(1, "fastwebsockets", vec![echo(100.0), None]),
                record(5, "duplex", vec![idle(4.5), idle(4.7)]),
                record(5, "fastwebsockets", vec![idle(6.0), idle(6.0)]),
                record(8, "duplex", vec![idle(5.0), idle(5.0)]),
                record(8, "duplex-deflate", vec![idle(7.0), idle(9.0)]),
                record(8, "gone", vec![idle(1.0)]),
            ],
        }
    }

    #[test]
    fn a_saved_run_gives_the_same_table_and_draws_every_chart() {
        let results = results();
        let table = report(&results);
        // Per-round ratios: round 1 only (round 2 failed for the peer).
        assert!(
            table.contains("| S1: duplex ≥ 1.0x fastwebsockets | 2.00x | yes |"),
            "{table}"
        );
        assert!(
            table.contains("| S8: duplex-deflate ≤ 8 KiB per idle connection | 8.00 KiB | yes |"),
            "{table}"
        );
        assert!(table.contains("(1 failed)"), "{table}");
        let json = serde_json::to_string(&results).unwrap();
        let again: Results = serde_json::from_str(&json).unwrap();
        assert_eq!(report(&again), table);

        let dir = std::env::temp_dir().join(format!("duplex-bench-test-{}", std::process::id()));
        write_results(&again, &dir).unwrap();
        for name in ["results.json", "ratios.svg", "latency.svg", "memory.svg"] {
            assert!(dir.join(name).is_file(), "{name} missing");
        }
        let memory = std::fs::read_to_string(dir.join("memory.svg")).unwrap();
        for label in [
            "S5 duplex",
            "S5 fastwebsockets",
            "S8 duplex (no deflate)",
            "S8 duplex-deflate",
            "Test CPU",
        ] {
            assert!(memory.contains(label), "{label} missing from memory.svg");
        }
        let ratios = std::fs::read_to_string(dir.join("ratios.svg")).unwrap();
        assert!(ratios.contains("vs fastwebsockets") && !ratios.contains("vs axum"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
