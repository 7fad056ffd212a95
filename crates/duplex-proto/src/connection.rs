//! The protocol state machine of one WebSocket connection.

use std::{collections::VecDeque, time::Duration, time::Instant};

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    close::{CloseCode, CloseReason},
    error::ProtocolError,
    extension::{EncodedMessage, Extension, Extensions, SharedEncoding},
    frame::{Frame, FrameHeader, MAX_CONTROL_PAYLOAD, OpCode, Rsv},
    mask::apply_mask,
    message::{Message, Utf8Bytes},
    timer::{Timer, TimerTable},
    utf8::Utf8Validator,
    write_queue::WriteQueue,
};

/// Which end of the connection this is. It decides masking (§5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Receives masked frames, sends unmasked ones.
    Server,
    /// Sends masked frames, receives unmasked ones.
    Client,
}

/// How much the connection does by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reassembles messages, answers pings, sends pings on a period,
    /// completes the closing handshake: the caller sees whole messages.
    Messages,
    /// Hands over every frame as it arrived, control frames and fragments
    /// included, and does nothing by itself. Every rule of the RFC is still
    /// enforced.
    Frames,
}

/// Limits and behaviour of a connection.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which end this is.
    pub role: Role,
    /// What the connection does by itself.
    pub mode: Mode,
    /// The largest frame payload accepted; a larger one fails with 1009.
    pub max_frame_size: u64,
    /// The largest message accepted, fragments added up; a larger one
    /// fails with 1009.
    pub max_message_size: u64,
    /// Whether frames we send are masked. Always true for a client; for a
    /// server this is Ktor's `masking` option, which browsers reject.
    pub mask_outgoing: bool,
    /// RSV bits that negotiated extensions claim on data frames.
    pub extension_rsv: Rsv,
    /// How often to ping the peer; `None` sends no pings.
    pub ping_period: Option<Duration>,
    /// How long to wait for the Pong that answers our Ping.
    pub pong_timeout: Duration,
    /// How long to wait for the peer's Close after we sent ours.
    pub close_timeout: Duration,
    /// Input stops being consumed while this many payload bytes of events
    /// wait in [`Connection::poll_event`]: the rest stays in the caller's
    /// buffer. Decompressed bytes count when the connection runs its
    /// extensions itself, so one read of small compressed messages cannot
    /// inflate past it (one message still may, up to `max_message_size`);
    /// with [detached](Connection::detach_extensions) extensions the
    /// messages wait compressed and are inflated one at a time as they are
    /// taken.
    pub max_pending_bytes: usize,
    /// Input stops being consumed while this many events wait, whatever
    /// their size.
    pub max_pending_events: usize,
    /// Input stops being consumed while this many bytes wait in the write
    /// queue. Replies the connection makes by itself (Pongs, the echoed
    /// Close) count, so a peer that floods Pings and reads nothing cannot
    /// grow the queue past it by more than one read's worth. The user's
    /// messages are held to it by
    /// [`outbox_has_room_for`](Connection::outbox_has_room_for).
    pub max_queued_output: usize,
}

impl Config {
    /// Defaults for `role`: 16 MiB frames, 64 MiB messages, no pings,
    /// a 10 s close timeout, masking as the role requires, input paused at
    /// 1 MiB (or 4096 events) waiting and at 1 MiB queued for writing.
    pub fn new(role: Role) -> Self {
        Config {
            role,
            mode: Mode::Messages,
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            mask_outgoing: role == Role::Client,
            extension_rsv: Rsv::NONE,
            ping_period: None,
            pong_timeout: Duration::from_secs(15),
            close_timeout: Duration::from_secs(10),
            max_pending_bytes: 1 << 20,
            max_pending_events: 4096,
            max_queued_output: 1 << 20,
        }
    }
}

/// What the connection hands to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A whole message ([`Mode::Messages`]).
    Message(Message),
    /// A frame as it arrived ([`Mode::Frames`]).
    Frame(Frame),
    /// A whole message that extensions transformed, still encoded: only
    /// after [`Connection::detach_extensions`]. Decode it with
    /// [`Extensions::decode`]; if that fails, hand the error to
    /// [`Connection::fail_with`].
    Encoded(EncodedMessage),
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// The closing handshake completed. The reason is the one that started
    /// it: the peer's when the peer closed first, ours otherwise.
    Closed(CloseReason),
    /// We failed the connection because the peer broke a rule.
    Failed(ProtocolError),
    /// No Pong answered our Ping in time; we sent 1011 "Ping timeout".
    PingTimeout,
    /// When the Pong was due, our Ping had not even left: it waited behind
    /// output the peer was not taking. We sent 1008 "Peer too slow to
    /// read" (and the peer, not reading, may not see it).
    TooSlow,
    /// We sent a Close and none came back in time.
    CloseTimeout,
    /// The transport ended without a closing handshake (or was terminated).
    Abnormal,
}

