//! A raw session (Ktor's `webSocketRaw`): every frame as it arrived, pings
//! and fragments included, and nothing answered automatically.
//!
//! Run with `cargo run -p duplex --example raw`.

use duplex::{App, CloseReason, Frame, OpCode, RawSession};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    App::new()
        .web_socket_raw("/raw", |mut session: RawSession| async move {
            while let Some(frame) = session.recv().await? {
                println!(
                    "{:?} fin={} {} bytes",
                    frame.opcode,
                    frame.fin,
                    frame.payload.len()
                );
                match frame.opcode {
                    // Nothing is automatic here: answer pings ourselves.
                    OpCode::Ping => {
                        session
                            .send_frame(Frame::new(OpCode::Pong, frame.payload))
                            .await?
                    }
                    OpCode::Close => {
                        let reason = CloseReason::parse(&frame.payload)
                            .unwrap_or_else(|_| CloseReason::normal());
                        session.close(reason).await?;
                    }
                    OpCode::Pong => {}
                    _ => session.send_frame(frame).await?,
                }
            }
            Ok::<_, duplex::Error>(())
        })
        .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
        .await
}
