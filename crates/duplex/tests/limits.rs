//! The limits in front of a session, over real sockets: how many sessions,
//! from whom, how fast, with which `Origin`, how large and how slow a
//! request head may be, and how long a shutdown may take. Each refusal is
//! the HTTP answer the docs promise, before any 101.

mod common;

use std::time::{Duration, Instant};

use axum::{
    extract::Request as HttpRequest,
    http::StatusCode,
    middleware::{self, Next},
    response::{IntoResponse, Response},
};
use common::{ChildServer, RawClient, Server, upgrade_request};
use duplex::{App, CloseCode, Session, WebSockets};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A handler that keeps its session open until the peer leaves.
async fn hold(mut session: Session) {
    while let Ok(Some(_)) = session.recv().await {}
}

async fn status_of(server: &Server, extra: &str) -> (u16, Option<String>, RawClient) {
    let (response, client) = RawClient::request(server.addr, upgrade_request("/ws", extra)).await;
    let retry_after = response.header("Retry-After").map(str::to_owned);
    (response.status, retry_after, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_may_hold_a_thousand_sessions_and_the_next_gets_429() {
    let server = Server::start(App::new().web_socket("/ws", hold)).await;
    let mut open = Vec::new();
    for n in 0..1_000 {
        let (status, _, client) = status_of(&server, "").await;
        assert_eq!(status, 101, "session {n} of the shipped 1,000 per address");
        open.push(client);
    }
    let (status, retry_after, _) = status_of(&server, "").await;
    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    // A session that ends gives its place back.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, _, client) = status_of(&server, "").await;
        if status == 101 {
            open.push(client);
            break;
        }
        assert!(Instant::now() < deadline, "the freed place never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An IPv6 client is one address like an IPv4 one (its /64, which on
/// loopback is `::1` alone): the per-address limit counts its sessions.
#[tokio::test]
async fn an_ipv6_address_is_held_to_the_per_address_limit() {
    let app = App::new()
        .install(WebSockets::default().max_sessions_per_ip(Some(2)))
        .web_socket("/ws", hold);
    let server = Server::start_on(app, "[::1]:0").await;
    assert!(server.addr.is_ipv6());
    let mut open = Vec::new();
    for _ in 0..2 {
        let (status, _, client) = status_of(&server, "").await;
        assert_eq!(status, 101);
        open.push(client);
    }
    let (status, retry_after, _) = status_of(&server, "").await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("1")));
}

#[tokio::test]
async fn the_session_after_max_sessions_gets_503_with_retry_after() {
    let ws = WebSockets::default().max_sessions(20);
    let server = Server::start(App::new().install(ws).web_socket("/ws", hold)).await;
    let mut open = Vec::new();
    for _ in 0..20 {
        let (status, _, client) = status_of(&server, "").await;
        assert_eq!(status, 101);
        open.push(client);
    }
    let (status, retry_after, _) = status_of(&server, "").await;
    assert_eq!(status, 503);
    assert_eq!(retry_after.as_deref(), Some("5"));
}

#[tokio::test]
async fn handshakes_past_the_rate_get_429_with_retry_after() {
    let ws = WebSockets::default().handshake_rate(Some((1, 5)));
    let server = Server::start(App::new().install(ws).web_socket("/ws", hold)).await;
    for _ in 0..5 {
        let (status, _, client) = status_of(&server, "").await;
        assert_eq!(status, 101);
        drop(client);
    }
    let (status, retry_after, _) = status_of(&server, "").await;
    assert_eq!(status, 429, "the sixth handshake within a second");
    assert_eq!(retry_after.as_deref(), Some("1"));
}

#[tokio::test]
async fn rfc6455_10_2_a_page_of_another_site_gets_403_by_default() {
    let server = Server::start(App::new().web_socket("/ws", hold)).await;
    let (status, _, _) = status_of(&server, "Origin: https://evil.example\r\n").await;
    assert_eq!(status, 403);
    // The server's own pages (Host: 127.0.0.1) and clients that send no
    // Origin are accepted.
    let (status, _, _) = status_of(&server, "Origin: http://127.0.0.1\r\n").await;
    assert_eq!(status, 101);
    let (status, _, _) = status_of(&server, "").await;
    assert_eq!(status, 101);
}

#[tokio::test]
async fn allowed_origins_add_to_the_servers_own() {
    let ws = WebSockets::default().allowed_origins(["https://app.example"]);
    let server = Server::start(App::new().install(ws).web_socket("/ws", hold)).await;
    for (origin, expected) in [
        ("https://app.example", 101),
        ("http://127.0.0.1", 101),
        ("https://evil.example", 403),
    ] {
        let (status, _, _) = status_of(&server, &format!("Origin: {origin}\r\n")).await;
        assert_eq!(status, expected, "{origin}");
    }
}

#[tokio::test]
async fn a_request_head_over_32_kib_gets_431() {
    let server = Server::start(App::new().web_socket("/ws", hold)).await;
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(40 * 1024));
    let (status, _, _) = status_of(&server, &cookie).await;
    assert_eq!(status, 431);
    let cookie = format!("Cookie: c={}\r\n", "x".repeat(16 * 1024));
    let (status, _, _) = status_of(&server, &cookie).await;
    assert_eq!(status, 101, "16 KiB of headers are fine");
}

/// On tokio's paused clock, as the other tests of shipped timeouts here:
/// the 10 s take no wall time.
#[tokio::test(start_paused = true)]
async fn a_client_that_never_finishes_its_request_head_is_dropped_after_10_s() {
    common::set_wait(Duration::from_secs(60));
    let server = Server::start(App::new().web_socket("/ws", hold)).await;
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .expect("write half a head");
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 512];
    let read = tokio::time::timeout(Duration::from_secs(20), stream.read(&mut buf))
        .await
        .expect("still connected 20 s later");
    let waited = started.elapsed();
    // The connection ends, with a 408 or without a word, and nothing else.
    if let Ok(n) = read
        && n > 0
    {
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 408"), "answered {head:?}");
    }
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(15)).contains(&waited),
        "dropped after {waited:?}, the shipped header timeout is 10 s"
    );
}

