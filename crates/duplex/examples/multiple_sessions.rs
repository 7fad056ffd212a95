//! The brief's multiple-sessions example: every connection gets a name and
//! every message goes to everyone as "[name]: text".
//!
//! Run with `cargo run -p duplex --example multiple_sessions`, then connect
//! several clients to `ws://127.0.0.1:8080/chat`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use duplex::{App, Message, Sender, Session};

type Connections = Arc<Mutex<HashMap<u64, Sender>>>;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let connections = Connections::default();
    let last_id = Arc::new(AtomicU64::new(0));
    App::new()
        .web_socket("/chat", move |mut session: Session| {
            let connections = connections.clone();
            let id = last_id.fetch_add(1, Ordering::Relaxed);
            async move {
                let name = format!("user{id}");
                let count = {
                    let mut all = connections.lock().unwrap();
                    all.insert(id, session.sender());
                    all.len()
                };
                let result = async {
                    session
                        .send(format!("You are connected! There are {count} users here."))
                        .await?;
                    while let Some(message) = session.recv().await? {
                        let Message::Text(text) = message else {
                            continue;
                        };
                        let line = Message::from(format!("[{name}]: {text}"));
                        let everyone: Vec<Sender> =
                            connections.lock().unwrap().values().cloned().collect();
                        for peer in everyone {
                            // try_send: a slow peer misses a line instead of stalling the room.
                            let _ = peer.try_send(line.clone());
                        }
                    }
                    Ok::<_, duplex::Error>(())
                }
                .await;
                // Whatever ended the session (Ktor's `finally`), it leaves the set.
                connections.lock().unwrap().remove(&id);
                result
            }
        })
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
