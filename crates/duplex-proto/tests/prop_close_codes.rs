//! Property tests of `Connection::handle_input` over generated frame
//! sequences: valid messages (fragmented, with control frames between the
//! fragments) and then, maybe, one broken rule of RFC 6455, cut into
//! arbitrary chunks, in both roles and both modes.
//!
//! - Valid messages come out whole and in order whatever the chunking
//!   (§5.4), and each Ping gets its Pong (§5.5.2).
//! - Each broken rule fails the connection with the close code §7.4.1 gives
//!   it: 1002 for a protocol error, 1007 for invalid UTF-8 (§8.1), 1009 for
//!   a frame or message over the limits, in the Close frame the connection
//!   writes, after the messages that came before it.
//! - Nothing after the failure (or after the peer's Close) is read.
//!
//! `PROPTEST_CASES` raises the case count for a longer run.

use std::time::Instant;

use bytes::BytesMut;
use duplex_proto::{
    CloseReason, Config, Connection, Event, Frame, FrameHeader, Message, Mode, OpCode, Role, Rsv,
    Termination, apply_mask,
};
use proptest::prelude::*;

const MAX_FRAME: u64 = 2048;
const MAX_MESSAGE: u64 = 4096;

/// One frame as the peer sends it, before masking.
#[derive(Debug, Clone)]
struct WireFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: Vec<u8>,
    /// Flip the masking the role requires (a broken rule).
    wrong_mask: bool,
    /// Announce this length instead of the payload's (only the header is
    /// sent then).
    announced_len: Option<u64>,
}

impl WireFrame {
    fn new(fin: bool, opcode: u8, payload: Vec<u8>) -> Self {
        WireFrame {
            fin,
            rsv: 0,
            opcode,
            payload,
            wrong_mask: false,
            announced_len: None,
        }
    }