impl Termination {
    /// The close reason a session reports for this ending.
    pub fn close_reason(&self) -> CloseReason {
        match self {
            Termination::Closed(reason) => reason.clone(),
            Termination::Failed(err) => CloseReason::new(err.close_code(), err.to_string()),
            Termination::PingTimeout => CloseReason::new(CloseCode::INTERNAL_ERROR, "Ping timeout"),
            Termination::TooSlow => {
                CloseReason::new(CloseCode::POLICY_VIOLATION, "Peer too slow to read")
            }
            Termination::CloseTimeout => {
                CloseReason::new(CloseCode::ABNORMAL, "Close handshake timed out")
            }
            Termination::Abnormal => CloseReason::new(
                CloseCode::ABNORMAL,
                "Connection was closed without close frame",
            ),
        }
    }
}

/// How a connection frames outgoing data messages; see
/// [`Connection::encoding`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encoding {
    /// Unmasked frames of the payload as it is: any such connection can take
    /// bytes from [`encode_frame`].
    Plain,
    /// Frames of a stateless extension's encoding, shared by connections
    /// with equal keys.
    Shared(SharedEncoding),
    /// Encoded by this connection alone (masking, or an extension with
    /// state).
    Unique,
}

/// The negotiated extensions of a connection.
#[derive(Debug)]
struct ExtensionState {
    /// Empty once detached.
    list: Extensions,
    /// The caller runs them: marked messages are handed over encoded.
    detached: bool,
    /// How outgoing data is framed, fixed when they were set.
    encoding: Encoding,
}

/// One whole unmasked data frame in wire form, for
/// [`Connection::send_encoded`].
pub fn encode_frame(opcode: OpCode, rsv: Rsv, payload: &[u8]) -> Bytes {
    let header = FrameHeader {
        fin: true,
        rsv,
        opcode,
        mask: None,
        payload_len: payload.len() as u64,
    };
    let mut head = [0u8; crate::frame::MAX_HEADER_LEN];
    let n = header.encode(&mut head);
    let mut out = BytesMut::with_capacity(n + payload.len());
    out.extend_from_slice(&head[..n]);
    out.extend_from_slice(payload);
    out.freeze()
}

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// We already sent a Close, or the connection ended: no more data (§5.5.1).
    #[error("the connection is closing or closed")]
    Closed,
    /// A control frame payload over 125 bytes (§5.5).
    #[error("control frame payload longer than 125 bytes")]
    ControlFrameTooLong,
    /// A close code that may not be sent (1005, 1006, 1015, or out of range).
    #[error("close code {0} may not be sent")]
    InvalidCloseCode(u16),
    /// A frame that breaks fragmentation: a continuation with nothing to
    /// continue, or a new message while a fragmented one is being sent.
    #[error("frame breaks the fragmentation of the message being sent")]
    InvalidFragment,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Open,
    /// We sent a Close; data still arrives until the peer's Close.
    CloseSent(CloseReason),
    /// The peer sent a Close that a raw session has not answered yet.
    CloseReceived(CloseReason),
    Closed(Termination),
}

/// A frame whose header is decoded and whose payload is still arriving.
#[derive(Debug, Clone, Copy)]
struct InFrame {
    header: FrameHeader,
    /// Payload bytes already unmasked and validated, at the start of the input.
    processed: usize,
}

/// A fragmented message being received.
#[derive(Debug)]
struct Assembly {
    size: u64,
    /// The fragments so far; unused in [`Mode::Frames`].
    data: BytesMut,
}

