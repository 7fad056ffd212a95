//! WebSockets over HTTP/2 (RFC 8441) on `App::serve` and `serve_tls`: the
//! setting (§3), the extended CONNECT (§4), the 200 and the stream as the
//! socket (§5), many sessions on one connection, the same routes, limits
//! and shutdown as over HTTP/1.1, and HTTP/1.1 on the same listener. The
//! client side is duplex's `Client::http2` / `connect_http2`; the refusals
//! are checked with hyper's own HTTP/2 client and raw frames.

mod common;

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use common::{Server, within};
use duplex::{
    App, Client, ClientError, CloseCode, Deflate, Message, Session, WebSockets, tls::rustls,
};
use http::{Method, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

type Seen = Arc<Mutex<Vec<(Method, Version, Option<std::net::SocketAddr>)>>>;

/// `/mirror` (subprotocol v1) echoing every message, noting each session's
/// request line and peer.
fn mirror(websockets: WebSockets, seen: Seen) -> App {
    App::new().install(websockets).web_socket_with_protocols(
        "/mirror",
        ["v1"],
        move |mut session: Session| {
            let seen = Arc::clone(&seen);
            async move {
                let request = session.request();
                seen.lock().unwrap().push((
                    request.method().clone(),
                    request.version(),
                    request.remote_addr(),
                ));
                while let Ok(Some(message)) = session.recv().await {
                    if session.send(message).await.is_err() {
                        break;
                    }
                }
            }
        },
    )
}

fn seen() -> Seen {
    Arc::new(Mutex::new(Vec::new()))
}

/// Reads one HTTP/2 frame: (type, flags, stream, payload).
async fn read_frame(tcp: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    (head[3], head[4], stream, payload)
}

#[tokio::test]
async fn rfc8441_3_server_advertises_settings_enable_connect_protocol() {
    let server = Server::start(mirror(WebSockets::default(), seen())).await;
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    // The preface and an empty SETTINGS frame (RFC 9113 §3.4).
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (kind, flags, stream, payload) =
        within("the server's SETTINGS", read_frame(&mut tcp)).await;
    assert_eq!(
        (kind, flags & 1, stream),
        (0x4, 0, 0),
        "a SETTINGS frame first"
    );
    let settings: Vec<(u16, u32)> = payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    // SETTINGS_ENABLE_CONNECT_PROTOCOL = 0x8, value 1.
    assert!(settings.contains(&(0x8, 1)), "{settings:?}");
}

#[tokio::test]
async fn rfc8441_4_5_extended_connect_echo_with_the_duplex_client() {
    let seen = seen();
    let server = Server::start(mirror(
        WebSockets::default().extension(Deflate::default()).unwrap(),
        Arc::clone(&seen),
    ))
    .await;
    let client = Client::new()
        .http2(true)
        .protocols(["v1"])
        .deflate(Deflate::default());
    let (protocol, extensions, replies) = within(
        "the HTTP/2 session",
        client.connect(
            &format!("ws://{}/mirror", server.addr),
            |mut session| async move {
                let protocol = session.protocol().map(str::to_owned);
                let extensions = session.extensions().len();
                let mut replies = Vec::new();
                for message in [
                    Message::text("héllo over h2"),
                    Message::binary(vec![7u8; 200_000]),
                ] {
                    session.send(message).await.unwrap();
                    replies.push(session.recv().await.unwrap().unwrap());
                }
                (protocol, extensions, replies)
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(protocol.as_deref(), Some("v1"));
    assert_eq!(extensions, 1, "permessage-deflate negotiated over h2 too");
    assert_eq!(replies[0], Message::text("héllo over h2"));
    assert_eq!(replies[1], Message::binary(vec![7u8; 200_000]));
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!((&seen[0].0, seen[0].1), (&Method::CONNECT, Version::HTTP_2));
}

#[tokio::test]
async fn rfc8441_5_a_hundred_concurrent_websockets_share_one_http2_connection() {
    const SESSIONS: usize = 100;
    let seen = seen();
    let server = Server::start(mirror(WebSockets::default(), Arc::clone(&seen))).await;
    let connection = within(
        "the HTTP/2 connection",
        Client::new()
            .protocols(["v1"])
            .connect_http2(&format!("ws://{}", server.addr)),
    )
    .await
    .unwrap();
    // Every session echoes once, waits until all are open, and echoes
    // again: they are open at the same time, not one after another.
    let all_open = Arc::new(tokio::sync::Barrier::new(SESSIONS));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..SESSIONS {
        let connection = connection.clone();
        let all_open = Arc::clone(&all_open);
        tasks.spawn(async move {
            connection
                .connect("/mirror", move |mut session| async move {
                    let text = format!("session {i}");
                    session.send(text.as_str()).await.unwrap();
                    let first = session.recv().await.unwrap().unwrap();
                    all_open.wait().await;
                    session.send(text.as_str()).await.unwrap();
                    let second = session.recv().await.unwrap().unwrap();
                    assert_eq!(first, Message::text(text.clone()));
                    assert_eq!(second, Message::text(text));
                })
                .await
        });
    }
    within("a hundred sessions", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap().unwrap();
        }
    })
    .await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), SESSIONS);
    let peers: HashSet<_> = seen.iter().map(|(_, _, peer)| *peer).collect();
    assert_eq!(peers.len(), 1, "one TCP connection: {peers:?}");
}

