//! WebSocket routes in users' own axum routers: a router with state, and a
//! WebSocket and a page on one path (`web_socket_or`), over real sockets: a
//! tokio-tungstenite client for the socket, plain HTTP/1.1 for the rest.

mod common;

use std::net::SocketAddr;

use axum::{
    Router,
    extract::State,
    routing::{MethodRouter, get, post},
};
use common::{upgrade_request, within, ws_connect, ws_next, ws_send, ws_text};
use duplex::{RawSession, Session, WebSockets};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A router served on 127.0.0.1 on a free port; the task is aborted on drop.
struct Served {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(router: Router) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, service).await;
    });
    Served { addr, task }
}

/// The status and body of a one-request HTTP/1.1 exchange (`Connection:
/// close`, read to EOF), the request written as given plus `Host` and
/// `Connection`.
async fn http(addr: SocketAddr, method: &str, path: &str, extra: &str) -> (u16, String, String) {
    let mut tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n{extra}\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    within("the HTTP response", tcp.read_to_end(&mut response))
        .await
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, head.to_owned(), body.to_owned())
}

/// The head of the answer to a raw upgrade request, read up to its blank
/// line; the connection is then dropped.
async fn upgrade_head(addr: SocketAddr, request: &str) -> String {
    let mut tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within("the response head", tcp.read_u8()).await.unwrap());
    }
    String::from_utf8(head).unwrap()
}

async fn echo(mut session: Session) {
    while let Ok(Some(message)) = session.recv().await {
        if session.send(message).await.is_err() {
            break;
        }
    }
}

async fn assert_echoes(addr: SocketAddr, path: &str) {
    let mut ws = ws_connect(addr, path).await;
    ws_send(&mut ws, ws_text("ping over the socket")).await;
    assert_eq!(ws_next(&mut ws).await, ws_text("ping over the socket"));
    within("the close", ws.close(None)).await.unwrap();
}

#[derive(Clone)]
struct AppState {
    name: &'static str,
}

async fn page(State(state): State<AppState>) -> String {
    format!("page of {}", state.name)
}

