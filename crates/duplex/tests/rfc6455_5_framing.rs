//! RFC 6455 framing rules (§5, §8.1, §10.4) over real loopback sockets: a
//! raw TCP client writes frames by hand and parses the server's by hand.

mod common;

use std::time::Duration;

use common::*;
use duplex::{CloseCode, CloseReason, Error, WebSockets, proto::ProtocolError};

/// Starts an observed mirror with the default configuration.
async fn mirror() -> (Server, Reports<Ending>) {
    let (app, ends) = observed_mirror_app(WebSockets::default());
    (Server::start(app).await, ends)
}

/// Sends `bytes` on a fresh connection to `/mirror` and expects a Close with
/// `code`, then EOF; returns how the handler saw the end.
async fn expect_failure(bytes: &[u8], code: u16) -> Ending {
    let (server, mut ends) = mirror().await;
    let mut client = RawClient::connect(server.addr, "/mirror").await;
    client.write(bytes).await;
    client.expect_close_then_eof(code).await;
    let ending = ends.next().await;
    assert_eq!(ending.reason.code, CloseCode(code), "{ending:?}");
    ending
}

mod rfc6455_5_1_masking {
    use super::*;

    #[tokio::test]
    async fn unmasked_client_frame_fails_with_1002() {
        let ending = expect_failure(&encode_frame(true, 0, TEXT, b"hi", None), 1002).await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::UnmaskedFrame))
            ),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn unmasked_control_frame_fails_with_1002() {
        expect_failure(&encode_frame(true, 0, PING, b"p", None), 1002).await;
    }

    #[tokio::test]
    async fn server_frames_are_unmasked() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(TEXT, b"hello").await;
        let frame = client.read_frame().await;
        assert_eq!(
            frame,
            RawFrame {
                fin: true,
                rsv: 0,
                opcode: TEXT,
                masked: false,
                payload: b"hello".to_vec(),
            }
        );
    }

    #[tokio::test]
    async fn masking_option_masks_server_frames() {
        // RFC 6455 §5.1 forbids it; the option exists for Ktor parity.
        let (app, _ends) = observed_mirror_app(WebSockets::default().masking(true));
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(BINARY, &[1, 2, 3, 4, 5]).await;
        let echo = client.read_frame().await;
        assert!(echo.masked, "{echo:?}");
        assert_eq!((echo.opcode, echo.payload), (BINARY, vec![1, 2, 3, 4, 5]));
    }
}

mod rfc6455_5_2_base_framing {
    use super::*;

    #[tokio::test]
    async fn reserved_opcodes_fail_with_1002() {
        for opcode in [0x3, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF] {
            let ending =
                expect_failure(&encode_frame(true, 0, opcode, b"x", Some(MASK)), 1002).await;
            assert!(
                matches!(
                    ending.recv,
                    Err(Error::Protocol(ProtocolError::ReservedOpcode(op))) if op == opcode
                ),
                "opcode {opcode:#x}: {ending:?}"
            );
        }
    }

    #[tokio::test]
    async fn rsv_bits_without_extension_fail_with_1002() {
        for (rsv, opcode) in [(RSV1, TEXT), (RSV2, BINARY), (RSV3, TEXT), (RSV1, PING)] {
            let ending =
                expect_failure(&encode_frame(true, rsv, opcode, b"x", Some(MASK)), 1002).await;
            assert!(
                matches!(
                    ending.recv,
                    Err(Error::Protocol(ProtocolError::ReservedBits))
                ),
                "rsv {rsv:#x} opcode {opcode:#x}: {ending:?}"
            );
        }
    }

    #[tokio::test]
    async fn length_with_most_significant_bit_set_fails_with_1002() {
        // 127, then a 64-bit length with its top bit set (§5.2), then a mask.
        let mut frame = vec![0x82, 0x80 | 127, 0x80, 0, 0, 0, 0, 0, 0, 5];
        frame.extend_from_slice(&MASK);
        expect_failure(&frame, 1002).await;
    }

    #[tokio::test]
    async fn frame_header_split_across_writes_is_reassembled() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        let payload = vec![0xA5; 300];
        let frame = encode_frame(true, 0, BINARY, &payload, Some(MASK));
        // One byte of header, the rest of the header, then the payload in two.
        for part in [&frame[..1], &frame[1..8], &frame[8..101], &frame[101..]] {
            client.write(part).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let echo = client.read_frame().await;
        assert_eq!((echo.opcode, echo.payload), (BINARY, payload));
    }

    #[tokio::test]
    async fn frame_written_one_byte_at_a_time_is_read_whole() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        // 130 bytes: a 16-bit length, and characters of 1 to 4 bytes that
        // arrive split, with the mask applied at every offset.
        let text = "a€𝄞é".repeat(13);
        assert_eq!(text.len(), 130);
        let frame = encode_frame(true, 0, TEXT, text.as_bytes(), Some(MASK));
        for byte in frame {
            client.write(&[byte]).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let echo = client.read_frame().await;
        assert_eq!((echo.opcode, echo.payload), (TEXT, text.into_bytes()));
    }

