//! The load generator: `echo`, `connections` and `broadcast` against one
//! server, one JSON result line on stdout (see `duplex_bench::report`).
//!
//! It runs on one thread (a current-thread tokio runtime) and does as little
//! as it can per message: frames are masked once at start and sent as they
//! are, replies are counted from their headers and their payloads skipped.
//! Every run is bounded: a warm-up, then `--duration` seconds, then exit.

use std::{
    cell::{Cell, RefCell},
    collections::VecDeque,
    future::poll_fn,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::ExitCode,
    rc::Rc,
    task::Poll,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use tokio::{io::AsyncWriteExt, net::TcpStream, sync::Notify, task::JoinHandle};

use duplex_bench::{
    CpuSnapshot,
    client::{self, Connected, FrameReader, OP_BINARY, OP_CLOSE, OP_TEXT},
    deflate::{self, Deflater, Inflater, Params},
    report::Outcome,
    vm_rss_kib,
};

/// The duplex-bench load generator.
#[derive(Debug, Parser)]
#[command(about)]
struct Args {
    /// The server.
    #[arg(long, default_value = "127.0.0.1:9001", global = true)]
    addr: SocketAddr,
    /// Spread connections over this many source addresses, 127.0.0.2 and
    /// up, so that ephemeral ports last; 0: let the kernel choose. Default:
    /// 0 up to 20,000 connections (binding each socket costs the client a
    /// port search that made it the bottleneck of handshakes/s), then one
    /// address per 20,000.
    #[arg(long, global = true)]
    sources: Option<u8>,
    /// Seconds a handshake may take.
    #[arg(long, default_value_t = 10.0, global = true)]
    handshake_timeout: f64,
    /// The server's pid: for its memory (connections mode, required) and
    /// its CPU use while measuring.
    #[arg(long, global = true)]
    server_pid: Option<u32>,
    /// More server-side processes whose CPU counts as the server's (the
    /// other chat node, redis-server); repeat for each.
    #[arg(long, global = true)]
    also_pid: Vec<u32>,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// C connections each keep P messages of S bytes in flight.
    Echo {
        /// The echo endpoint.
        #[arg(long, default_value = "/mirror")]
        path: String,
        /// Connections.
        #[arg(long, short = 'c', default_value_t = 100)]
        connections: usize,
        /// Payload bytes per message.
        #[arg(long, short = 's', default_value_t = 20)]
        size: usize,
        /// Send binary messages (default: text).
        #[arg(long)]
        binary: bool,
        /// Messages in flight per connection.
        #[arg(long, short = 'p', default_value_t = 1)]
        in_flight: usize,
        /// Offer permessage-deflate: the client still sends uncompressed
        /// frames (RFC 7692 §6 allows it) and counts the replies whatever
        /// their compressed length, so the server's compression is measured.
        #[arg(long)]
        deflate: bool,
        /// Seconds of warm-up, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds measured.
        #[arg(long, short = 'd', default_value_t = 5.0)]
        duration: f64,
    },
    /// As `echo`, with the C WebSockets on one HTTP/2 connection
    /// (extended CONNECT, RFC 8441; prior knowledge, no TLS) instead of C
    /// TCP connections.
    EchoH2 {
        /// The echo endpoint.
        #[arg(long, default_value = "/mirror")]
        path: String,
        /// WebSockets (HTTP/2 streams).
        #[arg(long, short = 'c', default_value_t = 100)]
        connections: usize,
        /// Payload bytes per message (text).
        #[arg(long, short = 's', default_value_t = 20)]
        size: usize,
        /// Messages in flight per WebSocket.
        #[arg(long, short = 'p', default_value_t = 1)]
        in_flight: usize,
        /// Seconds of warm-up, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds measured.
        #[arg(long, short = 'd', default_value_t = 5.0)]
        duration: f64,
    },
    /// Opens N idle connections: handshakes/s and the server's memory per
    /// connection.
    Connections {
        /// The endpoint.
        #[arg(long, default_value = "/mirror")]
        path: String,
        /// Connections to open.
        #[arg(long, short = 'n', default_value_t = 10_000)]
        count: usize,
        /// Handshakes in progress at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Milliseconds to wait after the last handshake before reading
        /// VmRSS.
        #[arg(long, default_value_t = 1000)]
        settle_ms: u64,
        /// Afterwards, check that every connection still echoes a message.
        #[arg(long)]
        check: bool,
        /// Offer permessage-deflate as Chromium does and, after the
        /// handshakes, send `--messages` compressible text messages on every
        /// connection, compressed as the response allows, and check their
        /// echoes (inflated when compressed) before the connections idle.
        #[arg(long)]
        deflate: bool,
        /// Messages per connection with `--deflate`.
        #[arg(long, default_value_t = 3)]
        messages: usize,
        /// Bytes per message with `--deflate`.
        #[arg(long, default_value_t = 4096)]
        message_size: usize,
    },
    /// One publisher, N subscribers: deliveries/s and publish-to-delivery
    /// latency.
    Broadcast {
        /// The broadcast endpoint.
        #[arg(long, default_value = "/broadcast")]
        path: String,
        /// Subscribers.
        #[arg(long, short = 'n', default_value_t = 1000)]
        subscribers: usize,
        /// Payload bytes per message (at least 16: sequence and time).
        #[arg(long, short = 's', default_value_t = 64)]
        size: usize,
        /// Messages published and not yet delivered to every subscriber.
        #[arg(long, short = 'w', default_value_t = 64)]
        window: u64,
        /// Offer permessage-deflate as Chromium does, and publish
        /// compressible text (sequence and time in decimal, then words)
        /// instead of binary.
        #[arg(long)]
        deflate: bool,
        /// With `--deflate`: every Nth subscriber inflates what it gets
        /// (sequence, latency and content checked); the others count
        /// compressed frames from their headers, so that inflating does not
        /// make the load generator the bottleneck.
        #[arg(long, default_value_t = 8)]
        inflate_every: usize,
        /// Seconds of warm-up, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds measured.
        #[arg(long, short = 'd', default_value_t = 5.0)]
        duration: f64,
    },
    /// duplex-chat's JSON protocol on `/chat`: N subscribers say `hello`
    /// and join one room on `--subscribe-addr`, one publisher on `--addr`
    /// joins it and sends chat messages stamped with their send time:
    /// deliveries/s and send-to-delivery latency.
    Chat {
        /// Where the subscribers connect (node B); default: `--addr`.
        #[arg(long)]
        subscribe_addr: Option<SocketAddr>,
        /// The chat endpoint.
        #[arg(long, default_value = "/chat")]
        path: String,
        /// The room.
        #[arg(long, default_value = "bench")]
        room: String,
        /// Subscribers.
        #[arg(long, short = 'n', default_value_t = 1000)]
        subscribers: usize,
        /// Chat messages sent and not yet delivered to every subscriber.
        #[arg(long, short = 'w', default_value_t = 64)]
        window: u64,
        /// Seconds the subscribers and the publisher may take to say
        /// `hello` and join.
        #[arg(long, default_value_t = 60.0)]
        join_timeout: f64,
        /// Seconds of warm-up, not measured.
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        /// Seconds measured.
        #[arg(long, short = 'd', default_value_t = 5.0)]
        duration: f64,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("load: no runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let result = local.block_on(&runtime, run(args));
    match result {
        Ok(outcome) => {
            println!(
                "{}",
                serde_json::to_string(&outcome).expect("numbers serialize")
            );
            // Skip tearing down thousands of sockets one by one.
            std::process::exit(0);
        }
        Err(err) => {
            eprintln!("load: {err}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> io::Result<Outcome> {
    let common = Common {
        extra_headers: match &args.mode {
            Mode::Echo { deflate: true, .. } => "Sec-WebSocket-Extensions: permessage-deflate\r\n",
            Mode::Connections { deflate: true, .. } | Mode::Broadcast { deflate: true, .. } => {
                deflate::OFFER
            }
            _ => "",
        },
        addr: args.addr,
        sources: args.sources.unwrap_or_else(|| {
            let n = match &args.mode {
                Mode::Echo { connections, .. } => *connections,
                Mode::EchoH2 { .. } => 1,
                Mode::Connections { count, .. } => *count,
                Mode::Broadcast { subscribers, .. } | Mode::Chat { subscribers, .. } => {
                    *subscribers + 1
                }
            };
            if n <= 20_000 {
                0
            } else {
                n.div_ceil(20_000).min(250) as u8
            }
        }),
        timeout: Duration::from_secs_f64(args.handshake_timeout),
        server_pid: args.server_pid,
        also_pids: args.also_pid,
    };
    match args.mode {
        Mode::Echo {
            path,
            connections,
            size,
            binary,
            in_flight,
            deflate,
            warmup,
            duration,
        } => {
            let opcode = if binary { OP_BINARY } else { OP_TEXT };
            let spec = EchoSpec {
                connections,
                size,
                any_len: deflate,
                opcode,
                in_flight: in_flight.max(1),
                warmup: secs(warmup),
                duration: secs(duration),
            };
            echo(&common, &path, spec).await
        }
        Mode::EchoH2 {
            path,
            connections,
            size,
            in_flight,
            warmup,
            duration,
        } => {
            let spec = EchoSpec {
                connections,
                size,
                any_len: false,
                opcode: OP_TEXT,
                in_flight: in_flight.max(1),
                warmup: secs(warmup),
                duration: secs(duration),
            };
            echo_h2(&common, &path, spec).await
        }
        Mode::Connections {
            path,
            count,
            concurrency,
            settle_ms,
            check,
            deflate,
            messages,
            message_size,
        } => {
            let server_pid = common.server_pid.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "connections needs --server-pid",
                )
            })?;
            let exchange = deflate.then_some(Exchange {
                messages,
                size: message_size.max(64),
            });
            let spec = IdleSpec {
                count,
                concurrency,
                server_pid,
                settle_ms,
                check,
                exchange,
            };
            connections(&common, &path, spec).await
        }
        Mode::Broadcast {
            path,
            subscribers,
            size,
            window,
            deflate,
            inflate_every,
            warmup,
            duration,
        } => {
            let spec = BroadcastSpec {
                subscribers: subscribers.max(1),
                size: size.max(if deflate { TEXT_HEAD } else { 16 }),
                window: window.max(1),
                text: deflate,
                inflate_every: inflate_every.max(1),
                warmup: secs(warmup),
                duration: secs(duration),
            };
            broadcast(&common, &path, spec).await
        }
        Mode::Chat {
            subscribe_addr,
            path,
            room,
            subscribers,
            window,
            join_timeout,
            warmup,
            duration,
        } => {
            let spec = ChatSpec {
                subscribe_addr: subscribe_addr.unwrap_or(common.addr),
                room,
                subscribers: subscribers.max(1),
                window: window.max(1),
                join_timeout: secs(join_timeout),
                warmup: secs(warmup),
                duration: secs(duration),
            };
            chat(&common, &path, spec).await
        }
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

struct Common {
    /// Headers added to every upgrade request.
    extra_headers: &'static str,
    addr: SocketAddr,
    sources: u8,
    timeout: Duration,
    server_pid: Option<u32>,
    also_pids: Vec<u32>,
}

/// Adds the CPU use between two snapshots to `outcome`.
fn cpu(outcome: &mut Outcome, before: &CpuSnapshot, after: &CpuSnapshot) {
    let (server, load, other) = before.usage(after);
    outcome
        .set("server_cpu", server)
        .set("load_cpu", load)
        .set("other_cpu", other);
}

impl Common {
    /// The source address of connection `i`.
    fn source(&self, i: usize) -> Option<IpAddr> {
        if self.sources == 0 || !self.addr.ip().is_loopback() || !self.addr.is_ipv4() {
            return None;
        }
        let host = 2 + (i % usize::from(self.sources)) as u8;
        Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)))
    }

    async fn connect(&self, i: usize, path: &str) -> io::Result<Connected> {
        self.connect_to(self.addr, i, path).await
    }

    async fn connect_to(&self, addr: SocketAddr, i: usize, path: &str) -> io::Result<Connected> {
        client::connect_negotiated(addr, self.source(i), path, self.timeout, self.extra_headers)
            .await
    }

    /// Opens `n` connections, `concurrency` handshakes at a time.
    async fn connect_many(
        &self,
        n: usize,
        concurrency: usize,
        path: &str,
    ) -> io::Result<Vec<Connected>> {
        let next = Cell::new(0usize);
        let opened = RefCell::new(Vec::with_capacity(n));
        let worker = || async {
            loop {
                let i = next.get();
                if i >= n {
                    return Ok::<_, io::Error>(());
                }
                next.set(i + 1);
                let conn = self
                    .connect(i, path)
                    .await
                    .map_err(|e| io::Error::new(e.kind(), format!("connection {i} of {n}: {e}")))?;
                opened.borrow_mut().push(conn);
            }
        };
        let workers: Vec<_> = (0..concurrency.clamp(1, n.max(1)))
            .map(|_| worker())
            .collect();
        for result in futures_util::future::join_all(workers).await {
            result?;
        }
        Ok(opened.into_inner())
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

fn percentiles(outcome: &mut Outcome, hist: &Histogram<u64>) {
    outcome
        .set("p50_us", hist.value_at_quantile(0.50) as f64)
        .set("p99_us", hist.value_at_quantile(0.99) as f64)
        .set("p999_us", hist.value_at_quantile(0.999) as f64);
}

/// Joins local tasks that must still be running: an ended one has failed.
fn check_running(tasks: &[JoinHandle<()>], failures: &RefCell<Vec<String>>) -> io::Result<()> {
    if let Some(first) = failures.borrow().first() {
        let n = failures.borrow().len();
        return Err(io::Error::other(format!(
            "{n} connection(s) failed, the first: {first}"
        )));
    }
    if tasks.iter().any(JoinHandle::is_finished) {
        return Err(io::Error::other("a connection ended early"));
    }
    Ok(())
}

// ---- echo ----

struct EchoSpec {
    connections: usize,
    size: usize,
    /// Count replies of any length (they may come compressed).
    any_len: bool,
    opcode: u8,
    in_flight: usize,
    warmup: Duration,
    duration: Duration,
}

struct EchoStats {
    measuring: Cell<bool>,
    messages: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    failures: RefCell<Vec<String>>,
}

async fn echo(common: &Common, path: &str, spec: EchoSpec) -> io::Result<Outcome> {
    let payload: Vec<u8> = (0..spec.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut one = Vec::new();
    client::push_frame(&mut one, spec.opcode, &payload);
    let frame_len = one.len();
    // In-flight frames plus one, so that a write may start mid-frame.
    let out: Rc<[u8]> = one.repeat(spec.in_flight + 1).into();
    let conns = common.connect_many(spec.connections, 128, path).await?;
    let stats = Rc::new(EchoStats {
        measuring: Cell::new(false),
        messages: Cell::new(0),
        hist: RefCell::new(histogram()),
        failures: RefCell::new(Vec::new()),
    });
    let tasks: Vec<JoinHandle<()>> = conns
        .into_iter()
        .map(
            |Connected {
                 stream, leftover, ..
             }| {
                let conn = EchoConn {
                    stream,
                    reader: FrameReader::new(256 << 10, &leftover),
                    out: Rc::clone(&out),
                    frame_len,
                    spec_len: spec.size as u64,
                    any_len: spec.any_len,
                    opcode: spec.opcode,
                    in_flight: spec.in_flight,
                    stats: Rc::clone(&stats),
                };
                let stats = Rc::clone(&stats);
                tokio::task::spawn_local(async move {
                    if let Err(err) = conn.run().await {
                        stats.failures.borrow_mut().push(err.to_string());
                    }
                })
            },
        )
        .collect();
    tokio::time::sleep(spec.warmup).await;
    check_running(&tasks, &stats.failures)?;
    stats.measuring.set(true);
    let start = Instant::now();
    let cpu_start = CpuSnapshot::take(common.server_pid);
    tokio::time::sleep(spec.duration).await;
    let elapsed = start.elapsed().as_secs_f64();
    stats.measuring.set(false);
    let cpu_end = CpuSnapshot::take(common.server_pid);
    check_running(&tasks, &stats.failures)?;
    tasks.iter().for_each(JoinHandle::abort);
    let messages = stats.messages.get() as f64;
    if messages == 0.0 {
        return Err(io::Error::other("no message came back"));
    }
    let mut outcome = Outcome::new("echo");
    outcome
        .set("msgs_per_s", messages / elapsed)
        .set("mb_per_s", messages * spec.size as f64 / elapsed / 1e6)
        .set("messages", messages)
        .set("seconds", elapsed);
    percentiles(&mut outcome, &stats.hist.borrow());
    cpu(&mut outcome, &cpu_start, &cpu_end);
    Ok(outcome)
}

/// One echo connection: keeps `in_flight` frames out, sends one more for
/// every frame that comes back, in one write per read.
struct EchoConn {
    stream: TcpStream,
    reader: FrameReader,
    out: Rc<[u8]>,
    frame_len: usize,
    spec_len: u64,
    /// Replies may be compressed: any length counts.
    any_len: bool,
    opcode: u8,
    in_flight: usize,
    stats: Rc<EchoStats>,
}

impl EchoConn {
    async fn run(mut self) -> io::Result<()> {
        let mut to_write = self.in_flight * self.frame_len;
        let mut write_pos = 0usize;
        let start = Instant::now();
        let mut sent: VecDeque<Instant> = std::iter::repeat_n(start, self.in_flight).collect();
        poll_fn(|cx| {
            loop {
                let mut progress = false;
                while to_write > 0 {
                    match self.stream.poll_write_ready(cx) {
                        Poll::Pending => break,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {}
                    }
                    match self
                        .stream
                        .try_write(&self.out[write_pos..write_pos + to_write])
                    {
                        Ok(n) => {
                            to_write -= n;
                            write_pos = (write_pos + n) % self.frame_len;
                            progress = true;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Poll::Ready(Err(e)),
                    }
                }
                match self.stream.poll_read_ready(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(())) => match self.reader.try_read(&self.stream) {
                        Ok(0) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "the server closed the connection",
                            )));
                        }
                        Ok(_) => {
                            let done = match self.take_frames() {
                                Ok(done) => done,
                                Err(e) => return Poll::Ready(Err(e)),
                            };
                            if done > 0 {
                                let now = Instant::now();
                                let measuring = self.stats.measuring.get();
                                let mut hist = self.stats.hist.borrow_mut();
                                for _ in 0..done {
                                    let at = sent.pop_front().unwrap_or(now);
                                    if measuring {
                                        let us = now.duration_since(at).as_micros() as u64;
                                        hist.saturating_record(us.max(1));
                                    }
                                    sent.push_back(now);
                                }
                                if measuring {
                                    let m = &self.stats.messages;
                                    m.set(m.get() + done as u64);
                                }
                                to_write += done * self.frame_len;
                            }
                            progress = true;
                        }
                        // Readiness was stale: polling again registers the waker.
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => progress = true,
                        Err(e) => return Poll::Ready(Err(e)),
                    },
                }
                if !progress {
                    return Poll::Pending;
                }
            }
        })
        .await
    }

    /// Counts the whole echoes read so far; an unexpected frame is an error.
    fn take_frames(&mut self) -> io::Result<usize> {
        let mut done = 0usize;
        let mut bad = None;
        let (opcode, len, any_len) = (self.opcode, self.spec_len, self.any_len);
        self.reader.parse(|f| {
            if f.opcode == OP_CLOSE {
                bad = Some("the server sent a Close".to_owned());
            } else if f.opcode == opcode && f.fin && (any_len || f.len == len) {
                done += 1;
            } else if f.opcode & 0x8 == 0 {
                bad = Some(format!(
                    "unexpected frame: opcode {} fin {} len {} (sent opcode {opcode} len {len})",
                    f.opcode, f.fin, f.len
                ));
            }
        })?;
        match bad {
            Some(msg) => Err(io::Error::other(msg)),
            None => Ok(done),
        }
    }
}

// ---- connections ----

/// What `connections` does.
struct IdleSpec {
    count: usize,
    concurrency: usize,
    server_pid: u32,
    settle_ms: u64,
    check: bool,
    /// Messages exchanged on every connection before it idles.
    exchange: Option<Exchange>,
}

async fn connections(common: &Common, path: &str, spec: IdleSpec) -> io::Result<Outcome> {
    let IdleSpec {
        count,
        concurrency,
        server_pid,
        settle_ms,
        check,
        ..
    } = spec;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = vm_rss_kib(server_pid)?;
    let start = Instant::now();
    let cpu_start = CpuSnapshot::take(Some(server_pid));
    let mut conns = common.connect_many(count, concurrency, path).await?;
    let elapsed = start.elapsed().as_secs_f64();
    let cpu_end = CpuSnapshot::take(Some(server_pid));
    let mut outcome = Outcome::new("connections");
    if let Some(exchange) = &spec.exchange {
        let started = Instant::now();
        let totals = exchange_all(&mut conns, exchange, concurrency).await?;
        let negotiated = totals.negotiated as f64 / count.max(1) as f64;
        outcome
            .set("deflate", negotiated)
            .set("exchange_s", started.elapsed().as_secs_f64())
            .set("compressed_echoes", totals.compressed_echoes as f64)
            .set(
                "client_wire_ratio",
                totals.wire_bytes as f64 / totals.payload_bytes.max(1) as f64,
            );
    }
    tokio::time::sleep(Duration::from_millis(settle_ms)).await;
    let after = vm_rss_kib(server_pid)?;
    if check {
        check_echo(&mut conns).await?;
    }
    outcome
        .set("handshakes_per_s", count as f64 / elapsed)
        .set("rss_before_kib", before as f64)
        .set("rss_after_kib", after as f64)
        .set(
            "kib_per_conn",
            (after as f64 - before as f64) / count.max(1) as f64,
        )
        .set("connections", count as f64);
    cpu(&mut outcome, &cpu_start, &cpu_end);
    Ok(outcome)
}

/// Messages sent on every connection before it idles.
struct Exchange {
    messages: usize,
    size: usize,
}

/// What the exchanges added up to.
#[derive(Default)]
struct ExchangeTotals {
    /// Connections whose response accepted permessage-deflate.
    negotiated: usize,
    /// Echoes that came back compressed.
    compressed_echoes: usize,
    /// Payload bytes sent, before and after compression.
    payload_bytes: usize,
    wire_bytes: usize,
}

/// Runs the exchange on every connection, `concurrency` at a time: a
/// connection's compressor lives only while it sends, as a client that
/// then goes quiet would drop it.
async fn exchange_all(
    conns: &mut [Connected],
    exchange: &Exchange,
    concurrency: usize,
) -> io::Result<ExchangeTotals> {
    use futures_util::StreamExt as _;
    let runs = conns
        .iter_mut()
        .enumerate()
        .map(|(i, conn)| exchange_one(conn, i, exchange));
    let all = futures_util::stream::iter(runs)
        .buffer_unordered(concurrency.max(1))
        .collect::<Vec<_>>();
    let results = tokio::time::timeout(Duration::from_secs(120), all)
        .await
        .map_err(|_| io::Error::other("the message exchange timed out"))?;
    let mut totals = ExchangeTotals::default();
    for result in results {
        let one = result?;
        totals.negotiated += one.negotiated;
        totals.compressed_echoes += one.compressed_echoes;
        totals.payload_bytes += one.payload_bytes;
        totals.wire_bytes += one.wire_bytes;
    }
    Ok(totals)
}

/// Compressible text, different for every connection and message: a chat
/// line's worth of JSON repeated with a counter, `size` bytes.
fn message_text(conn: usize, message: usize, size: usize) -> Vec<u8> {
    let mut text = String::with_capacity(size + 128);
    let mut line = 0usize;
    while text.len() < size {
        let _ = std::fmt::Write::write_fmt(
            &mut text,
            format_args!(
                "{{\"type\":\"message\",\"room\":\"lobby\",\"from\":\"user-{conn}\",\"seq\":{message},\"line\":{line},\"text\":\"the quick brown fox jumps over the lazy dog\"}}\n"
            ),
        );
        line += 1;
    }
    text.truncate(size);
    text.into_bytes()
}

/// Sends the messages on one connection, compressed if the response
/// accepted permessage-deflate, and checks every echo (inflated if
/// compressed) against what was sent.
async fn exchange_one(
    conn: &mut Connected,
    index: usize,
    exchange: &Exchange,
) -> io::Result<ExchangeTotals> {
    let fail = |e: io::Error| io::Error::new(e.kind(), format!("connection {index}: {e}"));
    let params = Params::from_response(conn.extensions.as_deref()).map_err(fail)?;
    // The client's level is not under test: the fastest keeps the load
    // generator's share small.
    let mut deflater = params.as_ref().map(|p| Deflater::new(p, 1));
    let mut inflater = params.as_ref().map(Inflater::new);
    let mut reader = FrameReader::new(0, &std::mem::take(&mut conn.leftover));
    let mut totals = ExchangeTotals {
        negotiated: usize::from(params.is_some()),
        ..ExchangeTotals::default()
    };
    let mut frame = Vec::new();
    for m in 0..exchange.messages {
        let text = message_text(index, m, exchange.size);
        frame.clear();
        match deflater.as_mut() {
            Some(d) => {
                let compressed = d.compress(&text).map_err(fail)?;
                totals.wire_bytes += compressed.len();
                client::push_frame_rsv1(&mut frame, OP_TEXT, true, &compressed);
            }
            None => {
                totals.wire_bytes += text.len();
                client::push_frame(&mut frame, OP_TEXT, &text);
            }
        }
        totals.payload_bytes += text.len();
        conn.stream.write_all(&frame).await.map_err(fail)?;
        loop {
            let mut echo: Option<io::Result<bool>> = None;
            reader
                .parse(|f| {
                    if echo.is_some() || f.opcode & 0x8 != 0 && f.opcode != OP_CLOSE {
                        return;
                    }
                    echo = Some(check_echoed(&f, &text, inflater.as_mut()));
                })
                .map_err(fail)?;
            if let Some(result) = echo {
                totals.compressed_echoes += usize::from(result.map_err(fail)?);
                break;
            }
            if reader.read(&mut conn.stream).await.map_err(fail)? == 0 {
                return Err(fail(io::Error::other("closed instead of echoing")));
            }
        }
    }
    Ok(totals)
}

/// Checks that frame `f` echoes `sent`; true if it came compressed.
fn check_echoed(
    f: &client::FrameInfo<'_>,
    sent: &[u8],
    inflater: Option<&mut Inflater>,
) -> io::Result<bool> {
    if f.opcode != OP_TEXT || !f.fin {
        return Err(io::Error::other(format!(
            "unexpected frame: opcode {} fin {}",
            f.opcode, f.fin
        )));
    }
    let payload = f
        .payload
        .ok_or_else(|| io::Error::other(format!("an echo of {} bytes", f.len)))?;
    let (text, compressed) = if f.rsv1 {
        let inflater = inflater
            .ok_or_else(|| io::Error::other("RSV1 set without permessage-deflate agreed"))?;
        (inflater.inflate(payload, sent.len() * 2)?, true)
    } else {
        (payload.to_vec(), false)
    };
    if text != sent {
        return Err(io::Error::other(format!(
            "the echo differs from the message ({} bytes back, {} sent)",
            text.len(),
            sent.len()
        )));
    }
    Ok(compressed)
}

/// Sends one text message on every connection and waits for its echo.
async fn check_echo(conns: &mut [Connected]) -> io::Result<()> {
    let mut frame = Vec::new();
    client::push_frame(&mut frame, OP_TEXT, b"still there?");
    let checks = conns.iter_mut().map(
        |Connected {
             stream, leftover, ..
         }| {
            let frame = &frame;
            async move {
                stream.write_all(frame).await?;
                let mut reader = FrameReader::new(0, leftover);
                loop {
                    let mut echoed = false;
                    reader.parse(|f| echoed |= f.opcode == OP_TEXT && f.len == 12)?;
                    if echoed {
                        return Ok::<_, io::Error>(());
                    }
                    if reader.read(stream).await? == 0 {
                        return Err(io::Error::other("closed instead of echoing"));
                    }
                }
            }
        },
    );
    let all = futures_util::future::join_all(checks);
    let results = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .map_err(|_| io::Error::other("echo check timed out"))?;
    let failed = results.iter().filter(|r| r.is_err()).count();
    if let Some(Err(first)) = results.into_iter().find(Result::is_err) {
        return Err(io::Error::other(format!(
            "{failed} connection(s) did not echo, the first: {first}"
        )));
    }
    Ok(())
}

// ---- broadcast ----

struct BroadcastSpec {
    subscribers: usize,
    size: usize,
    window: u64,
    /// Text messages (sequence and time in decimal), for permessage-deflate.
    text: bool,
    /// Every Nth subscriber inflates compressed messages.
    inflate_every: usize,
    warmup: Duration,
    duration: Duration,
}

/// Slots of the per-sequence delivery counts; far more than the window.
const RING: usize = 1 << 16;

struct BroadcastState {
    subscribers: u32,
    base: Instant,
    /// How many subscribers got (or skipped past) each sequence number.
    seen: RefCell<Vec<u32>>,
    /// The highest sequence number every subscriber got or skipped past.
    completed: Cell<u64>,
    progress: Notify,
    measuring: Cell<bool>,
    deliveries: Cell<u64>,
    publishes: Cell<u64>,
    dropped: Cell<u64>,
    stalls: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
    failures: RefCell<Vec<String>>,
    /// Subscribers whose response accepted permessage-deflate.
    negotiated: Cell<u64>,
    /// Deliveries that came compressed, and their payload bytes.
    compressed: Cell<u64>,
    wire_bytes: Cell<u64>,
    /// Compressed deliveries inflated and checked.
    inflated: Cell<u64>,
    /// What every text message holds after its sequence and time.
    text_tail: Vec<u8>,
}

/// The length of a text message's head: sequence and send time in
/// decimal, 20 digits each, a space after each.
const TEXT_HEAD: usize = 42;

/// The words after a text message's head, `size` bytes in all.
fn text_tail(size: usize) -> Vec<u8> {
    let words = b"the hub compresses each message once for every subscriber; ";
    words
        .iter()
        .copied()
        .cycle()
        .take(size.saturating_sub(TEXT_HEAD))
        .collect()
}

/// Sequence number and send time of a delivered payload.
fn seq_and_time(payload: &[u8], text: bool, tail: &[u8]) -> io::Result<(u64, u64)> {
    if !text {
        let seq = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
        let sent = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
        return Ok((seq, sent));
    }
    let bad = || io::Error::other("a text message that was not published");
    if payload.len() != TEXT_HEAD + tail.len() || &payload[TEXT_HEAD..] != tail {
        return Err(bad());
    }
    let number = |field: &[u8]| -> io::Result<u64> {
        std::str::from_utf8(field)
            .ok()
            .and_then(|d| d.parse().ok())
            .ok_or_else(bad)
    };
    Ok((number(&payload[..20])?, number(&payload[21..41])?))
}

impl BroadcastState {
    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
    }

    /// One subscriber got message `seq` after `last` (its previous one):
    /// counts what it skipped as dropped and moves `completed` on when
    /// every subscriber has got or skipped past a message.
    fn arrived(&self, seq: u64, last: &mut u64, measuring: bool) {
        if seq <= *last {
            return;
        }
        let mut seen = self.seen.borrow_mut();
        for s in *last + 1..=seq {
            if s < seq && measuring {
                BroadcastState::add(&self.dropped, 1);
            }
            let slot = &mut seen[s as usize % RING];
            *slot += 1;
            if *slot == self.subscribers && s > self.completed.get() {
                self.completed.set(s);
                self.progress.notify_one();
            }
        }
        *last = seq;
    }
}