/// `web_socket` and `web_socket_raw` in a `Router<AppState>` next to a
/// handler that reads the state: this test is first of all that it
/// compiles.
#[tokio::test]
async fn socket_routes_mount_on_a_router_with_state() {
    let ws = WebSockets::default();
    let raw = duplex::web_socket_raw(&ws, |mut session: RawSession| async move {
        while let Ok(Some(frame)) = session.recv().await {
            if frame.opcode == duplex::OpCode::Close {
                break;
            }
        }
    });
    let with_protocols = duplex::web_socket_with_protocols(&ws, ["chat"], echo);
    let router: Router<AppState> = Router::new()
        .route("/", get(page))
        .route("/ws", duplex::web_socket(&ws, echo))
        .route("/raw", raw)
        .route("/proto", with_protocols);
    let served = serve(router.with_state(AppState { name: "state" })).await;

    let (status, _, body) = http(served.addr, "GET", "/", "").await;
    assert_eq!((status, body.as_str()), (200, "page of state"));
    assert_echoes(served.addr, "/ws").await;
    let head = upgrade_head(served.addr, &upgrade_request("/raw", "")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let head = upgrade_head(
        served.addr,
        &upgrade_request("/proto", "Sec-WebSocket-Protocol: chat\r\n"),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// `/live` is a page and a socket at once, in a router with state whose
/// page reads it.
fn live_router(ws: &WebSockets, other: MethodRouter<AppState>) -> Router {
    Router::new()
        .route("/live", duplex::web_socket_or(ws, echo, other))
        .route("/only-socket", duplex::web_socket(ws, echo))
        .with_state(AppState { name: "live" })
}

#[tokio::test]
async fn an_upgrade_reaches_the_socket_and_a_plain_get_the_page() {
    let ws = WebSockets::default();
    let served = serve(live_router(&ws, get(page))).await;

    let (status, _, body) = http(served.addr, "GET", "/live", "").await;
    assert_eq!((status, body.as_str()), (200, "page of live"));
    assert_echoes(served.addr, "/live").await;
    // Both again, in the other order: neither route is consumed.
    assert_echoes(served.addr, "/live").await;
    let (status, _, body) = http(served.addr, "GET", "/live", "").await;
    assert_eq!((status, body.as_str()), (200, "page of live"));
}

#[tokio::test]
async fn other_methods_get_the_answer_of_the_path_handlers() {
    let ws = WebSockets::default();
    let served = serve(live_router(&ws, get(page).post(|| async { "posted" }))).await;
    let (status, _, body) = http(served.addr, "POST", "/live", "").await;
    assert_eq!((status, body.as_str()), (200, "posted"));
    // A method neither the page nor the socket takes: axum's 405, with the
    // page's methods in `Allow`.
    let (status, head, _) = http(served.addr, "DELETE", "/live", "").await;
    assert_eq!(status, 405, "{head}");
    let allow = head
        .lines()
        .find_map(|line| line.strip_prefix("allow: "))
        .unwrap_or_default();
    assert!(allow.contains("GET") && allow.contains("POST"), "{head}");
}

#[tokio::test]
async fn a_path_with_only_a_socket_answers_as_before() {
    let ws = WebSockets::default();
    let served = serve(live_router(&ws, get(page))).await;
    // The handshake's own answers: 405 for a POST, 400 for a plain GET.
    let (status, head, _) = http(served.addr, "POST", "/only-socket", "").await;
    assert_eq!(status, 405, "{head}");
    let (status, head, _) = http(served.addr, "GET", "/only-socket", "").await;
    assert_eq!(status, 400, "{head}");
    assert_echoes(served.addr, "/only-socket").await;
}

#[tokio::test]
async fn a_malformed_upgrade_is_refused_by_the_socket_not_served_the_page() {
    let ws = WebSockets::default();
    let served = serve(live_router(&ws, get(page))).await;
    // `Upgrade: websocket` with version 8: the handshake's 426, not the page.
    let request = upgrade_request("/live", "")
        .replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let head = upgrade_head(served.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 426"), "{head}");
    // A token list and any case count as asking for a WebSocket.
    let request =
        upgrade_request("/live", "").replace("Upgrade: websocket", "Upgrade: foo/2, WebSocket");
    let head = upgrade_head(served.addr, &request).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

#[tokio::test]
async fn an_upgrade_reaches_the_socket_when_the_path_has_no_get() {
    let ws = WebSockets::default();
    let served = serve(live_router(&ws, post(|| async { "form" }))).await;
    assert_echoes(served.addr, "/live").await;
    let (status, _, body) = http(served.addr, "POST", "/live", "").await;
    assert_eq!((status, body.as_str()), (200, "form"));
    let (status, head, _) = http(served.addr, "GET", "/live", "").await;
    assert_eq!(status, 405, "the path's own answer to a plain GET: {head}");
}

#[tokio::test]
async fn raw_and_subprotocol_sockets_share_a_path_with_a_page() {
    let ws = WebSockets::default();
    let raw = duplex::web_socket_raw_or(
        &ws,
        |session: RawSession| async move {
            let _ = session.sender().send_text("raw hello").await;
        },
        get(|| async { "raw page" }),
    );
    let proto = duplex::web_socket_with_protocols_or(
        &ws,
        ["v1"],
        |session: Session| async move {
            let protocol = session.protocol().unwrap_or_default().to_owned();
            let _ = session.send_text(protocol).await;
        },
        get(|| async { "proto page" }),
    );
    let served = serve(Router::new().route("/raw", raw).route("/proto", proto)).await;
    let (_, _, body) = http(served.addr, "GET", "/raw", "").await;
    assert_eq!(body, "raw page");
    let (_, _, body) = http(served.addr, "GET", "/proto", "").await;
    assert_eq!(body, "proto page");
    let mut socket = ws_connect(served.addr, "/raw").await;
    assert_eq!(ws_next(&mut socket).await, ws_text("raw hello"));
    let mut request = common::ws_request(served.addr, "/proto");
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "v1".parse().unwrap());
    let (mut socket, _) = common::ws_connect_request(served.addr, request).await;
    match ws_next(&mut socket).await {
        WsMessage::Text(text) => assert_eq!(text.as_str(), "v1"),
        other => panic!("expected the subprotocol, got {other:?}"),
    }
}

/// Why `web_socket_or` exists: two `.route` calls on one path merge into one
/// method router in which the page has `GET` and the socket only what is
/// left, so an upgrade never reaches the socket. If axum ever changes this,
/// the warning on `duplex::web_socket` is out of date.
#[tokio::test]
async fn two_routes_on_one_path_send_every_get_to_the_page() {
    let ws = WebSockets::default();
    let router: Router = Router::new()
        .route("/live", get(|| async { "the page" }))
        .route("/live", duplex::web_socket(&ws, echo));
    let served = serve(router).await;
    let head = upgrade_head(served.addr, &upgrade_request("/live", "")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}
