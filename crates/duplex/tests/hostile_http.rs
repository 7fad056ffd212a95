//! Hostile peers before any session, over real sockets at the shipped
//! defaults: what one address can make the HTTP layer hold (connections,
//! idle HTTP/2 connections, responses it never takes, TLS handshakes,
//! split prefaces) and that every other address is still served.
//!
//! Other addresses are other loopback addresses (127.0.0.2 and up), which
//! Linux routes to `lo` without any set-up.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use axum::routing::get;
use common::ChildServer;
use duplex::App;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpSocket, TcpStream},
    sync::oneshot,
};

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame (RFC 9113 §6.5).
const EMPTY_SETTINGS: [u8; 9] = [0, 0, 0, 4, 0, 0, 0, 0, 0];

/// The body of `/big`: larger than any socket buffer that 200 of it could
/// fit in.
const BIG: usize = 256 * 1024;

fn app() -> App {
    App::new()
        .route("/ping", get(|| async { "pong" }))
        .route("/page", get(|| async { "x".repeat(8 * 1024) }))
        .route("/big", get(|| async { vec![b'x'; BIG] }))
        // A body of unknown length whose first chunk comes later: the
        // application, then the peer, is what it waits for.
        .route(
            "/later",
            get(|| async {
                axum::body::Body::from_stream(futures_util::stream::once(async {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, std::convert::Infallible>(bytes::Bytes::from(vec![b'x'; 8 * 1024]))
                }))
            }),
        )
        .route(
            "/upload",
            axum::routing::post(|body: bytes::Bytes| async move { body.len().to_string() }),
        )
}

/// `app` served on 127.0.0.1 until the returned sender is dropped.
async fn serve(app: App) -> (SocketAddr, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.serve_with_shutdown(listener, async move {
        let _ = stopped.await;
    }));
    // `serve` raises the open-files limit for the whole process, which the
    // floods below need: one request makes sure it has started.
    assert_eq!(get_from(loopback(2), addr, "/ping").await, Some(200));
    (addr, stop)
}

fn loopback(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

async fn connect_from(ip: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(ip, 0))?;
    socket.connect(addr).await
}

/// The status of `GET path` sent from `ip` over HTTP/1.1, or `None` when
/// the connection was closed without an answer.
async fn get_from(ip: IpAddr, addr: SocketAddr, path: &str) -> Option<u16> {
    let mut tcp = connect_from(ip, addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut response))
        .await
        .expect("an answer or a close within 10 s")
        .ok()?;
    let head = std::str::from_utf8(response.get(..12)?).ok()?;
    head.strip_prefix("HTTP/1.1 ")?.parse().ok()
}