async fn broadcast(common: &Common, path: &str, spec: BroadcastSpec) -> io::Result<Outcome> {
    let subscribers = common.connect_many(spec.subscribers, 128, path).await?;
    let state = Rc::new(BroadcastState {
        subscribers: spec.subscribers as u32,
        base: Instant::now(),
        seen: RefCell::new(vec![0; RING]),
        completed: Cell::new(0),
        progress: Notify::new(),
        measuring: Cell::new(false),
        deliveries: Cell::new(0),
        publishes: Cell::new(0),
        dropped: Cell::new(0),
        stalls: Cell::new(0),
        hist: RefCell::new(histogram()),
        failures: RefCell::new(Vec::new()),
        negotiated: Cell::new(0),
        compressed: Cell::new(0),
        wire_bytes: Cell::new(0),
        inflated: Cell::new(0),
        text_tail: text_tail(spec.size),
    });
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(subscribers.len() + 2);
    for (i, conn) in subscribers.into_iter().enumerate() {
        let params = Params::from_response(conn.extensions.as_deref())?;
        BroadcastState::add(&state.negotiated, u64::from(params.is_some()));
        let sub = Subscriber {
            text: spec.text,
            inflater: params
                .filter(|_| i % spec.inflate_every == 0)
                .as_ref()
                .map(Inflater::new),
            negotiated: params.is_some(),
        };
        let state = Rc::clone(&state);
        tasks.push(tokio::task::spawn_local(async move {
            if let Err(err) = sub.run(conn.stream, conn.leftover, &state).await {
                state.failures.borrow_mut().push(err.to_string());
            }
        }));
    }
    // Let the server register every subscriber before anything is published.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let publisher = common.connect(spec.subscribers, path).await?.stream;
    let (mut drain, writer) = publisher.into_split();
    // The publisher gets its own messages too: read and forget them.
    tasks.push(tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut drain, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    }));
    {
        let state = Rc::clone(&state);
        let (size, window, text) = (spec.size, spec.window, spec.text);
        tasks.push(tokio::task::spawn_local(async move {
            if let Err(err) = publish(writer, size, window, text, &state).await {
                state
                    .failures
                    .borrow_mut()
                    .push(format!("publisher: {err}"));
            }
        }));
    }
    tokio::time::sleep(spec.warmup).await;
    check_running(&tasks, &state.failures)?;
    state.measuring.set(true);
    let start = Instant::now();
    let cpu_start = CpuSnapshot::take(common.server_pid);
    tokio::time::sleep(spec.duration).await;
    let elapsed = start.elapsed().as_secs_f64();
    state.measuring.set(false);
    let cpu_end = CpuSnapshot::take(common.server_pid);
    check_running(&tasks, &state.failures)?;
    tasks.iter().for_each(JoinHandle::abort);
    let deliveries = state.deliveries.get() as f64;
    if deliveries == 0.0 {
        return Err(io::Error::other("no message was delivered"));
    }
    let mut outcome = Outcome::new("broadcast");
    outcome
        .set("deliveries_per_s", deliveries / elapsed)
        .set("publishes_per_s", state.publishes.get() as f64 / elapsed)
        .set("dropped", state.dropped.get() as f64)
        .set("stalls", state.stalls.get() as f64)
        .set("seconds", elapsed);
    if spec.text {
        let compressed = state.compressed.get() as f64;
        outcome
            .set(
                "deflate",
                state.negotiated.get() as f64 / spec.subscribers as f64,
            )
            .set("compressed_share", compressed / deliveries.max(1.0))
            .set("inflated", state.inflated.get() as f64)
            .set(
                "wire_bytes_per_delivery",
                state.wire_bytes.get() as f64 / deliveries.max(1.0),
            );
    }
    percentiles(&mut outcome, &state.hist.borrow());
    cpu(&mut outcome, &cpu_start, &cpu_end);
    Ok(outcome)
}

