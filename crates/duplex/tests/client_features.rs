//! The client's permessage-deflate (RFC 7692 in the client role), header
//! checks, handshake timeout and refused-upgrade statuses, over real
//! loopback sockets: against duplex's server (through a relay that records
//! the bytes, to see the compression on the wire), against Python
//! `websockets` as an independent server, and against raw listeners that
//! answer what a test needs.

mod common;

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{Server, WAIT, within};
use duplex::{
    App, Client, ClientError, Deflate, Message, Session, WebSockets,
    proto::{FrameHeader, OpCode, Rsv, accept_key},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

fn mirror(deflate: Deflate) -> App {
    let websockets = WebSockets::default().extension(deflate).unwrap();
    App::new()
        .install(websockets)
        .web_socket("/mirror", |mut session: Session| async move {
            while let Ok(Some(message)) = session.recv().await {
                if session.send(message).await.is_err() {
                    break;
                }
            }
        })
}

/// A compressible payload of `len` bytes.
fn payload(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b"the quick brown fox jumps over the lazy dog. "[i % 45])
        .collect()
}

/// What went through the relay, each way.
#[derive(Default)]
struct Recorded {
    to_server: Vec<u8>,
    to_client: Vec<u8>,
}

/// A TCP relay on 127.0.0.1 for one connection to `target`, recording
/// every byte it passes.
async fn relay(target: std::net::SocketAddr) -> (String, Arc<Mutex<Recorded>>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let record = Arc::clone(&recorded);
    let task = tokio::spawn(async move {
        let (client, _) = listener.accept().await.unwrap();
        let server = TcpStream::connect(target).await.unwrap();
        let (client_read, client_write) = client.into_split();
        let (server_read, server_write) = server.into_split();
        let up = pump(client_read, server_write, Arc::clone(&record), |r| {
            &mut r.to_server
        });
        let down = pump(server_read, client_write, record, |r| &mut r.to_client);
        tokio::join!(up, down);
    });
    (format!("127.0.0.1:{}", addr.port()), recorded, task)
}