#[tokio::test]
async fn shutdown_drops_sessions_still_open_when_the_grace_period_ends() {
    let app = App::new()
        .shutdown_grace(Duration::from_secs(1))
        .web_socket("/ws", |session: Session| async move {
            // Ignores the 1001 and holds on to its session.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(session);
        });
    let server = Server::start(app).await;
    let mut client = RawClient::connect(server.addr, "/ws").await;
    let started = Instant::now();
    let stopping = tokio::spawn(server.shutdown());
    let (code, _) = client.read_close().await;
    assert_eq!(code, CloseCode::GOING_AWAY.0);
    stopping
        .await
        .expect("the shutdown task")
        .expect("serve returns Ok");
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(2500),
        "serve returned {took:?} after the signal, the grace period is 1 s"
    );
    client.expect_eof().await;
}

/// RFC 6455 §7.4.1 (1001 "going away"): the App's graceful shutdown reaches
/// every WebSocket route it serves, also one built with another
/// configuration and mounted with `App::route`.
#[tokio::test]
async fn shutdown_sends_1001_on_every_route_whatever_its_configuration() {
    let other = WebSockets::default().max_message_size(1 << 16);
    let echo = |session: Session| async move {
        let mut session = session;
        while let Ok(Some(message)) = session.recv().await {
            let _ = session.send(message).await;
        }
    };
    let app = App::new()
        .shutdown_grace(Duration::from_secs(2))
        .web_socket("/installed", echo)
        .route("/other", duplex::web_socket(&other, echo));
    let server = Server::start(app).await;
    let installed = RawClient::connect(server.addr, "/installed").await;
    let routed = RawClient::connect(server.addr, "/other").await;
    let stopping = tokio::spawn(server.shutdown());
    for mut client in [installed, routed] {
        assert_eq!(client.read_close().await.0, CloseCode::GOING_AWAY.0);
        client.send_close(1001, "").await;
        client.expect_eof().await;
    }
    stopping
        .await
        .expect("the shutdown task")
        .expect("serve returns Ok");
    assert_eq!(
        other.live_sessions(),
        0,
        "the routed configuration's session ended"
    );
}

/// Who the bearer token says the client is.
#[derive(Debug, Clone, PartialEq)]
struct User(String);

async fn bearer(mut request: HttpRequest, next: Next) -> Response {
    let token = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some("s3cret") => {
            request.extensions_mut().insert(User("alice".into()));
            next.run(request).await
        }
        Some(_) => StatusCode::FORBIDDEN.into_response(),
        None => StatusCode::UNAUTHORIZED.into_response(),
    }
}