/// Publishes while fewer than `window` messages are short of a subscriber,
/// every allowed message in one write.
async fn publish(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    size: usize,
    window: u64,
    text: bool,
    state: &BroadcastState,
) -> io::Result<()> {
    let mut next = 1u64;
    let mut batch = Vec::new();
    let mut payload = vec![0u8; size];
    if text {
        payload[TEXT_HEAD..].copy_from_slice(&state.text_tail);
    }
    loop {
        let allowed = state.completed.get() + window;
        if next <= allowed {
            batch.clear();
            let now = state.now_ns();
            let mut count = 0;
            while next <= allowed && count < 64 {
                state.seen.borrow_mut()[next as usize % RING] = 0;
                if text {
                    // Sent uncompressed (RFC 7692 §6): the server's
                    // compression is what is measured.
                    let head = format!("{next:020} {now:020} ");
                    payload[..TEXT_HEAD].copy_from_slice(head.as_bytes());
                    client::push_frame(&mut batch, OP_TEXT, &payload);
                } else {
                    payload[..8].copy_from_slice(&next.to_le_bytes());
                    payload[8..16].copy_from_slice(&now.to_le_bytes());
                    client::push_frame(&mut batch, OP_BINARY, &payload);
                }
                next += 1;
                count += 1;
            }
            writer.write_all(&batch).await?;
            if state.measuring.get() {
                BroadcastState::add(&state.publishes, count);
            }
            continue;
        }
        let wait = tokio::time::timeout(Duration::from_millis(200), state.progress.notified());
        if wait.await.is_err() {
            // Nothing completed for a while (a message lost for everyone):
            // let one more out.
            BroadcastState::add(&state.stalls, 1);
            state.completed.set(state.completed.get() + 1);
        }
    }
}

