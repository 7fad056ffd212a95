//! A live feed a client can leave and rejoin without losing a message.
//!
//! Every message of the `ticks` topic goes out as JSON with its position
//! (`{"offset":7,"epoch":"…","text":"tick 7"}`). A client that comes back
//! with the position of the last message it saw (`/feed?offset=7&epoch=…`)
//! gets exactly what it missed, then the live stream; when that cannot be
//! given (the history no longer reaches back, or the server restarted) it
//! is told `{"recovered":false}` first, and follows from now.
//!
//! Run with `cargo run -p duplex --example feed`, then open
//! `ws://127.0.0.1:8080/feed`.

use std::time::Duration;

use duplex::{
    App, Session,
    topics::{History, Position, Since, Topics},
};

/// The feed's route over `topics`.
pub(crate) fn app(topics: Topics) -> App {
    App::new().web_socket("/feed", move |session: Session| {
        follow(topics.clone(), session)
    })
}

async fn follow(topics: Topics, mut session: Session) {
    let request = session.request();
    let since = match (request.query_param("offset"), request.query_param("epoch")) {
        (Some(offset), Some(epoch)) => match offset.parse() {
            Ok(offset) => Since::Position(Position {
                offset,
                epoch: epoch.into(),
            }),
            Err(_) => Since::Now,
        },
        _ => Since::Now,
    };
    let mut ticks = match topics.subscribe("ticks", since) {
        Ok(ticks) => ticks,
        Err(_) => {
            let _ = session
                .send_json(&serde_json::json!({ "recovered": false }))
                .await;
            match topics.subscribe("ticks", Since::Now) {
                Ok(ticks) => ticks,
                Err(_) => return,
            }
        }
    };
    loop {
        tokio::select! {
            tick = ticks.next() => {
                let Ok(tick) = tick else { break };
                let json = serde_json::json!({
                    "offset": tick.offset,
                    "epoch": &*tick.epoch,
                    "text": tick.message.as_text().unwrap_or_default(),
                });
                if session.send_json(&json).await.is_err() {
                    break;
                }
            }
            // The client's messages are not for us; its close ends this.
            incoming = session.recv() => {
                if !matches!(incoming, Ok(Some(_))) {
                    break;
                }
            }
        }
    }
}

#[allow(dead_code)]
#[tokio::main]
async fn main() -> std::io::Result<()> {
    let topics = Topics::new(History::default().max_messages(1_000));
    let publisher = topics.clone();
    tokio::spawn(async move {
        for n in 1u64.. {
            let _ = publisher.publish("ticks", format!("tick {n}"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    app(topics)
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
