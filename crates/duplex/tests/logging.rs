//! What duplex logs when peers misbehave: a session that ends abnormally (a
//! protocol error, a peer that vanished) and a refused upgrade are logged
//! at info with the peer, the path and the code or status, at most 20
//! lines of each kind a second (the next line says how many were left
//! out); a normal end is logged at debug; only a handler's own error is
//! logged at error. The handler here passes on what `recv` returns with
//! `?`, as most handlers do.
//!
//! The test binary installs a subscriber that records every event, so this
//! file holds one test (the subscriber is global to the process).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{CLOSE, RawClient, Server, TEXT, encode_frame, upgrade_request};
use duplex::{App, Session, WebSockets};
use tracing::{Level, Subscriber};
use tracing_subscriber::{Layer, layer::SubscriberExt};

#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<(Level, String)>>>);

impl<S: Subscriber> Layer<S> for Recorded {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Text(String);
        impl tracing::field::Visit for Text {
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", field.name(), value));
            }
        }
        let mut text = Text(String::new());
        event.record(&mut text);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), text.0));
    }
}

impl Recorded {
    fn take(&self) -> Vec<(Level, String)> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

async fn settle() {
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abnormal_ends_and_refusals_log_at_info_normal_ends_at_debug_and_a_handlers_error_at_error()
{
    let recorded = Recorded::default();
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(
        recorded.clone().with_filter(
            tracing_subscriber::filter::Targets::new().with_target("duplex", Level::DEBUG),
        ),
    ))
    .expect("the only subscriber of this test binary");
    let app = App::new()
        .install(WebSockets::default())
        .web_socket("/passes-errors-on", |mut session: Session| async move {
            while let Some(message) = session.recv().await? {
                session.send(message).await?;
            }
            Ok::<(), duplex::Error>(())
        })
        .web_socket("/fails", |mut session: Session| async move {
            session.recv().await?;
            Err::<(), duplex::BoxError>(std::io::Error::other("the handler's own failure").into())
        });
    let server = Server::start(app).await;
    let errors = |events: &[(Level, String)]| {
        events
            .iter()
            .filter(|(level, _)| *level <= Level::WARN)
            .cloned()
            .collect::<Vec<_>>()
    };

    // RFC 6455 §5.1: an unmasked frame from a client fails the connection
    // with 1002.
    let mut client = RawClient::connect(server.addr, "/passes-errors-on").await;
    client
        .write(&encode_frame(true, 0, TEXT, b"unmasked", None))
        .await;
    assert_eq!(client.read_close().await.0, 1002);
    settle().await;
    let events = recorded.take();
    assert_eq!(
        errors(&events),
        [],
        "a protocol error is routine: {events:?}"
    );
    assert!(
        events.iter().any(|(level, text)| *level == Level::INFO
            && text.contains("code=1002")
            && text.contains("path=\"/passes-errors-on\"")
            && text.contains("peer=127.0.0.1:")),
        "the end is logged at info with its peer, path and code: {events:?}"
    );

    // A peer that vanishes without a Close (1006).
    let client = RawClient::connect(server.addr, "/passes-errors-on").await;
    drop(client);
    settle().await;
    let events = recorded.take();
    assert_eq!(
        errors(&events),
        [],
        "a vanished peer is routine: {events:?}"
    );
    assert!(
        events
            .iter()
            .any(|(level, text)| *level == Level::INFO && text.contains("code=1006")),
        "{events:?}"
    );

    // A normal close: debug only.
    let mut client = RawClient::connect(server.addr, "/passes-errors-on").await;
    client.send_close(1000, "bye").await;
    assert_eq!(client.read_close().await.0, 1000);
    settle().await;
    let events = recorded.take();
    assert!(
        events
            .iter()
            .any(|(level, text)| *level == Level::DEBUG && text.contains("code=1000")),
        "{events:?}"
    );
    assert!(
        events.iter().all(|(level, _)| *level > Level::INFO),
        "a normal end is routine: {events:?}"
    );

    // Refused upgrades: at info with peer, path, status and reason, at
    // most 20 lines a second; the next line says how many were left out.
    let cross_site = "Origin: https://evil.example\r\n";
    for _ in 0..60 {
        let (response, _) = RawClient::request(
            server.addr,
            upgrade_request("/passes-errors-on", cross_site),
        )
        .await;
        assert_eq!(response.status, 403);
    }
    settle().await;
    let refusals = |events: &[(Level, String)]| {
        events
            .iter()
            .filter(|(level, text)| {
                *level == Level::INFO && text.contains("WebSocket upgrade refused")
            })
            .cloned()
            .collect::<Vec<_>>()
    };
    let lines = refusals(&recorded.take());
    assert!(
        (1..=40).contains(&lines.len()),
        "{} lines for 60 refusals in well under two seconds",
        lines.len()
    );
    assert!(
        lines[0].1.contains("reason=\"origin\"")
            && lines[0].1.contains("status=403")
            && lines[0].1.contains("path=\"/passes-errors-on\"")
            && lines[0].1.contains("peer=127.0.0.1:"),
        "{lines:?}"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (response, _) = RawClient::request(
        server.addr,
        upgrade_request("/passes-errors-on", cross_site),
    )
    .await;
    assert_eq!(response.status, 403);
    let lines = refusals(&recorded.take());
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        !lines[0].1.contains("skipped=0 "),
        "the next line says how many were left out: {lines:?}"
    );

    // A clean close, then the handler's own error: one error line.
    let mut client = RawClient::connect(server.addr, "/fails").await;
    client.send_final(TEXT, b"go").await;
    assert_eq!(client.read_close().await.0, 1011);
    client
        .write(&encode_frame(
            true,
            0,
            CLOSE,
            &[0x03, 0xe8],
            Some([1, 2, 3, 4]),
        ))
        .await;
    settle().await;
    let events = recorded.take();
    let errors = errors(&events);
    assert_eq!(errors.len(), 1, "{events:?}");
    assert_eq!(errors[0].0, Level::ERROR);
    assert!(
        errors[0].1.contains("the handler's own failure"),
        "{errors:?}"
    );
}