    /// Wire bytes as a peer of `role` sends them: a client masks (§5.1).
    fn encode(&self, role: Role, key: [u8; 4], out: &mut Vec<u8>) {
        let masked = (role == Role::Server) != self.wrong_mask;
        out.push(u8::from(self.fin) << 7 | self.rsv << 4 | self.opcode);
        let mask_bit = if masked { 0x80 } else { 0 };
        let len = self.announced_len.unwrap_or(self.payload.len() as u64);
        match len {
            0..=125 => out.push(mask_bit | len as u8),
            126..=0xffff => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
        if masked {
            out.extend_from_slice(&key);
        }
        let start = out.len();
        out.extend_from_slice(&self.payload);
        if masked {
            apply_mask(&mut out[start..], key, 0);
        }
    }
}

/// A valid message, its fragments and the control frames between them.
#[derive(Debug, Clone)]
struct ValidMessage {
    message: Message,
    frames: Vec<WireFrame>,
}

/// A control frame a peer may send between fragments.
fn control() -> impl Strategy<Value = WireFrame> {
    (
        prop_oneof![Just(0x9u8), Just(0xAu8)],
        prop::collection::vec(any::<u8>(), 0..=125),
    )
        .prop_map(|(opcode, payload)| WireFrame::new(true, opcode, payload))
}

fn valid_message() -> impl Strategy<Value = ValidMessage> {
    let text = prop::collection::vec(any::<char>(), 0..300)
        .prop_map(|chars| Message::text(chars.into_iter().collect::<String>()));
    let binary = prop::collection::vec(any::<u8>(), 0..1200).prop_map(Message::binary);
    (
        prop_oneof![text, binary],
        // Cut points (fractions of the length) and what goes after each cut.
        prop::collection::vec(
            (any::<prop::sample::Index>(), prop::option::of(control())),
            0..4,
        ),
    )
        .prop_map(|(message, cuts)| {
            let (opcode, bytes) = match &message {
                Message::Text(t) => (0x1, t.as_bytes().to_vec()),
                Message::Binary(b) => (0x2, b.to_vec()),
            };
            let mut points: Vec<usize> =
                cuts.iter().map(|(i, _)| i.index(bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut frames = Vec::new();
            let mut start = 0;
            for (point, (_, between)) in points.iter().zip(&cuts) {
                let op = if frames.iter().any(|f: &WireFrame| f.opcode < 8) {
                    0x0
                } else {
                    opcode
                };
                // Text is cut anywhere, inside a character too: only the
                // whole message must be UTF-8.
                frames.push(WireFrame::new(false, op, bytes[start..*point].to_vec()));
                start = *point;
                if let Some(control) = between {
                    frames.push(control.clone());
                }
            }
            let op = if frames.iter().any(|f| f.opcode < 8) {
                0x0
            } else {
                opcode
            };
            frames.push(WireFrame::new(true, op, bytes[start..].to_vec()));
            ValidMessage { message, frames }
        })
}

/// A broken rule: the frames that break it and the close code it earns.
#[derive(Debug, Clone)]
struct Violation {
    what: &'static str,
    frames: Vec<WireFrame>,
    code: u16,
}

fn violation(what: &'static str, frames: Vec<WireFrame>, code: u16) -> Violation {
    Violation { what, frames, code }
}

fn close_payload(code: u16, reason: &[u8]) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason);
    p
}

/// Close codes that may not be sent (§7.4.1, §7.4.2).
fn bad_close_code() -> impl Strategy<Value = u16> {
    prop_oneof![
        0u16..1000,
        Just(1004u16),
        Just(1005u16),
        Just(1006u16),
        1015u16..3000,
        5000u16..=u16::MAX,
    ]
}

fn invalid_utf8() -> impl Strategy<Value = Vec<u8>> {
    // A valid prefix, then a byte sequence no UTF-8 text holds.
    (
        prop::collection::vec(0x20u8..0x7f, 0..20),
        prop_oneof![
            Just(vec![0xffu8]),
            Just(vec![0xc0, 0x80]),
            Just(vec![0xed, 0xa0, 0x80]),
            Just(vec![0xf4, 0x90, 0x80, 0x80]),
            Just(vec![0xe2, 0x82]),
            Just(vec![0x80]),
        ],
    )
        .prop_map(|(mut prefix, bad)| {
            prefix.extend_from_slice(&bad);
            prefix
        })
}

fn violation_strategy() -> impl Strategy<Value = Violation> {
    let data = || prop::collection::vec(any::<u8>(), 0..50);
    prop_oneof![
        (prop_oneof![3u8..8, 0xBu8..=0xF], data()).prop_map(|(op, p)| violation(
            "reserved opcode",
            vec![WireFrame::new(true, op, p)],
            1002
        )),
        (
            1u8..8,
            prop_oneof![Just(0x1u8), Just(0x2), Just(0x9)],
            data()
        )
            .prop_map(|(rsv, op, p)| {
                let mut f = WireFrame::new(true, op, p);
                f.rsv = rsv;
                violation("RSV bits without an extension", vec![f], 1002)
            }),
        (prop_oneof![Just(0x1u8), Just(0x2), Just(0x9)], data()).prop_map(|(op, p)| {
            let mut f = WireFrame::new(true, op, p);
            f.wrong_mask = true;
            violation("wrong masking", vec![f], 1002)
        }),
        (
            prop_oneof![Just(0x8u8), Just(0x9), Just(0xA)],
            126usize..300
        )
            .prop_map(|(op, n)| {
                violation(
                    "control frame over 125 bytes",
                    vec![WireFrame::new(true, op, vec![b'a'; n])],
                    1002,
                )
            }),
        (prop_oneof![Just(0x8u8), Just(0x9), Just(0xA)], data()).prop_map(|(op, p)| {
            violation(
                "fragmented control frame",
                vec![WireFrame::new(false, op, p)],
                1002,
            )
        }),
        (any::<bool>(), data()).prop_map(|(fin, p)| violation(
            "continuation without a message",
            vec![WireFrame::new(fin, 0x0, p)],
            1002
        )),
        (
            prop_oneof![Just(0x1u8), Just(0x2)],
            prop_oneof![Just(0x1u8), Just(0x2)]
        )
            .prop_map(|(first, second)| violation(
                "new message inside a fragmented one",
                vec![
                    WireFrame::new(false, first, b"abc".to_vec()),
                    WireFrame::new(true, second, b"def".to_vec()),
                ],
                1002
            )),
        (invalid_utf8(), any::<bool>(), any::<prop::sample::Index>()).prop_map(
            |(bytes, fragmented, at)| {
                let frames = if fragmented {
                    let at = at.index(bytes.len() + 1);
                    vec![
                        WireFrame::new(false, 0x1, bytes[..at].to_vec()),
                        WireFrame::new(true, 0x0, bytes[at..].to_vec()),
                    ]
                } else {
                    vec![WireFrame::new(true, 0x1, bytes)]
                };
                violation("invalid UTF-8 in text", frames, 1007)
            }
        ),
        any::<u8>().prop_map(|b| violation(
            "close payload of one byte",
            vec![WireFrame::new(true, 0x8, vec![b])],
            1002
        )),
        bad_close_code().prop_map(|code| violation(
            "close code that may not be sent",
            vec![WireFrame::new(true, 0x8, close_payload(code, b"x"))],
            1002
        )),
        invalid_utf8().prop_map(|reason| violation(
            "invalid UTF-8 in a close reason",
            vec![WireFrame::new(true, 0x8, close_payload(1000, &reason))],
            1007
        )),
        (
            prop_oneof![Just(0x1u8), Just(0x2), Just(0x0)],
            MAX_FRAME + 1..(1u64 << 63)
        )
            .prop_map(|(op, len)| {
                let mut frames = Vec::new();
                if op == 0x0 {
                    frames.push(WireFrame::new(false, 0x2, b"start".to_vec()));
                }
                let mut f = WireFrame::new(true, op, Vec::new());
                f.announced_len = Some(len);
                frames.push(f);
                violation("frame over max_frame_size", frames, 1009)
            }),
        (1u64 << 63..=u64::MAX).prop_map(|len| {
            let mut f = WireFrame::new(true, 0x2, Vec::new());
            f.announced_len = Some(len);
            violation("length with its top bit set", vec![f], 1002)
        }),
        (
            prop_oneof![Just(0x1u8), Just(0x2)],
            1500usize..=MAX_FRAME as usize
        )
            .prop_map(|(op, size)| {
                // Every frame is under the frame limit; their sum is not.
                let fragments = MAX_MESSAGE as usize / size + 1;
                let frames = (0..fragments)
                    .map(|i| {
                        let fin = i + 1 == fragments;
                        WireFrame::new(fin, if i == 0 { op } else { 0x0 }, vec![b'm'; size])
                    })
                    .collect();
                violation("message over max_message_size", frames, 1009)
            }),
    ]
}

/// What comes after the valid messages.
#[derive(Debug, Clone)]
enum Ending {
    /// Nothing: the stream stops between messages.
    None,
    /// The peer's Close with a valid code and reason.
    Close(u16, String),
    /// A broken rule.
    Broken(Violation),
}

fn ending() -> impl Strategy<Value = Ending> {
    let sendable = prop_oneof![1000u16..=1003, 1007u16..=1014, 3000u16..=4999];
    prop_oneof![
        Just(Ending::None),
        (
            sendable,
            prop::collection::vec(any::<char>(), 0..20).prop_map(String::from_iter)
        )
            .prop_filter("reason fits a control frame", |(_, r)| r.len() <= 123)
            .prop_map(|(code, reason)| Ending::Close(code, reason)),
        violation_strategy().prop_map(Ending::Broken),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    role: Role,
    mode: Mode,
    messages: Vec<ValidMessage>,
    ending: Ending,
    /// Frames after the ending, which must never be read.
    trailer: Vec<WireFrame>,
}

impl Case {
    fn wire(&self, key_seed: u32) -> Vec<u8> {
        let mut out = Vec::new();
        let mut key = key_seed;
        let mut put = |f: &WireFrame, out: &mut Vec<u8>| {
            key = key.wrapping_mul(0x0101_0101).wrapping_add(0x9e37_79b9);
            f.encode(self.role, key.to_be_bytes(), out);
        };
        for m in &self.messages {
            for f in &m.frames {
                put(f, &mut out);
            }
        }
        match &self.ending {
            Ending::None => {}
            Ending::Close(code, reason) => put(
                &WireFrame::new(true, 0x8, close_payload(*code, reason.as_bytes())),
                &mut out,
            ),
            Ending::Broken(v) => {
                for f in &v.frames {
                    put(f, &mut out);
                }
            }
        }
        if !matches!(self.ending, Ending::None) {
            for f in &self.trailer {
                put(f, &mut out);
            }
        }
        out
    }
}

/// What the connection did with the input.
struct Outcome {
    events: Vec<Event>,
    written: Vec<Frame>,
    conn: Connection,
}

/// Feeds `wire` in chunks of the given sizes (cycled) through one read
/// buffer, taking events and output after each chunk as a caller does.
fn run(role: Role, mode: Mode, wire: &[u8], chunk_sizes: &[usize]) -> Outcome {
    let now = Instant::now();
    let mut config = Config::new(role);
    config.mode = mode;
    config.max_frame_size = MAX_FRAME;
    config.max_message_size = MAX_MESSAGE;
    let mut conn = Connection::new(config, now);
    let mut events = Vec::new();
    let mut out = Vec::new();
    let mut input = BytesMut::new();
    let mut rest = wire;
    let mut sizes = chunk_sizes.iter().cycle();
    while !rest.is_empty() {
        let n = (*sizes.next().expect("chunk sizes")).min(rest.len());
        input.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        conn.handle_input(now, &mut input);
        events.extend(std::iter::from_fn(|| conn.poll_event()));
        let queue = conn.write_queue();
        while !queue.is_empty() {
            let chunk = queue.chunk().to_vec();
            queue.advance(chunk.len());
            out.extend_from_slice(&chunk);
        }
    }
    Outcome {
        events,
        written: decode_all(&out),
        conn,
    }
}

/// The frames the connection wrote, as its peer reads them.
fn decode_all(mut bytes: &[u8]) -> Vec<Frame> {
    let mut frames = Vec::new();
    while !bytes.is_empty() {
        let (h, n) = FrameHeader::decode(bytes)
            .expect("valid output")
            .expect("whole frames");
        let len = h.payload_len as usize;
        let mut payload = bytes[n..n + len].to_vec();
        if let Some(key) = h.mask {
            apply_mask(&mut payload, key, 0);
        }
        frames.push(Frame {
            fin: h.fin,
            rsv: h.rsv,
            opcode: h.opcode,
            payload: payload.into(),
        });
        bytes = &bytes[n + len..];
    }
    frames
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![Just(Role::Server), Just(Role::Client)],
        prop_oneof![Just(Mode::Messages), Just(Mode::Frames)],
        prop::collection::vec(valid_message(), 0..5),
        ending(),
        prop::collection::vec(valid_message(), 0..2),
    )
        .prop_map(|(role, mode, messages, ending, trailer)| Case {
            role,
            mode,
            messages,
            ending,
            trailer: trailer.into_iter().flat_map(|m| m.frames).collect(),
        })
}

fn chunking() -> impl Strategy<Value = Vec<usize>> {
    prop_oneof![
        Just(vec![usize::MAX]),
        Just(vec![1]),
        prop::collection::vec(1usize..64, 1..8),
        prop::collection::vec(1usize..5000, 1..4),
    ]
}

/// The events a valid prefix must produce in each mode.
fn expected_events(case: &Case) -> Vec<Event> {
    match case.mode {
        Mode::Messages => case
            .messages
            .iter()
            .map(|m| Event::Message(m.message.clone()))
            .collect(),
        Mode::Frames => case
            .messages
            .iter()
            .flat_map(|m| &m.frames)
            .map(|f| {
                Event::Frame(Frame {
                    fin: f.fin,
                    rsv: Rsv::NONE,
                    opcode: OpCode::from_wire(f.opcode).expect("valid opcode"),
                    payload: f.payload.clone().into(),
                })
            })
            .collect(),
    }
}

/// Pongs a message-mode connection answers the valid prefix's Pings with.
fn expected_pongs(case: &Case) -> Vec<Vec<u8>> {
    if case.mode == Mode::Frames {
        return Vec::new();
    }
    case.messages
        .iter()
        .flat_map(|m| &m.frames)
        .filter(|f| f.opcode == 0x9)
        .map(|f| f.payload.clone())
        .collect()
}

fn check(case: &Case, outcome: &Outcome) -> Result<(), TestCaseError> {
    let events = &outcome.events;
    let expected = expected_events(case);
    // A broken rule may sit in the middle of a message whose earlier
    // fragments a raw session already got; the messages before it all
    // arrive whole.
    prop_assert!(
        events.len() >= expected.len(),
        "{} events, {} expected",
        events.len(),
        expected.len()
    );
    prop_assert_eq!(&events[..expected.len()], &expected[..]);
    let extra = &events[expected.len()..];
    match (&case.ending, case.mode) {
        (Ending::Broken(v), Mode::Frames) => {
            prop_assert!(extra.len() < v.frames.len(), "{} extra events", extra.len());
        }
        // A raw session gets the peer's Close as a frame, to answer itself.
        (Ending::Close(..), Mode::Frames) => {
            prop_assert_eq!(extra.len(), 1);
            prop_assert!(
                matches!(&extra[0], Event::Frame(f) if f.opcode == OpCode::Close),
                "last event {:?}",
                extra[0]
            );
        }
        _ => prop_assert!(extra.is_empty(), "events after the ending: {:?}", extra),
    }
    let pongs = expected_pongs(case);
    let (controls, close) = match outcome.written.split_last() {
        Some((last, rest)) if last.opcode == OpCode::Close => (rest, Some(last)),
        _ => (&outcome.written[..], None),
    };
    let written_pongs: Vec<Vec<u8>> = controls
        .iter()
        .map(|f| {
            assert_eq!(
                f.opcode,
                OpCode::Pong,
                "only Pongs and one Close are written"
            );
            f.payload.to_vec()
        })
        .collect();
    prop_assert_eq!(written_pongs, pongs);
    let close = close.map(|c| CloseReason::parse(&c.payload).expect("our Close parses"));
    match &case.ending {
        Ending::None => {
            prop_assert!(close.is_none());
            prop_assert!(!outcome.conn.is_closed());
            prop_assert!(outcome.conn.wants_input());
        }
        Ending::Close(code, reason) => {
            prop_assert!(!outcome.conn.wants_input());
            match case.mode {
                Mode::Messages => {
                    // §5.5.1: the status code is echoed.
                    let close = close.expect("the Close is echoed");
                    prop_assert_eq!(close.code.0, *code);
                    let ours = CloseReason::new(*code, reason.clone());
                    prop_assert_eq!(outcome.conn.termination(), Some(&Termination::Closed(ours)));
                }
                Mode::Frames => prop_assert!(close.is_none()),
            }
        }
        Ending::Broken(v) => {
            let close = close.unwrap_or_else(|| panic!("no Close for {}", v.what));
            prop_assert_eq!(close.code.0, v.code, "close code for {}", v.what);
            match outcome.conn.termination() {
                Some(Termination::Failed(err)) => {
                    prop_assert_eq!(err.close_code().0, v.code, "{}: {:?}", v.what, err);
                }
                other => prop_assert!(false, "{}: ended {:?}", v.what, other),
            }
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    // Small by default, so the suite stays quick; PROPTEST_CASES raises it.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The property of this file: the right messages, Pongs and close code,
    /// whatever the chunking.
    #[test]
    fn frame_sequences_in_any_chunking(
        case in case(),
        chunks in chunking(),
        key_seed in any::<u32>(),
    ) {
        let wire = case.wire(key_seed);
        let outcome = run(case.role, case.mode, &wire, &chunks);
        check(&case, &outcome)?;
    }

    /// The same bytes give the same result at once and byte by byte.
    #[test]
    fn chunking_does_not_change_the_outcome(case in case(), key_seed in any::<u32>()) {
        let wire = case.wire(key_seed);
        let whole = run(case.role, case.mode, &wire, &[usize::MAX]);
        let bytewise = run(case.role, case.mode, &wire, &[1]);
        prop_assert_eq!(&whole.events, &bytewise.events);
        prop_assert_eq!(&whole.written, &bytewise.written);
        prop_assert_eq!(whole.conn.termination(), bytewise.conn.termination());
    }
}
