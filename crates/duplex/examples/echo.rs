//! The brief's single-session example: `ws://127.0.0.1:8080/echo` asks for a
//! name, greets every line and closes on "bye".
//!
//! Run with `cargo run -p duplex --example echo`.

use std::time::Duration;

use duplex::{App, CloseCode, CloseReason, Message, Session, WebSockets};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let websockets = WebSockets::default()
        .ping_period(Some(Duration::from_secs(15)))
        .timeout(Duration::from_secs(15))
        .max_frame_size(u64::MAX)
        .masking(false);
    App::new()
        .install(websockets)
        .web_socket("/echo", |mut session: Session| async move {
            session.send("Please enter your name").await?;
            while let Some(message) = session.recv().await? {
                let Message::Text(text) = message else {
                    continue;
                };
                if text.as_str().eq_ignore_ascii_case("bye") {
                    let reason = CloseReason::new(CloseCode::NORMAL, "Client said BYE");
                    session.close(reason).await?;
                } else {
                    session.send(format!("Hi, {text}!")).await?;
                }
            }
            Ok::<_, duplex::Error>(())
        })
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
