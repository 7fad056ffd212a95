//! Typed messages through the content converter (Ktor's `sendSerialized`
//! and `receiveDeserialized`), JSON by default.
//!
//! Run with `cargo run -p duplex --example json`, then send
//! `{"name":"write docs","priority":2}` to `ws://127.0.0.1:8080/tasks`.

use duplex::{App, Error, Session};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Task {
    name: String,
    priority: u8,
}

#[derive(Serialize)]
struct Ack<'a> {
    accepted: &'a str,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    App::new()
        .web_socket("/tasks", |mut session: Session| async move {
            loop {
                match session.recv_json::<Task>().await {
                    Ok(Some(task)) => {
                        session
                            .send_json(&Ack {
                                accepted: &task.name,
                            })
                            .await?
                    }
                    Ok(None) => return Ok(()),
                    // A message that does not decode leaves the session open.
                    Err(Error::Convert(err)) => session.send(format!("error: {err}")).await?,
                    Err(err) => return Err(err),
                }
            }
        })
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