/// Whether the server closed `tcp` within `wait` (EOF or reset, after any
/// bytes it had sent).
async fn closed_within(tcp: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = vec![0; 64 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// An HTTP/2 connection that says the preface and an empty SETTINGS, and
/// then nothing: no stream, no answer to PINGs.
async fn idle_h2(ip: IpAddr, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tcp = connect_from(ip, addr).await?;
    // A connection closed at once fails the write: kept all the same, for
    // the test to see it closed.
    let _ = tcp.write_all(PREFACE).await;
    let _ = tcp.write_all(&EMPTY_SETTINGS).await;
    Ok(tcp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_10050_idle_http2_connections_leaves_others_served_and_they_close_when_idle()
 {
    let (addr, _stop) = serve(app()).await;
    let opened = Instant::now();
    let mut held = Vec::new();
    for _ in 0..10_050 {
        held.push(idle_h2(loopback(1), addr).await.unwrap());
    }
    assert_eq!(
        get_from(loopback(2), addr, "/ping").await,
        Some(200),
        "a client of another address is served"
    );
    // The shipped per-address cap (1,000) closed the rest at once.
    let mut closed = 0;
    for tcp in held.iter_mut().rev().take(9_000) {
        closed += usize::from(closed_within(tcp, Duration::from_millis(1)).await);
    }
    assert!(
        closed >= 8_900,
        "{closed} of the last 9,000 were closed at once"
    );
    // The 1,000 kept have no open stream: closed after the idle timeout
    // (10 s), though they answer nothing and hyper's keep-alive would
    // take 20 s; not before.
    assert!(
        opened.elapsed() < Duration::from_secs(9),
        "the flood took {:?}",
        opened.elapsed()
    );
    for tcp in held.iter_mut().take(1_000) {
        assert!(!closed_within(tcp, Duration::from_millis(1)).await);
    }
    let start = Instant::now();
    for tcp in held.iter_mut().take(1_000) {
        assert!(
            closed_within(tcp, Duration::from_secs(15).saturating_sub(start.elapsed())).await,
            "an idle HTTP/2 connection was still open {:?} after the flood",
            start.elapsed()
        );
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= Duration::from_secs(10),
        "closed {closed_after:?} after they opened"
    );
}

/// [`app`] in a process of its own ([`ChildServer`]), for the tests whose
/// floods one process could not hold both ends of, or whose server's
/// memory they read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the server process of other tests, which start it"]
async fn child_server() {
    ChildServer::serve(app()).await;
}

/// [`child_server`] started, once it answers.
async fn start_child() -> ChildServer {
    let server = ChildServer::start("child_server");
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_from(loopback(2), server.addr, "/ping").await != Some(200) {
        assert!(Instant::now() < deadline, "the child server never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_after_max_connections_is_closed_at_once_and_one_address_gets_a_thousand() {
    let server = start_child().await;
    let addr = server.addr;
    // 10,000 connections from ten addresses, each at the per-address cap;
    // they wait for a request head (10 s), which the test does not need.
    let mut held = Vec::new();
    for n in 1..=10u8 {
        for _ in 0..1_000 {
            held.push(connect_from(loopback(n), addr).await.unwrap());
        }
        if n == 1 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut over_address = connect_from(loopback(1), addr).await.unwrap();
            assert!(
                closed_within(&mut over_address, Duration::from_secs(2)).await,
                "the 1,001st connection of one address is closed at once"
            );
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut over_server = connect_from(loopback(11), addr).await.unwrap();
    assert!(
        closed_within(&mut over_server, Duration::from_secs(2)).await,
        "the 10,001st connection is closed at once"
    );
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    while get_from(loopback(11), addr, "/ping").await != Some(200) {
        assert!(Instant::now() < deadline, "a freed place never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The resident set and its peak, in KiB, of process `pid`.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches(" kB").parse().ok())
            .unwrap()
    };
    (field("VmRSS:"), field("VmHWM:"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_responses_a_peer_never_takes_are_bounded_and_dropped_after_the_write_timeout() {
    let server = start_child().await;
    let addr = server.addr;
    let (baseline, _) = memory_kib(server.pid());
    // 200 connections of 256 requests each, whose response bodies the
    // peer never takes, though it answers PINGs all along: pages with a
    // window of 0, pages with a window of 1 byte (hyper would hand a whole
    // body to h2 at once), and bodies of unknown length that come late.
    let groups = [(100, 0, "/page"), (50, 1, "/page"), (50, 0, "/later")];
    let flood = Instant::now();
    let mut connections = Vec::new();
    let mut senders = Vec::new();
    let mut statuses = Vec::new();
    for (count, window, path) in groups {
        for _ in 0..count {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(window)
                .max_concurrent_reset_streams(0)
                .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(tcp))
                .await
                .unwrap();
            connections.push(tokio::spawn(connection));
            // Kept: a client with no handle left closes its connection.
            senders.push(send.clone());
            for _ in 0..256 {
                let mut send = send.clone();
                let request = http::Request::get(format!("http://{addr}{path}"))
                    .version(http::Version::HTTP_2)
                    .body(http_body_util::Empty::new())
                    .unwrap();
                statuses.push(tokio::spawn(async move {
                    // The head arrives (HEADERS are not flow-controlled);
                    // the body is kept unread.
                    let response = send.send_request(request).await.ok()?;
                    let status = response.status().as_u16();
                    tokio::spawn(async move {
                        let _body = response.into_body();
                        std::future::pending::<()>().await;
                    });
                    Some((window, path, status))
                }));
            }
        }
    }
    let (mut ok, mut busy) = (0, 0);
    let mut seen = std::collections::BTreeMap::new();
    for status in statuses {
        let answer = status.await.unwrap();
        *seen.entry(answer).or_insert(0) += 1;
        match answer {
            Some((_, "/page", 200)) => ok += 1,
            Some((_, "/page", 503)) => busy += 1,
            _ => {}
        }
    }
    eprintln!("answers (window, path, status): {seen:?}");
    // 8 KiB pages against 256 KiB a connection: at most 33 held each.
    assert!(ok <= 150 * 33, "{ok} pages held");
    assert!(busy >= 150 * 220, "{busy} page requests refused with 503");
    // Every connection is dropped once its responses waited the write
    // timeout (20 s), and not before.
    let mut ends = std::collections::BTreeMap::new();
    for connection in connections {
        let wait = Duration::from_secs(35).saturating_sub(flood.elapsed());
        let end = tokio::time::timeout(wait, connection)
            .await
            .expect("an HTTP/2 connection whose responses were never taken still open 35 s on")
            .unwrap();
        *ends.entry(format!("{end:?}")).or_insert(0) += 1;
    }
    eprintln!("connection ends: {ends:?}");
    let dropped = flood.elapsed();
    assert!(
        senders.iter().all(|send| send.is_closed()),
        "the server, not the client, ended them"
    );
    let (now, hwm) = memory_kib(server.pid());
    eprintln!(
        "200 connections dropped {dropped:?} after the flood; the server's peak was {} KiB over \
         a baseline of {baseline} KiB, {now} KiB after",
        hwm.saturating_sub(baseline)
    );
    assert!(
        dropped >= Duration::from_secs(20),
        "all dropped {dropped:?} after the flood began, before the write timeout"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_that_stop_arriving_fail_after_the_header_read_timeout() {
    let (addr, _stop) = serve(app()).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Stuck>(TokioIo::new(tcp))
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let start = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..256 {
        let mut send = send.clone();
        let request = http::Request::post(format!("http://{addr}/upload"))
            .version(http::Version::HTTP_2)
            .body(Stuck(false))
            .unwrap();
        answers.push(tokio::spawn(async move {
            send.send_request(request)
                .await
                .map(|response| response.status().as_u16())
        }));
    }
    for answer in answers {
        let answer = tokio::time::timeout(Duration::from_secs(15), answer)
            .await
            .expect("an upload that stopped was answered within 15 s")
            .unwrap();
        // A 400 from the body extractor, or the stream reset.
        assert!(!matches!(answer, Ok(200)), "{answer:?}");
    }
    let answered = start.elapsed();
    assert!(
        answered >= Duration::from_secs(9),
        "answered after {answered:?}"
    );
    // Then nothing is open: the connection goes after the idle timeout.
    tokio::time::timeout(Duration::from_secs(15), connection)
        .await
        .expect("the connection closed once idle")
        .unwrap()
        .ok();
}

/// A request body that sends one byte and then never another.
struct Stuck(bool);

impl hyper::body::Body for Stuck {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.0 {
            return std::task::Poll::Pending;
        }
        self.0 = true;
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(
            bytes::Bytes::from_static(b"x"),
        ))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_whose_answers_are_never_read_are_dropped_within_the_write_timeout() {
    let (addr, _stop) = serve(app()).await;
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    let request = format!("GET /big HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    tcp.write_all(request.repeat(200).as_bytes()).await.unwrap();
    // Nothing read for longer than the write timeout (20 s).
    tokio::time::sleep(Duration::from_secs(25)).await;
    let mut received = 0usize;
    let mut buf = vec![0; 256 * 1024];
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received += n,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the connection was still open 30 s on");
    assert!(
        received < 100 * BIG,
        "{received} bytes: the answers went on once read, the connection was never dropped"
    );
}

/// The CPU time (user and system) this process has used.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields 14 and 15, counted after the command name's closing paren.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // USER_HZ is 100 on Linux whatever the kernel's HZ.
    Duration::from_millis(ticks * 10)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_partial_http2_prefaces_cost_almost_no_cpu_while_they_wait() {
    let (addr, _stop) = serve(app()).await;
    let mut held = Vec::new();
    for _ in 0..1_000 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"P").await.unwrap();
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = cpu_time();
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let used = cpu_time() - before;
    eprintln!("{used:?} of CPU in {window:?} for 1,000 partial prefaces");
    assert!(
        used < window / 10,
        "{used:?} of CPU in {window:?} for 1,000 connections that sent one byte"
    );
    // Still served: the rest of a split preface is waited for.
    let mut tcp = held.pop().unwrap();
    tcp.write_all(&PREFACE[1..]).await.unwrap();
    tcp.write_all(&EMPTY_SETTINGS).await.unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(2), tcp.read_exact(&mut head))
        .await
        .expect("the server's SETTINGS")
        .unwrap();
    assert_eq!(head[3], 4, "a SETTINGS frame");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tls_sockets_of_one_address_cannot_shut_out_the_tls_clients_of_others() {
    use duplex::tls::rustls;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_der = cert.cert.der().clone();
    let key_der =
        rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(
        app().serve_tls_with_shutdown(listener, Arc::new(server_config), async move {
            let _ = stopped.await;
        }),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let client_config = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    // A TLS handshake from `ip`, in blocking rustls on its own thread.
    let handshake = |ip: IpAddr| {
        let client_config = Arc::clone(&client_config);
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(ip, 0).into())?;
            socket.connect(&addr.into())?;
            socket.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut tcp: std::net::TcpStream = socket.into();
            let mut tls =
                rustls::ClientConnection::new(client_config, "localhost".try_into().unwrap())
                    .map_err(std::io::Error::other)?;
            while tls.is_handshaking() {
                tls.complete_io(&mut tcp)?;
            }
            Ok(())
        })
    };
    handshake(loopback(2))
        .await
        .unwrap()
        .expect("a first TLS handshake");
    // 1,024 sockets from one address that never say a word: the shipped
    // server-wide limit of handshakes in progress, all from 127.0.0.1.
    let mut silent = Vec::new();
    for _ in 0..1_024 {
        silent.push(connect_from(loopback(1), addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        handshake(loopback(1)).await.unwrap().is_err(),
        "one address holds at most 64 handshakes in progress"
    );
    for n in 2..6 {
        handshake(loopback(n))
            .await
            .unwrap()
            .unwrap_or_else(|err| panic!("a client of 127.0.0.{n} was shut out: {err}"));
    }
    drop(silent);
}

/// An HPACK block for `GET /` (RFC 7541 static table: `:method GET`,
/// `:scheme http`, `:path /`).
const GET_ROOT: [u8; 3] = [0x82, 0x86, 0x84];

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads frames until a GOAWAY (its error code) or the end of the
/// connection (`None`), for at most 10 s.
async fn goaway_or_close(tcp: &mut TcpStream) -> Option<u32> {
    let mut buf = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        while buf.len() >= 9 {
            let len = usize::from(buf[0]) << 16 | usize::from(buf[1]) << 8 | usize::from(buf[2]);
            if buf.len() < 9 + len {
                break;
            }
            if buf[3] == 7 && len >= 8 {
                return Some(u32::from_be_bytes(buf[13..17].try_into().unwrap()));
            }
            buf.drain(..9 + len);
        }
        match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Err(_) => panic!("neither GOAWAY nor a close within 10 s"),
            Ok(Ok(0) | Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[tokio::test]
async fn cve_2023_44487_rapid_reset_ends_the_connection() {
    let (addr, _stop) = serve(app()).await;
    let mut tcp = idle_h2(loopback(1), addr).await.unwrap();
    // Open and at once reset 10,000 streams: each would start a request
    // the peer never waits for.
    let mut burst = Vec::new();
    for n in 0..10_000u32 {
        let stream = 2 * n + 1;
        burst.extend(frame(1, 0x4 | 0x1, stream, &GET_ROOT));
        burst.extend(frame(3, 0, stream, &8u32.to_be_bytes()));
    }
    // The server may close before it has read everything.
    let _ = tcp.write_all(&burst).await;
    let code = goaway_or_close(&mut tcp).await;
    // GOAWAY with ENHANCE_YOUR_CALM (RFC 9113 §7): the h2 crate's limit
    // on streams reset before they were served.
    assert_eq!(code, Some(0xb), "GOAWAY's error code");
}

#[tokio::test]
async fn a_continuation_flood_ends_the_connection_without_holding_the_headers() {
    let (addr, _stop) = serve(app()).await;
    let mut tcp = idle_h2(loopback(1), addr).await.unwrap();
    // HEADERS without END_HEADERS, then CONTINUATION frames of literal
    // headers that never end: 64 MiB if the server kept reading them.
    let _ = tcp.write_all(&frame(1, 0x1, 1, &GET_ROOT)).await;
    let mut literal = vec![0x40, 8];
    literal.extend_from_slice(b"x-filler");
    literal.push(100);
    literal.extend_from_slice(&[b'a'; 100]);
    let block: Vec<u8> = literal.repeat(16 * 1024 / literal.len());
    let continuation = frame(9, 0, 1, &block);
    let flood = async {
        for _ in 0..4_096 {
            if tcp.write_all(&continuation).await.is_err() {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    let code = goaway_or_close(&mut tcp).await;
    // GOAWAY with ENHANCE_YOUR_CALM: the h2 crate's limit on a header
    // block's frames and size.
    assert_eq!(code, Some(0xb), "GOAWAY's error code");
}