/// An HTTP/2 connection made with hyper's client, for requests duplex's
/// client would not send.
async fn hyper_h2(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_empty::Empty> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    // The server's SETTINGS first (RFC 8441 §3), as a client must: the
    // flag is set by hyper's own connection task, without a wake-up here.
    let mut connection = Box::pin(connection);
    within("the server's SETTINGS", async {
        while !connection.is_extended_connect_protocol_enabled() {
            tokio::select! {
                _ = connection.as_mut() => panic!("the connection ended"),
                () = tokio::time::sleep(std::time::Duration::from_millis(1)) => {}
            }
        }
    })
    .await;
    tokio::spawn(connection);
    send
}

mod http_body_empty {
    //! An empty request body (the CONNECT carries none).
    use std::{
        pin::Pin,
        task::{Context, Poll},
    };

    pub(crate) struct Empty;

    impl hyper::body::Body for Empty {
        type Data = bytes::Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
            Poll::Ready(None)
        }
        fn is_end_stream(&self) -> bool {
            true
        }
    }
}

fn request(
    addr: std::net::SocketAddr,
    method: Method,
    protocol: Option<&'static str>,
    version_13: bool,
) -> http::Request<http_body_empty::Empty> {
    let mut request = http::Request::new(http_body_empty::Empty);
    *request.method_mut() = method;
    *request.uri_mut() = format!("http://{addr}/mirror").parse().unwrap();
    *request.version_mut() = Version::HTTP_2;
    if let Some(protocol) = protocol {
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static(protocol));
    }
    if version_13 {
        request
            .headers_mut()
            .insert("sec-websocket-version", "13".parse().unwrap());
    }
    request
}

#[tokio::test]
async fn rfc8441_4_requests_that_are_not_a_websocket_connect_are_refused() {
    let seen = seen();
    let server = Server::start(mirror(WebSockets::default(), Arc::clone(&seen))).await;
    let mut send = within("the hyper connection", hyper_h2(server.addr)).await;
    let addr = server.addr;
    for (what, request, status) in [
        (
            ":protocol other than websocket",
            request(addr, Method::CONNECT, Some("webtransport"), true),
            StatusCode::NOT_IMPLEMENTED,
        ),
        (
            "a GET: a page request to a WebSocket route",
            request(addr, Method::GET, None, true),
            StatusCode::BAD_REQUEST,
        ),
        (
            "a POST",
            request(addr, Method::POST, None, true),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "no Sec-WebSocket-Version: 13",
            request(addr, Method::CONNECT, Some("websocket"), false),
            StatusCode::UPGRADE_REQUIRED,
        ),
    ] {
        send.ready().await.unwrap();
        let response = within(what, send.send_request(request)).await.unwrap();
        assert_eq!(response.status(), status, "{what}");
    }
    // A CONNECT without :protocol is a tunnel request with no path (RFC
    // 9113 §8.5): it names no route, and no session starts.
    let mut tunnel = http::Request::new(http_body_empty::Empty);
    *tunnel.method_mut() = Method::CONNECT;
    *tunnel.uri_mut() = addr.to_string().parse().unwrap();
    send.ready().await.unwrap();
    let response = within("the plain CONNECT", send.send_request(tunnel))
        .await
        .unwrap();
    assert!(response.status().is_client_error(), "{}", response.status());
    assert!(seen.lock().unwrap().is_empty(), "no session was started");
}

