//! The fastwebsockets peer (hyper 1 for the upgrade): `/mirror` returns every
//! message, as fastwebsockets' echo example does; `/broadcast` sends every
//! message to every connection of `/broadcast` through a
//! `tokio::sync::broadcast` channel, with the connection split in a read half
//! and a write half shared by the reader (pongs, close) and a writer task.

use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{
    FragmentCollector, FragmentCollectorRead, Frame, OpCode, Payload, WebSocketError, upgrade,
};
use http_body_util::Empty;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    net::TcpListener,
    sync::{Mutex, broadcast},
};

use duplex_bench::server::{self, BROADCAST_CAPACITY, MAX_MESSAGE_SIZE, ServerArgs};

type Hub = broadcast::Sender<(OpCode, Bytes)>;

fn main() -> std::io::Result<()> {
    let args = ServerArgs::parse();
    server::run(args.addr, serve)
}

async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let (hub, _) = broadcast::channel(BROADCAST_CAPACITY);
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let hub: Hub = hub.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| route(request, hub.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .with_upgrades()
                .await;
        });
    }
}

async fn route(
    mut request: Request<Incoming>,
    hub: Hub,
) -> Result<Response<Empty<Bytes>>, WebSocketError> {
    let path = request.uri().path().to_owned();
    if path != "/mirror" && path != "/broadcast" {
        let mut response = Response::new(Empty::new());
        *response.status_mut() = StatusCode::NOT_FOUND;
        return Ok(response);
    }
    let (response, upgraded) = upgrade::upgrade(&mut request)?;
    tokio::spawn(async move {
        let result = if path == "/broadcast" {
            broadcast_member(upgraded, hub).await
        } else {
            // As fastwebsockets' own echo example runs it.
            tokio::task::unconstrained(mirror(upgraded)).await
        };
        drop(result);
    });
    Ok(response)
}

async fn mirror(upgraded: upgrade::UpgradeFut) -> Result<(), WebSocketError> {
    let mut ws = upgraded.await?;
    ws.set_max_message_size(MAX_MESSAGE_SIZE);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = ws.read_frame().await?;
        match frame.opcode {
            OpCode::Close => break,
            OpCode::Text | OpCode::Binary => ws.write_frame(frame).await?,
            _ => {}
        }
    }
    Ok(())
}

async fn broadcast_member(upgraded: upgrade::UpgradeFut, hub: Hub) -> Result<(), WebSocketError> {
    let mut ws = upgraded.await?;
    ws.set_max_message_size(MAX_MESSAGE_SIZE);
    let (read_half, write_half) = ws.split(tokio::io::split);
    let mut reader = FragmentCollectorRead::new(read_half);
    let writer = Arc::new(Mutex::new(write_half));
    let mut rx = hub.subscribe();
    let forward = {
        let writer = Arc::clone(&writer);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok((opcode, payload)) => {
                        let frame = Frame::new(true, opcode, None, Payload::Borrowed(&payload));
                        if writer.lock().await.write_frame(frame).await.is_err() {
                            break;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        })
    };
    let result = async {
        loop {
            let frame = reader
                .read_frame(&mut |frame| {
                    let writer = Arc::clone(&writer);
                    async move { writer.lock().await.write_frame(frame).await }
                })
                .await?;
            match frame.opcode {
                OpCode::Close => break,
                OpCode::Text | OpCode::Binary => {
                    let _ = hub.send((frame.opcode, Bytes::copy_from_slice(&frame.payload)));
                }
                _ => {}
            }
        }
        Ok(())
    }
    .await;
    forward.abort();
    result
}
