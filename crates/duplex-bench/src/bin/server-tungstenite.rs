//! The tokio-tungstenite peer: `/mirror` returns every message, `/broadcast`
//! sends every message to every connection of `/broadcast` through a
//! `tokio::sync::broadcast` channel and a writer task per connection.

use futures_util::{SinkExt, StreamExt};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::broadcast,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message,
        handshake::server::{Request, Response},
        protocol::WebSocketConfig,
    },
};

use duplex_bench::server::{
    self, BROADCAST_CAPACITY, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, ServerArgs,
};

fn main() -> std::io::Result<()> {
    let args = ServerArgs::parse();
    server::run(args.addr, serve)
}

async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let (tx, _) = broadcast::channel::<Message>(BROADCAST_CAPACITY);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp, tx.clone()));
    }
}

// The callback type is tungstenite's, error response included.
#[allow(clippy::result_large_err)]
async fn connection(tcp: TcpStream, tx: broadcast::Sender<Message>) {
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_SIZE))
        .max_frame_size(Some(MAX_FRAME_SIZE));
    let mut path = String::new();
    let callback = |request: &Request, response: Response| {
        path = request.uri().path().to_owned();
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)).await
    else {
        return;
    };
    match path.as_str() {
        "/broadcast" => broadcast_member(ws, tx).await,
        _ => mirror(ws).await,
    }
}

async fn mirror(mut ws: WebSocketStream<TcpStream>) {
    while let Some(Ok(message)) = ws.next().await {
        if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err() {
            break;
        }
    }
}

async fn broadcast_member(ws: WebSocketStream<TcpStream>, tx: broadcast::Sender<Message>) {
    let (mut sink, mut stream) = ws.split();
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
        if message.is_text() || message.is_binary() {
            let _ = tx.send(message);
        }
    }
    writer.abort();
}
