//! What the fuzz targets share: a `duplex_proto::Connection` fed arbitrary
//! bytes in arbitrary chunks, with the checks made after every chunk.

use std::time::Instant;

use bytes::BytesMut;
use duplex_proto::{
    CloseCode, CloseReason, Config, Connection, Deflate, Event, ExtensionFactory, FrameHeader,
    MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, Message, Mode, OpCode, Termination, apply_mask,
    parse_extensions,
};

/// Small limits, so that frames and inflated messages over them are cheap
/// to reach.
const LIMITS: [(u64, u64); 2] = [(64 << 10, 64 << 10), (1 << 10, 4 << 10)];

/// The offers a connection's permessage-deflate is negotiated from.
const DEFLATE_OFFERS: [&str; 2] = [
    "permessage-deflate",
    "permessage-deflate; client_no_context_takeover",
];

/// How one run is set up, from the first byte of the input.
#[derive(Debug)]
struct Setup {
    mode: Mode,
    deflate: Option<&'static str>,
    max_frame_size: u64,
    max_message_size: u64,
    /// Seeds the chunk sizes; 0 feeds everything at once.
    chunk_seed: u8,
}

impl Setup {
    fn from_bytes(config: u8, chunk_seed: u8) -> Setup {
        let (max_frame_size, max_message_size) = LIMITS[usize::from((config >> 3) & 1)];
        Setup {
            mode: if config & 1 == 0 {
                Mode::Messages
            } else {
                Mode::Frames
            },
            deflate: match (config >> 1) & 0b11 {
                0 => None,
                n => Some(DEFLATE_OFFERS[usize::from(n - 1) & 1]),
            },
            max_frame_size,
            max_message_size,
            chunk_seed,
        }
    }
}

/// Chunk lengths from a xorshift generator: the wire bytes stay contiguous
/// in the input, so the fuzzer's frames are not cut up by chunk sizes.
struct Chunks {
    state: u32,
    max: usize,
}

impl Chunks {
    fn new(seed: u8) -> Chunks {
        Chunks {
            state: u32::from(seed).wrapping_mul(0x9e37_79b9) | 1,
            // Seeds with high bits cut into large chunks, low ones byte-ish.
            max: [1, 3, 16, 200, 5000, usize::MAX][usize::from(seed % 6)],
        }
    }

    fn next(&mut self) -> usize {
        if self.max == usize::MAX {
            return usize::MAX;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        (self.state as usize % self.max) + 1
    }
}

/// A frame the connection wrote, decoded as its peer would.
struct Written {
    opcode: OpCode,
    payload: Vec<u8>,
}

/// Feeds `data` to a connection in the role given, after two bytes of
/// set-up, and checks every output.
///
/// # Panics
/// On any broken invariant: that is the finding.
pub fn run_connection(role: duplex_proto::Role, data: &[u8]) {
    let [config_byte, chunk_seed, wire @ ..] = data else {
        return;
    };
    let setup = Setup::from_bytes(*config_byte, *chunk_seed);
    let now = Instant::now();
    let mut config = Config::new(role);
    config.mode = setup.mode;
    config.max_frame_size = setup.max_frame_size;
    config.max_message_size = setup.max_message_size;
    let mut conn = Connection::new(config, now);
    if let Some(offer) = setup.deflate {
        let offers = parse_extensions(offer).expect("a valid offer");
        let refs: Vec<_> = offers.iter().collect();
        let negotiated = Deflate::default()
            .negotiate(&refs)
            .expect("permessage-deflate accepted");
        conn.set_extensions(vec![negotiated.extension]);
    }
    let mut checker = Checker::new(&setup, role);
    let mut input = BytesMut::new();
    let mut chunks = Chunks::new(setup.chunk_seed);
    let mut rest = wire;
    while !rest.is_empty() {
        let take = chunks.next().min(rest.len());
        let (chunk, tail) = rest.split_at(take);
        rest = tail;
        input.extend_from_slice(chunk);
        conn.handle_input(now, &mut input);
        checker.after_input(&conn, &input);
        checker.drain(&mut conn);
    }
    conn.handle_eof(now);
    checker.drain(&mut conn);
    checker.at_end(&conn);
}

struct Checker {
    mode: Mode,
    role: duplex_proto::Role,
    max_frame_size: u64,
    max_message_size: u64,
    /// The wire bytes written so far and not yet decoded.
    out: Vec<u8>,
    written: Vec<Written>,
    /// In frame mode, the text message being handed over fragment by
    /// fragment, when no extension marked it.
    text_fragments: Option<Vec<u8>>,
    /// Whether a data message is in progress in frame mode.
    in_message: bool,
}

impl Checker {
    fn new(setup: &Setup, role: duplex_proto::Role) -> Checker {
        Checker {
            mode: setup.mode,
            role,
            max_frame_size: setup.max_frame_size,
            max_message_size: setup.max_message_size,
            out: Vec::new(),
            written: Vec::new(),
            text_fragments: None,
            in_message: false,
        }
    }

    /// What stays in the read buffer is at most one partial frame.
    fn after_input(&self, conn: &Connection, input: &BytesMut) {
        let bound = self.max_frame_size as usize + MAX_HEADER_LEN;
        assert!(
            input.len() < bound,
            "{} bytes left in the read buffer, limit {}",
            input.len(),
            self.max_frame_size
        );
        if conn.is_closed() || !conn.wants_input() {
            assert!(
                input.is_empty(),
                "input kept after the connection stopped reading"
            );
        }
    }

