//! The connection against literal wire bytes, one module per RFC section.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::*;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame as a client would send it (masked), with full control over the bits.
fn client_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(fin, rsv, opcode, payload, Some(KEY))
}

fn raw_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mut body = payload.to_vec();
    if let Some(key) = mask {
        out.extend_from_slice(&key);
        apply_mask(&mut body, key, 0);
    }
    out.extend_from_slice(&body);
    out
}

fn text(payload: &str) -> Vec<u8> {
    client_frame(true, 0, 0x1, payload.as_bytes())
}

fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    client_frame(true, 0, 0x8, &p)
}

struct Harness {
    conn: Connection,
    now: Instant,
}

impl Harness {
    fn server() -> Self {
        Self::with(Config::new(Role::Server))
    }

    fn raw() -> Self {
        let mut config = Config::new(Role::Server);
        config.mode = Mode::Frames;
        Self::with(config)
    }

    fn with(config: Config) -> Self {
        let now = Instant::now();
        Harness {
            conn: Connection::new(config, now),
            now,
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut buf = BytesMut::from(bytes);
        self.conn.handle_input(self.now, &mut buf);
    }

    /// Feeds `bytes` one byte at a time through one persistent buffer, as a
    /// slow network would deliver them.
    fn feed_bytewise(&mut self, bytes: &[u8]) {
        let mut buf = BytesMut::new();
        for b in bytes {
            buf.extend_from_slice(&[*b]);
            self.conn.handle_input(self.now, &mut buf);
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.conn.handle_timeout(self.now);
    }

    fn events(&mut self) -> Vec<Event> {
        std::iter::from_fn(|| self.conn.poll_event()).collect()
    }

    fn messages(&mut self) -> Vec<Message> {
        self.events()
            .into_iter()
            .map(|e| match e {
                Event::Message(m) => m,
                other => panic!("{other:?} in message mode, extensions inline"),
            })
            .collect()
    }

    /// Everything written so far, decoded as the client would read it.
    fn sent(&mut self) -> Vec<Frame> {
        let q = self.conn.write_queue();
        let mut bytes = Vec::new();
        while !q.is_empty() {
            let chunk = q.chunk().to_vec();
            q.advance(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (h, n) = FrameHeader::decode(rest).unwrap().unwrap();
            let len = h.payload_len as usize;
            let mut payload = rest[n..n + len].to_vec();
            if let Some(key) = h.mask {
                apply_mask(&mut payload, key, 0);
            }
            frames.push(Frame {
                fin: h.fin,
                rsv: h.rsv,
                opcode: h.opcode,
                payload: payload.into(),
            });
            rest = &rest[n + len..];
        }
        frames
    }

    fn assert_failing(&mut self, code: CloseCode) {
        let frames = self.sent();
        let close = frames.last().expect("a Close frame was sent");
        assert_eq!(close.opcode, OpCode::Close);
        let reason = CloseReason::parse(&close.payload).unwrap();
        assert_eq!(reason.code, code, "close reason {reason}");
        assert!(self.conn.is_closed());
        assert!(
            matches!(self.conn.termination(), Some(Termination::Failed(e)) if e.close_code() == code)
        );
    }
}

mod rfc6455_5_1_masking {
    use super::*;

    #[test]
    fn server_fails_unmasked_client_frame_with_1002() {
        let mut h = Harness::server();
        h.feed(&raw_frame(true, 0, 0x1, b"hi", None));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
        assert!(h.events().is_empty());
    }

    #[test]
    fn client_fails_masked_server_frame_with_1002() {
        let mut h = Harness::with(Config::new(Role::Client));
        h.feed(&raw_frame(true, 0, 0x1, b"hi", Some(KEY)));
        assert!(matches!(
            h.conn.termination(),
            Some(Termination::Failed(ProtocolError::MaskedFrame))
        ));
    }

    #[test]
    fn server_sends_unmasked_frames_by_default() {
        let mut h = Harness::server();
        h.conn.send_message(Message::text("x")).unwrap();
        let q = h.conn.write_queue();
        assert_eq!(q.chunk(), &[0x81, 0x01, b'x']);
    }

    #[test]
    fn masking_option_masks_server_frames() {
        let mut config = Config::new(Role::Server);
        config.mask_outgoing = true;
        let mut h = Harness::with(config);
        h.conn.send_message(Message::text("hello")).unwrap();
        let bytes = h.conn.write_queue().chunk().to_vec();
        assert_eq!(bytes[1], 0x80 | 5);
        let frames = h.sent();
        assert_eq!(frames[0].payload, Bytes::from_static(b"hello"));
    }
}

mod rfc6455_5_2_base_framing {
    use super::*;

    #[test]
    fn server_fails_reserved_opcodes_with_1002() {
        for op in (3..=7).chain(11..=15) {
            let mut h = Harness::server();
            h.feed(&client_frame(true, 0, op, b""));
            h.assert_failing(CloseCode::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn server_fails_rsv_bits_without_extension_with_1002() {
        for rsv in 1..=7 {
            let mut h = Harness::server();
            h.feed(&client_frame(true, rsv, 0x1, b"x"));
            h.assert_failing(CloseCode::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn server_accepts_rsv_bits_an_extension_claims() {
        let mut config = Config::new(Role::Server);
        config.extension_rsv = Rsv::RSV1;
        let mut h = Harness::with(config);
        h.feed(&client_frame(true, 0b100, 0x2, b"x"));
        assert!(!h.conn.is_closed());
        assert_eq!(h.events().len(), 1);
        h.feed(&client_frame(true, 0b010, 0x2, b"x"));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn frames_arrive_one_byte_at_a_time() {
        let mut h = Harness::server();
        let mut wire = text("hello, world");
        wire.extend(client_frame(true, 0, 0x2, &vec![7u8; 70_000]));
        wire.extend(text(""));
        h.feed_bytewise(&wire);
        let msgs = h.messages();
        assert_eq!(msgs.len(), 3);
        assert_eq!(msgs[0], Message::text("hello, world"));
        assert_eq!(msgs[1], Message::binary(vec![7u8; 70_000]));
        assert_eq!(msgs[2], Message::text(""));
    }

    #[test]
    fn many_frames_in_one_read() {
        let mut h = Harness::server();
        let wire: Vec<u8> = (0..100).flat_map(|i| text(&i.to_string())).collect();
        h.feed(&wire);
        let msgs = h.messages();
        assert_eq!(msgs.len(), 100);
        assert_eq!(msgs[99], Message::text("99"));
    }

    #[test]
    fn frame_over_max_frame_size_fails_with_1009_before_its_payload() {
        let mut config = Config::new(Role::Server);
        config.max_frame_size = 100;
        let mut h = Harness::with(config);
        // Only the header: the limit is checked before any payload arrives.
        let frame = client_frame(true, 0, 0x2, &[0; 101]);
        h.feed(&frame[..8]);
        h.assert_failing(CloseCode::TOO_BIG);
    }

    #[test]
    fn huge_declared_length_fails_without_allocating() {
        let mut h = Harness::server();
        let mut wire = vec![0x82, 0xff];
        wire.extend_from_slice(&(1u64 << 62).to_be_bytes());
        wire.extend_from_slice(&KEY);
        let mut buf = BytesMut::from(&wire[..]);
        h.conn.handle_input(h.now, &mut buf);
        assert!(buf.capacity() < 1 << 20);
        h.assert_failing(CloseCode::TOO_BIG);
    }
}

mod rfc6455_5_4_fragmentation {
    use super::*;

    #[test]
    fn server_reassembles_fragments() {
        let mut h = Harness::server();
        h.feed(&client_frame(false, 0, 0x1, b"Hel"));
        h.feed(&client_frame(false, 0, 0x0, b"lo, "));
        assert!(h.events().is_empty());
        h.feed(&client_frame(true, 0, 0x0, b"world"));
        assert_eq!(h.messages(), [Message::text("Hello, world")]);
    }

    #[test]
    fn control_frames_may_interleave_with_fragments() {
        let mut h = Harness::server();
        h.feed(&client_frame(false, 0, 0x2, b"a"));
        h.feed(&client_frame(true, 0, 0x9, b"ping!"));
        h.feed(&client_frame(true, 0, 0x0, b"b"));
        assert_eq!(h.messages(), [Message::binary(&b"ab"[..])]);
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].opcode, OpCode::Pong);
        assert_eq!(sent[0].payload, Bytes::from_static(b"ping!"));
    }

    #[test]
    fn server_fails_continuation_without_a_message_with_1002() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x0, b"x"));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn server_fails_new_message_inside_fragmented_one_with_1002() {
        let mut h = Harness::server();
        h.feed(&client_frame(false, 0, 0x1, b"a"));
        h.feed(&client_frame(true, 0, 0x1, b"b"));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn reassembled_message_over_max_message_size_fails_with_1009() {
        let mut config = Config::new(Role::Server);
        config.max_message_size = 10;
        let mut h = Harness::with(config);
        h.feed(&client_frame(false, 0, 0x2, &[0; 6]));
        h.feed(&client_frame(true, 0, 0x0, &[0; 6]));
        h.assert_failing(CloseCode::TOO_BIG);
    }

    #[test]
    fn sender_refuses_broken_fragment_sequences() {
        let mut h = Harness::server();
        let now = h.now;
        assert_eq!(
            h.conn
                .send_frame(now, Frame::new(OpCode::Continuation, "x")),
            Err(SendError::InvalidFragment)
        );
        h.conn
            .send_frame(now, Frame::new(OpCode::Text, "a").with_fin(false))
            .unwrap();
        assert_eq!(
            h.conn.send_message(Message::text("b")),
            Err(SendError::InvalidFragment)
        );
        h.conn
            .send_frame(now, Frame::new(OpCode::Ping, "p"))
            .unwrap();
        h.conn
            .send_frame(now, Frame::new(OpCode::Continuation, "c"))
            .unwrap();
        h.conn.send_message(Message::text("d")).unwrap();
        let ops: Vec<_> = h.sent().iter().map(|f| (f.opcode, f.fin)).collect();
        assert_eq!(
            ops,
            [
                (OpCode::Text, false),
                (OpCode::Ping, true),
                (OpCode::Continuation, true),
                (OpCode::Text, true)
            ]
        );
    }
}

mod rfc6455_5_5_control_frames {
    use super::*;

    #[test]
    fn server_fails_control_frame_over_125_bytes_with_1002() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x9, &[0; 126]));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn server_fails_fragmented_control_frame_with_1002() {
        let mut h = Harness::server();
        h.feed(&client_frame(false, 0, 0x9, b""));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn sender_refuses_control_payload_over_125_bytes() {
        let mut h = Harness::server();
        assert_eq!(
            h.conn.send_ping(Bytes::from(vec![0; 126])),
            Err(SendError::ControlFrameTooLong)
        );
    }
}

mod rfc6455_5_5_2_ping {
    use super::*;

    #[test]
    fn server_answers_ping_with_pong_of_same_payload() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x9, b"are you there"));
        let sent = h.sent();
        assert_eq!(sent, [Frame::new(OpCode::Pong, "are you there")]);
        assert!(h.events().is_empty(), "default mode hides pings");
    }

    #[test]
    fn raw_mode_hands_over_pings_and_answers_nothing() {
        let mut h = Harness::raw();
        h.feed(&client_frame(true, 0, 0x9, b"p"));
        assert!(h.sent().is_empty());
        assert_eq!(h.events(), [Event::Frame(Frame::new(OpCode::Ping, "p"))]);
    }
}

mod rfc6455_5_5_3_pong {
    use super::*;

    fn pinging() -> Harness {
        let mut config = Config::new(Role::Server);
        config.ping_period = Some(Duration::from_secs(10));
        config.pong_timeout = Duration::from_secs(5);
        Harness::with(config)
    }

    #[test]
    fn server_pings_every_period() {
        let mut h = pinging();
        h.advance(Duration::from_secs(9));
        assert!(h.sent().is_empty());
        h.advance(Duration::from_secs(1));
        let sent = h.sent();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].opcode, OpCode::Ping);
    }

    #[test]
    fn answered_ping_keeps_the_connection_and_schedules_the_next() {
        let mut h = pinging();
        h.advance(Duration::from_secs(10));
        let ping = h.sent().remove(0);
        h.feed(&client_frame(true, 0, 0xA, &ping.payload));
        h.advance(Duration::from_secs(6));
        assert!(!h.conn.is_closed());
        h.advance(Duration::from_secs(4));
        assert_eq!(h.sent()[0].opcode, OpCode::Ping);
    }

    #[test]
    fn unanswered_ping_closes_with_1011_ping_timeout() {
        let mut h = pinging();
        h.advance(Duration::from_secs(10));
        h.sent();
        // An unsolicited Pong with another payload does not count (§5.5.3).
        h.feed(&client_frame(true, 0, 0xA, b"something else"));
        h.advance(Duration::from_secs(5));
        assert_eq!(h.conn.termination(), Some(&Termination::PingTimeout));
        let close = h.sent().remove(0);
        let reason = CloseReason::parse(&close.payload).unwrap();
        assert_eq!(
            reason,
            CloseReason::new(CloseCode::INTERNAL_ERROR, "Ping timeout")
        );
    }

    /// A peer that takes none of our output never got the Ping: at the
    /// Pong's deadline it is closed for what it is, too slow to read.
    #[test]
    fn a_ping_still_queued_at_its_deadline_closes_with_1008_too_slow() {
        let mut h = pinging();
        h.advance(Duration::from_secs(10));
        // Nothing written: the Ping waits in the queue.
        h.advance(Duration::from_secs(5));
        assert_eq!(h.conn.termination(), Some(&Termination::TooSlow));
        let sent = h.sent();
        assert_eq!(sent[0].opcode, OpCode::Ping);
        let reason = CloseReason::parse(&sent[1].payload).unwrap();
        assert_eq!(
            reason,
            CloseReason::new(CloseCode::POLICY_VIOLATION, "Peer too slow to read")
        );
    }

    #[test]
    fn deferring_the_pong_timeout_restarts_the_wait() {
        let mut h = pinging();
        h.advance(Duration::from_secs(10));
        h.sent();
        h.advance(Duration::from_secs(4));
        let now = h.now;
        h.conn.defer_pong_timeout(now);
        h.advance(Duration::from_secs(4));
        assert!(!h.conn.is_closed());
        h.advance(Duration::from_secs(1));
        assert_eq!(h.conn.termination(), Some(&Termination::PingTimeout));
    }

    #[test]
    fn early_timeout_calls_do_nothing() {
        let mut h = pinging();
        h.advance(Duration::ZERO);
        h.advance(Duration::from_secs(1));
        assert!(h.sent().is_empty());
        assert!(h.conn.poll_timeout().is_some());
    }
}

mod rfc6455_5_5_1_close {
    use super::*;

