//! The duplex client against the Autobahn|Testsuite fuzzingserver
//! (`wstest -m fuzzingserver`): it asks for the number of cases, runs each
//! one as an echo (every message back as it came), then asks the server to
//! write its reports. `.ci/autobahn/run-client.sh` starts the server, runs
//! this and checks the reports.
//!
//! ```sh
//! cargo run --release -p duplex --example autobahn_client -- ws://127.0.0.1:9001 duplex-client
//! ```

use std::time::Duration;

use duplex::{Client, Deflate, Session, WebSockets};

/// Echoes every message until the server closes.
async fn echo(mut session: Session) -> Result<(), duplex::Error> {
    while let Some(message) = session.recv().await? {
        session.send(message).await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let server = args.next().unwrap_or_else(|| "ws://127.0.0.1:9001".into());
    let agent = args.next().unwrap_or_else(|| "duplex-client".into());
    // The suite sends messages up to 16 MiB (section 9) and expects the
    // close handshake within its own timeouts.
    let websockets = WebSockets::default()
        .max_frame_size(64 << 20)
        .max_message_size(64 << 20)
        .close_timeout(Duration::from_secs(5));
    let client = Client::new()
        .websockets(websockets)
        .deflate(Deflate::default())
        .handshake_timeout(Duration::from_secs(10));

    let count = client
        .connect(
            &format!("{server}/getCaseCount"),
            |mut session: Session| async move {
                let message = session.recv().await?.ok_or(duplex::Error::Closed)?;
                let count = message.as_text().unwrap_or_default().trim().parse::<u32>();
                Ok::<_, duplex::Error>(count.unwrap_or(0))
            },
        )
        .await??;
    println!("autobahn client: {count} cases");
    for case in 1..=count {
        let url = format!("{server}/runCase?case={case}&agent={agent}");
        // A case may end the connection any way it likes: that is what it
        // tests, and the report says whether we answered it right.
        match client.connect(&url, echo).await {
            Ok(_) => {}
            Err(err) => eprintln!("case {case}: {err}"),
        }
    }
    client
        .connect(
            &format!("{server}/updateReports?agent={agent}"),
            |mut session: Session| async move { while let Ok(Some(_)) = session.recv().await {} },
        )
        .await?;
    println!("autobahn client: reports updated");
    Ok(())
}