/// Copies `from` into `to` until either ends, recording every byte in the
/// side of `record` that `side` picks.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Recorded>>,
    side: fn(&mut Recorded) -> &mut Vec<u8>,
) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        side(&mut record.lock().unwrap()).extend_from_slice(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The data messages in one direction of a recorded connection: for each,
/// its opcode, the RSV bits of its first frame and its size on the wire.
fn messages_on_the_wire(bytes: &[u8]) -> Vec<(OpCode, Rsv, u64)> {
    let head = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP head")
        + 4;
    let mut rest = &bytes[head..];
    let mut messages: Vec<(OpCode, Rsv, u64)> = Vec::new();
    while let Some((header, len)) = FrameHeader::decode(rest).expect("valid frames") {
        match header.opcode {
            OpCode::Text | OpCode::Binary => {
                messages.push((header.opcode, header.rsv, header.payload_len));
            }
            OpCode::Continuation => {
                messages.last_mut().expect("a first frame").2 += header.payload_len
            }
            _ => {}
        }
        rest = &rest[len + header.payload_len as usize..];
    }
    assert!(rest.is_empty(), "a frame cut short");
    messages
}

const SIZES: [usize; 8] = [0, 1, 32, 33, 1000, 70_000, 200_000, 1 << 20];

/// Sends text and binary messages of every size in [`SIZES`], then the
/// same 1000-byte message twice; returns the server's answer and checks
/// every echo.
async fn exchange(client: Client, url: String) -> Vec<String> {
    within(
        "the deflate exchange",
        client.connect(&url, |mut session| async move {
            let answers: Vec<String> = session.extensions().iter().map(|e| e.to_string()).collect();
            for &size in &SIZES {
                let text = String::from_utf8(payload(size)).unwrap();
                for message in [Message::text(text.clone()), Message::binary(payload(size))] {
                    session.send(message.clone()).await.unwrap();
                    let echo = session.recv().await.unwrap().expect("an echo");
                    assert_eq!(echo, message, "{size} bytes");
                }
            }
            let repeat = Message::binary(payload(1000));
            for _ in 0..2 {
                session.send(repeat.clone()).await.unwrap();
                assert_eq!(session.recv().await.unwrap().as_ref(), Some(&repeat));
            }
            session
                .close(duplex::CloseReason::new(duplex::CloseCode::NORMAL, ""))
                .await
                .unwrap();
            assert_eq!(session.recv().await.unwrap(), None);
            answers
        }),
    )
    .await
    .unwrap()
}

/// Checks one direction: messages over the 32-byte threshold went
/// compressed (RSV1, smaller), the others plain; and whether the repeated
/// message at the end came smaller the second time (context kept).
fn check_direction(what: &str, wire: &[(OpCode, Rsv, u64)], context_kept: bool) {
    assert_eq!(wire.len(), SIZES.len() * 2 + 2, "{what}: {wire:?}");
    for (i, &(opcode, rsv, len)) in wire[..SIZES.len() * 2].iter().enumerate() {
        let size = SIZES[i / 2];
        let expected = if i % 2 == 0 {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        assert_eq!(opcode, expected, "{what}: message {i}");
        if size > 32 {
            assert_eq!(rsv, Rsv::RSV1, "{what}: {size} bytes not compressed");
            // Short messages gain little; the longer ones must shrink.
            let most = if size >= 1000 { size / 4 } else { size + 8 };
            assert!(len < most as u64, "{what}: {size} bytes sent as {len}");
        } else {
            assert_eq!((rsv, len), (Rsv::NONE, size as u64), "{what}: {size} bytes");
        }
    }
    let (first, second) = (wire[wire.len() - 2].2, wire[wire.len() - 1].2);
    if context_kept {
        assert!(
            second < first,
            "{what}: repeat {second} after {first}, context not kept"
        );
    } else {
        assert_eq!(
            second, first,
            "{what}: repeat {second} after {first}, not compressed alone"
        );
    }
}

async fn deflate_through_relay(
    server_config: Deflate,
    client_config: Deflate,
) -> (Vec<String>, Recorded) {
    let server = Server::start(mirror(server_config)).await;
    let (addr, recorded, relay) = relay(server.addr).await;
    let answers = exchange(
        Client::new().deflate(client_config),
        format!("ws://{addr}/mirror"),
    )
    .await;
    within("the relay to finish", relay).await.unwrap();
    let recorded = std::mem::take(&mut *recorded.lock().unwrap());
    (answers, recorded)
}

#[tokio::test]
async fn rfc7692_client_deflate_with_duplex_defaults_compresses_each_message_alone() {
    let (answers, recorded) = deflate_through_relay(Deflate::default(), Deflate::default()).await;
    let offer = String::from_utf8_lossy(&recorded.to_server);
    assert!(
        offer.contains(
            "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits\r\n"
        ),
        "{offer}"
    );
    assert_eq!(
        answers,
        ["permessage-deflate; server_no_context_takeover; client_no_context_takeover"]
    );
    check_direction(
        "client to server",
        &messages_on_the_wire(&recorded.to_server),
        false,
    );
    check_direction(
        "server to client",
        &messages_on_the_wire(&recorded.to_client),
        false,
    );
}

#[tokio::test]
async fn rfc7692_client_deflate_keeps_contexts_when_neither_side_turns_them_off() {
    let keep = Deflate::default()
        .server_no_context_takeover(false)
        .client_no_context_takeover(false);
    let (answers, recorded) = deflate_through_relay(keep.clone(), keep).await;
    assert_eq!(answers, ["permessage-deflate"]);
    // Both directions rely on the context across messages: a client that
    // reset its decompressor would fail on the server's second repeat.
    check_direction(
        "client to server",
        &messages_on_the_wire(&recorded.to_server),
        true,
    );
    check_direction(
        "server to client",
        &messages_on_the_wire(&recorded.to_client),
        true,
    );
}

#[tokio::test]
async fn rfc7692_client_compresses_alone_when_the_server_asks_though_it_would_keep_context() {
    // The server keeps its own context but answers client_no_context_takeover.
    let server = Deflate::default().server_no_context_takeover(false);
    let client = Deflate::default()
        .server_no_context_takeover(false)
        .client_no_context_takeover(false);
    let (answers, recorded) = deflate_through_relay(server, client).await;
    assert_eq!(answers, ["permessage-deflate; client_no_context_takeover"]);
    check_direction(
        "client to server",
        &messages_on_the_wire(&recorded.to_server),
        false,
    );
    check_direction(
        "server to client",
        &messages_on_the_wire(&recorded.to_client),
        true,
    );
}

#[tokio::test]
async fn client_without_deflate_offers_nothing_and_sends_plain() {
    let server = Server::start(mirror(Deflate::default())).await;
    let (addr, recorded, relay) = relay(server.addr).await;
    within(
        "a plain session",
        Client::new().connect(&format!("ws://{addr}/mirror"), |mut session| async move {
            assert!(session.extensions().is_empty());
            session.send(Message::binary(payload(5000))).await.unwrap();
            session.recv().await.unwrap().unwrap();
        }),
    )
    .await
    .unwrap();
    within("the relay to finish", relay).await.unwrap();
    let recorded = recorded.lock().unwrap();
    assert!(!String::from_utf8_lossy(&recorded.to_server).contains("Sec-WebSocket-Extensions"));
    assert_eq!(
        messages_on_the_wire(&recorded.to_server),
        [(OpCode::Binary, Rsv::NONE, 5000)]
    );
}

// ------------------------------------------------------- Python websockets

/// An echo server of Python `websockets` (its default permessage-deflate
/// on), on a free loopback port; killed on drop.
struct PythonServer {
    child: std::process::Child,
    port: u16,
}

const PYTHON_ECHO: &str = r#"
import asyncio, sys
from websockets.asyncio.server import serve

async def echo(ws):
    async for message in ws:
        await ws.send(message)

async def main():
    async with serve(echo, "127.0.0.1", 0, max_size=None) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(60)

asyncio.run(main())
"#;

impl PythonServer {
    async fn start() -> PythonServer {
        let mut child = std::process::Command::new("python3")
            .args(["-c", PYTHON_ECHO])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("python3 is needed for this test (and `pip install 'websockets>=13'`)");
        let stdout = child.stdout.take().unwrap();
        // The first line is the port, or nothing when the import failed.
        let line = within(
            "the Python server's port",
            tokio::task::spawn_blocking(move || {
                let mut line = String::new();
                std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
                    .map(|_| line)
            }),
        )
        .await
        .unwrap()
        .unwrap();
        let port = line.trim().parse().unwrap_or_else(|_| {
            panic!("the Python websockets server did not start (is `websockets` >= 13 installed? .ci/run installs it): {line:?}")
        });
        PythonServer { child, port }
    }
}

impl Drop for PythonServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn python_round_trip(deflate: Deflate) -> Vec<String> {
    let server = PythonServer::start().await;
    let url = format!("ws://127.0.0.1:{}/", server.port);
    let answers = within(
        "the session with Python websockets",
        Client::new()
            .deflate(deflate)
            .connect(&url, |mut session| async move {
                let answers: Vec<String> =
                    session.extensions().iter().map(|e| e.to_string()).collect();
                // Several similar messages: with contexts kept, each one's
                // compression refers to the ones before, in both directions.
                for size in [0, 10, 100, 1000, 5000, 1000, 100, 70_000, 1 << 20, 1000] {
                    let text = Message::text(String::from_utf8(payload(size)).unwrap());
                    let binary = Message::binary(payload(size));
                    for message in [text, binary] {
                        session.send(message.clone()).await.unwrap();
                        assert_eq!(
                            session.recv().await.unwrap().as_ref(),
                            Some(&message),
                            "{size} bytes"
                        );
                    }
                }
                answers
            }),
    )
    .await
    .unwrap();
    drop(server);
    answers
}

#[tokio::test]
async fn rfc7692_client_deflate_against_python_websockets_defaults() {
    let answers = python_round_trip(Deflate::default()).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    for param in [
        "permessage-deflate",
        "server_no_context_takeover",
        "client_no_context_takeover",
    ] {
        assert!(answers[0].contains(param), "{answers:?}");
    }
}

#[tokio::test]
async fn rfc7692_client_deflate_against_python_websockets_with_contexts_kept() {
    let keep = Deflate::default()
        .server_no_context_takeover(false)
        .client_no_context_takeover(false);
    let answers = python_round_trip(keep).await;
    assert_eq!(answers.len(), 1, "{answers:?}");
    assert!(answers[0].starts_with("permessage-deflate"), "{answers:?}");
    assert!(!answers[0].contains("no_context_takeover"), "{answers:?}");
}

// ------------------------------------------------------------ raw servers

/// A listener that answers one upgrade with a 101 carrying `extensions`
/// (or with `status` when not 101), then reads the client's first frame:
/// its RSV bits and payload length (`None` if the client hung up first).
async fn raw_server(
    status: u16,
    extensions: Option<&'static str>,
) -> (String, JoinHandle<Option<(Rsv, u64)>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        while !request.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                return None;
            }
            request.push(byte[0]);
        }
        let request = String::from_utf8(request).unwrap();
        let key = request
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let mut response = if status == 101 {
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
                accept_key(key.as_bytes())
            )
        } else {
            format!("HTTP/1.1 {status} Nope\r\nContent-Length: 0\r\n")
        };
        if let Some(extensions) = extensions {
            response.push_str(&format!("Sec-WebSocket-Extensions: {extensions}\r\n"));
        }
        response.push_str("\r\n");
        tcp.write_all(response.as_bytes()).await.unwrap();
        let mut frame = Vec::new();
        loop {
            if let Some((header, len)) = FrameHeader::decode(&frame).unwrap()
                && frame.len() as u64 >= len as u64 + header.payload_len
            {
                return Some((header.rsv, header.payload_len));
            }
            let mut buf = [0u8; 4096];
            match tcp.read(&mut buf).await {
                Ok(n @ 1..) => frame.extend_from_slice(&buf[..n]),
                _ => return None,
            }
        }
    });
    (format!("ws://127.0.0.1:{}/", addr.port()), task)
}