#[tokio::test]
async fn rfc8441_5_the_same_limits_apply_over_http2() {
    let server = Server::start(mirror(
        WebSockets::default()
            .max_sessions_per_ip(Some(1))
            .max_message_size(1024),
        seen(),
    ))
    .await;
    let connection = within(
        "the HTTP/2 connection",
        Client::new()
            .protocols(["v1"])
            .connect_http2(&format!("ws://{}", server.addr)),
    )
    .await
    .unwrap();
    let (held, release) = tokio::sync::oneshot::channel::<()>();
    let (opened, is_open) = tokio::sync::oneshot::channel::<()>();
    let first = {
        let connection = connection.clone();
        tokio::spawn(async move {
            connection
                .connect("/mirror", |mut session| async move {
                    let _ = opened.send(());
                    let _ = release.await;
                    // Over max_message_size: the server closes with 1009.
                    session.send(vec![0u8; 2048]).await.unwrap();
                    while let Ok(Some(_)) = session.recv().await {}
                    session.close_reason().await
                })
                .await
        })
    };
    within("the first session", is_open).await.unwrap();
    // The address has its one session: the next stream is refused with 429.
    let refused = within(
        "the second CONNECT",
        connection.connect("/mirror", |_session| async {}),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.status(), Some(StatusCode::TOO_MANY_REQUESTS));
    // The origin check compares with :authority.
    let foreign = Client::new()
        .protocols(["v1"])
        .header("origin", "http://evil.example")
        .connect_http2(&format!("ws://{}", server.addr))
        .await
        .unwrap()
        .connect("/mirror", |_session| async {})
        .await
        .unwrap_err();
    assert_eq!(foreign.status(), Some(StatusCode::FORBIDDEN));
    held.send(()).unwrap();
    let reason = within("the 1009", first).await.unwrap().unwrap();
    assert_eq!(reason.code, CloseCode::TOO_BIG);
}

#[tokio::test]
async fn rfc8441_5_graceful_shutdown_sends_1001_on_every_stream() {
    let server = Server::start(mirror(WebSockets::default(), seen())).await;
    let connection = Client::new()
        .protocols(["v1"])
        .connect_http2(&format!("ws://{}", server.addr))
        .await
        .unwrap();
    let (opened_tx, mut opened) = tokio::sync::mpsc::channel::<()>(2);
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..2 {
        let connection = connection.clone();
        let opened_tx = opened_tx.clone();
        sessions.spawn(async move {
            connection
                .connect("/mirror", |mut session| async move {
                    let _ = opened_tx.send(()).await;
                    while let Ok(Some(_)) = session.recv().await {}
                    session.close_reason().await
                })
                .await
        });
    }
    for _ in 0..2 {
        within("a session", opened.recv()).await.unwrap();
    }
    server.shutdown().await.unwrap();
    while let Some(reason) = within("the sessions to end", sessions.join_next()).await {
        let reason = reason.unwrap().unwrap();
        assert_eq!(reason.code, CloseCode::GOING_AWAY, "{reason:?}");
    }
}

#[tokio::test]
async fn http1_still_works_on_the_same_listener() {
    let seen = seen();
    let server = Server::start(mirror(WebSockets::default(), Arc::clone(&seen))).await;
    let url = format!("ws://{}/mirror", server.addr);
    for http2 in [false, true] {
        let reply = within(
            "the session",
            Client::new()
                .http2(http2)
                .protocols(["v1"])
                .connect(&url, |mut session| async move {
                    session.send("either version").await.unwrap();
                    session.recv().await.unwrap()
                }),
        )
        .await
        .unwrap();
        assert_eq!(reply, Some(Message::text("either version")));
    }
    let versions: Vec<_> = seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(versions, [Version::HTTP_11, Version::HTTP_2]);
}

#[tokio::test]
async fn http2_off_serves_http1_only() {
    let server = Server::start(mirror(WebSockets::default(), seen()).http2(false)).await;
    let err = within(
        "the refused HTTP/2 connection",
        Client::new()
            .handshake_timeout(std::time::Duration::from_secs(2))
            .connect_http2(&format!("ws://{}", server.addr)),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Handshake(_)), "{err}");
}

#[tokio::test]
async fn rfc8441_alpn_h2_over_tls_next_to_http1() {
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
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let seen = seen();
    let serve = tokio::spawn(
        mirror(WebSockets::default(), Arc::clone(&seen)).serve_tls_with_shutdown(
            listener,
            Arc::new(server_config),
            async move {
                let _ = stopped.await;
            },
        ),
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
    for http2 in [true, false] {
        let reply = within(
            "the wss session",
            Client::new()
                .tls_config(Arc::clone(&client_config))
                .http2(http2)
                .protocols(["v1"])
                .connect(
                    &format!("wss://localhost:{port}/mirror"),
                    |mut session| async move {
                        session.send(Bytes::from_static(b"over TLS")).await.unwrap();
                        session.recv().await.unwrap()
                    },
                ),
        )
        .await
        .unwrap();
        assert_eq!(reply, Some(Message::binary(&b"over TLS"[..])));
    }
    let versions: Vec<_> = seen.lock().unwrap().iter().map(|s| s.1).collect();
    assert_eq!(versions, [Version::HTTP_2, Version::HTTP_11]);
    stop.send(()).unwrap();
    within("serve_tls to return", serve).await.unwrap().unwrap();
}
