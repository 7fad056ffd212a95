//! The browser API's events mapped onto a session, as in the brief:
//! onConnect is the start of the handler, onMessage each received message,
//! onClose a `recv` that returns `Ok(None)`, onError a `recv` that returns
//! `Err`; in both of the last the close reason is set.
//!
//! Run with `cargo run -p duplex --example events`.

use duplex::{App, Message, Session};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    App::new()
        .web_socket("/echo", |mut session: Session| async move {
            println!("onConnect from {:?}", session.request().remote_addr());
            let mut received = Vec::new();
            loop {
                match session.recv().await {
                    Ok(Some(Message::Text(text))) => {
                        println!("onMessage");
                        received.push(text.to_string());
                        let _ = session.send(Message::Text(text)).await;
                    }
                    Ok(Some(Message::Binary(_))) => {}
                    Ok(None) => {
                        println!("onClose {}", session.close_reason().await);
                        break;
                    }
                    Err(err) => {
                        println!("onError {} ({err})", session.close_reason().await);
                        break;
                    }
                }
            }
            println!("received {} messages", received.len());
        })
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