#[tokio::test]
async fn rfc7692_7_1_response_with_parameters_not_allowed_fails_the_handshake() {
    for (client, answer) in [
        (
            Client::new().deflate(Deflate::default()),
            "permessage-deflate; unknown_param",
        ),
        (
            Client::new().deflate(Deflate::default()),
            "permessage-deflate; client_max_window_bits",
        ),
        (
            Client::new().deflate(Deflate::default()),
            "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        ),
        (
            Client::new().deflate(Deflate::default().server_max_window_bits(10)),
            "permessage-deflate; server_max_window_bits=12",
        ),
        (
            Client::new().deflate(Deflate::default()),
            "permessage-deflate, permessage-deflate",
        ),
        (Client::new().deflate(Deflate::default()), "x-unknown"),
        // §9.1: not offered at all.
        (Client::new(), "permessage-deflate"),
    ] {
        let (url, server) = raw_server(101, Some(answer)).await;
        let err = within("the refused handshake", client.connect(&url, |_| async {}))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ClientError::Extension(_)),
            "{answer}: {err:?}"
        );
        // Failed without sending a frame.
        assert_eq!(
            within("the raw server", server).await.unwrap(),
            None,
            "{answer}"
        );
    }
}

/// The client's first message to a raw server that answered `answer`.
async fn first_frame_after(answer: &'static str) -> (Vec<String>, Option<(Rsv, u64)>) {
    let (url, server) = raw_server(101, Some(answer)).await;
    let answers = within(
        "the session",
        Client::new()
            .deflate(Deflate::default())
            .handshake_timeout(WAIT)
            .connect(&url, |mut session| async move {
                session.send(Message::binary(payload(1000))).await.unwrap();
                // The raw server hangs up once it has read the frame.
                let _ = session.recv().await;
                session
                    .extensions()
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
            }),
    )
    .await
    .unwrap();
    (answers, within("the raw server", server).await.unwrap())
}