/// One subscriber's reading side.
struct Subscriber {
    /// Text messages are expected (binary otherwise).
    text: bool,
    /// Set on the sampled subscribers that negotiated permessage-deflate:
    /// they inflate what comes compressed. The others take the next
    /// sequence number for a compressed message (a connection's messages
    /// arrive in order), which makes drops invisible on them.
    inflater: Option<Inflater>,
    negotiated: bool,
}

impl Subscriber {
    async fn run(
        mut self,
        mut stream: TcpStream,
        leftover: Vec<u8>,
        state: &BroadcastState,
    ) -> io::Result<()> {
        let mut reader = FrameReader::new(64 << 10, &leftover);
        let mut last = 0u64;
        let want = if self.text { OP_TEXT } else { OP_BINARY };
        loop {
            let mut result = Ok(());
            let now = state.now_ns();
            let measuring = state.measuring.get();
            reader.parse(|f| {
                if result.is_err() {
                    return;
                }
                if f.opcode == OP_CLOSE {
                    result = Err(io::Error::other("the server sent a Close"));
                    return;
                }
                if f.opcode != want {
                    return;
                }
                let delivery = match self.delivered(&f, last, state) {
                    Ok(d) => d,
                    Err(e) => {
                        result = Err(e);
                        return;
                    }
                };
                let Some((seq, sent)) = delivery else {
                    return;
                };
                if measuring {
                    BroadcastState::add(&state.deliveries, 1);
                    if f.rsv1 {
                        BroadcastState::add(&state.compressed, 1);
                    }
                    BroadcastState::add(&state.wire_bytes, f.len);
                    if let Some(sent) = sent {
                        let us = now.saturating_sub(sent) / 1000;
                        state.hist.borrow_mut().saturating_record(us.max(1));
                    }
                }
                state.arrived(seq, &mut last, measuring);
            })?;
            result?;
            if reader.read(&mut stream).await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                ));
            }
        }
    }

    /// The sequence number of a delivered frame and, if read, its send time.
    fn delivered(
        &mut self,
        f: &client::FrameInfo<'_>,
        last: u64,
        state: &BroadcastState,
    ) -> io::Result<Option<(u64, Option<u64>)>> {
        let Some(payload) = f.payload else {
            return Err(io::Error::other(format!(
                "a message of {} bytes, larger than published",
                f.len
            )));
        };
        if !f.rsv1 {
            if payload.len() < 16 {
                return Ok(None);
            }
            let (seq, sent) = seq_and_time(payload, self.text, &state.text_tail)?;
            return Ok(Some((seq, Some(sent))));
        }
        if !self.negotiated {
            return Err(io::Error::other(
                "RSV1 set without permessage-deflate agreed",
            ));
        }
        let Some(inflater) = self.inflater.as_mut() else {
            return Ok(Some((last + 1, None)));
        };
        let max = TEXT_HEAD + state.text_tail.len();
        let text = inflater.inflate(payload, max)?;
        BroadcastState::add(&state.inflated, 1);
        let (seq, sent) = seq_and_time(&text, self.text, &state.text_tail)?;
        Ok(Some((seq, Some(sent))))
    }
}

