//! Session APIs over real loopback sockets: typed JSON messages on a default
//! session (§5.6 text data), and the raw session that hands over every frame
//! (§5.4 fragments, §5.5.2 pings) and does nothing automatically.

mod common;

use common::*;
use duplex::{App, CloseCode, CloseReason, Error, Frame, Message, OpCode, RawSession, Session};

#[cfg(feature = "json")]
mod rfc6455_5_6_json_text {
    use super::*;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Deserialize)]
    struct Command {
        op: String,
        n: i64,
    }

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Reply {
        op: String,
        doubled: i64,
    }

    /// What the handler saw for each message.
    #[derive(Debug)]
    enum Seen {
        Command(String, i64),
        ConvertError(String),
        Other(String),
    }

    #[tokio::test]
    async fn malformed_json_is_a_convert_error_and_the_session_stays_open() {
        let (tx, mut seen) = reports();
        let app = App::new().web_socket("/json", move |mut session: Session| {
            let tx = tx.clone();
            async move {
                loop {
                    match session.recv_json::<Command>().await {
                        Ok(Some(command)) => {
                            let _ = tx.send(Seen::Command(command.op.clone(), command.n));
                            let reply = Reply {
                                op: command.op,
                                doubled: command.n * 2,
                            };
                            session.send_json(&reply).await?;
                        }
                        Ok(None) => return Ok(()),
                        Err(Error::Convert(err)) => {
                            let _ = tx.send(Seen::ConvertError(err.to_string()));
                            session.send_text("not a command").await?;
                        }
                        Err(err) => {
                            let _ = tx.send(Seen::Other(format!("{err:?}")));
                            return Err(err);
                        }
                    }
                }
            }
        });
        let server = Server::start(app).await;
        let mut ws = ws_connect(server.addr, "/json").await;

        let reply_to = |message: WsMessage| -> Reply {
            serde_json::from_str(message.to_text().expect("a text reply")).expect("a JSON reply")
        };

        ws_send(&mut ws, ws_text(r#"{"op":"double","n":21}"#)).await;
        assert_eq!(
            reply_to(ws_next(&mut ws).await),
            Reply {
                op: "double".into(),
                doubled: 42
            }
        );
        assert!(matches!(seen.next().await, Seen::Command(op, 21) if op == "double"));

        for (bad, why) in [
            (ws_text("{nope"), "could not decode"),
            (ws_text(r#"{"op":"double"}"#), "missing field `n`"),
            (
                ws_text(r#"{"op":"double","n":1} trailing"#),
                "trailing characters",
            ),
            (
                WsMessage::binary(br#"{"op":"double","n":1}"#.to_vec()),
                "binary",
            ),
        ] {
            ws_send(&mut ws, bad.clone()).await;
            assert_eq!(ws_next(&mut ws).await, ws_text("not a command"), "{bad:?}");
            match seen.next().await {
                Seen::ConvertError(err) => assert!(err.contains(why), "{bad:?}: {err}"),
                Seen::Other(err) => panic!("{bad:?}: not a convert error: {err}"),
                Seen::Command(op, n) => panic!("{bad:?}: decoded as {op} {n}"),
            }
        }

        ws_send(&mut ws, ws_text(r#"{"op":"again","n":-5}"#)).await;
        assert_eq!(
            reply_to(ws_next(&mut ws).await),
            Reply {
                op: "again".into(),
                doubled: -10
            }
        );
        assert!(matches!(seen.next().await, Seen::Command(op, -5) if op == "again"));
    }
}

mod rfc6455_7_incoming_stream {
    use futures_util::StreamExt;

    use super::*;

    /// A route that collects `session.incoming()` and reports what it saw.
    fn collecting_app() -> (App, Reports<Vec<Result<String, String>>>) {
        let (tx, seen) = reports();
        let app = App::new().web_socket("/incoming", move |mut session: Session| {
            let tx = tx.clone();
            async move {
                let mut seen = Vec::new();
                let mut incoming = session.incoming();
                while let Some(item) = incoming.next().await {
                    seen.push(
                        item.map(|m| m.as_text().unwrap_or("binary").to_owned())
                            .map_err(|e| e.to_string()),
                    );
                }
                // Polled again after the end: still the end.
                if incoming.next().await.is_some() {
                    seen.push(Err("an item after the end".into()));
                }
                let _ = tx.send(seen);
            }
        });
        (app, seen)
    }

    #[tokio::test]
    async fn incoming_yields_messages_then_ends_after_the_closing_handshake() {
        let (app, mut seen) = collecting_app();
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/incoming").await;
        client.send_final(TEXT, b"one").await;
        client.send_final(TEXT, b"two").await;
        client.send_close(1000, "").await;
        assert_eq!(client.read_close().await.0, 1000);
        assert_eq!(seen.next().await, vec![Ok("one".into()), Ok("two".into())]);
    }

    #[tokio::test]
    async fn incoming_yields_the_error_that_failed_the_connection_then_ends() {
        let (app, mut seen) = collecting_app();
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/incoming").await;
        client.send_final(TEXT, b"one").await;
        client
            .write(&encode_frame(true, 0, TEXT, b"unmasked", None))
            .await;
        assert_eq!(client.read_close().await.0, 1002);
        let seen = seen.next().await;
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0], Ok("one".into()));
        assert!(seen[1].is_err(), "{seen:?}");
    }
}

/// A raw route that reports every frame and answers the peer's Close.
fn raw_recorder_app() -> (App, Reports<Frame>) {
    let (tx, frames) = reports();
    let app = App::new().web_socket_raw("/raw", move |mut session: RawSession| {
        let tx = tx.clone();
        async move {
            while let Ok(Some(frame)) = session.recv().await {
                let close = frame.opcode == OpCode::Close;
                let _ = tx.send(frame);
                if close {
                    let _ = session
                        .close(CloseReason::new(CloseCode::NORMAL, "raw bye"))
                        .await;
                }
            }
        }
    });
    (app, frames)
}

mod rfc6455_5_5_2_raw_pings {
    use super::*;

    #[tokio::test]
    async fn raw_session_receives_pings_and_does_not_answer_them() {
        let (app, mut frames) = raw_recorder_app();
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/raw").await;
        client.send_final(PING, b"are you there").await;
        let ping = frames.next().await;
        assert_eq!(
            (ping.opcode, ping.fin, &ping.payload[..]),
            (OpCode::Ping, true, &b"are you there"[..])
        );
        client.send_final(PONG, b"unasked").await;
        let pong = frames.next().await;
        assert_eq!(
            (pong.opcode, &pong.payload[..]),
            (OpCode::Pong, &b"unasked"[..])
        );
        client.send_close(1000, "done").await;
        let close = frames.next().await;
        assert_eq!(close.opcode, OpCode::Close);
        // The first frame back is the handler's Close: no Pong was sent.
        let first = client.read_frame().await;
        assert_eq!(
            first.close_code_and_reason(),
            (1000, "raw bye".to_owned()),
            "{first:?}"
        );
        client.expect_eof().await;
    }
}

mod rfc6455_5_4_raw_fragments {
    use super::*;

    #[tokio::test]
    async fn raw_session_receives_fragments_one_by_one_with_their_fin_flags() {
        let (app, mut frames) = raw_recorder_app();
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/raw").await;
        client.send(false, TEXT, b"ab").await;
        client.send(false, CONTINUATION, b"cd").await;
        client.send_final(PING, b"p").await;
        client.send(true, CONTINUATION, b"ef").await;
        client.send_final(BINARY, &[9]).await;
        let mut got = Vec::new();
        for _ in 0..5 {
            let f = frames.next().await;
            got.push((f.opcode, f.fin, f.payload.to_vec()));
        }
        assert_eq!(
            got,
            vec![
                (OpCode::Text, false, b"ab".to_vec()),
                (OpCode::Continuation, false, b"cd".to_vec()),
                (OpCode::Ping, true, b"p".to_vec()),
                (OpCode::Continuation, true, b"ef".to_vec()),
                (OpCode::Binary, true, vec![9]),
            ]
        );
    }

    #[tokio::test]
    async fn raw_session_sends_frames_as_given() {
        let app = App::new().web_socket_raw("/raw", |session: RawSession| async move {
            session
                .send_frame(Frame::new(OpCode::Text, "fr").with_fin(false))
                .await?;
            session.ping("between").await?;
            session
                .send_frame(Frame::new(OpCode::Continuation, "agments"))
                .await?;
            Ok::<_, Error>(())
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/raw").await;
        let mut got = Vec::new();
        for _ in 0..3 {
            let f = client.read_frame().await;
            assert!(!f.masked);
            got.push((f.opcode, f.fin, f.payload));
        }
        assert_eq!(
            got,
            vec![
                (TEXT, false, b"fr".to_vec()),
                (PING, true, b"between".to_vec()),
                (CONTINUATION, true, b"agments".to_vec()),
            ]
        );
        // Returning without a Close gets one sent: 1000.
        assert_eq!(client.read_close().await.0, 1000);
    }
}

mod backpressure {
    use std::{sync::Arc, time::Duration};

    use duplex::{TrySendError, WebSockets};
    use tokio::sync::Notify;

    use super::*;

    #[tokio::test]
    async fn a_handler_that_falls_behind_loses_no_message() {
        const COUNT: u32 = 300;
        let go = Arc::new(Notify::new());
        let (tx, mut report) = reports();
        let app = App::new()
            .install(WebSockets::default().incoming_buffer(16 << 10))
            .web_socket("/slow", {
                let go = Arc::clone(&go);
                move |mut session: Session| {
                    let go = Arc::clone(&go);
                    let tx = tx.clone();
                    async move {
                        // Busy elsewhere while 300 × 4 KiB arrive.
                        go.notified().await;
                        let mut seen = Vec::new();
                        while seen.len() < COUNT as usize {
                            match session.recv().await {
                                Ok(Some(m)) => seen.push(m),
                                other => {
                                    let _ = tx.send(Err(format!("{other:?}")));
                                    return;
                                }
                            }
                        }
                        let _ = tx.send(Ok(seen));
                    }
                }
            });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/slow").await;
        let writer = tokio::spawn(async move {
            for i in 0..COUNT {
                let mut payload = i.to_be_bytes().to_vec();
                payload.resize(4096, i as u8);
                client.send_final(BINARY, &payload).await;
            }
            client
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        go.notify_one();
        let seen = report.next().await.expect("the handler saw an error");
        let _client = within("the writer", writer).await.expect("writer task");
        for (i, message) in seen.iter().enumerate() {
            let payload = message.payload();
            assert_eq!(payload.len(), 4096, "message {i}");
            assert_eq!(
                u32::from_be_bytes(payload[..4].try_into().unwrap()),
                i as u32,
                "message {i} out of order"
            );
            assert!(
                payload[4..].iter().all(|&b| b == i as u8),
                "message {i} corrupted"
            );
        }
    }

    #[tokio::test]
    async fn more_pending_messages_than_the_event_limit_all_arrive_in_order() {
        const COUNT: usize = 10_000;
        let (app, _ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        let mut burst = Vec::new();
        for i in 0..COUNT {
            burst.extend(encode_frame(
                true,
                0,
                BINARY,
                &[(i % 251) as u8],
                Some(MASK),
            ));
        }
        client.write(&burst).await;
        for i in 0..COUNT {
            let echo = client.read_frame().await;
            assert_eq!(
                (echo.opcode, echo.payload.as_slice()),
                (BINARY, &[(i % 251) as u8][..]),
                "echo {i}"
            );
        }
    }

    #[tokio::test]
    async fn a_slow_reader_fills_the_outgoing_buffer_and_loses_nothing() {
        const CHUNK: usize = 64 << 10;
        const COUNT: usize = 64;
        let (tx, mut report) = reports();
        let app = App::new()
            .install(WebSockets::default().outgoing_buffer(2 * CHUNK))
            .web_socket("/fast", move |session: Session| {
                let tx = tx.clone();
                async move {
                    let chunk = |i: usize| Message::binary(vec![i as u8; CHUNK]);
                    // Without awaiting, the connection task cannot write:
                    // the buffer fills after a few messages.
                    let mut queued = 0;
                    let full = loop {
                        match session.try_send(chunk(queued)) {
                            Ok(()) => queued += 1,
                            Err(err) => break err,
                        }
                        if queued == COUNT {
                            break TrySendError::Closed;
                        }
                    };
                    let _ = tx.send((queued, full));
                    for i in queued..COUNT {
                        session.send(chunk(i)).await?;
                    }
                    session.send_text("done").await
                }
            });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/fast").await;
        let (queued, full) = report.next().await;
        assert_eq!(full, TrySendError::Full, "after {queued} messages");
        assert!(
            (1..=2).contains(&queued),
            "{queued} messages fit in 2 × {CHUNK} bytes"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        for i in 0..COUNT {
            let frame = client.read_frame().await;
            assert_eq!(frame.opcode, BINARY, "message {i}");
            assert_eq!(frame.payload.len(), CHUNK, "message {i}");
            assert!(frame.payload.iter().all(|&b| b == i as u8), "message {i}");
        }
        assert_eq!(client.read_frame().await.payload, b"done");
    }

    #[tokio::test]
    async fn a_slow_handler_does_not_get_a_responsive_peer_timed_out() {
        // The handler sleeps while the peer's messages fill the incoming
        // buffer and the server stops reading. The peer answers every Ping
        // at once, but its Pong waits behind the unread messages: the
        // server must not count that against the peer.
        let (tx, mut report) = reports();
        let app = App::new()
            .install(
                WebSockets::default()
                    .incoming_buffer(16 << 10)
                    .ping_period(Some(Duration::from_millis(100)))
                    .timeout(Duration::from_millis(100)),
            )
            .web_socket("/slow", move |mut session: Session| {
                let tx = tx.clone();
                async move {
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    let mut received = 0;
                    while received < 8 {
                        match session.recv().await {
                            Ok(Some(_)) => received += 1,
                            Ok(None) => break,
                            Err(err) => {
                                let _ = tx.send(Err(format!(
                                    "{err} after {received} of 8 messages; close reason {}",
                                    session.close_reason().await
                                )));
                                return;
                            }
                        }
                    }
                    let _ = tx.send(Ok(received));
                }
            });
        let server = Server::start(app).await;
        let mut ws = ws_connect(server.addr, "/slow").await;
        for _ in 0..8 {
            ws_send(&mut ws, WsMessage::binary(vec![0u8; 8 << 10])).await;
        }
        // Keep reading, so that tungstenite answers every Ping.
        let reader = tokio::spawn(async move {
            let mut closes = Vec::new();
            while let Some(Ok(message)) = futures_util::StreamExt::next(&mut ws).await {
                if message.is_close() {
                    closes.push(message);
                }
            }
            closes
        });
        let outcome = report.next().await;
        reader.abort();
        assert_eq!(outcome, Ok(8));
    }
}
