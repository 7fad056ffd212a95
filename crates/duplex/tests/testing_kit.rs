//! `duplex::testing`: the kit's server, client session and raw client, each
//! checked against what RFC 6455 and the kit's own promises require.

use std::time::Duration;

use duplex::{
    App, CloseCode, CloseReason, Message, Rsv, Session,
    testing::{RawFrame, TestServer},
};
use http::{HeaderMap, HeaderValue, StatusCode};

/// Ktor's echo: asks a name, greets it, closes on "bye".
async fn echo(mut session: Session) -> Result<(), duplex::Error> {
    session.send("Please enter your name").await?;
    while let Some(Message::Text(name)) = session.recv().await? {
        if name == "bye" {
            let reason = CloseReason::new(CloseCode::NORMAL, "Client said BYE");
            session.close(reason).await?;
        } else {
            session.send(format!("Hi, {name}!")).await?;
        }
    }
    Ok(())
}

async fn mirror(mut session: Session) -> Result<(), duplex::Error> {
    while let Some(message) = session.recv().await? {
        session.send(message).await?;
    }
    Ok(())
}

async fn within_a_second<F: std::future::Future>(fut: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(1), fut)
        .await
        .expect("done within a second")
}

fn app() -> App {
    App::new()
        .web_socket("/echo", echo)
        .web_socket("/mirror", mirror)
}

#[tokio::test]
async fn the_echo_example() {
    let server = TestServer::start(app()).await;
    let reason = server
        .connect("/echo", |mut session| async move {
            let greeting = session.recv().await.unwrap();
            assert_eq!(greeting, Some(Message::text("Please enter your name")));
            session.send("Ada").await.unwrap();
            assert_eq!(
                session.recv().await.unwrap(),
                Some(Message::text("Hi, Ada!"))
            );
            session.send("bye").await.unwrap();
            assert_eq!(session.recv().await.unwrap(), None);
            session.close_reason().await
        })
        .await;
    assert_eq!(
        reason,
        CloseReason::new(CloseCode::NORMAL, "Client said BYE")
    );
    assert!(server.url("/echo").starts_with("ws://127.0.0.1:"));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_unmasked_frame_is_a_protocol_error() {
    let server = TestServer::start(app()).await;
    let mut client = server.raw("/mirror").await;
    assert!(client.is_upgraded());
    client.send_frame(RawFrame::text("hello").unmasked()).await;
    // §5.1: the server fails the connection on an unmasked client frame.
    assert_eq!(client.expect_close().await.0, CloseCode::PROTOCOL_ERROR);
}

#[tokio::test]
async fn reserved_opcodes_and_rsv_bits_are_protocol_errors() {
    let server = TestServer::start(app()).await;
    for frame in [
        RawFrame::with_opcode(0x3, "x"),
        RawFrame::with_opcode(0xB, ""),
        RawFrame::text("x").rsv(Rsv::RSV2),
    ] {
        let mut client = server.raw("/mirror").await;
        client.send_frame(frame.clone()).await;
        let (code, _) = client.expect_close().await;
        assert_eq!(code, CloseCode::PROTOCOL_ERROR, "{frame:?}");
        // After our echo of the Close the server ends the TCP connection.
        client.send_close(code, "").await;
        client.expect_eof().await;
    }
}

#[tokio::test]
async fn fragments_and_a_close_go_through_the_raw_client() {
    let server = TestServer::start(app()).await;
    let mut client = server.raw("/mirror").await;
    client.send_frame(RawFrame::text("Hel").fin(false)).await;
    client.send_frame(RawFrame::ping("p")).await;
    client
        .send_frame(RawFrame::continuation("lo").masked_with([1, 2, 3, 4]))
        .await;
    let pong = client.next_frame().await.expect("a Pong");
    assert_eq!(
        (pong.opcode, &pong.payload[..], pong.mask),
        (0xA, &b"p"[..], None)
    );
    assert_eq!(client.expect_text().await, "Hello");
    client.send_close(4000u16, "done").await;
    assert_eq!(
        client.expect_close().await,
        (CloseCode(4000), "done".to_owned())
    );
    client.expect_eof().await;
}

#[tokio::test]
async fn handshake_refusals_come_back_typed() {
    let server = TestServer::start(app()).await;
    let mut headers = HeaderMap::new();
    headers.insert("sec-websocket-version", HeaderValue::from_static("12"));
    let client = server.raw_with("/mirror", headers).await;
    assert_eq!(client.status(), StatusCode::UPGRADE_REQUIRED);
    assert_eq!(client.headers()["sec-websocket-version"], "13");
    assert!(!client.is_upgraded());

    let plain_get = format!("GET /mirror HTTP/1.1\r\nHost: {}\r\n\r\n", server.addr());
    let client = duplex::testing::RawTestClient::request(server.addr(), plain_get).await;
    assert_eq!(client.status(), StatusCode::BAD_REQUEST);

    let refused = server
        .try_connect_with(&duplex::Client::new(), "/nowhere", |_session| async {})
        .await;
    assert!(
        matches!(&refused, Err(err) if err.status() == Some(StatusCode::NOT_FOUND)),
        "{refused:?}"
    );
}

#[tokio::test]
async fn stop_closes_sessions_with_1001() {
    let server = TestServer::start(app()).await;
    let mut client = server.raw("/mirror").await;
    let stop = tokio::spawn(server.stop());
    let (code, reason) = client.expect_close().await;
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::GOING_AWAY, "Server shutting down")
    );
    client.send_close(code, "").await;
    client.expect_eof().await;
    // Our FIN ends the server's wait for it, so `stop` returns at once.
    drop(client);
    within_a_second(stop).await.unwrap().unwrap();
}

#[tokio::test]
#[should_panic(expected = "timed out after 200ms waiting for a frame from the server")]
async fn waits_are_bounded() {
    let server = TestServer::start(app())
        .await
        .with_timeout(Duration::from_millis(200));
    let mut client = server.raw("/mirror").await;
    client.next_frame().await;
}

/// Run by [`a_failed_assertion_in_the_client_panics_once`] in a child
/// process, so that its panic output can be counted.
#[tokio::test]
#[ignore = "run in a child process by a_failed_assertion_in_the_client_panics_once"]
async fn child_failing_client_assertion() {
    let server = TestServer::start(app()).await;
    server
        .connect("/echo", |mut session| async move {
            let greeting = session.recv().await.unwrap();
            assert_eq!(
                greeting,
                Some(Message::text("the wrong greeting")),
                "GREETING-CHECK"
            );
        })
        .await;
}

#[test]
fn a_failed_assertion_in_the_client_panics_once() {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "child_failing_client_assertion",
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the child test passed: {stderr}");
    assert_eq!(stderr.matches("panicked at").count(), 1, "{stderr}");
    assert!(stderr.contains("GREETING-CHECK"), "{stderr}");
    assert!(stderr.contains("testing_kit.rs"), "{stderr}");
}