    #[test]
    fn server_echoes_the_peers_close_and_completes() {
        let mut h = Harness::server();
        h.feed(&close_frame(1000, "bye"));
        let sent = h.sent();
        assert_eq!(
            CloseReason::parse(&sent[0].payload).unwrap().code,
            CloseCode::NORMAL
        );
        assert_eq!(
            h.conn.termination(),
            Some(&Termination::Closed(CloseReason::new(
                CloseCode::NORMAL,
                "bye"
            )))
        );
    }

    #[test]
    fn empty_close_is_answered_with_empty_close_and_reports_1005() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x8, b""));
        assert_eq!(h.sent()[0].payload.len(), 0);
        assert_eq!(
            h.conn.termination().unwrap().close_reason().code,
            CloseCode::NO_STATUS
        );
    }

    #[test]
    fn server_initiated_close_completes_on_the_peers_reply() {
        let mut h = Harness::server();
        let now = h.now;
        h.conn
            .close(now, CloseReason::new(CloseCode::GOING_AWAY, "shutdown"))
            .unwrap();
        assert!(!h.conn.is_closed());
        assert_eq!(
            h.conn.send_message(Message::text("late")),
            Err(SendError::Closed)
        );
        // Data that was in flight still arrives before the peer's Close.
        h.feed(&text("in flight"));
        h.feed(&close_frame(1001, ""));
        assert_eq!(h.messages(), [Message::text("in flight")]);
        assert_eq!(
            h.conn.termination(),
            Some(&Termination::Closed(CloseReason::new(
                CloseCode::GOING_AWAY,
                "shutdown"
            )))
        );
        assert_eq!(h.sent().len(), 1, "no second Close");
    }

    #[test]
    fn close_times_out_without_a_reply() {
        let mut h = Harness::server();
        let now = h.now;
        h.conn.close(now, CloseReason::normal()).unwrap();
        h.advance(Duration::from_secs(10));
        assert_eq!(h.conn.termination(), Some(&Termination::CloseTimeout));
    }

    #[test]
    fn input_after_close_is_discarded() {
        let mut h = Harness::server();
        let mut wire = close_frame(1000, "");
        wire.extend(text("after close"));
        h.feed(&wire);
        assert!(h.events().is_empty());
    }

    #[test]
    fn server_fails_one_byte_close_payload_with_1002() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x8, &[0x03]));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn server_fails_invalid_close_codes_with_1002() {
        for code in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
            let mut h = Harness::server();
            h.feed(&close_frame(code, ""));
            h.assert_failing(CloseCode::PROTOCOL_ERROR);
        }
    }

    #[test]
    fn server_accepts_application_close_codes() {
        for code in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            let mut h = Harness::server();
            h.feed(&close_frame(code, ""));
            let echoed = CloseReason::parse(&h.sent()[0].payload).unwrap();
            assert_eq!(echoed.code.0, code);
        }
    }

    #[test]
    fn raw_mode_hands_over_close_and_waits_for_the_answer() {
        let mut h = Harness::raw();
        h.feed(&close_frame(4000, "app"));
        assert!(h.sent().is_empty());
        assert!(!h.conn.is_closed());
        assert_eq!(h.events().len(), 1);
        let now = h.now;
        h.conn
            .close(now, CloseReason::new(CloseCode(4000), ""))
            .unwrap();
        assert!(h.conn.is_closed());
        assert_eq!(h.sent()[0].opcode, OpCode::Close);
    }

    #[test]
    fn eof_without_close_is_abnormal_1006() {
        let mut h = Harness::server();
        h.conn.handle_eof(h.now);
        assert_eq!(
            h.conn.termination().unwrap().close_reason().code,
            CloseCode::ABNORMAL
        );
    }

    #[test]
    fn sending_reserved_close_codes_is_refused() {
        let mut h = Harness::server();
        let now = h.now;
        assert_eq!(
            h.conn.close(now, CloseReason::new(CloseCode::ABNORMAL, "")),
            Err(SendError::InvalidCloseCode(1006))
        );
    }
}

