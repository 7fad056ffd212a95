//! What duplex logs when peers misbehave: a peer that breaks the protocol
//! or vanishes is routine for a server, logged at debug with the close
//! code; only a handler's own error is logged at error. The handler here
//! passes on what `recv` returns with `?`, as most handlers do.
//!
//! The test binary installs a subscriber that records every event, so this
//! file holds one test (the subscriber is global to the process).

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use common::{CLOSE, RawClient, Server, TEXT, encode_frame};
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
async fn routine_disconnects_log_at_debug_with_their_code_and_only_a_handlers_own_error_at_error() {
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
        events
            .iter()
            .any(|(level, text)| *level == Level::DEBUG && text.contains("code=1002")),
        "the end is logged at debug with its code: {events:?}"
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
        events.iter().any(|(_, text)| text.contains("code=1006")),
        "{events:?}"
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