// ---- chat ----

struct ChatSpec {
    /// Where the subscribers connect.
    subscribe_addr: SocketAddr,
    room: String,
    subscribers: usize,
    window: u64,
    join_timeout: Duration,
    warmup: Duration,
    duration: Duration,
}

/// Payloads up to this size are read whole by the chat clients: a `joined`
/// lists every member of the room (about 7 bytes a name).
const CHAT_PEEK: usize = 32 << 10;

/// How a `message` event starts (PROTOCOL.md; the server writes `type`
/// first).
const CHAT_EVENT: &[u8] = br#"{"type":"message""#;

/// What a bench message's text starts with; its sequence number and send
/// time follow, 20 digits each, a space between.
const CHAT_MARK: &[u8] = br#""text":"bench "#;

/// One masked text frame holding `json`.
fn chat_frame(json: &str) -> Vec<u8> {
    let mut out = Vec::new();
    client::push_frame(&mut out, OP_TEXT, json.as_bytes());
    out
}

/// The sequence number and send time of a bench chat message, `None` for
/// any other event.
fn chat_seq_and_time(payload: &[u8]) -> io::Result<Option<(u64, u64)>> {
    if !payload.starts_with(CHAT_EVENT) {
        return Ok(None);
    }
    let bad = || {
        io::Error::other(format!(
            "a chat message that was not published: {}",
            String::from_utf8_lossy(payload)
        ))
    };
    let at = payload
        .windows(CHAT_MARK.len())
        .position(|w| w == CHAT_MARK)
        .ok_or_else(bad)?
        + CHAT_MARK.len();
    let digits = payload.get(at..at + 41).ok_or_else(bad)?;
    let number = |field: &[u8]| -> Option<u64> { std::str::from_utf8(field).ok()?.parse().ok() };
    match (number(&digits[..20]), digits[20], number(&digits[21..])) {
        (Some(seq), b' ', Some(sent)) => Ok(Some((seq, sent))),
        _ => Err(bad()),
    }
}

