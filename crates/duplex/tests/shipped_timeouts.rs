//! The session's time bounds of SECURITY.md at their shipped defaults, over
//! real loopback sockets, each checked to the second (the HTTP layer's and
//! the write timeout are in `limits.rs` and `hostile_peers.rs`, on the same
//! clock): on tokio's paused clock,
//! which jumps to the next timer whenever every task waits, so a minute of
//! protocol time takes milliseconds of wall time.
//!
//! Server and client run in one current-thread runtime; the clock moves
//! only when neither has anything to do (a loopback write is readable at
//! once), so a deadline that fires marks the time the server chose.

mod common;

use std::time::Duration;

use common::{CLOSE, PING, RawClient, Server, set_wait};
use duplex::{App, Session};
use tokio::time::Instant;

/// Longer than any deadline here.
const LONG: Duration = Duration::from_secs(600);

/// A handler that reads until the end, answering nothing.
async fn reader(mut session: Session) {
    while let Ok(Some(_)) = session.recv().await {}
}

/// Asserts that `at` is `expected` from `start`, to the second.
fn at_second(what: &str, start: Instant, at: Instant, expected: u64) {
    let elapsed = at - start;
    assert!(
        elapsed >= Duration::from_secs(expected) && elapsed < Duration::from_secs(expected + 1),
        "{what} after {elapsed:?}, expected {expected} s"
    );
}

/// RFC 6455 §5.5.2: the server pings after `ping_period` (30 s) and, with
/// no Pong for `timeout` (15 s), closes with 1011 and drops the
/// connection at once: a peer that answers no Ping is not waited for to
/// answer a Close.
#[tokio::test(start_paused = true)]
async fn rfc6455_5_5_2_a_ping_after_30_s_unanswered_for_15_s_closes_with_1011() {
    set_wait(LONG);
    let server = Server::start(App::new().web_socket("/ws", reader)).await;
    let start = Instant::now();
    let mut client = RawClient::connect(server.addr, "/ws").await;
    let ping = client.read_frame().await;
    assert_eq!(ping.opcode, PING, "{ping:?}");
    at_second("the Ping", start, Instant::now(), 30);
    let (code, reason) = client.read_close().await;
    assert_eq!((code, reason.as_str()), (1011, "Ping timeout"));
    at_second("the Close", start, Instant::now(), 45);
    client.expect_eof().await;
    at_second("the end of the connection", start, Instant::now(), 45);
}

/// RFC 6455 §7.1.1: after its Close, the server waits `close_timeout`
/// (10 s) for the peer's, then drops the connection.
#[tokio::test(start_paused = true)]
async fn rfc6455_7_1_1_an_unanswered_close_is_dropped_after_10_s() {
    set_wait(LONG);
    let app = App::new().web_socket("/ws", |session: Session| async move {
        let _ = session.close(duplex::CloseReason::normal()).await;
        // The handler stays: the connection's end is the driver's.
        std::future::pending::<()>().await;
    });
    let server = Server::start(app).await;
    let mut client = RawClient::connect(server.addr, "/ws").await;
    let start = Instant::now();
    let close = client.read_frame().await;
    assert_eq!(close.opcode, CLOSE, "{close:?}");
    client.expect_eof().await;
    at_second("the end of the connection", start, Instant::now(), 10);
}