    #[tokio::test]
    async fn frames_ending_inside_a_read_continue_in_the_next_one() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        // Small frames and a 20 KiB one, cut so that reads end inside a
        // header, inside a small payload and inside the large payload: the
        // server's small reads (a scratch buffer, then a copy of what is
        // left) and its large ones (straight into the frame's buffer) must
        // hand over every byte once, in order.
        let payloads: Vec<Vec<u8>> = (0u8..6)
            .map(|i| vec![i; 10 + usize::from(i)])
            .chain([vec![0xEE; 20_000]])
            .chain((6u8..9).map(|i| vec![i; 3]))
            .collect();
        let wire: Vec<u8> = payloads
            .iter()
            .flat_map(|p| encode_frame(true, 0, BINARY, p, Some(MASK)))
            .collect();
        for part in [&wire[..40], &wire[40..75], &wire[75..5_000], &wire[5_000..]] {
            client.write(part).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for expected in payloads {
            let echo = client.read_frame().await;
            assert_eq!((echo.opcode, echo.payload), (BINARY, expected));
        }
    }
}

mod rfc6455_5_4_fragmentation {
    use super::*;

    #[tokio::test]
    async fn fragments_come_back_as_one_message() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send(false, TEXT, b"Hel").await;
        client.send(false, CONTINUATION, b"").await;
        client.send(false, CONTINUATION, b"lo, ").await;
        client.send(true, CONTINUATION, b"world").await;
        let echo = client.read_frame().await;
        assert_eq!(
            (echo.fin, echo.opcode, echo.payload.as_slice()),
            (true, TEXT, &b"Hello, world"[..])
        );
    }

    #[tokio::test]
    async fn pings_between_fragments_are_answered_at_once_with_the_same_payload() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send(false, BINARY, &[1, 2, 3]).await;
        client.send_final(PING, b"first").await;
        // The Pong comes while the message is still incomplete.
        let pong = client.read_frame().await;
        assert_eq!(
            (pong.opcode, pong.payload.as_slice()),
            (PONG, &b"first"[..])
        );
        client.send(false, CONTINUATION, &[4, 5]).await;
        client.send_final(PING, &[0xEE; 125]).await;
        let pong = client.read_frame().await;
        assert_eq!((pong.opcode, pong.payload), (PONG, vec![0xEE; 125]));
        client.send(true, CONTINUATION, &[6]).await;
        let echo = client.read_frame().await;
        assert_eq!(
            (echo.opcode, echo.payload),
            (BINARY, vec![1, 2, 3, 4, 5, 6])
        );
    }

    #[tokio::test]
    async fn continuation_without_a_message_fails_with_1002() {
        let ending =
            expect_failure(&encode_frame(true, 0, CONTINUATION, b"x", Some(MASK)), 1002).await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::UnexpectedContinuation))
            ),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn new_data_frame_inside_a_fragmented_message_fails_with_1002() {
        let mut bytes = encode_frame(false, 0, TEXT, b"a", Some(MASK));
        bytes.extend(encode_frame(true, 0, TEXT, b"b", Some(MASK)));
        let ending = expect_failure(&bytes, 1002).await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::ExpectedContinuation))
            ),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn fragmented_control_frame_fails_with_1002() {
        let ending = expect_failure(&encode_frame(false, 0, PING, b"x", Some(MASK)), 1002).await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::FragmentedControlFrame))
            ),
            "{ending:?}"
        );
    }
}

mod rfc6455_5_5_control_frames {
    use super::*;

    #[tokio::test]
    async fn control_frame_longer_than_125_bytes_fails_with_1002() {
        let ending =
            expect_failure(&encode_frame(true, 0, PING, &[0; 126], Some(MASK)), 1002).await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::ControlFrameTooLong))
            ),
            "{ending:?}"
        );
    }
}

mod rfc6455_5_5_2_ping {
    use super::*;