mod rfc6455_8_1_utf8_handling {
    use super::*;

    #[test]
    fn server_fails_invalid_utf8_text_with_1007() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x1, &[0xce, 0xba, 0xff]));
        h.assert_failing(CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn invalid_utf8_fails_on_the_fragment_that_brings_it() {
        let mut h = Harness::server();
        h.feed(&client_frame(false, 0, 0x1, "κόσμε".as_bytes()));
        assert!(!h.conn.is_closed());
        h.feed(&client_frame(false, 0, 0x0, &[0xf4, 0x90, 0x80, 0x80]));
        h.assert_failing(CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn invalid_utf8_fails_before_the_frame_is_complete() {
        let mut h = Harness::server();
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend_from_slice(&[0xf4, 0x90, 0x80, 0x80]);
        payload.extend_from_slice(b"edited");
        let wire = client_frame(true, 0, 0x1, &payload);
        // Header (6 bytes), the valid part and the first bad byte only.
        let cut = 6 + "κόσμε".len() + 2;
        let mut buf = BytesMut::from(&wire[..cut]);
        h.conn.handle_input(h.now, &mut buf);
        h.assert_failing(CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn characters_split_across_fragments_are_valid() {
        let mut h = Harness::server();
        let bytes = "€".as_bytes();
        h.feed(&client_frame(false, 0, 0x1, &bytes[..1]));
        h.feed(&client_frame(false, 0, 0x0, &bytes[1..2]));
        h.feed(&client_frame(true, 0, 0x0, &bytes[2..]));
        assert_eq!(h.messages(), [Message::text("€")]);
    }

    #[test]
    fn message_ending_inside_a_character_fails_with_1007() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x1, &"€".as_bytes()[..2]));
        h.assert_failing(CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn binary_messages_are_not_checked() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x2, &[0xff, 0xfe]));
        assert_eq!(h.messages(), [Message::binary(&[0xff, 0xfe][..])]);
    }
}