/// The protocol state of one connection, fed with bytes and time.
///
/// It has no socket and no clock: the caller reads, writes and keeps time.
///
/// # The calling protocol
/// - **Inputs:** [`handle_input`](Self::handle_input) with the bytes read
///   (it consumes whole frames and leaves a partial one in the buffer),
///   [`handle_eof`](Self::handle_eof) when the peer closes the transport, and
///   [`handle_timeout`](Self::handle_timeout) when
///   [`poll_timeout`](Self::poll_timeout)'s deadline has passed (calling it
///   early does nothing).
/// - **Commands:** [`send_message`](Self::send_message),
///   [`send_frame`](Self::send_frame), [`send_ping`](Self::send_ping),
///   [`send_pong`](Self::send_pong), [`close`](Self::close),
///   [`terminate`](Self::terminate).
/// - **Outputs**, drained after every input and command: the
///   [`write_queue`](Self::write_queue) (write it out, then `advance`),
///   [`poll_event`](Self::poll_event) until `None`, and
///   [`poll_timeout`](Self::poll_timeout) for the next deadline.
/// - Once [`is_closed`](Self::is_closed) and the write queue is empty, the
///   caller closes the transport: a server closes it first (§7.1.1).
///
/// Time must not go backwards between calls.
///
/// ```
/// use bytes::BytesMut;
/// use duplex_proto::{Config, Connection, Event, Message, Role};
/// use std::time::Instant;
///
/// let now = Instant::now();
/// let mut conn = Connection::new(Config::new(Role::Server), now);
/// // A masked "Hello" from a client (RFC 6455 §5.7).
/// let mut input = BytesMut::from(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58][..]);
/// conn.handle_input(now, &mut input);
/// assert_eq!(conn.poll_event(), Some(Event::Message(Message::text("Hello"))));
/// ```
#[derive(Debug)]
pub struct Connection {
    config: Config,
    state: State,
    in_frame: Option<InFrame>,
    assembly: Option<Assembly>,
    utf8: Utf8Validator,
    /// Whether the message being received is text (UTF-8 is checked).
    receiving_text: bool,
    /// The RSV bits of the first frame of the message being received: the
    /// extensions that transformed it.
    receiving_rsv: Rsv,
    /// The negotiated extensions, if any (boxed: most connections have none).
    extensions: Option<Box<ExtensionState>>,
    /// Whether a fragmented message is being sent with `send_frame`.
    sending_fragmented: bool,
    events: VecDeque<Event>,
    event_bytes: usize,
    out: WriteQueue,
    timers: TimerTable,
    /// The payload of the Ping awaiting its Pong.
    ping_payload: Option<Bytes>,
    /// Where in the output stream our last Ping ends: until
    /// `out.written()` reaches it, the peer has not been sent it.
    ping_end: u64,
    ping_counter: u64,
    /// A rule the peer broke after frames that are still waiting in
    /// `events`: the connection fails once the user has taken them, so that
    /// replies to those earlier messages go out before our Close.
    deferred_failure: Option<ProtocolError>,
}

impl Connection {
    /// A connection that has just completed its opening handshake at `now`.
    pub fn new(config: Config, now: Instant) -> Self {
        let mut timers = TimerTable::default();
        if config.mode == Mode::Messages
            && let Some(period) = config.ping_period.filter(|p| !p.is_zero())
        {
            timers.set(Timer::Ping, now + period);
        }
        Connection {
            config,
            state: State::Open,
            in_frame: None,
            assembly: None,
            utf8: Utf8Validator::new(),
            receiving_text: false,
            receiving_rsv: Rsv::NONE,
            extensions: None,
            sending_fragmented: false,
            events: VecDeque::new(),
            event_bytes: 0,
            out: WriteQueue::new(),
            timers,
            ping_payload: None,
            ping_end: 0,
            ping_counter: 0,
            deferred_failure: None,
        }
    }

    /// Installs the extensions negotiated for this connection, in
    /// installation order; their RSV bits become legal on data frames.
    /// Extensions apply in [`Mode::Messages`] only.
    pub fn set_extensions(&mut self, extensions: Vec<Box<dyn Extension>>) {
        if extensions.is_empty() {
            self.config.extension_rsv = Rsv::NONE;
            self.extensions = None;
            return;
        }
        let list = Extensions::new(extensions);
        self.config.extension_rsv = list.rsv();
        let encoding = if self.config.mask_outgoing {
            Encoding::Unique
        } else {
            list.shared_encoding()
                .map_or(Encoding::Unique, Encoding::Shared)
        };
        self.extensions = Some(Box::new(ExtensionState {
            list,
            detached: false,
            encoding,
        }));
    }

    /// Takes the extensions out, for the caller to run: from now on a
    /// message they marked arrives as [`Event::Encoded`] (its bytes count
    /// against `max_pending_bytes` as they arrived) and an encoded message
    /// goes out with [`send_data`](Self::send_data). Their RSV bits stay
    /// legal and [`encoding`](Self::encoding) stays as it was.
    ///
    /// This is for a caller that shares the connection behind a lock: the
    /// lock need not be held while a message is compressed or inflated.
    pub fn detach_extensions(&mut self) -> Extensions {
        match self.extensions.as_mut() {
            Some(state) => {
                state.detached = true;
                std::mem::take(&mut state.list)
            }
            None => Extensions::default(),
        }
    }

    /// The extensions the connection runs itself (none once detached).
    pub fn extensions(&self) -> impl Iterator<Item = &dyn Extension> {
        self.extensions.iter().flat_map(|state| state.list.iter())
    }

    /// How this connection frames outgoing messages, so that a message sent
    /// to many connections is encoded once per distinct encoding.
    pub fn encoding(&self) -> Encoding {
        match &self.extensions {
            Some(state) => state.encoding.clone(),
            None if self.config.mask_outgoing => Encoding::Unique,
            None => Encoding::Plain,
        }
    }

    // ---- getters ----

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether the connection has ended: no input is read and no data can be
    /// sent. The transport closes once the write queue is empty.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Whether data may still be sent.
    pub fn can_send(&self) -> bool {
        matches!(self.state, State::Open | State::CloseReceived(_))
    }

