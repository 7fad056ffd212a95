//! The duplex chat server's endpoints: the brief's echo and
//! multiple-sessions examples, and the mirror that conformance suites and
//! benchmarks use. The binary serves [`app`]; tests mount it on a free port.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use duplex::axum::routing::get;
use duplex::{App, CloseCode, CloseReason, Error, Message, Sender, Session, WebSockets};

/// Every route of the server.
pub fn app(websockets: WebSockets) -> App {
    let chat = ChatRoom::default();
    App::new()
        .install(websockets)
        .route("/", get(|| async { INDEX }))
        .web_socket("/echo", echo)
        .web_socket("/mirror", mirror)
        .web_socket("/chat", move |session| chat.clone().join(session))
}

const INDEX: &str = "duplex-chat: WebSocket endpoints /echo, /chat and /mirror\n";

/// The brief's echo: asks for a name, greets each line, closes on "bye".
async fn echo(mut session: Session) -> Result<(), Error> {
    session.send("Please enter your name").await?;
    while let Some(message) = session.recv().await? {
        let Message::Text(text) = message else {
            continue;
        };
        if text.as_str() == "bye" {
            session
                .close(CloseReason::new(CloseCode::NORMAL, "Client said BYE"))
                .await?;
        } else {
            session.send(format!("Hi, {text}!")).await?;
        }
    }
    Ok(())
}

/// Returns every text and binary message unchanged.
async fn mirror(mut session: Session) -> Result<(), Error> {
    while let Some(message) = session.recv().await? {
        session.send(message).await?;
    }
    Ok(())
}

/// The brief's multiple-sessions example: each connection gets a name, and
/// every message goes to everyone as "[name]: text".
#[derive(Clone, Default)]
struct ChatRoom {
    members: Arc<Mutex<BTreeMap<u64, Sender>>>,
    next_id: Arc<AtomicU64>,
}

impl ChatRoom {
    async fn join(self, mut session: Session) -> Result<(), Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("user{id}");
        let count = {
            let mut members = self.lock();
            members.insert(id, session.sender());
            members.len()
        };
        let result = async {
            session
                .send(format!("You are connected! There are {count} users here."))
                .await?;
            while let Some(message) = session.recv().await? {
                if let Message::Text(text) = message {
                    self.broadcast(Message::from(format!("[{name}]: {text}")));
                }
            }
            Ok(())
        }
        .await;
        self.lock().remove(&id);
        result
    }

    /// Sends to every member without waiting on any: a member whose buffer
    /// is full misses this message rather than slowing the room.
    fn broadcast(&self, message: Message) {
        let members: Vec<Sender> = self.lock().values().cloned().collect();
        for member in members {
            if let Err(err) = member.try_send(message.clone()) {
                tracing::debug!("chat message not delivered: {err}");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Sender>> {
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