    #[tokio::test]
    async fn ping_is_answered_with_a_pong_of_the_same_payload() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        for payload in [&b""[..], b"x", &[0x5A; 125]] {
            client.send_final(PING, payload).await;
            let pong = client.read_frame().await;
            assert_eq!(
                (pong.fin, pong.opcode, pong.payload.as_slice()),
                (true, PONG, payload)
            );
        }
    }

    #[tokio::test]
    async fn ping_timeout_closes_with_1011() {
        let websockets = WebSockets::default()
            .ping_period(Some(Duration::from_millis(200)))
            .timeout(Duration::from_millis(200));
        let (app, mut ends) = observed_mirror_app(websockets);
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        let ping = client.read_frame().await;
        assert_eq!(ping.opcode, PING, "{ping:?}");
        assert!(!ping.masked);
        // Not answered.
        let (code, reason) = client.read_close().await;
        assert_eq!((code, reason.as_str()), (1011, "Ping timeout"));
        client.expect_eof().await;
        let ending = ends.next().await;
        assert!(matches!(ending.recv, Err(Error::PingTimeout)), "{ending:?}");
        assert_eq!(
            ending.reason,
            CloseReason::new(CloseCode::INTERNAL_ERROR, "Ping timeout")
        );
    }

    #[tokio::test]
    async fn answered_pings_keep_the_session_open() {
        let websockets = WebSockets::default()
            .ping_period(Some(Duration::from_millis(50)))
            .timeout(Duration::from_millis(150));
        let (app, _ends) = observed_mirror_app(websockets);
        let server = Server::start(app).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        let mut payloads = Vec::new();
        while payloads.len() < 4 {
            let ping = client.read_frame().await;
            assert_eq!(ping.opcode, PING, "{ping:?}");
            client.send_final(PONG, &ping.payload).await;
            payloads.push(ping.payload);
        }
        payloads.dedup();
        assert_eq!(payloads.len(), 4, "each ping has its own payload");
        client.send_final(TEXT, b"still here").await;
        let echo = loop {
            let frame = client.read_frame().await;
            if frame.opcode == PING {
                client.send_final(PONG, &frame.payload).await;
            } else {
                break frame;
            }
        };
        assert_eq!(
            (echo.opcode, echo.payload.as_slice()),
            (TEXT, &b"still here"[..])
        );
    }
}

mod rfc6455_5_5_3_pong {
    use super::*;

    #[tokio::test]
    async fn unsolicited_pong_is_ignored() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(PONG, b"unasked").await;
        client.send_final(TEXT, b"after").await;
        let echo = client.read_frame().await;
        assert_eq!(
            (echo.opcode, echo.payload.as_slice()),
            (TEXT, &b"after"[..])
        );
    }
}

mod rfc6455_8_1_utf8 {
    use super::*;

    #[tokio::test]
    async fn invalid_utf8_in_one_frame_gives_1007() {
        let ending = expect_failure(
            &encode_frame(true, 0, TEXT, b"ok \xC3\x28", Some(MASK)),
            1007,
        )
        .await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::InvalidUtf8))
            ),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn invalid_utf8_in_a_later_fragment_gives_1007_before_the_final_fragment() {
        let (server, mut ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send(false, TEXT, "valid é".as_bytes()).await;
        client.send(false, CONTINUATION, b"\xFF more").await;
        // No final fragment is ever sent.
        client.expect_close_then_eof(1007).await;
        let ending = ends.next().await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::InvalidUtf8))
            ),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::INVALID_PAYLOAD);
    }

    #[tokio::test]
    async fn invalid_utf8_fails_before_the_frame_is_complete() {
        let (server, mut ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        // A 100 000-byte text frame of which only the first 20 bytes are
        // sent, the last of them invalid.
        let mut payload = b"nineteen valid bytes".to_vec();
        payload[19] = 0xFF;
        payload.resize(100_000, b'x');
        let frame = encode_frame(true, 0, TEXT, &payload, Some(MASK));
        client.write(&frame[..14 + 20]).await;
        client.expect_close_then_eof(1007).await;
        let ending = ends.next().await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::InvalidUtf8))
            ),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn text_ending_inside_a_character_gives_1007() {
        // "é" is C3 A9; the message ends after C3.
        let mut bytes = encode_frame(false, 0, TEXT, b"abc", Some(MASK));
        bytes.extend(encode_frame(true, 0, CONTINUATION, b"\xC3", Some(MASK)));
        expect_failure(&bytes, 1007).await;
    }

    #[tokio::test]
    async fn character_split_across_fragments_is_accepted() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        let text = "a€b𝄞c";
        let bytes = text.as_bytes();
        // Cut inside "€" (3 bytes) and inside "𝄞" (4 bytes).
        client.send(false, TEXT, &bytes[..2]).await;
        client.send(false, CONTINUATION, &bytes[2..7]).await;
        client.send(true, CONTINUATION, &bytes[7..]).await;
        let echo = client.read_frame().await;
        assert_eq!((echo.opcode, echo.payload.as_slice()), (TEXT, bytes));
    }

    #[tokio::test]
    async fn invalid_utf8_in_close_reason_gives_1007() {
        let mut payload = 1000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"\xCE\xBA\xE1");
        expect_failure(&encode_frame(true, 0, CLOSE, &payload, Some(MASK)), 1007).await;
    }

    #[tokio::test]
    async fn binary_messages_are_not_checked_for_utf8() {
        let (server, _ends) = mirror().await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(BINARY, b"\xFF\xFE\xC3").await;
        let echo = client.read_frame().await;
        assert_eq!(
            (echo.opcode, echo.payload.as_slice()),
            (BINARY, &b"\xFF\xFE\xC3"[..])
        );
    }
}