#[tokio::test]
async fn rfc6455_4_2_2_authentication_answers_before_any_101_and_hands_the_identity_over() {
    let app = App::new();
    let ws = app.websockets().clone();
    let (tx, mut seen) = common::reports::<Option<User>>();
    let route = duplex::web_socket(&ws, move |session: Session| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(session.request().extension::<User>().cloned());
        }
    })
    .layer(middleware::from_fn(bearer));
    let server = Server::start(app.route("/ws", route)).await;
    let (status, _, _) = status_of(&server, "").await;
    assert_eq!(status, 401);
    let (status, _, _) = status_of(&server, "Authorization: Bearer wrong\r\n").await;
    assert_eq!(status, 403);
    let (status, _, _) = status_of(&server, "Authorization: Bearer s3cret\r\n").await;
    assert_eq!(status, 101);
    assert_eq!(seen.next().await, Some(User("alice".into())));
}

/// The status of an upgrade request to `/ws` sent from `ip`, and the
/// connection (a session when 101).
async fn upgrade_from(ip: [u8; 4], addr: std::net::SocketAddr) -> (u16, TcpStream) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind((ip, 0).into()).unwrap();
    let mut tcp = socket.connect(addr).await.unwrap();
    tcp.write_all(upgrade_request("/ws", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut byte))
            .await
            .expect("an answer within 10 s")
            .unwrap();
        assert_eq!(n, 1, "closed before a whole response head");
        head.push(byte[0]);
    }
    let status = std::str::from_utf8(&head[9..12]).unwrap().parse().unwrap();
    (status, tcp)
}

/// The server of [`the_session_after_the_shipped_10000_gets_503`], in a
/// process of its own ([`ChildServer`]).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the server process of another test, which starts it"]
async fn child_server_for_max_sessions() {
    ChildServer::serve(App::new().web_socket("/ws", hold)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_after_the_shipped_10000_gets_503() {
    let server = ChildServer::start("child_server_for_max_sessions");
    let mut open = Vec::new();
    // Ten addresses at the shipped 1,000 sessions each.
    for n in 1..=10u8 {
        for k in 0..1_000 {
            let (status, tcp) = upgrade_from([127, 0, 0, n], server.addr).await;
            assert_eq!(status, 101, "session {k} of 127.0.0.{n}");
            open.push(tcp);
        }
    }
    let (status, _) = upgrade_from([127, 0, 0, 11], server.addr).await;
    assert_eq!(status, 503, "the 10,001st session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_past_the_shipped_burst_of_1000_get_429() {
    // Sessions per address unlimited, so that only the rate refuses.
    let ws = WebSockets::default().max_sessions_per_ip(None);
    let server = Server::start(App::new().install(ws).web_socket("/ws", hold)).await;
    let started = Instant::now();
    let mut open = Vec::new();
    let (retry_after, accepted) = loop {
        let (status, retry_after, client) = status_of(&server, "").await;
        match status {
            101 => open.push(client),
            429 => break (retry_after, open.len()),
            other => panic!("answered {other}"),
        }
        assert!(open.len() <= 2_000, "no 429 after 2,000 handshakes");
    };
    // The burst, and what the shipped 50 a second refilled meanwhile.
    let refilled = (started.elapsed().as_secs_f64() * 50.0).ceil() as usize;
    assert!(
        (1_000..=1_000 + refilled).contains(&accepted),
        "{accepted} handshakes before the first 429, in {:?}",
        started.elapsed()
    );
    assert_eq!(retry_after.as_deref(), Some("1"));
}

#[tokio::test(start_paused = true)]
async fn shutdown_drops_sessions_still_open_after_the_shipped_10_s_grace() {
    common::set_wait(Duration::from_secs(60));
    let app = App::new().web_socket("/ws", |session: Session| async move {
        // Ignores the 1001 and holds on to its session.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(session);
    });
    let server = Server::start(app).await;
    let mut client = RawClient::connect(server.addr, "/ws").await;
    let started = tokio::time::Instant::now();
    let stopping = tokio::spawn(server.shutdown_within(Duration::from_secs(15)));
    let (code, _) = client.read_close().await;
    assert_eq!(code, CloseCode::GOING_AWAY.0);
    stopping
        .await
        .expect("the shutdown task")
        .expect("serve returns Ok");
    let took = started.elapsed();
    assert!(
        (Duration::from_secs(10)..Duration::from_secs(12)).contains(&took),
        "serve returned {took:?} after the signal, the shipped grace period is 10 s"
    );
    client.expect_eof().await;
}