    /// Whether input is still read: until the peer's Close arrives.
    pub fn wants_input(&self) -> bool {
        matches!(self.state, State::Open | State::CloseSent(_)) && self.deferred_failure.is_none()
    }

    /// How the connection ended, once it has.
    pub fn termination(&self) -> Option<&Termination> {
        match &self.state {
            State::Closed(t) => Some(t),
            _ => None,
        }
    }

    /// Events waiting in [`poll_event`](Self::poll_event), and their payload bytes.
    pub fn pending_events(&self) -> (usize, usize) {
        (self.events.len(), self.event_bytes)
    }

    /// The input bytes the connection holds: events waiting for the user
    /// and the fragments of a message still being received. (A partial
    /// frame stays in the caller's input buffer.)
    pub fn held_input_bytes(&self) -> usize {
        let assembling = self.assembly.as_ref().map_or(0, |a| a.data.len());
        self.event_bytes + assembling
    }

    /// Whether the events waiting for the user have reached
    /// `max_pending_bytes` or `max_pending_events`: input is not consumed
    /// until the user takes some.
    pub fn inbox_full(&self) -> bool {
        self.events.len() >= self.config.max_pending_events
            || self.event_bytes >= self.config.max_pending_bytes
    }

    /// Whether the write queue has reached `max_queued_output`: input is not
    /// consumed until some of it is written.
    pub fn outbox_full(&self) -> bool {
        self.out.len() >= self.config.max_queued_output
    }

    /// Whether `frame_len` more bytes (a message as it will be queued:
    /// [`frame_len`](Self::frame_len), or a frame already encoded) may be
    /// queued now without taking the write queue past
    /// `max_queued_output`: they fit in what is left of the bound, or the
    /// queue is empty, so that a message larger than the whole bound is
    /// still sendable, alone. The queue then never holds more than
    /// `max(max_queued_output, one message)`, plus the replies the
    /// connection makes by itself. Senders are expected to ask before each
    /// `send_*` and wait (or refuse) while it is false; the connection
    /// does not refuse by itself.
    pub fn outbox_has_room_for(&self, frame_len: usize) -> bool {
        self.out.is_empty()
            || self.out.len().saturating_add(frame_len) <= self.config.max_queued_output
    }

    /// The bytes an unfragmented data frame of `payload_len` bytes takes
    /// in the write queue: header (with the masking key when we mask) and
    /// payload.
    pub fn frame_len(&self, payload_len: usize) -> usize {
        let extended = match payload_len {
            0..=125 => 0,
            126..=0xffff => 2,
            _ => 8,
        };
        let mask = if self.config.mask_outgoing { 4 } else { 0 };
        (2 + extended + mask as usize).saturating_add(payload_len)
    }

    /// Whether [`handle_input`](Self::handle_input) would leave input
    /// unconsumed now: the inbox or the outbox is full.
    pub fn input_paused(&self) -> bool {
        self.inbox_full() || self.outbox_full()
    }

    // ---- inputs ----

    /// Consumes the frames at the start of `input`.
    ///
    /// Complete frames are removed from `input`; a partial frame stays, its
    /// received part already unmasked and checked, so an invalid UTF-8 byte
    /// fails the connection as soon as it arrives. Nothing is read once the
    /// connection is closing in the receive direction: the rest of `input` is
    /// discarded (§1.4).
    ///
    /// When a frame breaks a rule while earlier messages still wait in
    /// [`poll_event`](Self::poll_event), the failure waits until they are
    /// taken: what the user answers to them goes out before the Close.
    ///
    /// While [`input_paused`](Self::input_paused), whole frames stay in
    /// `input` too: call again, with the same buffer, once the user has
    /// taken events or the queue has been written.
    pub fn handle_input(&mut self, now: Instant, input: &mut BytesMut) {
        loop {
            if !self.wants_input() {
                input.clear();
                return;
            }
            if self.input_paused() {
                return;
            }
            match self.read_frame(now, input) {
                Ok(true) => {}
                Ok(false) => return,
                Err(err) if self.events.is_empty() => self.fail(err),
                Err(err) => self.deferred_failure = Some(err),
            }
        }
    }

    /// The peer closed the transport.
    pub fn handle_eof(&mut self, _now: Instant) {
        if !self.is_closed() {
            self.enter_closed(Termination::Abnormal);
        }
    }

    /// Restarts the wait for the Pong of an outstanding Ping from `now`.
    ///
    /// A caller that stops reading (its user is behind) calls this while it
    /// does not read: the Pong may be sitting unread in its own socket, and
    /// a responsive peer must not be timed out for the caller's delay.
    pub fn defer_pong_timeout(&mut self, now: Instant) {
        if self.ping_payload.is_some() && self.timers.is_set(Timer::PongTimeout) {
            self.timers
                .set(Timer::PongTimeout, now + self.config.pong_timeout);
        }
    }

