//! The client side shared by the chat's tests: a server on a free loopback
//! port, a tokio-tungstenite client, and the JSON exchanges every test makes.
//! Every wait is bounded by [`WAIT`]; all traffic goes to 127.0.0.1.
#![allow(dead_code)]

use std::{future::Future, net::SocketAddr, time::Duration};

use duplex::WebSockets;
use duplex_chat::ChatOptions;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::oneshot,
};
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

pub(crate) const WAIT: Duration = Duration::from_secs(3);
/// How long a client must stay quiet to count as having received nothing.
pub(crate) const QUIET: Duration = Duration::from_millis(300);

pub(crate) type Ws = WebSocketStream<TcpStream>;

pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

pub(crate) async fn start(options: ChatOptions) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let (stop, stopped) = oneshot::channel::<()>();
    let app = duplex_chat::app_with(WebSockets::default(), options)
        .shutdown_grace(Duration::from_secs(1));
    tokio::spawn(app.serve_with_shutdown(listener, async move {
        let _ = stopped.await;
    }));
    Server { addr, _stop: stop }
}

pub(crate) async fn open(server: &Server, path: &str) -> Ws {
    let tcp = within("TCP connect", TcpStream::connect(server.addr))
        .await
        .expect("connect");
    let url = format!("ws://{}{path}", server.addr);
    within("the handshake", tokio_tungstenite::client_async(url, tcp))
        .await
        .expect("handshake")
        .0
}

pub(crate) async fn connect(server: &Server) -> Ws {
    let mut ws = open(server, "/chat").await;
    let first = next_raw(&mut ws).await;
    assert_eq!(first["type"], "directory", "{first}");
    ws
}

/// The next text message, as sent.
pub(crate) async fn next_text(ws: &mut Ws) -> String {
    loop {
        let message = within("a message from the server", ws.next())
            .await
            .expect("the connection ended")
            .expect("a WebSocket error");
        match message {
            Message::Text(text) => return text.as_str().to_owned(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

pub(crate) async fn next_raw(ws: &mut Ws) -> Value {
    serde_json::from_str(&next_text(ws).await).expect("JSON")
}

/// The next JSON message that is not a directory update, and its text.
pub(crate) async fn next_with_text(ws: &mut Ws) -> (Value, String) {
    loop {
        let text = next_text(ws).await;
        let event: Value = serde_json::from_str(&text).expect("JSON");
        if event["type"] != "directory" {
            return (event, text);
        }
    }
}

pub(crate) async fn next(ws: &mut Ws) -> Value {
    next_with_text(ws).await.0
}

/// The next message of this type, skipping others.
/// Asserts that nothing but directory updates arrives for a while.
pub(crate) async fn quiet(ws: &mut Ws, who: &str) {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return,
            Ok(Some(Ok(Message::Text(text)))) => {
                let event: Value = serde_json::from_str(text.as_str()).expect("JSON");
                assert_eq!(event["type"], "directory", "{who} got {event}");
            }
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(other) => panic!("{who}: unexpected {other:?}"),
        }
    }
}

pub(crate) async fn send(ws: &mut Ws, value: Value) {
    within("a send", ws.send(Message::text(value.to_string())))
        .await
        .expect("send");
}

pub(crate) async fn hello(ws: &mut Ws, name: &str) -> Value {
    send(ws, json!({"type": "hello", "name": name})).await;
    let welcome = next(ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    welcome
}

/// Joins a room the connection is not in: `joined`, then its own presence.
pub(crate) async fn expect_error(ws: &mut Ws, code: &str) -> Value {
    let event = next(ws).await;
    assert_eq!(event["type"], "error", "expected error {code}, got {event}");
    assert_eq!(event["code"], code, "{event}");
    assert!(event["message"].as_str().is_some_and(|m| !m.is_empty()));
    event
}

pub(crate) async fn still_open(ws: &mut Ws) {
    send(ws, json!({"type": "ping", "id": 7})).await;
    assert_eq!(next(ws).await, json!({"type": "pong", "id": 7}));
}

/// Reads until a Close and returns its code.
pub(crate) async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        match within("a Close", ws.next()).await {
            Some(Ok(Message::Close(Some(frame)))) => return u16::from(frame.code),
            Some(Ok(Message::Close(None))) => panic!("Close without a code"),
            Some(Ok(_)) => {}
            other => panic!("expected a Close, got {other:?}"),
        }
    }
}