/// Sends `request` and reads until a text event starting with `want`
/// (`{"type":"welcome"` ...) has come; an `error` event or a Close fails.
/// Whatever else comes meanwhile (directory, presence) is skipped.
async fn chat_request(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    request: &str,
    want: &[u8],
) -> io::Result<()> {
    stream.write_all(&chat_frame(request)).await?;
    loop {
        let mut found = false;
        let mut failure = None;
        reader.parse(|f| {
            if found || failure.is_some() {
                return;
            }
            if f.opcode == OP_CLOSE {
                failure = Some("the server sent a Close".to_owned());
                return;
            }
            let Some(payload) = f.payload.filter(|_| f.opcode == OP_TEXT) else {
                return;
            };
            if payload.starts_with(want) {
                found = true;
            } else if payload.starts_with(br#"{"type":"error""#) {
                failure = Some(String::from_utf8_lossy(payload).into_owned());
            }
        })?;
        if let Some(failure) = failure {
            return Err(io::Error::other(format!("{request}: {failure}")));
        }
        if found {
            return Ok(());
        }
        if reader.read(stream).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{request}: the server closed the connection"),
            ));
        }
    }
}

/// Connects to `addr`, says `hello` as `name` and joins `room`.
async fn chat_join(
    common: &Common,
    addr: SocketAddr,
    i: usize,
    path: &str,
    name: &str,
    room: &str,
) -> io::Result<(TcpStream, FrameReader)> {
    let Connected {
        mut stream,
        leftover,
        ..
    } = common.connect_to(addr, i, path).await?;
    let mut reader = FrameReader::with_peek(64 << 10, &leftover, CHAT_PEEK);
    let hello = format!(r#"{{"type":"hello","name":"{name}"}}"#);
    chat_request(&mut stream, &mut reader, &hello, br#"{"type":"welcome""#).await?;
    let join = format!(r#"{{"type":"join","room":"{room}"}}"#);
    chat_request(&mut stream, &mut reader, &join, br#"{"type":"joined""#).await?;
    Ok((stream, reader))
}

/// A subscriber's reading side: every bench message, in order.
async fn chat_subscriber(
    mut stream: TcpStream,
    mut reader: FrameReader,
    state: &BroadcastState,
) -> io::Result<()> {
    let mut last = 0u64;
    loop {
        let now = state.now_ns();
        let measuring = state.measuring.get();
        let mut result = Ok(());
        reader.parse(|f| {
            if result.is_err() {
                return;
            }
            if f.opcode == OP_CLOSE {
                result = Err(io::Error::other("the server sent a Close"));
                return;
            }
            if f.opcode != OP_TEXT {
                return;
            }
            // Large text frames are directories and member lists.
            let Some(payload) = f.payload else { return };
            let (seq, sent) = match chat_seq_and_time(payload) {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    result = Err(e);
                    return;
                }
            };
            if seq <= last {
                result = Err(io::Error::other(format!(
                    "message {seq} after {last}: out of order or twice"
                )));
                return;
            }
            if measuring {
                BroadcastState::add(&state.deliveries, 1);
                let us = now.saturating_sub(sent) / 1000;
                state.hist.borrow_mut().saturating_record(us.max(1));
            }
            state.arrived(seq, &mut last, measuring);
        })?;
        result?;
        if reader.read(&mut stream).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
    }
}

async fn chat(common: &Common, path: &str, spec: ChatSpec) -> io::Result<Outcome> {
    let state = Rc::new(BroadcastState {
        subscribers: spec.subscribers as u32,
        base: Instant::now(),
        seen: RefCell::new(vec![0; RING]),
        completed: Cell::new(0),
        progress: Notify::new(),
        measuring: Cell::new(false),
        deliveries: Cell::new(0),
        publishes: Cell::new(0),
        dropped: Cell::new(0),
        stalls: Cell::new(0),
        hist: RefCell::new(histogram()),
        failures: RefCell::new(Vec::new()),
        negotiated: Cell::new(0),
        compressed: Cell::new(0),
        wire_bytes: Cell::new(0),
        inflated: Cell::new(0),
        text_tail: Vec::new(),
    });
    let joining = Rc::new(tokio::sync::Semaphore::new(64));
    let ready = Rc::new(Cell::new(0usize));
    let joined = Rc::new(Notify::new());
    let started = Instant::now();
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(spec.subscribers + 2);
    // Each subscriber reads as soon as it has joined: the presence events of
    // those joining after it would pile up in its queue otherwise.
    for i in 0..spec.subscribers {
        let (state, joining, ready, joined) = (
            Rc::clone(&state),
            Rc::clone(&joining),
            Rc::clone(&ready),
            Rc::clone(&joined),
        );
        let (common, path, room) = (
            Common {
                extra_headers: common.extra_headers,
                addr: spec.subscribe_addr,
                sources: common.sources,
                timeout: common.timeout,
                server_pid: None,
                also_pids: Vec::new(),
            },
            path.to_owned(),
            spec.room.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            let permit = joining.acquire().await.expect("never closed");
            let name = format!("s{i}");
            let result = chat_join(&common, common.addr, i, &path, &name, &room).await;
            drop(permit);
            let result = match result {
                Ok((stream, reader)) => {
                    ready.set(ready.get() + 1);
                    joined.notify_one();
                    chat_subscriber(stream, reader, &state).await
                }
                Err(e) => Err(e),
            };
            if let Err(err) = result {
                state.failures.borrow_mut().push(format!("{name}: {err}"));
                joined.notify_one();
            }
        }));
    }
    while ready.get() < spec.subscribers {
        check_running(&tasks, &state.failures)?;
        let left = spec.join_timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(io::Error::other(format!(
                "{} of {} subscribers joined in {:.0} s",
                ready.get(),
                spec.subscribers,
                spec.join_timeout.as_secs_f64()
            )));
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(500)), joined.notified()).await;
    }
    let join_s = started.elapsed().as_secs_f64();
    let (publisher, reader) = chat_join(
        common,
        common.addr,
        spec.subscribers,
        path,
        "publisher",
        &spec.room,
    )
    .await
    .map_err(|e| io::Error::new(e.kind(), format!("publisher: {e}")))?;
    let (mut drain, writer) = publisher.into_split();
    drop(reader);
    // The publisher gets its own messages back too: read and forget them.
    tasks.push(tokio::task::spawn_local(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n) = tokio::io::AsyncReadExt::read(&mut drain, &mut buf).await {
            if n == 0 {
                break;
            }
        }
    }));
    {
        let state = Rc::clone(&state);
        let (room, window) = (spec.room.clone(), spec.window);
        tasks.push(tokio::task::spawn_local(async move {
            if let Err(err) = chat_publish(writer, &room, window, &state).await {
                state
                    .failures
                    .borrow_mut()
                    .push(format!("publisher: {err}"));
            }
        }));
    }
    tokio::time::sleep(spec.warmup).await;
    check_running(&tasks, &state.failures)?;
    let pids: Vec<u32> = common
        .server_pid
        .iter()
        .chain(&common.also_pids)
        .copied()
        .collect();
    state.measuring.set(true);
    let start = Instant::now();
    let cpu_start = CpuSnapshot::take_all(&pids);
    tokio::time::sleep(spec.duration).await;
    let elapsed = start.elapsed().as_secs_f64();
    state.measuring.set(false);
    let cpu_end = CpuSnapshot::take_all(&pids);
    check_running(&tasks, &state.failures)?;
    tasks.iter().for_each(JoinHandle::abort);
    let deliveries = state.deliveries.get() as f64;
    if deliveries == 0.0 {
        return Err(io::Error::other("no chat message was delivered"));
    }
    let mut outcome = Outcome::new("chat");
    outcome
        .set("deliveries_per_s", deliveries / elapsed)
        .set("publishes_per_s", state.publishes.get() as f64 / elapsed)
        .set("dropped", state.dropped.get() as f64)
        .set("stalls", state.stalls.get() as f64)
        .set("join_s", join_s)
        .set("seconds", elapsed);
    percentiles(&mut outcome, &state.hist.borrow());
    cpu(&mut outcome, &cpu_start, &cpu_end);
    Ok(outcome)
}

