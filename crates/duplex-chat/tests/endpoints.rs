//! The duplex-chat endpoints (`/mirror`, `/chat/plain`, `/echo`, the page
//! and `/metrics`) over real loopback sockets, with tokio-tungstenite as the
//! independent client. The JSON chat of `/chat` is in `chat_protocol.rs`.
//!
//! Every wait is bounded by [`WAIT`] (the 16 MiB round trips by [`BIG_WAIT`]);
//! all traffic goes to 127.0.0.1.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use duplex::WebSockets;
use duplex_chat::ChatOptions;
use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        protocol::{
            WebSocketConfig,
            frame::{
                Frame,
                coding::{Data, OpCode},
            },
        },
    },
};

const WAIT: Duration = Duration::from_secs(3);
const BIG_WAIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<TcpStream>;

async fn within_for<F: Future>(limit: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(limit, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {limit:?} waiting for {what}"),
    }
}

async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    within_for(WAIT, what, fut).await
}

/// `duplex_chat::app` served on a free loopback port until the returned
/// sender fires (or the test ends), with the echo routes reading up to
/// 16 MiB a message, as conformance suites need (`--echo-max-message`).
async fn start(
    websockets: WebSockets,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<io::Result<()>>) {
    start_with(
        websockets,
        ChatOptions {
            echo_max_message: 16 << 20,
            ..ChatOptions::default()
        },
    )
    .await
}

/// As [`start`], with `options`.
async fn start_with(
    websockets: WebSockets,
    options: ChatOptions,
) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<io::Result<()>>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("local_addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let app = duplex_chat::app_with(websockets, options).shutdown_grace(Duration::from_secs(2));
    let serve = tokio::spawn(app.serve_with_shutdown(listener, async move {
        let _ = stopped.await;
    }));
    (addr, stop, serve)
}

async fn connect(addr: SocketAddr, path: &str) -> Ws {
    let config = WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect to the test server");
    let url = format!("ws://{addr}{path}");
    within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async_with_config(url, tcp, Some(config)),
    )
    .await
    .expect("WebSocket handshake")
    .0
}

async fn next_within(limit: Duration, ws: &mut Ws) -> Message {
    within_for(limit, "a message from the server", ws.next())
        .await
        .expect("the connection ended")
        .expect("a WebSocket error")
}

async fn next(ws: &mut Ws) -> Message {
    next_within(WAIT, ws).await
}

async fn send(ws: &mut Ws, message: Message) {
    within("a send", ws.send(message)).await.expect("send");
}

/// Reads until a Close arrives and returns its code and reason, then reads
/// on (tungstenite answers the Close) until the stream ends.
async fn expect_close(ws: &mut Ws) -> (u16, String) {
    let close = loop {
        match next(ws).await {
            Message::Close(Some(frame)) => break (u16::from(frame.code), frame.reason.to_string()),
            Message::Close(None) => panic!("Close without a status code"),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a Close, got {other:?}"),
        }
    };
    if let Some(Ok(other)) = within("the end of the stream after Close", ws.next()).await {
        panic!("data after Close: {other:?}");
    }
    close
}

fn fragment(opcode: Data, payload: &[u8], fin: bool) -> Message {
    Message::Frame(Frame::message(payload.to_vec(), OpCode::Data(opcode), fin))
}

/// The length classes of §5.2: 7-bit, 16-bit and 64-bit lengths and their
/// edges, up to the default 16 MiB frame limit.
const SIZES: [usize; 8] = [0, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20];

/// Text of exactly `len` bytes that mixes 1- to 4-byte characters.
fn text_of_len(len: usize) -> String {
    let mut text = String::with_capacity(len);
    for c in "aé€𝄞 z".chars().cycle() {
        if text.len() + c.len_utf8() > len {
            break;
        }
        text.push(c);
    }
    while text.len() < len {
        text.push('.');
    }
    text
}

mod rfc6455_5_6_data_frames {
    use super::*;