    fn drain(&mut self, conn: &mut Connection) {
        while let Some(event) = conn.poll_event() {
            self.check_event(event);
        }
        let queue = conn.write_queue();
        while !queue.is_empty() {
            let chunk = queue.chunk();
            let n = chunk.len();
            assert!(n > 0, "a non-empty write queue gave an empty chunk");
            self.out.extend_from_slice(chunk);
            queue.advance(n);
        }
        assert_eq!(conn.write_queue_len(), 0);
        self.decode_written();
    }

    fn check_event(&mut self, event: Event) {
        match (self.mode, event) {
            (Mode::Messages, Event::Message(message)) => {
                assert!(
                    message.len() as u64 <= self.max_message_size,
                    "a message of {} bytes passed the limit {}",
                    message.len(),
                    self.max_message_size
                );
                if let Message::Text(text) = &message {
                    assert!(std::str::from_utf8(text.as_bytes()).is_ok());
                }
            }
            (Mode::Frames, Event::Frame(frame)) => {
                assert!(frame.payload.len() as u64 <= self.max_frame_size);
                if frame.opcode.is_control() {
                    assert!(frame.fin && frame.payload.len() <= MAX_CONTROL_PAYLOAD);
                    return;
                }
                match frame.opcode {
                    OpCode::Continuation => assert!(self.in_message, "continuation handed over"),
                    _ => {
                        assert!(!self.in_message, "new message inside another");
                        self.text_fragments =
                            (frame.opcode == OpCode::Text && frame.rsv.is_empty()).then(Vec::new);
                    }
                }
                self.in_message = !frame.fin;
                if let Some(text) = &mut self.text_fragments {
                    text.extend_from_slice(&frame.payload);
                    if frame.fin {
                        assert!(
                            std::str::from_utf8(text).is_ok(),
                            "invalid text handed over"
                        );
                        self.text_fragments = None;
                    }
                }
            }
            (mode, event) => panic!("{event:?} in {mode:?}"),
        }
    }

    /// Decodes the frames the connection wrote: they are what its peer
    /// reads, so they must follow the RFC too.
    fn decode_written(&mut self) {
        let mut at = 0;
        while let Some((header, n)) = FrameHeader::decode(&self.out[at..]).expect("valid output") {
            let len = header.payload_len as usize;
            if self.out.len() - at - n < len {
                break;
            }
            // The client masks (§5.1); the server does not, by default.
            assert_eq!(
                header.mask.is_some(),
                self.role == duplex_proto::Role::Client,
                "masking of output"
            );
            assert!(header.fin && header.rsv.is_empty() && header.opcode.is_control());
            assert!(len <= MAX_CONTROL_PAYLOAD);
            let mut payload = self.out[at + n..at + n + len].to_vec();
            if let Some(key) = header.mask {
                apply_mask(&mut payload, key, 0);
            }
            self.written.push(Written {
                opcode: header.opcode,
                payload,
            });
            at += n + len;
        }
        self.out.drain(..at);
    }

    /// The Close the connection wrote agrees with how it says it ended.
    fn at_end(&self, conn: &Connection) {
        assert!(self.out.is_empty(), "a partial frame was written");
        let closes: Vec<&Written> = self
            .written
            .iter()
            .filter(|w| w.opcode == OpCode::Close)
            .collect();
        assert!(closes.len() <= 1, "{} Close frames written", closes.len());
        let sent = closes
            .first()
            .map(|close| CloseReason::parse(&close.payload).expect("a Close we wrote must parse"));
        // Nothing but Pongs and that one Close is written without commands.
        for w in &self.written {
            assert!(matches!(w.opcode, OpCode::Close | OpCode::Pong));
            if w.opcode == OpCode::Pong {
                assert_eq!(
                    self.mode,
                    Mode::Messages,
                    "raw sessions answer pings themselves"
                );
            }
        }
        let termination = conn.termination().expect("closed after eof");
        match termination {
            Termination::Failed(err) => {
                let code = err.close_code();
                assert!(
                    matches!(code.0, 1002 | 1007 | 1009),
                    "{err:?} fails with {code:?}"
                );
                let sent = sent.expect("a failure sends a Close");
                assert_eq!(sent.code, code, "Close sent for {err:?}");
                assert_eq!(
                    conn.termination().map(|t| t.close_reason().code),
                    Some(code)
                );
            }
            Termination::Closed(theirs) => {
                assert_eq!(
                    self.mode,
                    Mode::Messages,
                    "raw sessions answer Close themselves"
                );
                let sent = sent.expect("the peer's Close is echoed");
                assert_eq!(sent.code, theirs.code, "echoed code");
                assert!(theirs.code == CloseCode::NO_STATUS || theirs.code.is_sendable());
            }
            Termination::Abnormal => {
                // Ended by our eof: the peer's Close, if any, waits for a
                // raw session's answer, and nothing was sent.
                assert!(sent.is_none(), "Close sent but ended abnormally");
            }
            other => panic!("{other:?} without timers"),
        }
    }
}