/// Sends chat messages while fewer than `window` are short of a
/// subscriber, every allowed one in one write.
async fn chat_publish(
    mut writer: tokio::net::tcp::OwnedWriteHalf,
    room: &str,
    window: u64,
    state: &BroadcastState,
) -> io::Result<()> {
    let mut next = 1u64;
    let mut batch = Vec::new();
    loop {
        let allowed = state.completed.get() + window;
        if next <= allowed {
            batch.clear();
            let now = state.now_ns();
            let mut count = 0;
            while next <= allowed && count < 64 {
                state.seen.borrow_mut()[next as usize % RING] = 0;
                let json = format!(
                    r#"{{"type":"message","room":"{room}","text":"bench {next:020} {now:020}"}}"#
                );
                client::push_frame(&mut batch, OP_TEXT, json.as_bytes());
                next += 1;
                count += 1;
            }
            writer.write_all(&batch).await?;
            if state.measuring.get() {
                BroadcastState::add(&state.publishes, count);
            }
            continue;
        }
        let wait = tokio::time::timeout(Duration::from_millis(200), state.progress.notified());
        if wait.await.is_err() {
            // Nothing completed for a while (a message lost for everyone):
            // let one more out.
            BroadcastState::add(&state.stalls, 1);
            state.completed.set(state.completed.get() + 1);
        }
    }
}

// ---- echo over HTTP/2 ----

