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

/// How long a session may take to leave the hub once it is closed: the
/// close timeout and the wait for the peer's FIN are each a few hundred ms
/// to 2 s, and a loaded machine may stretch them; an event ends the wait
/// as soon as it happens, so the bound only matters when something is wrong.
const LEAVE_WAIT: Duration = Duration::from_secs(30);

/// Like [`room_app`], and each handler reports on `ended` once its session
/// has left the hub.
fn reporting_room_app(
    hub: &Hub,
    websockets: WebSockets,
    ended: tokio::sync::mpsc::UnboundedSender<()>,
) -> App {
    let hub = hub.clone();
    App::new()
        .install(websockets)
        .web_socket("/room", move |mut session: Session| {
            let (hub, ended) = (hub.clone(), ended.clone());
            async move {
                {
                    let membership = hub.register(&session.sender());
                    membership.join("room");
                    while let Ok(Some(_)) = session.recv().await {}
                }
                let _ = ended.send(());
            }
        })
}

/// Publishes `count` messages of 32 KiB to "room", each only once the
/// healthy client has read the one before (a healthy reader that merely
/// lags on a loaded machine must not be taken for a slow consumer: its
/// outbox holds two messages), and checks that it got all of them. Returns
/// the healthy client, still connected.
async fn publish_past_a_stalled_client(
    hub: &Hub,
    mut healthy: common::Ws,
    count: usize,
) -> common::Ws {
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
        (got, healthy)
    });
    let payload = vec![b'x'; 32 << 10];
    for _ in 0..count {
        hub.publish("room", payload.clone());
        within("the healthy client's acknowledgement", acks.recv()).await;
    }
    let (got, healthy) = within("the healthy reader", reader).await.unwrap();
    assert_eq!(got, count);
    healthy
}

/// 200 messages of 32 KiB: 6.25 MiB, more than the stalled client's outbox
/// (64 KiB) and both kernel buffers (at most 4 MiB for sending, by the
/// default tcp_wmem, and 4 KiB for receiving) hold.
const PUBLISHED: usize = 200;

fn slow_consumer_hub() -> Hub {
    Hub::builder()
        .slow_consumer(SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER))
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_1013_while_the_others_get_everything() {
    let hub = slow_consumer_hub();
    // Long enough for the stalled client to drain its backlog and answer.
    let websockets = WebSockets::default()
        .outgoing_buffer(64 << 10)
        .close_timeout(Duration::from_secs(20));
    let (ended, mut endings) = tokio::sync::mpsc::unbounded_channel();
    let server = Server::start(reporting_room_app(&hub, websockets, ended)).await;
    // Connected with a tiny receive window; reads nothing until the end.
    let stalled = stalled_client(server.addr).await;
    let healthy = ws_connect(server.addr, "/room").await;
    until("2 registered sessions", || hub.session_count() == 2).await;

    let _healthy = publish_past_a_stalled_client(&hub, healthy, PUBLISHED).await;

    // Now it reads: the messages that were queued before the hub gave up on
    // it, whole and in order, then the Close with 1013 (tungstenite answers
    // it), then the end of the connection.
    let mut stalled = tokio_tungstenite::WebSocketStream::from_raw_socket(
        stalled,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        Some(common::ws_config()),
    )
    .await;
    let mut before_close = 0;
    let close = loop {
        match within("the stalled client's backlog", stalled.next()).await {
            Some(Ok(WsMessage::Binary(data))) => {
                assert_eq!(data.len(), 32 << 10);
                before_close += 1;
            }
            Some(Ok(WsMessage::Close(frame))) => break frame,
            other => panic!("the stalled client did not get a Close: {other:?}"),
        }
    };
    let close = close.expect("a Close with a code");
    assert_eq!(u16::from(close.code), 1013, "{close:?}");
    assert_eq!(close.reason.as_str(), "Too slow to keep up");
    // The first message found an empty outbox, so it was queued; the hub
    // closed the session long before the last.
    assert!(
        (1..PUBLISHED).contains(&before_close),
        "{before_close} messages before the Close"
    );
    assert!(
        within("the end of the stalled connection", stalled.next())
            .await
            .is_none_or(|r| r.is_err()),
        "nothing after the Close"
    );
    tokio::time::timeout(LEAVE_WAIT, endings.recv())
        .await
        .expect("the stalled session to leave the hub")
        .expect("a handler's report");
    assert_eq!(hub.session_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_again_is_dropped_after_the_close_timeout() {
    let hub = slow_consumer_hub();
    let websockets = WebSockets::default()
        .outgoing_buffer(64 << 10)
        .close_timeout(Duration::from_millis(300));
    let (ended, mut endings) = tokio::sync::mpsc::unbounded_channel();
    let server = Server::start(reporting_room_app(&hub, websockets, ended)).await;
    let stalled = stalled_client(server.addr).await;
    let healthy = ws_connect(server.addr, "/room").await;
    until("2 registered sessions", || hub.session_count() == 2).await;

    let _healthy = publish_past_a_stalled_client(&hub, healthy, PUBLISHED).await;

    // Its Close cannot be written, so it is never answered: the session
    // ends on the close timeout and leaves the registry.
    tokio::time::timeout(LEAVE_WAIT, endings.recv())
        .await
        .expect("the stalled session to leave the hub")
        .expect("a handler's report");
    assert_eq!(hub.session_count(), 1);
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
