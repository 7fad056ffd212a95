//! The `futures` traits over real sockets, with tokio-tungstenite as the
//! client: a session split into owned halves that live in different tasks,
//! the receiving half a `Stream` forwarded into the sending half's `Sink`;
//! a session used as a `Stream` directly; closing the `Sink` sends 1000.

mod common;

use common::Server;
use duplex::{App, Message, Session};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::{self, protocol::frame::coding::CloseCode};

const MESSAGES: usize = 200;

async fn client(addr: std::net::SocketAddr, path: &str) -> common_ws::Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}{path}"))
        .await
        .expect("connect");
    ws
}

mod common_ws {
    pub(crate) type Ws = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_halves_in_two_tasks_forward_a_stream_into_a_sink_in_order() {
    let app = App::new().web_socket("/upper", |session: Session| async move {
        let (mut sender, receiver) = session.split();
        // The receiving half moves to a task of its own; the sending half
        // stays here, fed through a channel: two tasks, one connection.
        let (tx, rx) = tokio::sync::mpsc::channel::<Message>(8);
        let reader = tokio::spawn(async move {
            let mut receiver = receiver;
            while let Some(Ok(message)) = receiver.next().await {
                let upper = message.as_text().unwrap_or_default().to_uppercase();
                if tx.send(Message::text(upper)).await.is_err() {
                    break;
                }
            }
        });
        let forwarded = tokio_stream_of(rx).map(Ok).forward(&mut sender).await;
        let _ = reader.await;
        forwarded
    });
    let server = Server::start(app).await;
    let mut ws = client(server.addr, "/upper").await;
    for i in 0..MESSAGES {
        ws.send(tungstenite::Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    for i in 0..MESSAGES {
        let reply = common::within("a reply", ws.next()).await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("MESSAGE {i}"));
    }
    ws.close(None).await.unwrap();
}

/// `forward` closes the Sink when the stream ends: our Close 1000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_is_a_stream_and_closing_its_sink_sends_1000() {
    let app = App::new().web_socket("/three", |mut session: Session| async move {
        let mut got = Vec::new();
        while let Some(Ok(message)) = session.next().await {
            got.push(message);
            if got.len() == 3 {
                break;
            }
        }
        // Back in reverse, then the Sink is closed.
        got.reverse();
        futures_util::stream::iter(got.into_iter().map(Ok))
            .forward(&mut session)
            .await
    });
    let server = Server::start(app).await;
    let mut ws = client(server.addr, "/three").await;
    for text in ["a", "b", "c"] {
        ws.send(tungstenite::Message::text(text)).await.unwrap();
    }
    for expected in ["c", "b", "a"] {
        let reply = common::within("a reply", ws.next()).await.unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), expected);
    }
    match common::within("the Close", ws.next()).await {
        Some(Ok(tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal);
        }
        other => panic!("expected Close 1000, got {other:?}"),
    }
}

/// An mpsc receiver as a `Stream`, without another dependency.
fn tokio_stream_of<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// A message fed to the `Sink` that does not fit in what is left of the
/// outgoing buffer (1 MiB) is held by the sink and queued once it fits:
/// `feed` of a second 700 KiB message returns, `flush` delivers both, and
/// closing the sink sends 1000 after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_holds_a_message_that_does_not_fit_yet_and_delivers_it_in_order() {
    let app = App::new().web_socket("/big", |session: Session| async move {
        let (mut sender, _receiver) = session.split();
        for fill in [1u8, 2, 3] {
            sender
                .feed(Message::Binary(vec![fill; 700 << 10].into()))
                .await?;
        }
        SinkExt::flush(&mut sender).await?;
        SinkExt::close(&mut sender).await
    });
    let server = Server::start(app).await;
    let config = tungstenite::protocol::WebSocketConfig::default();
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(
        format!("ws://{}/big", server.addr),
        Some(config),
        false,
    )
    .await
    .expect("connect");
    for fill in [1u8, 2, 3] {
        let message = common::within("a message", ws.next())
            .await
            .unwrap()
            .unwrap();
        let data = message.into_data();
        assert_eq!(data.len(), 700 << 10);
        assert!(data.iter().all(|&b| b == fill), "message {fill}");
    }
    match common::within("the Close", ws.next()).await {
        Some(Ok(tungstenite::Message::Close(Some(frame)))) => {
            assert_eq!(frame.code, CloseCode::Normal)
        }
        other => panic!("expected a Close, got {other:?}"),
    }
}