/// Opens one HTTP/2 connection and `spec.connections` WebSockets on it,
/// then runs the echo of [`echo`] on every one.
async fn echo_h2(common: &Common, path: &str, spec: EchoSpec) -> io::Result<Outcome> {
    let h2_error = |what: &str, e: h2::Error| io::Error::other(format!("{what}: {e}"));
    let payload: Vec<u8> = (0..spec.size).map(|i| b'a' + (i % 26) as u8).collect();
    let mut one = Vec::new();
    client::push_frame(&mut one, spec.opcode, &payload);
    let frame_len = one.len();
    let out = bytes::Bytes::from(one.repeat(spec.in_flight));
    let tcp = TcpStream::connect(common.addr).await?;
    tcp.set_nodelay(true)?;
    let (client, connection) = h2::client::Builder::new()
        // Windows far above what is in flight: flow control never waits.
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 26)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .map_err(|e| h2_error("HTTP/2 handshake", e))?;
    let stats = Rc::new(EchoStats {
        measuring: Cell::new(false),
        messages: Cell::new(0),
        hist: RefCell::new(histogram()),
        failures: RefCell::new(Vec::new()),
    });
    let mut tasks: Vec<JoinHandle<()>> = Vec::with_capacity(spec.connections + 1);
    {
        let stats = Rc::clone(&stats);
        tasks.push(tokio::task::spawn_local(async move {
            if let Err(e) = connection.await {
                stats
                    .failures
                    .borrow_mut()
                    .push(format!("the HTTP/2 connection: {e}"));
            }
        }));
    }
    let mut client = client
        .ready()
        .await
        .map_err(|e| h2_error("HTTP/2 connection", e))?;
    // Extended CONNECT may be sent once the server's SETTINGS allowed it.
    let deadline = Instant::now() + common.timeout;
    while !client.is_extended_connect_protocol_enabled() {
        if Instant::now() >= deadline {
            return Err(io::Error::other(
                "the server did not send SETTINGS_ENABLE_CONNECT_PROTOCOL",
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let uri = format!("http://{}{path}", common.addr);
    for i in 0..spec.connections {
        let request = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(&uri)
            .header("sec-websocket-version", "13")
            .extension(h2::ext::Protocol::from_static("websocket"))
            .body(())
            .map_err(io::Error::other)?;
        let (response, send) = client
            .send_request(request, false)
            .map_err(|e| h2_error("extended CONNECT", e))?;
        client = client
            .ready()
            .await
            .map_err(|e| h2_error("HTTP/2 connection", e))?;
        let response = tokio::time::timeout(common.timeout, response)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "extended CONNECT timed out"))?
            .map_err(|e| h2_error("extended CONNECT", e))?;
        if response.status() != http::StatusCode::OK {
            return Err(io::Error::other(format!(
                "WebSocket {i}: extended CONNECT answered {}",
                response.status()
            )));
        }
        let stream = EchoStream {
            send,
            recv: response.into_body(),
            reader: FrameReader::new(256 << 10, &[]),
            out: out.clone(),
            frame_len,
            spec_len: spec.size as u64,
            opcode: spec.opcode,
            in_flight: spec.in_flight,
            stats: Rc::clone(&stats),
        };
        let stats = Rc::clone(&stats);
        tasks.push(tokio::task::spawn_local(async move {
            if let Err(err) = stream.run().await {
                stats
                    .failures
                    .borrow_mut()
                    .push(format!("WebSocket {i}: {err}"));
            }
        }));
    }
    tokio::time::sleep(spec.warmup).await;
    check_running(&tasks, &stats.failures)?;
    stats.measuring.set(true);
    let start = Instant::now();
    let cpu_start = CpuSnapshot::take(common.server_pid);
    tokio::time::sleep(spec.duration).await;
    let elapsed = start.elapsed().as_secs_f64();
    stats.measuring.set(false);
    let cpu_end = CpuSnapshot::take(common.server_pid);
    check_running(&tasks, &stats.failures)?;
    tasks.iter().for_each(JoinHandle::abort);
    let messages = stats.messages.get() as f64;
    if messages == 0.0 {
        return Err(io::Error::other("no message came back"));
    }
    let mut outcome = Outcome::new("echo");
    outcome
        .set("msgs_per_s", messages / elapsed)
        .set("mb_per_s", messages * spec.size as f64 / elapsed / 1e6)
        .set("messages", messages)
        .set("seconds", elapsed);
    percentiles(&mut outcome, &stats.hist.borrow());
    cpu(&mut outcome, &cpu_start, &cpu_end);
    Ok(outcome)
}

/// One WebSocket on an HTTP/2 stream: keeps `in_flight` frames out and
/// sends one more for every frame that comes back, all those of one DATA
/// frame in one send.
struct EchoStream {
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
    reader: FrameReader,
    /// `in_flight` frames back to back.
    out: bytes::Bytes,
    frame_len: usize,
    spec_len: u64,
    opcode: u8,
    in_flight: usize,
    stats: Rc<EchoStats>,
}

impl EchoStream {
    async fn run(mut self) -> io::Result<()> {
        let h2_error = |e: h2::Error| io::Error::other(e.to_string());
        let mut sent: VecDeque<Instant> = VecDeque::with_capacity(self.in_flight);
        sent.extend(std::iter::repeat_n(Instant::now(), self.in_flight));
        self.send
            .send_data(self.out.clone(), false)
            .map_err(h2_error)?;
        while let Some(data) = self.recv.data().await {
            let data = data.map_err(h2_error)?;
            let _ = self.recv.flow_control().release_capacity(data.len());
            let mut replies = 0usize;
            let mut bad = None;
            let (spec_len, opcode) = (self.spec_len, self.opcode);
            self.reader.feed(&data, |f| {
                if f.opcode != opcode || !f.fin || f.len != spec_len {
                    bad.get_or_insert_with(|| {
                        format!(
                            "a frame with opcode {}, FIN {}, {} bytes came back",
                            f.opcode, f.fin, f.len
                        )
                    });
                }
                replies += 1;
            })?;
            if let Some(bad) = bad {
                return Err(io::Error::other(bad));
            }
            if replies == 0 {
                continue;
            }
            let now = Instant::now();
            if self.stats.measuring.get() {
                let mut hist = self.stats.hist.borrow_mut();
                for _ in 0..replies {
                    let at = sent.pop_front().unwrap_or(now);
                    let us = now.duration_since(at).as_micros() as u64;
                    hist.saturating_record(us.max(1));
                }
                drop(hist);
                let m = &self.stats.messages;
                m.set(m.get() + replies as u64);
            } else {
                for _ in 0..replies {
                    sent.pop_front();
                }
            }
            sent.extend(std::iter::repeat_n(now, replies));
            // `replies` never exceeds what is in flight.
            let more = self
                .out
                .slice(..(replies.min(self.in_flight) * self.frame_len));
            self.send.send_data(more, false).map_err(h2_error)?;
        }
        Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server ended the stream",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_messages_give_their_sequence_and_send_time() {
        let event = br#"{"type":"message","id":"1733130000000-0","room":"bench","from":"publisher","text":"bench 00000000000000000042 00000000000123456789","ts":1733130000000}"#;
        assert_eq!(chat_seq_and_time(event).unwrap(), Some((42, 123_456_789)));
        let presence =
            br#"{"type":"presence","room":"bench","event":"join","name":"s1","count":2}"#;
        assert_eq!(chat_seq_and_time(presence).unwrap(), None);
        // A message event that is not the publisher's, or cut short, fails.
        let other =
            br#"{"type":"message","id":"1-0","room":"bench","from":"x","text":"hi","ts":1}"#;
        assert!(chat_seq_and_time(other).is_err());
        let short =
            br#"{"type":"message","id":"1-0","room":"bench","from":"x","text":"bench 0042"}"#;
        assert!(chat_seq_and_time(short).is_err());
    }
}