    /// Fires the timers whose deadline is at or before `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.timers.expired(Timer::Close, now) {
            self.timers.clear(Timer::Close);
            if matches!(self.state, State::CloseSent(_)) {
                self.enter_closed(Termination::CloseTimeout);
            }
        }
        if self.timers.expired(Timer::PongTimeout, now) {
            self.timers.clear(Timer::PongTimeout);
            // A peer that never got the Ping is not the one a Ping timeout
            // is for: it is too slow to take what it is sent.
            let termination = if self.out.written() < self.ping_end {
                Termination::TooSlow
            } else {
                Termination::PingTimeout
            };
            if self.can_send() {
                let reason = termination.close_reason();
                self.queue_control(OpCode::Close, reason.to_payload());
            }
            if !self.is_closed() {
                self.enter_closed(termination);
            }
        }
        if self.timers.expired(Timer::Ping, now) {
            self.timers.clear(Timer::Ping);
            if matches!(self.state, State::Open) {
                self.ping_counter += 1;
                let payload = Bytes::from(format!("duplex-ping-{}", self.ping_counter));
                self.queue_control(OpCode::Ping, payload.clone());
                self.ping_end = self.out.written() + self.out.len() as u64;
                self.ping_payload = Some(payload);
                self.timers
                    .set(Timer::PongTimeout, now + self.config.pong_timeout);
            }
        }
    }

    // ---- commands ----

    /// Queues a whole message as one frame.
    ///
    /// # Errors
    /// [`SendError::Closed`] after our Close; [`SendError::InvalidFragment`]
    /// while a fragmented message is being sent with `send_frame`.
    pub fn send_message(&mut self, message: Message) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closed);
        }
        if self.sending_fragmented {
            return Err(SendError::InvalidFragment);
        }
        let (opcode, payload) = match message {
            Message::Text(t) => (OpCode::Text, t.into_bytes()),
            Message::Binary(b) => (OpCode::Binary, b),
        };
        let Some(state) = self.extensions.as_mut() else {
            // The common case, kept free of the extensions' error path: it
            // is most of the cost of a small echo.
            self.queue_frame(true, Rsv::NONE, opcode, payload);
            return Ok(());
        };
        match state.list.encode(opcode, payload) {
            Ok((rsv, payload)) => {
                self.queue_frame(true, rsv, opcode, payload);
                Ok(())
            }
            Err(err) => {
                self.fail(err);
                Err(SendError::Closed)
            }
        }
    }

    /// Queues a whole data message as one frame, its payload already
    /// transformed by the caller's [`Extensions`] (see
    /// [`detach_extensions`](Self::detach_extensions)) with `rsv` the bits
    /// they returned.
    ///
    /// # Errors
    /// As [`send_message`](Self::send_message); [`SendError::InvalidFragment`]
    /// for a control or continuation opcode too.
    pub fn send_data(&mut self, opcode: OpCode, rsv: Rsv, payload: Bytes) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closed);
        }
        if self.sending_fragmented || !matches!(opcode, OpCode::Text | OpCode::Binary) {
            return Err(SendError::InvalidFragment);
        }
        self.queue_frame(true, rsv, opcode, payload);
        Ok(())
    }

    /// Fails the connection with `err`, found by the caller: the decoding of
    /// an [`Event::Encoded`] failed (§7.1.7). The Close carries the error's
    /// code; events not yet taken are dropped, since they came after the
    /// message that broke the rules.
    pub fn fail_with(&mut self, err: ProtocolError) {
        self.events.clear();
        self.event_bytes = 0;
        self.deferred_failure = None;
        if !self.is_closed() {
            self.fail(err);
        }
    }

    /// Queues one frame as given: a fragment, a control frame, RSV bits of a
    /// negotiated extension.
    ///
    /// A Close frame goes through [`close`](Self::close) so that the state
    /// follows it.
    ///
    /// # Errors
    /// See [`SendError`].
    pub fn send_frame(&mut self, now: Instant, frame: Frame) -> Result<(), SendError> {
        match frame.opcode {
            OpCode::Close => {
                let reason = CloseReason::parse(&frame.payload)
                    .map_err(|_| SendError::InvalidCloseCode(close_code_of(&frame.payload)))?;
                return self.close(now, reason);
            }
            OpCode::Ping | OpCode::Pong => return self.send_control(frame.opcode, frame.payload),
            OpCode::Continuation if !self.sending_fragmented => {
                return Err(SendError::InvalidFragment);
            }
            OpCode::Text | OpCode::Binary if self.sending_fragmented => {
                return Err(SendError::InvalidFragment);
            }
            _ => {}
        }
        if !self.can_send() {
            return Err(SendError::Closed);
        }
        self.sending_fragmented = !frame.fin;
        self.queue_frame(frame.fin, frame.rsv, frame.opcode, frame.payload);
        Ok(())
    }

    /// Queues a Ping.
    ///
    /// # Errors
    /// [`SendError::ControlFrameTooLong`] over 125 bytes; [`SendError::Closed`]
    /// once the connection has ended.
    pub fn send_ping(&mut self, payload: Bytes) -> Result<(), SendError> {
        self.send_control(OpCode::Ping, payload)
    }

    /// Queues a Pong.
    ///
    /// # Errors
    /// As [`send_ping`](Self::send_ping).
    pub fn send_pong(&mut self, payload: Bytes) -> Result<(), SendError> {
        self.send_control(OpCode::Pong, payload)
    }

    fn send_control(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), SendError> {
        if payload.len() > MAX_CONTROL_PAYLOAD {
            return Err(SendError::ControlFrameTooLong);
        }
        if self.is_closed() {
            return Err(SendError::Closed);
        }
        self.queue_control(opcode, payload);
        Ok(())
    }

    /// Starts the closing handshake, or answers the peer's Close in
    /// [`Mode::Frames`]. Closing twice is not an error.
    ///
    /// # Errors
    /// [`SendError::InvalidCloseCode`] for a code that may not be sent
    /// (1005 sends a Close with no payload).
    pub fn close(&mut self, now: Instant, reason: CloseReason) -> Result<(), SendError> {
        if reason.code != CloseCode::NO_STATUS && !reason.code.is_sendable() {
            return Err(SendError::InvalidCloseCode(reason.code.0));
        }
        if let Some(err) = self.deferred_failure.take() {
            // The peer's error decides how this connection ends.
            self.fail(err);
            return Ok(());
        }
        match std::mem::replace(&mut self.state, State::Open) {
            State::Open => {
                self.queue_control(OpCode::Close, reason.to_payload());
                self.state = State::CloseSent(reason);
                self.timers
                    .set(Timer::Close, now + self.config.close_timeout);
                self.timers.clear(Timer::Ping);
                self.timers.clear(Timer::PongTimeout);
            }
            State::CloseReceived(theirs) => {
                self.queue_control(OpCode::Close, reason.to_payload());
                self.enter_closed(Termination::Closed(theirs));
            }
            other => self.state = other,
        }
        Ok(())
    }

    /// Ends the connection at once, without a closing handshake: queued
    /// output is dropped.
    pub fn terminate(&mut self) {
        self.out = WriteQueue::new();
        if !self.is_closed() {
            self.enter_closed(Termination::Abnormal);
        }
    }

    // ---- outputs ----

    /// The next event for the user.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<Event> {
        let Some(event) = self.events.pop_front() else {
            if let Some(err) = self.deferred_failure.take() {
                self.fail(err);
            }
            return None;
        };
        self.event_bytes -= event_len(&event);
        Some(event)
    }

    /// The bytes to write. Write from its chunks, then `advance` it.
    #[must_use]
    pub fn write_queue(&mut self) -> &mut WriteQueue {
        &mut self.out
    }

    /// Bytes waiting in the write queue.
    pub fn write_queue_len(&self) -> usize {
        self.out.len()
    }

    /// The earliest deadline at which [`handle_timeout`](Self::handle_timeout)
    /// has work to do.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// Queues a frame encoded elsewhere (a broadcast encoded once for many
    /// connections). The caller vouches that it is one whole, unmasked data
    /// frame.
    ///
    /// # Errors
    /// [`SendError::Closed`] once data may no longer be sent;
    /// [`SendError::InvalidFragment`] in the middle of a fragmented send.
    pub fn send_encoded(&mut self, encoded: Bytes) -> Result<(), SendError> {
        if !self.can_send() {
            return Err(SendError::Closed);
        }
        if self.sending_fragmented {
            return Err(SendError::InvalidFragment);
        }
        self.out.push_encoded(encoded);
        Ok(())
    }

    // ---- the receive path ----

    /// Reads one frame from the start of `input`. `Ok(false)` means more
    /// bytes are needed.
    fn read_frame(&mut self, now: Instant, input: &mut BytesMut) -> Result<bool, ProtocolError> {
        let mut frame = match self.in_frame.take() {
            Some(frame) => frame,
            None => {
                let Some((header, header_len)) = FrameHeader::decode(input)? else {
                    return Ok(false);
                };
                self.check_header(&header)?;
                input.advance(header_len);
                InFrame {
                    header,
                    processed: 0,
                }
            }
        };
        // The limit check in `check_header` bounds this below max_frame_size.
        let len =
            usize::try_from(frame.header.payload_len).map_err(|_| ProtocolError::FrameTooBig {
                size: frame.header.payload_len,
                max: self.config.max_frame_size,
            })?;
        let available = input.len().min(len);
        if available > frame.processed {
            let fresh = &mut input[frame.processed..available];
            if let Some(key) = frame.header.mask {
                apply_mask(fresh, key, frame.processed);
            }
            if self.is_text_data(&frame.header) {
                self.utf8.feed(fresh)?;
            }
            frame.processed = available;
        }
        if available < len {
            input.reserve(len - input.len());
            self.in_frame = Some(frame);
            return Ok(false);
        }
        let payload = if len == input.len() {
            // The frame ends the input (one message per read, the usual
            // case): taking the whole buffer avoids the shared header that
            // splitting a buffer allocates.
            std::mem::take(input).freeze()
        } else {
            input.split_to(len).freeze()
        };
        self.on_frame(now, frame.header, payload)?;
        Ok(true)
    }

    /// The rules a header alone can break, checked before any payload
    /// memory is reserved.
    fn check_header(&self, h: &FrameHeader) -> Result<(), ProtocolError> {
        match (self.config.role, h.mask.is_some()) {
            (Role::Server, false) => return Err(ProtocolError::UnmaskedFrame),
            (Role::Client, true) => return Err(ProtocolError::MaskedFrame),
            _ => {}
        }
        if h.opcode.is_control() {
            if !h.rsv.is_empty() {
                return Err(ProtocolError::ReservedBits);
            }
            if !h.fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if h.payload_len > MAX_CONTROL_PAYLOAD as u64 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
            return Ok(());
        }
        // Extensions mark a message on its first frame only (RFC 7692 §6.1).
        if !self.config.extension_rsv.contains(h.rsv)
            || (h.opcode == OpCode::Continuation && !h.rsv.is_empty())
        {
            return Err(ProtocolError::ReservedBits);
        }
        match (h.opcode, &self.assembly) {
            (OpCode::Continuation, None) => return Err(ProtocolError::UnexpectedContinuation),
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ProtocolError::ExpectedContinuation);
            }
            _ => {}
        }
        if h.payload_len > self.config.max_frame_size {
            return Err(ProtocolError::FrameTooBig {
                size: h.payload_len,
                max: self.config.max_frame_size,
            });
        }
        let so_far = self.assembly.as_ref().map_or(0, |a| a.size);
        let total = so_far.saturating_add(h.payload_len);
        if total > self.config.max_message_size {
            return Err(ProtocolError::MessageTooBig {
                size: total,
                max: self.config.max_message_size,
            });
        }
        Ok(())
    }

    /// Whether a frame's bytes are text to check as they arrive: text that
    /// no extension transformed (transformed text is checked once decoded).
    fn is_text_data(&self, h: &FrameHeader) -> bool {
        match h.opcode {
            OpCode::Text => h.rsv.is_empty(),
            OpCode::Continuation => self.receiving_text && self.receiving_rsv.is_empty(),
            _ => false,
        }
    }

    fn on_frame(
        &mut self,
        now: Instant,
        h: FrameHeader,
        payload: Bytes,
    ) -> Result<(), ProtocolError> {
        match h.opcode {
            OpCode::Close => self.on_close(h, payload),
            OpCode::Ping => {
                match self.config.mode {
                    // §5.5.2: answer with the same payload, unless our Close is out.
                    Mode::Messages if matches!(self.state, State::Open) => {
                        self.queue_control(OpCode::Pong, payload);
                    }
                    Mode::Messages => {}
                    Mode::Frames => self.push_event(Event::Frame(frame_of(h, payload))),
                }
                Ok(())
            }
            OpCode::Pong => {
                match self.config.mode {
                    // §5.5.3: a Pong that answers nothing is ignored.
                    Mode::Messages => self.on_pong(now, &payload),
                    Mode::Frames => self.push_event(Event::Frame(frame_of(h, payload))),
                }
                Ok(())
            }
            OpCode::Text | OpCode::Binary | OpCode::Continuation => self.on_data(h, payload),
        }
    }

    fn on_data(&mut self, h: FrameHeader, payload: Bytes) -> Result<(), ProtocolError> {
        if h.opcode != OpCode::Continuation {
            self.receiving_text = h.opcode == OpCode::Text;
            self.receiving_rsv = h.rsv;
        }
        let text = self.receiving_text;
        let transformed = !self.receiving_rsv.is_empty();
        if h.fin && text && !transformed {
            self.utf8.finish()?;
        }
        if self.config.mode == Mode::Frames {
            self.track_fragments(h, payload.len());
            self.push_event(Event::Frame(frame_of(h, payload)));
            return Ok(());
        }
        let message_payload = match (h.fin, self.assembly.take()) {
            (true, None) => payload,
            (false, None) => {
                let mut data = BytesMut::new();
                data.extend_from_slice(&payload);
                self.assembly = Some(Assembly {
                    size: payload.len() as u64,
                    data,
                });
                return Ok(());
            }
            (fin, Some(mut assembly)) => {
                assembly.data.extend_from_slice(&payload);
                assembly.size += payload.len() as u64;
                if !fin {
                    self.assembly = Some(assembly);
                    return Ok(());
                }
                assembly.data.freeze()
            }
        };
        if transformed {
            let encoded = EncodedMessage {
                opcode: if text { OpCode::Text } else { OpCode::Binary },
                rsv: self.receiving_rsv,
                payload: message_payload,
            };
            let max = self.config.max_message_size;
            match self.extensions.as_mut() {
                Some(state) if !state.detached => {
                    let message = state.list.decode(encoded, max)?;
                    self.push_event(Event::Message(message));
                }
                // Detached (or, never, marked without extensions: the
                // header check refuses bits no extension claims).
                _ => self.push_event(Event::Encoded(encoded)),
            }
            return Ok(());
        }
        let message = if text {
            // The validator accepted every byte of this payload and
            // `finish` passed above.
            Message::Text(Utf8Bytes::from_validated(message_payload))
        } else {
            Message::Binary(message_payload)
        };
        self.push_event(Event::Message(message));
        Ok(())
    }

    /// Keeps the fragmentation state of a raw connection, which hands over
    /// fragments instead of assembling them.
    fn track_fragments(&mut self, h: FrameHeader, len: usize) {
        match (h.fin, self.assembly.take()) {
            (true, _) => {}
            (false, None) => {
                self.assembly = Some(Assembly {
                    size: len as u64,
                    data: BytesMut::new(),
                });
            }
            (false, Some(mut assembly)) => {
                assembly.size += len as u64;
                self.assembly = Some(assembly);
            }
        }
    }

    fn on_close(&mut self, h: FrameHeader, payload: Bytes) -> Result<(), ProtocolError> {
        let theirs = CloseReason::parse(&payload)?;
        match std::mem::replace(&mut self.state, State::Open) {
            State::Open => match self.config.mode {
                // §5.5.1: echo the peer's status code, then the handshake is done.
                Mode::Messages => {
                    self.queue_control(OpCode::Close, theirs.to_payload());
                    self.enter_closed(Termination::Closed(theirs));
                }
                Mode::Frames => {
                    self.state = State::CloseReceived(theirs);
                    self.push_event(Event::Frame(frame_of(h, payload)));
                }
            },
            State::CloseSent(ours) => {
                if self.config.mode == Mode::Frames {
                    self.push_event(Event::Frame(frame_of(h, payload)));
                }
                self.enter_closed(Termination::Closed(ours));
            }
            other => self.state = other,
        }
        Ok(())
    }

    fn on_pong(&mut self, now: Instant, payload: &[u8]) {
        if self.ping_payload.as_deref() == Some(payload) {
            self.ping_payload = None;
            self.timers.clear(Timer::PongTimeout);
            if let Some(period) = self.config.ping_period
                && matches!(self.state, State::Open)
            {
                self.timers.set(Timer::Ping, now + period);
            }
        }
    }

    /// Fails the connection (§7.1.7): send a Close with the error's code if
    /// ours is not out yet, and read nothing more.
    fn fail(&mut self, err: ProtocolError) {
        if self.can_send() {
            let reason = CloseReason::new(err.close_code(), err.to_string());
            self.queue_control(OpCode::Close, reason.to_payload());
        }
        self.enter_closed(Termination::Failed(err));
    }

    fn enter_closed(&mut self, termination: Termination) {
        self.state = State::Closed(termination);
        self.deferred_failure = None;
        self.in_frame = None;
        self.assembly = None;
        self.ping_payload = None;
        self.timers.clear_all();
    }

    #[inline]
    fn push_event(&mut self, event: Event) {
        self.event_bytes += event_len(&event);
        self.events.push_back(event);
    }

    // ---- the send path ----

    fn queue_control(&mut self, opcode: OpCode, payload: Bytes) {
        self.queue_frame(true, Rsv::NONE, opcode, payload);
    }

    #[inline]
    fn queue_frame(&mut self, fin: bool, rsv: Rsv, opcode: OpCode, payload: Bytes) {
        let mask = self.config.mask_outgoing.then(rand::random::<[u8; 4]>);
        let header = FrameHeader {
            fin,
            rsv,
            opcode,
            mask,
            payload_len: payload.len() as u64,
        };
        self.out.push_frame(&header, payload);
    }
}

fn frame_of(h: FrameHeader, payload: Bytes) -> Frame {
    Frame {
        fin: h.fin,
        rsv: h.rsv,
        opcode: h.opcode,
        payload,
    }
}

fn event_len(event: &Event) -> usize {
    match event {
        Event::Message(m) => m.len(),
        Event::Frame(f) => f.payload.len(),
        Event::Encoded(m) => m.payload.len(),
    }
}

fn close_code_of(payload: &[u8]) -> u16 {
    match payload {
        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
        _ => 0,
    }
}