#[tokio::test]
async fn rfc7692_client_window_8_answer_sends_uncompressed() {
    // zlib cannot compress raw with 8 bits: §6 lets the client send plain.
    let (answers, frame) = first_frame_after("permessage-deflate; client_max_window_bits=8").await;
    assert_eq!(answers, ["permessage-deflate; client_max_window_bits=8"]);
    assert_eq!(frame, Some((Rsv::NONE, 1000)));
    let (_, frame) = first_frame_after("permessage-deflate; client_max_window_bits=9").await;
    let (rsv, len) = frame.unwrap();
    assert!(rsv == Rsv::RSV1 && len < 200, "{rsv:?} {len}");
}

#[tokio::test]
async fn header_with_cr_or_lf_is_refused_before_connecting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    for (name, value) in [
        ("X-Evil", "a\r\nInjected: 1"),
        ("X-Evil", "a\nInjected: 1"),
        ("X-Evil", "a\rb"),
        ("X-Evil", "nul\0"),
        ("X-Evil\r\nInjected", "1"),
        ("Bad Name", "1"),
        ("", "1"),
        // Written by the handshake itself: a second copy would break it.
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("connection", "close"),
        ("Host", "elsewhere.example"),
        ("Sec-WebSocket-Extensions", "permessage-deflate"),
    ] {
        let err = within(
            "the refused header",
            Client::new()
                .header("X-Fine", "ok")
                .header(name, value)
                .connect(&url, |_| async {}),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, ClientError::InvalidHeader(_)),
            "{name:?}: {value:?}: {err:?}"
        );
    }
    // Nothing was written: no connection was even opened.
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the client connected");
}