mod rfc6455_7_1_7_fail_the_connection {
    use super::*;

    #[test]
    fn messages_before_the_bad_frame_are_answered_before_the_close() {
        let mut h = Harness::server();
        let mut wire = text("first");
        wire.extend(client_frame(true, 0, 0x5, b""));
        wire.extend(text("never read"));
        h.feed(&wire);
        assert!(
            !h.conn.is_closed(),
            "the failure waits for the queued message"
        );
        assert_eq!(
            h.conn.poll_event(),
            Some(Event::Message(Message::text("first")))
        );
        h.conn.send_message(Message::text("first")).unwrap();
        assert_eq!(h.conn.poll_event(), None);
        let sent = h.sent();
        assert_eq!(sent[0], Frame::new(OpCode::Text, "first"));
        assert_eq!(sent[1].opcode, OpCode::Close);
        assert_eq!(
            CloseReason::parse(&sent[1].payload).unwrap().code,
            CloseCode::PROTOCOL_ERROR
        );
        assert!(h.conn.is_closed());
    }

    #[test]
    fn closing_with_a_deferred_failure_reports_the_peers_error() {
        let mut h = Harness::server();
        let mut wire = text("first");
        wire.extend(client_frame(true, 0, 0x5, b""));
        h.feed(&wire);
        let now = h.now;
        h.conn.close(now, CloseReason::normal()).unwrap();
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn nothing_is_read_after_a_failure() {
        let mut h = Harness::server();
        let mut wire = client_frame(true, 0, 0x3, b"");
        wire.extend(text("after"));
        h.feed(&wire);
        assert!(h.events().is_empty());
        h.feed(&text("later"));
        assert!(h.events().is_empty());
    }

    #[test]
    fn one_close_frame_only() {
        let mut h = Harness::server();
        h.feed(&client_frame(true, 0, 0x3, b""));
        h.feed(&client_frame(true, 0, 0x3, b""));
        assert_eq!(h.sent().len(), 1);
    }
}

#[cfg(feature = "deflate")]
mod rfc7692_6_permessage_deflate_framing {
    use super::*;

