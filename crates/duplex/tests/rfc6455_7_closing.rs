//! RFC 6455 closing (§5.5.1, §7.1, §7.4) over real loopback sockets: the
//! closing handshake both ways, abnormal closure, and the status codes the
//! server sends for handler failures and shutdown.

mod common;

use std::time::Duration;

use common::*;
use duplex::{App, BoxError, CloseCode, CloseReason, Error, Session, WebSockets};
use tokio::sync::mpsc;

/// A handler that closes with `reason` at once, then receives until the end
/// and reports it.
fn closes_with(
    reason: CloseReason,
    tx: mpsc::UnboundedSender<Ending>,
) -> impl duplex::Handler<Session> {
    move |mut session: Session| {
        let tx = tx.clone();
        let reason = reason.clone();
        async move {
            session.close(reason).await.expect("close");
            let recv = loop {
                match session.recv().await {
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(()),
                    Err(err) => break Err(err),
                }
            };
            let reason = session.close_reason().await;
            let _ = tx.send(Ending { recv, reason });
        }
    }
}

mod rfc6455_5_5_1_close {
    use super::*;

    #[tokio::test]
    async fn client_close_is_echoed_with_the_same_code_and_the_handler_sees_ok_none() {
        let (app, mut ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_close(1000, "bye").await;
        let (code, _reason) = client.read_close().await;
        assert_eq!(code, 1000);
        client.expect_eof().await;
        let ending = ends.next().await;
        assert!(
            ending.recv.is_ok(),
            "recv should return Ok(None): {ending:?}"
        );
        assert_eq!(ending.reason, CloseReason::new(CloseCode::NORMAL, "bye"));
    }

    #[tokio::test]
    async fn application_close_code_is_echoed() {
        let (app, mut ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_close(4321, "app reason ✓").await;
        let (code, _reason) = client.read_close().await;
        assert_eq!(code, 4321);
        client.expect_eof().await;
        let ending = ends.next().await;
        assert_eq!(
            ending.reason,
            CloseReason::new(CloseCode(4321), "app reason ✓")
        );
    }

    #[tokio::test]
    async fn close_without_status_is_answered_without_status() {
        let (app, mut ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(CLOSE, b"").await;
        let reply = client.read_frame().await;
        // 1005 stands for "no status" and must never be on the wire (§7.4.1).
        assert_eq!((reply.opcode, reply.payload.as_slice()), (CLOSE, &b""[..]));
        client.expect_eof().await;
        let ending = ends.next().await;
        assert!(ending.recv.is_ok(), "{ending:?}");
        assert_eq!(ending.reason.code, CloseCode::NO_STATUS);
    }

    #[tokio::test]
    async fn close_with_a_code_that_may_not_be_sent_fails_with_1002() {
        let payloads: [&[u8]; 7] = [
            &1005u16.to_be_bytes(),
            &1006u16.to_be_bytes(),
            &1015u16.to_be_bytes(),
            &999u16.to_be_bytes(),
            &2999u16.to_be_bytes(),
            &5000u16.to_be_bytes(),
            &[0x03], // one byte: half a status code
        ];
        for payload in payloads {
            let (app, mut ends) = observed_mirror_app(WebSockets::default());
            let server = Server::start(app).await;
            let mut client = RawClient::connect(server.addr, "/mirror").await;
            client.send_final(CLOSE, payload).await;
            let (code, reason) = client.read_close().await;
            assert_eq!(code, 1002, "payload {payload:?}: reason {reason:?}");
            client.expect_eof().await;
            let ending = ends.next().await;
            assert!(
                matches!(ending.recv, Err(Error::Protocol(_))),
                "payload {payload:?}: {ending:?}"
            );
            assert_eq!(ending.reason.code, CloseCode::PROTOCOL_ERROR);
        }
    }

    #[tokio::test]
    async fn server_close_reaches_the_client_and_the_server_closes_tcp_after_the_reply() {
        let (tx, mut ends) = reports();
        let app = App::new().web_socket(
            "/close",
            closes_with(CloseReason::new(CloseCode(4000), "done"), tx),
        );
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/close").await;
        let (code, reason) = client.read_close().await;
        assert_eq!((code, reason.as_str()), (4000, "done"));
        // The server waits for our Close before it closes the connection.
        let early = tokio::time::timeout(Duration::from_millis(100), client.read_frame()).await;
        assert!(
            early.is_err(),
            "the server went on before our Close: {early:?}"
        );
        client.send_close(4000, "").await;
        client.expect_eof().await;
        let ending = ends.next().await;
        assert!(
            ending.recv.is_ok(),
            "recv should return Ok(None): {ending:?}"
        );
        assert_eq!(ending.reason, CloseReason::new(CloseCode(4000), "done"));
    }

    #[tokio::test]
    async fn server_close_with_tungstenite_completes_the_handshake() {
        let (tx, mut ends) = reports();
        let app = App::new().web_socket(
            "/close",
            closes_with(CloseReason::new(CloseCode(4000), "done"), tx),
        );
        let server = Server::start(app).await;
        let mut ws = ws_connect(server.addr, "/close").await;
        assert_eq!(ws_expect_close(&mut ws).await, (4000, "done".to_owned()));
        let ending = ends.next().await;
        assert!(ending.recv.is_ok(), "{ending:?}");
        assert_eq!(ending.reason, CloseReason::new(CloseCode(4000), "done"));
    }

    #[tokio::test]
    async fn messages_sent_before_close_arrive_before_the_close() {
        let app = App::new().web_socket("/bye", |session: Session| async move {
            for i in 0..3 {
                session.send_text(format!("message {i}")).await?;
            }
            session
                .close(CloseReason::new(CloseCode(4001), "after three"))
                .await
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/bye").await;
        for i in 0..3 {
            let frame = client.read_frame().await;
            assert_eq!(
                (
                    frame.opcode,
                    String::from_utf8_lossy(&frame.payload).into_owned()
                ),
                (TEXT, format!("message {i}"))
            );
        }
        let (code, reason) = client.read_close().await;
        assert_eq!((code, reason.as_str()), (4001, "after three"));
        client.send_close(4001, "").await;
        client.expect_eof().await;
    }

    #[tokio::test]
    async fn data_the_peer_sent_before_seeing_our_close_is_still_delivered() {
        let (tx, mut seen) = reports();
        let app = App::new().web_socket("/late", move |mut session: Session| {
            let tx = tx.clone();
            async move {
                let mut texts = Vec::new();
                let end = loop {
                    match session.recv().await {
                        Ok(Some(message)) => {
                            let text = message.as_text().unwrap_or("?").to_owned();
                            if text == "close now" {
                                session
                                    .close(CloseReason::new(CloseCode(4002), "asked"))
                                    .await
                                    .expect("close");
                            }
                            texts.push(text);
                        }
                        Ok(None) => break Ok(()),
                        Err(err) => break Err(err),
                    }
                };
                let _ = tx.send((texts, end.map_err(|e| e.to_string())));
            }
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/late").await;
        // Both leave before the server's Close can reach us.
        let mut both = encode_frame(true, 0, TEXT, b"close now", Some(MASK));
        both.extend(encode_frame(true, 0, TEXT, b"late", Some(MASK)));
        client.write(&both).await;
        assert_eq!(client.read_close().await.0, 4002);
        client.send_close(4002, "").await;
        client.expect_eof().await;
        let (texts, end) = seen.next().await;
        assert_eq!(texts, ["close now", "late"]);
        assert_eq!(end, Ok(()));
    }

    #[tokio::test]
    async fn unanswered_server_close_times_out_with_1006() {
        let (tx, mut ends) = reports();
        let app = App::new()
            .install(WebSockets::default().close_timeout(Duration::from_millis(200)))
            .web_socket(
                "/close",
                closes_with(CloseReason::new(CloseCode(4000), "done"), tx),
            );
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/close").await;
        assert_eq!(client.read_close().await.0, 4000);
        // We never answer: the server gives up and drops the connection.
        client.expect_eof().await;
        let ending = ends.next().await;
        assert!(
            matches!(ending.recv, Err(Error::ConnectionLost)),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::ABNORMAL);
    }
}

mod rfc6455_7_4_2_reserved_codes {
    use super::*;

    #[tokio::test]
    async fn closing_with_a_code_that_may_not_be_sent_is_refused_and_the_session_stays_open() {
        let app = App::new().web_socket("/reserved", |mut session: Session| async move {
            let _ = session.recv().await;
            for code in [1006, 1015, 999, 5000] {
                let refused = session.close(CloseReason::new(CloseCode(code), "")).await;
                let text = match refused {
                    Err(Error::Send(_)) => format!("{code} refused"),
                    other => format!("{code}: {other:?}"),
                };
                session.send_text(text).await?;
            }
            Ok::<_, Error>(())
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/reserved").await;
        client.send_final(TEXT, b"go").await;
        for code in [1006, 1015, 999, 5000] {
            let frame = client.read_frame().await;
            assert_eq!(
                String::from_utf8_lossy(&frame.payload),
                format!("{code} refused"),
                "{frame:?}"
            );
        }
        assert_eq!(client.read_close().await.0, 1000);
    }

    #[tokio::test]
    async fn sending_after_the_end_is_an_error() {
        let (tx, mut report) = reports();
        let app = App::new().web_socket("/after", move |mut session: Session| {
            let tx = tx.clone();
            async move {
                while let Ok(Some(_)) = session.recv().await {}
                let send = session.send_text("too late").await;
                let try_send = session.try_send(duplex::Message::text("too late"));
                let _ = tx.send((
                    matches!(send, Err(Error::Closed)),
                    try_send == Err(duplex::TrySendError::Closed),
                    session.is_closed(),
                ));
            }
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/after").await;
        client.send_close(1000, "").await;
        assert_eq!(client.read_close().await.0, 1000);
        assert_eq!(report.next().await, (true, true, true));
    }
}

mod rfc6455_7_1_5_abnormal_closure {
    use super::*;

    #[tokio::test]
    async fn dropped_connection_gives_1006() {
        let (app, mut ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app).await;
        let client = RawClient::connect(server.addr, "/mirror").await;
        drop(client);
        let ending = ends.next().await;
        assert!(
            matches!(ending.recv, Err(Error::ConnectionLost)),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::ABNORMAL);
    }

    #[tokio::test]
    async fn connection_dropped_inside_a_message_gives_1006() {
        let (app, mut ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send(false, TEXT, b"half a mess").await;
        // Half a frame, then gone.
        client
            .write(&encode_frame(true, 0, CONTINUATION, b"age", Some(MASK))[..4])
            .await;
        drop(client);
        let ending = ends.next().await;
        assert!(
            matches!(ending.recv, Err(Error::ConnectionLost)),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::ABNORMAL);
    }

    #[tokio::test]
    async fn terminate_drops_the_connection_without_a_close_frame() {
        let (tx, mut reasons) = reports();
        let app = App::new().web_socket("/terminate", move |mut session: Session| {
            let tx = tx.clone();
            async move {
                let _ = session.recv().await;
                session.terminate();
                let _ = tx.send(session.close_reason().await);
            }
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/terminate").await;
        client.send_final(TEXT, b"go").await;
        client.expect_eof().await;
        assert_eq!(reasons.next().await.code, CloseCode::ABNORMAL);
    }
}

mod rfc6455_7_4_1_status_codes {
    use super::*;

    #[tokio::test]
    async fn handler_panic_closes_with_1011_while_other_sessions_keep_working() {
        let (tx, _ends) = reports();
        let app = App::new()
            .web_socket("/mirror", observed_mirror(tx))
            .web_socket("/panic", |mut session: Session| async move {
                if session.recv().await.is_ok() {
                    panic!("the handler has a bug");
                }
            });
        let server = Server::start(app).await;
        let mut bystander = ws_connect(server.addr, "/mirror").await;
        ws_send(&mut bystander, ws_text("before")).await;
        assert_eq!(ws_next(&mut bystander).await, ws_text("before"));

        let mut victim = RawClient::connect(server.addr, "/panic").await;
        victim.send_final(TEXT, b"trigger").await;
        let (code, reason) = victim.read_close().await;
        assert_eq!(code, 1011, "reason {reason:?}");
        victim.send_close(1011, "").await;
        victim.expect_eof().await;

        ws_send(&mut bystander, ws_text("after")).await;
        assert_eq!(ws_next(&mut bystander).await, ws_text("after"));
        // The route still serves new sessions.
        let mut again = RawClient::connect(server.addr, "/panic").await;
        again.send_final(TEXT, b"trigger").await;
        assert_eq!(again.read_close().await.0, 1011);
    }

    #[tokio::test]
    async fn handler_error_closes_with_1011() {
        let app = App::new().web_socket("/fail", |mut session: Session| async move {
            let _ = session.recv().await;
            Err::<(), BoxError>("the handler failed".into())
        });
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/fail").await;
        client.send_final(TEXT, b"trigger").await;
        let (code, reason) = client.read_close().await;
        assert_eq!(code, 1011);
        assert!(
            !reason.contains("the handler failed"),
            "error details must not leak to the peer: {reason:?}"
        );
        client.send_close(1011, "").await;
        client.expect_eof().await;
    }

    #[tokio::test]
    async fn handler_returning_closes_with_1000() {
        let app = App::new().web_socket("/done", |_session: Session| async {});
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/done").await;
        assert_eq!(client.read_close().await.0, 1000);
        client.send_close(1000, "").await;
        client.expect_eof().await;
    }

    #[tokio::test]
    async fn shutdown_grace_bounds_the_wait_for_peers_that_never_close() {
        let (app, _ends) = observed_mirror_app(WebSockets::default());
        let server = Server::start(app.shutdown_grace(Duration::from_millis(300))).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        let started = tokio::time::Instant::now();
        let shutdown = tokio::spawn(server.shutdown());
        assert_eq!(client.read_close().await.0, 1001);
        // We never answer; serve returns after the grace anyway.
        within("serve to return after the grace", shutdown)
            .await
            .expect("shutdown task")
            .expect("serve");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(250),
            "returned before the grace: {took:?}"
        );
        assert!(
            took < Duration::from_secs(2),
            "the grace was not applied: {took:?}"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_sessions_with_1001_and_refuses_new_upgrades_with_503() {
        let (app, mut ends) = observed_mirror_app(WebSockets::default());
        let websockets = app.websockets().clone();
        let server = Server::start(app).await;
        let mut ws = ws_connect(server.addr, "/mirror").await;
        ws_send(&mut ws, ws_text("hello")).await;
        assert_eq!(ws_next(&mut ws).await, ws_text("hello"));
        assert_eq!(websockets.live_sessions(), 1);

        let shutdown = tokio::spawn({
            let websockets = websockets.clone();
            async move { websockets.shutdown(Duration::from_secs(2)).await }
        });
        let (code, reason) = ws_expect_close(&mut ws).await;
        assert_eq!((code, reason.as_str()), (1001, "Server shutting down"));
        // Our FIN ends the server's linger after its own FIN.
        drop(ws);
        within("WebSockets::shutdown", shutdown)
            .await
            .expect("shutdown task");
        assert_eq!(websockets.live_sessions(), 0);
        let ending = ends.next().await;
        assert!(ending.recv.is_ok(), "{ending:?}");
        assert_eq!(ending.reason.code, CloseCode::GOING_AWAY);

        let (response, _client) =
            RawClient::request(server.addr, &upgrade_request("/mirror", "")).await;
        assert_eq!(response.status, 503, "{response:?}");
    }
}

mod rfc6455_7_1_7_fail_the_connection {
    use super::*;

    /// Polls until the configuration has no live session.
    async fn until_no_live_session(websockets: &WebSockets) {
        within("the session task to end and drop the connection", async {
            while websockets.live_sessions() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
    }

    /// A handler that sends 1 MiB messages until it cannot, then reports
    /// how its session ended.
    fn flooder(tx: mpsc::UnboundedSender<Ending>) -> impl duplex::Handler<Session> {
        move |mut session: Session| {
            let tx = tx.clone();
            async move {
                let chunk = duplex::Message::binary(vec![0u8; 1 << 20]);
                for _ in 0..256 {
                    if session.send(chunk.clone()).await.is_err() {
                        break;
                    }
                }
                let recv = match session.recv().await {
                    Ok(Some(_)) => Err(Error::Closed),
                    Ok(None) => Ok(()),
                    Err(err) => Err(err),
                };
                let reason = session.close_reason().await;
                let _ = tx.send(Ending { recv, reason });
            }
        }
    }

    /// The Ping waits behind the flood the peer does not take: when its
    /// Pong is due, the peer is closed as too slow to read (1008).
    #[tokio::test]
    async fn a_peer_that_stopped_reading_is_closed_as_too_slow_and_dropped() {
        let (tx, mut ends) = reports();
        let app = App::new()
            .install(
                WebSockets::default()
                    .ping_period(Some(Duration::from_millis(100)))
                    .timeout(Duration::from_millis(100))
                    .close_timeout(Duration::from_millis(200)),
            )
            .web_socket("/flood", flooder(tx));
        let websockets = app.websockets().clone();
        let server = Server::start(app).await;
        // Connects, then neither reads nor answers: its receive window fills.
        let _client = RawClient::connect(server.addr, "/flood").await;
        let ending = ends.next().await;
        assert!(matches!(ending.recv, Err(Error::TooSlow)), "{ending:?}");
        assert_eq!(ending.reason.code, CloseCode::POLICY_VIOLATION);
        // The connection is failed: the server must not keep the socket
        // (and the session task) alive until the peer reads again.
        until_no_live_session(&websockets).await;
    }

    #[tokio::test]
    async fn close_timeout_drops_a_peer_that_stopped_reading() {
        let (tx, mut ends) = reports();
        let app = App::new()
            .install(
                WebSockets::default()
                    .ping_period(None)
                    .close_timeout(Duration::from_millis(200)),
            )
            .web_socket("/flood", move |mut session: Session| {
                let tx = tx.clone();
                async move {
                    let sender = session.sender();
                    tokio::spawn(async move {
                        let chunk = duplex::Message::binary(vec![0u8; 1 << 20]);
                        for _ in 0..256 {
                            if sender.send(chunk.clone()).await.is_err() {
                                break;
                            }
                        }
                    });
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    // The Close waits behind data the peer does not read.
                    let close = session.close(CloseReason::new(CloseCode(4000), "done"));
                    let returned = tokio::time::timeout(Duration::from_millis(1500), close)
                        .await
                        .is_ok();
                    let recv = match session.recv().await {
                        Ok(Some(_)) => Err(Error::Closed),
                        Ok(None) => Ok(()),
                        Err(err) => Err(err),
                    };
                    let reason = session.close_reason().await;
                    let _ = tx.send((returned, Ending { recv, reason }));
                }
            });
        let websockets = app.websockets().clone();
        let server = Server::start(app).await;
        let _client = RawClient::connect(server.addr, "/flood").await;
        let (close_returned, ending) = ends.next().await;
        assert!(
            matches!(ending.recv, Err(Error::ConnectionLost)),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::ABNORMAL);
        until_no_live_session(&websockets).await;
        assert!(
            close_returned,
            "Sender::close still waited for its Close to be written after the close timeout"
        );
    }
}
