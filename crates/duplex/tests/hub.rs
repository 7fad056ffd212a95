//! The hub over real sockets: fan-out to many tokio-tungstenite clients,
//! a subscriber that stops reading, and the registry after sessions close.

mod common;

use std::time::Duration;

use common::{Server, upgrade_request, within, ws_connect, ws_next};
use duplex::{App, CloseCode, Hub, Session, SlowConsumer, WebSockets};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A route that registers each session in `hub`, joins "room", and stays
/// until the peer leaves.
fn room_app(hub: &Hub, websockets: WebSockets) -> App {
    let hub = hub.clone();
    App::new()
        .install(websockets)
        .web_socket("/room", move |mut session: Session| {
            let hub = hub.clone();
            async move {
                let membership = hub.register(&session.sender());
                membership.join("room");
                while let Ok(Some(_)) = session.recv().await {}
            }
        })
}

/// A client whose kernel receive buffer is small (loopback buffers
/// otherwise autotune to tens of MiB) and that stops reading after the
/// handshake.
async fn stalled_client(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = within("TCP connect", socket.connect(addr)).await.unwrap();
    tcp.write_all(upgrade_request("/room", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(within("the 101", tcp.read_u8()).await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    tcp
}

async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    within(what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_1000_clients_arrives_complete_and_in_order() {
    let hub = Hub::new();
    let server = Server::start(room_app(&hub, WebSockets::default())).await;
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(ws_connect(server.addr, "/room").await);
    }
    until("1000 registered sessions", || hub.session_count() == 1000).await;
    for i in 0..20 {
        hub.publish("room", format!("message {i}"));
    }
    let readers = clients.into_iter().map(|mut ws| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            while got.len() < 20 {
                if let WsMessage::Text(text) = ws_next(&mut ws).await {
                    got.push(text.as_str().to_owned());
                }
            }
            got
        })
    });
    for reader in readers {
        let got = within("a client's 20 messages", reader).await.unwrap();
        let expected: Vec<String> = (0..20).map(|i| format!("message {i}")).collect();
        assert_eq!(got, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_while_the_others_get_everything() {
    let hub = Hub::builder()
        .slow_consumer(SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER))
        .build();
    let websockets = WebSockets::default()
        .outgoing_buffer(64 << 10)
        .close_timeout(Duration::from_millis(300));
    let server = Server::start(room_app(&hub, websockets)).await;
    // Connected with a tiny receive window, then never reads again.
    let stalled = stalled_client(server.addr).await;
    let mut healthy = ws_connect(server.addr, "/room").await;
    until("2 registered sessions", || hub.session_count() == 2).await;

    let payload = vec![b'x'; 32 << 10];
    let count = 200; // 6.25 MiB: far more than the stalled socket and outbox hold
    // The healthy client acknowledges each message, and the publisher waits
    // for it: a healthy reader that merely lags on a loaded machine must not
    // be taken for a slow consumer (its outbox holds only two messages).
    let (ack, mut acks) = tokio::sync::mpsc::unbounded_channel::<()>();
    let reader = tokio::spawn(async move {
        let mut got = 0;
        while got < count {
            match within("the healthy client's messages", healthy.next()).await {
                Some(Ok(WsMessage::Binary(data))) => {
                    assert_eq!(data.len(), 32 << 10);
                    got += 1;
                    let _ = ack.send(());
                }
                Some(Ok(_)) => {}
                other => panic!("healthy client lost its connection: {other:?}"),
            }
        }
        got
    });
    for _ in 0..count {
        hub.publish("room", payload.clone());
        // The healthy reader keeps up; the stalled one cannot.
        within("the healthy client's acknowledgement", acks.recv()).await;
    }
    assert_eq!(within("the healthy reader", reader).await.unwrap(), count);
    // The stalled session was closed (1013), dropped after the close
    // timeout, and left the registry.
    until("the stalled session to leave the hub", || {
        hub.session_count() == 1
    })
    .await;
    drop(stalled);
}

#[tokio::test]
async fn closed_sessions_leave_no_registry_or_topic_entries() {
    let hub = Hub::new();
    let server = Server::start(room_app(&hub, WebSockets::default())).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(ws_connect(server.addr, "/room").await);
    }
    until("50 registered sessions", || hub.session_count() == 50).await;
    assert_eq!(hub.topics(), ["room"]);
    for (i, mut ws) in clients.into_iter().enumerate() {
        if i % 2 == 0 {
            within("a close", ws.close(None)).await.unwrap();
        } else {
            drop(ws); // vanishes without a Close
        }
    }
    until("every session to leave", || hub.session_count() == 0).await;
    assert!(hub.topics().is_empty());
    assert!(hub.members("room").is_empty());
}