    fn deflate_server() -> Harness {
        let mut h = Harness::server();
        let params = Deflate::default()
            .negotiate(&[&ExtensionOffer::new(PERMESSAGE_DEFLATE)])
            .unwrap();
        h.conn.set_extensions(vec![params.extension]);
        h
    }

    fn compressed(payload: &[u8]) -> Vec<u8> {
        compress_standalone(6, 15, payload).unwrap().to_vec()
    }

    #[test]
    fn compressed_message_is_inflated() {
        let mut h = deflate_server();
        h.feed(&client_frame(
            true,
            0b100,
            0x1,
            &compressed("héllo".repeat(20).as_bytes()),
        ));
        assert_eq!(h.messages(), [Message::text("héllo".repeat(20))]);
    }

    #[test]
    fn rsv1_only_on_the_first_frame() {
        let wire = compressed(&[b'z'; 300]);
        let mut h = deflate_server();
        h.feed(&client_frame(false, 0b100, 0x2, &wire[..5]));
        h.feed(&client_frame(true, 0, 0x0, &wire[5..]));
        assert_eq!(h.messages(), [Message::binary(vec![b'z'; 300])]);
        let mut h = deflate_server();
        h.feed(&client_frame(false, 0b100, 0x2, &wire[..5]));
        h.feed(&client_frame(true, 0b100, 0x0, &wire[5..]));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    /// With the extensions detached (a caller that runs them outside its
    /// lock), a compressed message is handed over as it arrived, counted
    /// at its wire size, and decodes with the detached extensions; an
    /// uncompressed one is a plain message as before.
    #[test]
    fn detached_extensions_hand_over_encoded_messages_for_the_caller_to_inflate() {
        let mut h = deflate_server();
        let mut extensions = h.conn.detach_extensions();
        assert_eq!(h.conn.extensions().count(), 0);
        let wire = compressed("héllo".repeat(200).as_bytes());
        h.feed(&client_frame(true, 0b100, 0x1, &wire));
        h.feed(&text("plain"));
        assert_eq!(h.conn.pending_events(), (2, wire.len() + 5));
        let Some(Event::Encoded(encoded)) = h.conn.poll_event() else {
            panic!("the compressed message is handed over encoded");
        };
        assert_eq!((encoded.opcode, encoded.rsv), (OpCode::Text, Rsv::RSV1));
        let message = extensions.decode(encoded, 1 << 20).unwrap();
        assert_eq!(message, Message::text("héllo".repeat(200)));
        assert_eq!(
            h.conn.poll_event(),
            Some(Event::Message(Message::text("plain")))
        );
        // Sending: the caller encodes, the connection frames with its bits.
        let (rsv, payload) = extensions
            .encode(OpCode::Text, Bytes::from("x".repeat(500)))
            .unwrap();
        assert_eq!(rsv, Rsv::RSV1);
        h.conn.send_data(OpCode::Text, rsv, payload).unwrap();
        let sent = h.sent();
        assert_eq!((sent[0].rsv, sent[0].opcode), (Rsv::RSV1, OpCode::Text));
    }

    /// §8.1 via RFC 7692 §6: compressed text that inflates to invalid
    /// UTF-8 fails with 1007 when the caller decodes it, and what came
    /// after it is dropped.
    #[test]
    fn detached_decode_failure_fails_the_connection_with_its_code() {
        let mut h = deflate_server();
        let mut extensions = h.conn.detach_extensions();
        h.feed(&client_frame(
            true,
            0b100,
            0x1,
            &compressed(&[0xff, 0xfe, 0xfd]),
        ));
        h.feed(&text("after"));
        let Some(Event::Encoded(encoded)) = h.conn.poll_event() else {
            panic!("encoded");
        };
        let err = extensions.decode(encoded, 1 << 20).unwrap_err();
        h.conn.fail_with(err);
        h.assert_failing(CloseCode::INVALID_PAYLOAD);
        assert_eq!(h.conn.poll_event(), None);
    }

    /// Messages compressed alone by the thread's compressor inflate alone
    /// (a fresh window each), one after another: nothing of the previous
    /// message is referenced (§7.1.1.1 as the server promises it).
    #[test]
    fn standalone_messages_inflate_with_a_fresh_window_each() {
        let line = b"the same line, the same line, the same line";
        for _ in 0..3 {
            let wire = compressed(line);
            let mut inflater = flate2::Decompress::new(false);
            let mut input = wire.clone();
            input.extend_from_slice(&[0, 0, 0xff, 0xff]);
            let mut out = Vec::with_capacity(256);
            inflater
                .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
                .unwrap();
            assert_eq!(out, line);
        }
    }

    #[test]
    fn rsv1_on_a_control_frame_is_1002() {
        let mut h = deflate_server();
        h.feed(&client_frame(true, 0b100, 0x9, b""));
        h.assert_failing(CloseCode::PROTOCOL_ERROR);
    }

    #[test]
    fn uncompressed_messages_between_compressed_ones() {
        let mut h = deflate_server();
        h.feed(&client_frame(true, 0b100, 0x1, &compressed(b"one")));
        h.feed(&text("two"));
        h.feed(&client_frame(true, 0b100, 0x1, &compressed(b"three")));
        assert_eq!(
            h.messages(),
            [
                Message::text("one"),
                Message::text("two"),
                Message::text("three")
            ]
        );
    }

    #[test]
    fn empty_compressed_message() {
        let mut h = deflate_server();
        // §7.2.3.6: an empty message compresses to a single 0x00 byte.
        h.feed(&client_frame(true, 0b100, 0x1, &[0x00]));
        h.feed(&client_frame(true, 0b100, 0x2, &compressed(b"")));
        assert_eq!(
            h.messages(),
            [Message::text(""), Message::binary(Vec::new())]
        );
    }

    #[test]
    fn compressed_invalid_utf8_is_1007() {
        let mut h = deflate_server();
        h.feed(&client_frame(
            true,
            0b100,
            0x1,
            &compressed(&[0xce, 0xba, 0xff]),
        ));
        h.assert_failing(CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn bomb_over_max_message_size_is_1009() {
        let mut config = Config::new(Role::Server);
        config.max_message_size = 1 << 20;
        let mut h = Harness::with(config);
        let negotiated = Deflate::default()
            .negotiate(&[&ExtensionOffer::new(PERMESSAGE_DEFLATE)])
            .unwrap();
        h.conn.set_extensions(vec![negotiated.extension]);
        h.feed(&client_frame(
            true,
            0b100,
            0x2,
            &compressed(&vec![0; 64 << 20]),
        ));
        h.assert_failing(CloseCode::TOO_BIG);
    }

    #[test]
    fn outgoing_messages_are_compressed_with_rsv1() {
        let mut h = deflate_server();
        let payload = "a compressible line of text; ".repeat(10);
        h.conn.send_message(Message::text(payload.clone())).unwrap();
        let sent = h.sent();
        assert_eq!(sent[0].rsv, Rsv::RSV1);
        assert!(sent[0].payload.len() < payload.len());
        // A client would inflate it back.
        let mut client = Deflate::default()
            .negotiate(&[&ExtensionOffer::new(PERMESSAGE_DEFLATE)])
            .unwrap()
            .extension;
        let back = client
            .decode(OpCode::Text, Rsv::RSV1, sent[0].payload.clone(), 1 << 20)
            .unwrap();
        assert_eq!(&back[..], payload.as_bytes());
    }
}