mod rfc6455_10_4_limits {
    use super::*;

    async fn limited(websockets: WebSockets) -> (Server, Reports<Ending>) {
        let (app, ends) = observed_mirror_app(websockets);
        (Server::start(app).await, ends)
    }

    #[tokio::test]
    async fn frame_over_max_frame_size_gives_1009() {
        let (server, mut ends) = limited(WebSockets::default().max_frame_size(1024)).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(BINARY, &[7; 2000]).await;
        client.expect_close_then_eof(1009).await;
        let ending = ends.next().await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::FrameTooBig {
                    size: 2000,
                    max: 1024
                }))
            ),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::TOO_BIG);
    }

    #[tokio::test]
    async fn huge_declared_length_gives_1009_before_any_payload() {
        let (server, mut ends) = limited(WebSockets::default()).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        // A header announcing 1 TiB, and no payload at all.
        let mut header = vec![0x82, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&MASK);
        client.write(&header).await;
        client.expect_close_then_eof(1009).await;
        let ending = ends.next().await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::FrameTooBig { size, .. })) if size == 1 << 40
            ),
            "{ending:?}"
        );
    }

    #[tokio::test]
    async fn frame_at_max_frame_size_is_accepted() {
        let (server, _ends) = limited(WebSockets::default().max_frame_size(1024)).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send_final(BINARY, &[7; 1024]).await;
        let echo = client.read_frame().await;
        assert_eq!((echo.opcode, echo.payload), (BINARY, vec![7; 1024]));
    }

    #[tokio::test]
    async fn message_over_max_message_size_across_fragments_gives_1009() {
        let (server, mut ends) = limited(WebSockets::default().max_message_size(1024)).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send(false, TEXT, &[b'a'; 500]).await;
        client.send(false, CONTINUATION, &[b'b'; 500]).await;
        client.send(false, CONTINUATION, &[b'c'; 500]).await;
        // No final fragment is ever sent.
        client.expect_close_then_eof(1009).await;
        let ending = ends.next().await;
        assert!(
            matches!(
                ending.recv,
                Err(Error::Protocol(ProtocolError::MessageTooBig {
                    max: 1024,
                    ..
                }))
            ),
            "{ending:?}"
        );
        assert_eq!(ending.reason.code, CloseCode::TOO_BIG);
    }

    #[tokio::test]
    async fn message_at_max_message_size_is_accepted() {
        let (server, _ends) = limited(WebSockets::default().max_message_size(1024)).await;
        let mut client = RawClient::connect(server.addr, "/mirror").await;
        client.send(false, BINARY, &[1; 512]).await;
        client.send(true, CONTINUATION, &[2; 512]).await;
        let echo = client.read_frame().await;
        let mut expected = vec![1; 512];
        expected.extend([2; 512]);
        assert_eq!((echo.opcode, echo.payload), (BINARY, expected));
    }
}

mod rfc6455_10_4_shipped_limits {
    use super::*;

    use duplex::{App, Session};

    /// Answers each message with its length.
    async fn sizes(mut session: Session) {
        while let Ok(Some(message)) = session.recv().await {
            let _ = session.send_text(message.len().to_string()).await;
        }
    }

    /// Sends a binary message of `len` bytes in fragments of the shipped
    /// `max_frame_size` (16 MiB) at most.
    async fn send_fragmented(client: &mut RawClient, len: usize) {
        let fragment = vec![0x5a; 16 << 20];
        let mut left = len;
        let mut opcode = BINARY;
        while left > 0 {
            let take = left.min(fragment.len());
            left -= take;
            client.send(left == 0, opcode, &fragment[..take]).await;
            opcode = CONTINUATION;
        }
    }

    /// `max_message_size` at its shipped default, 64 MiB: a message of
    /// exactly that many bytes, in four frames of the shipped
    /// `max_frame_size`, is taken whole; one byte more closes with 1009.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_64_mib_message_is_accepted_and_one_byte_more_gives_1009() {
        common::set_wait(Duration::from_secs(30));
        let server = Server::start(App::new().web_socket("/size", sizes)).await;
        let mut client = RawClient::connect(server.addr, "/size").await;
        send_fragmented(&mut client, 64 << 20).await;
        let answer = client.read_frame().await;
        assert_eq!(
            (answer.opcode, answer.payload),
            (TEXT, (64u64 << 20).to_string().into_bytes())
        );
        let mut client = RawClient::connect(server.addr, "/size").await;
        // The fifth frame, of one byte, passes the limit.
        send_fragmented(&mut client, (64 << 20) + 1).await;
        client.expect_close_then_eof(1009).await;
    }
}