#[tokio::test]
async fn valid_headers_reach_the_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let recorder = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut bytes = Vec::new();
        while !bytes.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            tcp.read_exact(&mut byte).await.unwrap();
            bytes.push(byte[0]);
        }
        String::from_utf8(bytes).unwrap()
    });
    let client = Client::new()
        .header("Authorization", "Bearer abc\tdef")
        .handshake_timeout(Duration::from_millis(500));
    let err = client.connect(&url, |_| async {}).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Handshake(_) | ClientError::Timeout(_)),
        "{err:?}"
    );
    let head = within("the request head", recorder).await.unwrap();
    assert!(
        head.contains("\r\nauthorization: Bearer abc\tdef\r\n"),
        "{head}"
    );
}

#[tokio::test]
async fn handshake_timeout_fires_when_the_server_never_answers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    // Accepts and holds the connection, answering nothing.
    let silent = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(tcp);
    });
    let timeout = Duration::from_millis(300);
    let start = Instant::now();
    let err = within(
        "the handshake timeout",
        Client::new()
            .handshake_timeout(timeout)
            .connect(&url, |_| async {}),
    )
    .await
    .unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(err, ClientError::Timeout(t) if t == timeout),
        "{err:?}"
    );
    assert!(took >= timeout && took < timeout * 5, "{took:?}");
    silent.abort();
}

#[tokio::test]
async fn refused_upgrade_carries_its_status() {
    let server = Server::start(mirror(Deflate::default())).await;
    // An unknown path: 404.
    let err = within(
        "the 404",
        duplex::connect(&format!("ws://{}/nowhere", server.addr), |_| async {}),
    )
    .await
    .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::NOT_FOUND), "{err:?}");
    // Another site's page: 403 from the origin check.
    let err = within(
        "the 403",
        Client::new()
            .header("Origin", "http://elsewhere.example")
            .connect(&format!("ws://{}/mirror", server.addr), |_| async {}),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, ClientError::Status(s) if s == http::StatusCode::FORBIDDEN),
        "{err:?}"
    );
    // A raw server's 503.
    let (url, raw) = raw_server(503, None).await;
    let err = within("the 503", duplex::connect(&url, |_| async {}))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(http::StatusCode::SERVICE_UNAVAILABLE));
    assert!(err.to_string().contains("503"), "{err}");
    raw.abort();
}