    /// At the shipped defaults `/echo` and `/mirror` read 64 KiB a message,
    /// the chat's own limit: one byte more (in one frame, or added up over
    /// fragments) is refused with 1009 (RFC 6455 §7.4.1), so that an echo
    /// never holds more than that per connection.
    #[tokio::test]
    async fn echo_routes_read_64_kib_a_message_by_default_and_refuse_more_with_1009() {
        let (addr, _stop, _serve) = start_with(WebSockets::default(), ChatOptions::default()).await;
        let mut ws = connect(addr, "/mirror").await;
        let most = vec![7u8; 64 << 10];
        send(&mut ws, Message::binary(most.clone())).await;
        assert_eq!(next(&mut ws).await, Message::binary(most));
        send(&mut ws, Message::binary(vec![7u8; (64 << 10) + 1])).await;
        assert_eq!(expect_close(&mut ws).await.0, 1009);

        let mut ws = connect(addr, "/mirror").await;
        send(&mut ws, fragment(Data::Binary, &[1u8; 40 << 10], false)).await;
        send(&mut ws, fragment(Data::Continue, &[1u8; 40 << 10], true)).await;
        assert_eq!(expect_close(&mut ws).await.0, 1009);

        let mut ws = connect(addr, "/echo").await;
        assert_eq!(next(&mut ws).await, Message::text("Please enter your name"));
        send(&mut ws, Message::text("x".repeat((64 << 10) + 1))).await;
        assert_eq!(expect_close(&mut ws).await.0, 1009);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mirror_returns_text_of_every_length_class_unchanged() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let mut ws = connect(addr, "/mirror").await;
        for size in SIZES {
            let text = text_of_len(size);
            assert_eq!(text.len(), size);
            within_for(BIG_WAIT, "a big send", ws.send(Message::text(text.clone())))
                .await
                .expect("send");
            match next_within(BIG_WAIT, &mut ws).await {
                Message::Text(echo) => {
                    assert_eq!(echo.len(), size, "length of the echo of {size} bytes");
                    assert!(echo.as_str() == text, "the echo of {size} bytes differs");
                }
                other => panic!(
                    "{size} bytes: expected text, got {} bytes of {other:?}",
                    other.len()
                ),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn mirror_returns_binary_of_every_length_class_unchanged() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let mut ws = connect(addr, "/mirror").await;
        for size in SIZES {
            let data: Vec<u8> = (0..size).map(|i| (i * 31 + i / 251) as u8).collect();
            within_for(
                BIG_WAIT,
                "a big send",
                ws.send(Message::binary(data.clone())),
            )
            .await
            .expect("send");
            match next_within(BIG_WAIT, &mut ws).await {
                Message::Binary(echo) => {
                    assert_eq!(echo.len(), size, "length of the echo of {size} bytes");
                    assert!(echo == data, "the echo of {size} bytes differs");
                }
                other => panic!("{size} bytes: expected binary, got {other:?}"),
            }
        }
    }
}

mod rfc6455_5_4_fragmentation {
    use super::*;

    #[tokio::test]
    async fn mirror_returns_fragmented_message_whole() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let mut ws = connect(addr, "/mirror").await;
        // Text cut inside "é" (2 bytes) and inside "𝄞" (4 bytes).
        let text = "fragé𝄞nted";
        let bytes = text.as_bytes();
        send(&mut ws, fragment(Data::Text, &bytes[..5], false)).await;
        send(&mut ws, fragment(Data::Continue, &bytes[5..8], false)).await;
        send(&mut ws, fragment(Data::Continue, &[], false)).await;
        send(&mut ws, fragment(Data::Continue, &bytes[8..], true)).await;
        assert_eq!(next(&mut ws).await, Message::text(text));

        send(&mut ws, fragment(Data::Binary, &[1, 2], false)).await;
        send(&mut ws, fragment(Data::Continue, &[3], true)).await;
        assert_eq!(next(&mut ws).await, Message::binary(vec![1, 2, 3]));
    }

    #[tokio::test]
    async fn pings_between_fragments_are_answered_with_pongs_of_the_same_payload() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let mut ws = connect(addr, "/mirror").await;
        send(&mut ws, fragment(Data::Text, b"one ", false)).await;
        send(&mut ws, Message::Ping(b"ping 1".to_vec().into())).await;
        // Answered while the message is still incomplete.
        assert_eq!(
            next(&mut ws).await,
            Message::Pong(b"ping 1".to_vec().into())
        );
        send(&mut ws, fragment(Data::Continue, b"two ", false)).await;
        send(&mut ws, Message::Ping(vec![0xAB; 125].into())).await;
        assert_eq!(next(&mut ws).await, Message::Pong(vec![0xAB; 125].into()));
        send(&mut ws, fragment(Data::Continue, b"three", true)).await;
        assert_eq!(next(&mut ws).await, Message::text("one two three"));
    }
}

mod chat_broadcast {
    use super::*;

    #[tokio::test]
    async fn broadcast_reaches_every_connected_client() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let mut clients = Vec::new();
        for n in 1..=3 {
            let mut ws = connect(addr, "/chat/plain").await;
            assert_eq!(
                next(&mut ws).await,
                Message::text(format!("You are connected! There are {n} users here."))
            );
            clients.push(ws);
        }
        // The second to join is user1.
        send(&mut clients[1], Message::text("hi")).await;
        for (i, ws) in clients.iter_mut().enumerate() {
            assert_eq!(next(ws).await, Message::text("[user1]: hi"), "client {i}");
        }
        send(&mut clients[2], Message::text("hello all")).await;
        for (i, ws) in clients.iter_mut().enumerate() {
            assert_eq!(
                next(ws).await,
                Message::text("[user2]: hello all"),
                "client {i}"
            );
        }
    }
}

mod echo_endpoint {
    use super::*;

    #[tokio::test]
    async fn echo_greets_and_closes_on_bye() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let mut ws = connect(addr, "/echo").await;
        assert_eq!(next(&mut ws).await, Message::text("Please enter your name"));
        send(&mut ws, Message::text("Ada")).await;
        assert_eq!(next(&mut ws).await, Message::text("Hi, Ada!"));
        send(&mut ws, Message::text("bye")).await;
        assert_eq!(
            expect_close(&mut ws).await,
            (1000, "Client said BYE".to_owned())
        );
    }
}

