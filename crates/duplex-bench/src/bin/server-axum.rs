//! The axum peer (axum's `ws`, tokio-tungstenite underneath): `/mirror`
//! returns every message, `/broadcast` sends every message to every
//! connection of `/broadcast` through a `tokio::sync::broadcast` channel and
//! a writer task per connection, as axum's chat example does.

use axum::{
    Router,
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    response::Response,
    routing::any,
    serve::ListenerExt,
};
use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpListener, sync::broadcast};

use duplex_bench::server::{
    self, BROADCAST_CAPACITY, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, ServerArgs,
};

fn main() -> std::io::Result<()> {
    let args = ServerArgs::parse();
    server::run(args.addr, serve)
}

async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let (tx, _) = broadcast::channel::<Message>(BROADCAST_CAPACITY);
    let app = Router::new()
        .route("/mirror", any(mirror_upgrade))
        .route("/broadcast", any(broadcast_upgrade))
        .with_state(tx);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await
}

fn limits(upgrade: WebSocketUpgrade) -> WebSocketUpgrade {
    upgrade
        .max_message_size(MAX_MESSAGE_SIZE)
        .max_frame_size(MAX_FRAME_SIZE)
}

async fn mirror_upgrade(upgrade: WebSocketUpgrade) -> Response {
    limits(upgrade).on_upgrade(mirror)
}

async fn mirror(mut socket: WebSocket) {
    while let Some(Ok(message)) = socket.recv().await {
        if matches!(message, Message::Text(_) | Message::Binary(_))
            && socket.send(message).await.is_err()
        {
            break;
        }
    }
}

async fn broadcast_upgrade(
    upgrade: WebSocketUpgrade,
    State(tx): State<broadcast::Sender<Message>>,
) -> Response {
    limits(upgrade).on_upgrade(move |socket| broadcast_member(socket, tx))
}

async fn broadcast_member(socket: WebSocket, tx: broadcast::Sender<Message>) {
    let (mut sink, mut stream) = socket.split();
    let mut rx = tx.subscribe();
    let writer = tokio::spawn(async move {
        loop {
            match rx.recv().await {
                Ok(message) => {
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    while let Some(Ok(message)) = stream.next().await {
        if matches!(message, Message::Text(_) | Message::Binary(_)) {
            let _ = tx.send(message);
        }
    }
    writer.abort();
}