mod http_routes {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// One plain HTTP/1.1 GET; the whole response as text.
    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut tcp = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("connect");
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        within("a write", tcp.write_all(request.as_bytes()))
            .await
            .expect("write");
        let mut response = String::new();
        within("the response", tcp.read_to_string(&mut response))
            .await
            .expect("read");
        response
    }

    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        let head = response.split("\r\n\r\n").next()?;
        head.lines().find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    #[tokio::test]
    async fn the_chat_page_and_its_assets_are_served_next_to_the_websocket_routes() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        let page = get(addr, "/").await;
        assert!(page.starts_with("HTTP/1.1 200 "), "{page}");
        assert_eq!(
            header(&page, "content-type"),
            Some("text/html; charset=utf-8")
        );
        assert!(page.contains("<title>duplex chat</title>"), "{page}");
        assert!(page.contains(r#"<script src="/app.js" defer></script>"#));
        assert!(
            header(&page, "content-security-policy")
                .is_some_and(|p| p.contains("connect-src 'self'"))
        );
        for (path, kind, needle) in [
            (
                "/app.js",
                "text/javascript; charset=utf-8",
                "new WebSocket(",
            ),
            ("/app.css", "text/css; charset=utf-8", ".composer"),
            ("/favicon.svg", "image/svg+xml", "<svg"),
        ] {
            let response = get(addr, path).await;
            assert!(response.starts_with("HTTP/1.1 200 "), "{path}: {response}");
            assert_eq!(header(&response, "content-type"), Some(kind), "{path}");
            assert!(response.contains(needle), "{path}");
        }
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404 "));
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_prometheus_text_format() {
        let (addr, _stop, _serve) = start(WebSockets::default()).await;
        // Some traffic, so that counters exist.
        let mut ws = connect(addr, "/mirror").await;
        send(&mut ws, Message::text("count me")).await;
        assert_eq!(next(&mut ws).await, Message::text("count me"));
        let response = get(addr, "/metrics").await;
        assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
        assert!(
            header(&response, "content-type").is_some_and(|t| t.starts_with("text/plain")),
            "{response}"
        );
        assert!(
            response.contains("duplex_messages_received_total")
                || response.contains("duplex_sessions"),
            "no duplex metric in {response}"
        );
    }

    /// `--metrics-addr`: the public routes without `/metrics`, and
    /// `/metrics` alone on a listener of its own.
    #[tokio::test]
    async fn metrics_on_their_own_listener_are_not_on_the_public_one() {
        let serve = |app: duplex::App| async move {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(app.serve_with_shutdown(listener, std::future::pending()));
            addr
        };
        let chat = duplex_chat::Chat::new(ChatOptions::default());
        let public = serve(duplex_chat::public_app_for(WebSockets::default(), chat)).await;
        let private = serve(duplex_chat::metrics_app()).await;
        assert!(get(public, "/").await.starts_with("HTTP/1.1 200 "));
        let refused = get(public, "/metrics").await;
        assert!(refused.starts_with("HTTP/1.1 404 "), "{refused}");
        let metrics = get(private, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200 "), "{metrics}");
        assert!(metrics.contains("duplex_sessions"), "{metrics}");
        assert!(get(private, "/").await.starts_with("HTTP/1.1 404 "));
    }
}

mod rfc6455_7_4_1_going_away {
    use super::*;

    #[tokio::test]
    async fn graceful_shutdown_closes_sessions_with_1001_and_serve_returns() {
        let (addr, stop, serve) = start(WebSockets::default()).await;
        let mut ws = connect(addr, "/mirror").await;
        send(&mut ws, Message::text("before")).await;
        assert_eq!(next(&mut ws).await, Message::text("before"));
        stop.send(())
            .expect("the server is listening for the signal");
        let (code, reason) = expect_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (1001, "Server shutting down"));
        drop(ws);
        within("serve_with_shutdown to return", serve)
            .await
            .expect("the serve task panicked")
            .expect("serve returned an error");
    }
}

/// The status of an upgrade to `path` from a page of `origin`.
async fn upgrade_status(addr: SocketAddr, path: &str, origin: &str) -> u16 {
    use tokio_tungstenite::tungstenite::{Error as WsError, client::IntoClientRequest};
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    request
        .headers_mut()
        .insert("Origin", origin.parse().expect("origin header"));
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect to the test server");
    match within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async(request, tcp),
    )
    .await
    {
        Ok(_) => 101,
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("handshake failed without an HTTP answer: {err}"),
    }
}

#[tokio::test]
async fn rfc6455_10_2_pages_of_other_sites_get_403_on_every_websocket_route() {
    let (addr, _stop, _serve) = start(WebSockets::default()).await;
    for path in ["/chat", "/chat/plain", "/echo", "/mirror"] {
        assert_eq!(
            upgrade_status(addr, path, "https://evil.example").await,
            403,
            "a foreign page on {path}"
        );
        assert_eq!(
            upgrade_status(addr, path, &format!("http://{addr}")).await,
            101,
            "the chat's own page on {path}"
        );
    }
}
