//! Session handles: [`Session`] and [`RawSession`] for the handler, and the
//! cloneable [`Sender`] for any task.

use std::{
    fmt,
    future::poll_fn,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use bytes::Bytes;
use duplex_proto::{
    CloseReason, EncodedMessage, Event, ExtensionOffer, Frame, Message, OpCode, SendError,
    Termination,
};
use futures_core::Stream;

use crate::{
    convert::{self, ContentConverter},
    error::Error,
    request::Request,
    shared::{Inner, Shared},
};

/// Sends on a session from any task. Cheap to clone; every clone feeds the
/// same connection, and whole messages from several senders never
/// interleave.
///
/// ```no_run
/// # async fn demo(session: duplex::Session) {
/// let sender = session.sender();
/// tokio::spawn(async move {
///     let _ = sender.send("from another task").await;
/// });
/// # }
/// ```
pub struct Sender {
    shared: Arc<Shared>,
    converter: Arc<dyn ContentConverter>,
    /// As a `Sink`: the message given to `start_send` that did not fit in
    /// the outgoing buffer yet; queued by the next `poll_ready`,
    /// `poll_flush` or `poll_close`. Each clone has its own.
    unsent: Option<Message>,
}

impl Clone for Sender {
    fn clone(&self) -> Self {
        Sender::new(Arc::clone(&self.shared), Arc::clone(&self.converter))
    }
}

/// Why [`Sender::try_send`] did not queue a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TrySendError {
    /// The outgoing buffer is full: the peer reads slower than we send.
    #[error("the session's outgoing buffer is full")]
    Full,
    /// The session is closing or closed.
    #[error("the session is closed")]
    Closed,
    /// A fragmented message is being sent with `send_frame`; whole
    /// messages wait until its last frame.
    #[error("a fragmented message is being sent")]
    Busy,
}

impl From<SendError> for TrySendError {
    fn from(err: SendError) -> Self {
        match err {
            SendError::InvalidFragment => TrySendError::Busy,
            _ => TrySendError::Closed,
        }
    }
}

impl fmt::Debug for Sender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sender").finish_non_exhaustive()
    }
}

impl Sender {
    pub(crate) fn new(shared: Arc<Shared>, converter: Arc<dyn ContentConverter>) -> Self {
        Sender {
            shared,
            converter,
            unsent: None,
        }
    }

    /// Queues a whole message, waiting while the outgoing buffer has no
    /// room for it: it must fit in what is left of
    /// [`outgoing_buffer`](crate::WebSockets::outgoing_buffer), or, if it
    /// is larger than the whole buffer, wait until nothing is queued (a
    /// message is never queued past the bound, and one of any size can
    /// still be sent, alone). A compressed message is judged by its size
    /// before compression.
    ///
    /// Returning `Ok` means the message will be written before any later one
    /// and before our Close; it does not mean the peer has it
    /// ([`flush`](Self::flush) waits until it is written).
    ///
    /// # Errors
    /// [`Error::Closed`] once the session is closing.
    ///
    /// # Cancel safety
    /// Cancelling before it returns means the message was not queued.
    pub async fn send(&self, message: impl Into<Message>) -> Result<(), Error> {
        let message = message.into();
        let len = message.len();
        let mut message = Some(message);
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if !inner.conn.can_send() {
                return Poll::Ready(Err(Error::Closed));
            }
            let frame_len = inner.conn.frame_len(len);
            if !inner.has_room_for(frame_len) {
                inner.register_send(frame_len, cx);
                return Poll::Pending;
            }
            let Some(message) = message.take() else {
                return Poll::Ready(Ok(()));
            };
            if !self.shared.has_codec() {
                let result = inner.conn.send_message(message).map_err(Error::from);
                inner.wake_driver(Some(cx));
                return Poll::Ready(result);
            }
            drop(inner);
            let result = self.send_through_codec(message, Some(cx));
            Poll::Ready(result.map_err(Error::from))
        })
        .await
    }

    /// Encodes `message` with the connection's extensions under the codec's
    /// lock, then queues it under the state's: the compression does not
    /// hold the state lock, and the codec lock, held until the frame is
    /// queued, keeps messages in the order of their encoding (which a
    /// compressor with context depends on).
    fn send_through_codec(
        &self,
        message: Message,
        cx: Option<&Context<'_>>,
    ) -> Result<(), SendError> {
        let (opcode, payload) = match message {
            Message::Text(t) => (OpCode::Text, t.into_bytes()),
            Message::Binary(b) => (OpCode::Binary, b),
        };
        let Some(mut codec) = self.shared.lock_codec() else {
            return Err(SendError::Closed);
        };
        let encoded = codec.extensions.encode(opcode, payload);
        if self.shared.codec_idle_timeout.is_some() {
            codec.last_encode = Some(Inner::now());
        }
        let mut inner = self.shared.lock();
        let result = match encoded {
            Ok((rsv, payload)) => {
                if !rsv.is_empty() {
                    counter!("duplex_extension_encoded_messages_total", "direction" => "sent")
                        .increment(1);
                }
                inner.conn.send_data(opcode, rsv, payload)
            }
            Err(err) => {
                inner.conn.fail_with(err);
                Err(SendError::Closed)
            }
        };
        inner.wake_driver(cx);
        result
    }

    /// Queues a text message.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_text(&self, text: impl Into<String>) -> Result<(), Error> {
        self.send(Message::from(text.into())).await
    }

    /// Queues a binary message.
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn send_binary(&self, data: impl Into<Bytes>) -> Result<(), Error> {
        self.send(Message::Binary(data.into())).await
    }

    /// Queues a message without waiting: for fan-out, where one slow peer
    /// must not hold up the others.
    ///
    /// # Errors
    /// [`TrySendError::Full`] when the outgoing buffer has no room for the
    /// message (as [`send`](Self::send) would wait),
    /// [`TrySendError::Closed`] once the session is closing.
    pub fn try_send(&self, message: impl Into<Message>) -> Result<(), TrySendError> {
        let message = message.into();
        let len = message.len();
        if !self.shared.has_codec() {
            return self.try_queue(
                |conn| conn.frame_len(len),
                |conn| conn.send_message(message),
            );
        }
        {
            let inner = self.shared.lock();
            if !inner.conn.can_send() {
                return Err(TrySendError::Closed);
            }
            if !inner.has_room_for(inner.conn.frame_len(len)) {
                return Err(TrySendError::Full);
            }
        }
        self.send_through_codec(message, None)
            .map_err(TrySendError::from)
    }

    /// Queues a frame already in wire form (encoded once for many
    /// sessions by the hub).
    #[cfg(feature = "hub")]
    pub(crate) fn try_send_encoded(&self, encoded: &Bytes) -> Result<(), TrySendError> {
        self.try_queue(|_| encoded.len(), |conn| conn.send_encoded(encoded.clone()))
    }

    /// The checks both non-waiting sends share, then `queue` (of
    /// `frame_len` bytes).
    fn try_queue(
        &self,
        frame_len: impl FnOnce(&duplex_proto::Connection) -> usize,
        queue: impl FnOnce(&mut duplex_proto::Connection) -> Result<(), SendError>,
    ) -> Result<(), TrySendError> {
        let mut inner = self.shared.lock();
        if !inner.conn.can_send() {
            return Err(TrySendError::Closed);
        }
        if !inner.has_room_for(frame_len(&inner.conn)) {
            return Err(TrySendError::Full);
        }
        queue(&mut inner.conn).map_err(TrySendError::from)?;
        inner.wake_driver(None);
        Ok(())
    }

    /// How this session frames outgoing messages.
    #[cfg(feature = "hub")]
    pub(crate) fn encoding(&self) -> duplex_proto::Encoding {
        self.shared.lock().conn.encoding()
    }

    /// Starts the closing handshake without waiting for anything: for
    /// code that cannot await, such as a hub closing a slow consumer.
    pub fn close_now(&self, reason: CloseReason) {
        let mut inner = self.shared.lock();
        if inner.conn.close(Inner::now(), reason).is_ok() {
            inner.wake_driver(None);
        }
    }

    /// Queues one frame as given: a fragment (`fin` false, then
    /// continuations), a Ping or a Pong. A Close frame closes the session as
    /// [`close`](Self::close) does.
    ///
    /// # Errors
    /// [`Error::Send`] for a frame that breaks the rules, [`Error::Closed`]
    /// once the session is closing.
    pub async fn send_frame(&self, frame: Frame) -> Result<(), Error> {
        let len = frame.payload.len();
        let mut frame = Some(frame);
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let frame_len = inner.conn.frame_len(len);
            if !inner.has_room_for(frame_len) && inner.conn.can_send() {
                inner.register_send(frame_len, cx);
                return Poll::Pending;
            }
            let Some(frame) = frame.take() else {
                return Poll::Ready(Ok(()));
            };
            let now = Inner::now();
            let result = inner.conn.send_frame(now, frame).map_err(Error::from);
            inner.wake_driver(Some(cx));
            Poll::Ready(result)
        })
        .await
    }

    /// Sends a Ping with `payload` (at most 125 bytes).
    ///
    /// # Errors
    /// As [`send_frame`](Self::send_frame).
    pub async fn ping(&self, payload: impl Into<Bytes>) -> Result<(), Error> {
        self.send_frame(Frame::new(duplex_proto::OpCode::Ping, payload.into()))
            .await
    }

    /// Encodes `value` with the configured content converter (JSON by
    /// default) and sends it (Ktor's `sendSerialized`).
    ///
    /// # Errors
    /// [`Error::Convert`] if the value does not encode, or as
    /// [`send`](Self::send).
    pub async fn send_json<T: serde::Serialize>(&self, value: &T) -> Result<(), Error> {
        let message = self.converter.encode(value)?;
        self.send(message).await
    }

    /// Waits until every message queued before this call is written to the
    /// socket, or the connection is gone.
    pub async fn flush(&self) {
        let mut mark = None;
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let target = *mark.get_or_insert(inner.written + inner.conn.write_queue_len() as u64);
            if inner.written >= target || inner.transport_done {
                return Poll::Ready(());
            }
            inner.register_flush(target, cx);
            inner.wake_driver(Some(cx));
            Poll::Pending
        })
        .await;
    }

    /// Starts the closing handshake with `reason` and waits until the Close
    /// is written (Ktor's `close`). Messages keep arriving until the peer's
    /// Close; the session ends then, or after the close timeout.
    ///
    /// Closing an already closing session does nothing.
    ///
    /// # Errors
    /// [`Error::Send`] for a reserved code (1005 sends an empty Close;
    /// 1006 and 1015 cannot be sent).
    pub async fn close(&self, reason: CloseReason) -> Result<(), Error> {
        {
            let mut inner = self.shared.lock();
            match inner.conn.close(Inner::now(), reason) {
                Ok(()) | Err(SendError::Closed) => {}
                Err(err) => return Err(Error::from(err)),
            }
            inner.wake_driver(None);
        }
        self.flush().await;
        Ok(())
    }

    /// Waits until the session has ended and returns why: the peer's or our
    /// close reason, 1002/1007/1009 for a protocol error, 1011 "Ping timeout",
    /// or 1006 when the connection dropped without a closing handshake.
    pub async fn close_reason(&self) -> CloseReason {
        poll_fn(|cx| {
            let mut inner = self.shared.lock();
            match inner.termination() {
                Some(t) => Poll::Ready(t.close_reason()),
                None => {
                    inner.register_close(cx);
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// The close reason if the session has ended, without waiting.
    pub fn try_close_reason(&self) -> Option<CloseReason> {
        self.shared.lock().termination().map(|t| t.close_reason())
    }

    /// Drops the connection at once, without a closing handshake (1006).
    pub fn terminate(&self) {
        let mut inner = self.shared.lock();
        inner.terminate_requested = true;
        inner.conn.terminate();
        inner.wake_driver(None);
    }

    /// Whether nothing more can be sent.
    pub fn is_closed(&self) -> bool {
        !self.shared.lock().conn.can_send()
    }

    /// As a `Sink`: queues the held message once it fits. Ready when
    /// nothing is held (any more); an error drops the message.
    fn poll_unsent(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some(len) = self.unsent.as_ref().map(Message::len) else {
            return Poll::Ready(Ok(()));
        };
        {
            let mut inner = self.shared.lock();
            if !inner.conn.can_send() {
                self.unsent = None;
                return Poll::Ready(Err(Error::Closed));
            }
            let frame_len = inner.conn.frame_len(len);
            if !inner.has_room_for(frame_len) {
                inner.register_send(frame_len, cx);
                return Poll::Pending;
            }
        }
        match self.unsent.take() {
            Some(message) => Poll::Ready(self.queue_now(message)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Queues a message now, room or not (the caller checked).
    fn queue_now(&self, message: Message) -> Result<(), Error> {
        if self.shared.has_codec() {
            return self.send_through_codec(message, None).map_err(Error::from);
        }
        let mut inner = self.shared.lock();
        let result = inner.conn.send_message(message).map_err(Error::from);
        inner.wake_driver(None);
        result
    }
}

/// A `Sink` of whole messages, for `futures` combinators
/// (`stream.forward(sender)`, `sink.send(m)`): a message that does not fit
/// in the outgoing buffer yet is held by the sink (one at most) and
/// queued when it fits, as [`Sender::send`] waits; ready once nothing is
/// held, flushed once what was queued is written, closed with 1000 (the
/// closing handshake then runs as after [`Sender::close`]).
///
/// ```no_run
/// use futures_util::{SinkExt, StreamExt};
/// # async fn demo(session: duplex::Session) -> Result<(), duplex::Error> {
/// let (mut sender, receiver) = session.split();
/// // Echo: every message received goes back, through the Sink.
/// receiver
///     .filter_map(|m| async move { m.ok() })
///     .map(Ok)
///     .forward(&mut sender)
///     .await?;
/// # Ok(())
/// # }
/// ```
impl futures_sink::Sink<Message> for Sender {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.unsent.is_none() && !this.shared.lock().conn.can_send() {
            return Poll::Ready(Err(Error::Closed));
        }
        this.poll_unsent(cx)
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
        let this = self.get_mut();
        let fits = {
            let inner = this.shared.lock();
            inner.has_room_for(inner.conn.frame_len(message.len()))
        };
        if fits {
            this.queue_now(message)
        } else {
            this.unsent = Some(message);
            Ok(())
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if this.poll_unsent(cx)?.is_pending() {
            return Poll::Pending;
        }
        let mut inner = this.shared.lock();
        let queued = inner.conn.write_queue_len() as u64;
        if queued == 0 || inner.transport_done {
            return Poll::Ready(Ok(()));
        }
        let mark = inner.written + queued;
        inner.register_flush(mark, cx);
        inner.wake_driver(Some(cx));
        Poll::Pending
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // A held message goes before our Close; if the session is closing
        // already it is dropped, as a send would fail.
        if self.poll_unsent(cx).is_pending() {
            return Poll::Pending;
        }
        {
            let mut inner = self.shared.lock();
            if inner.conn.can_send() {
                let _ = inner.conn.close(Inner::now(), CloseReason::normal());
                inner.wake_driver(Some(cx));
            }
        }
        self.poll_flush(cx)
    }
}

#[cfg(all(test, feature = "hub"))]
impl Sender {
    /// A sender with no connection task behind it: what is sent stays in
    /// the write queue, for [`Sender::take_written`].
    pub(crate) fn detached(outgoing_limit: usize) -> Sender {
        use duplex_proto::{Config, Connection, Role};
        let mut config = Config::new(Role::Server);
        config.max_queued_output = outgoing_limit;
        let conn = Connection::new(config, Inner::now());
        Sender::new(
            Arc::new(Shared::new(conn)),
            crate::convert::default_converter(),
        )
    }

    /// Empties the write queue and returns the frames it held.
    pub(crate) fn take_written(&self) -> Vec<Frame> {
        let mut inner = self.shared.lock();
        let queue = inner.conn.write_queue();
        let mut bytes = Vec::new();
        while !queue.is_empty() {
            let chunk = queue.chunk().to_vec();
            queue.advance(chunk.len());
            bytes.extend_from_slice(&chunk);
        }
        let mut frames = Vec::new();
        let mut rest = &bytes[..];
        while let Ok(Some((header, n))) = duplex_proto::FrameHeader::decode(rest) {
            let len = header.payload_len as usize;
            frames.push(Frame {
                fin: header.fin,
                rsv: header.rsv,
                opcode: header.opcode,
                payload: Bytes::copy_from_slice(&rest[n..n + len]),
            });
            rest = &rest[n + len..];
        }
        frames
    }
}

/// What both kinds of session offer besides receiving: a sender for other
/// tasks, the request, the subprotocol, the [`Sender`]'s methods, and
/// `Sink`.
macro_rules! session_handle {
    ($session:ty) => {
        impl $session {
            /// A sender for other tasks.
            pub fn sender(&self) -> Sender {
                self.sender.clone()
            }

            /// The upgrade request: address, path, query, headers, path
            /// parameters.
            pub fn request(&self) -> &Request {
                &self.request
            }

            /// The subprotocol agreed in the handshake, if the route names any.
            pub fn protocol(&self) -> Option<&str> {
                self.protocol.as_deref()
            }

            /// [`Sender::send`].
            ///
            /// # Errors
            /// As [`Sender::send`].
            pub fn send(
                &self,
                message: impl Into<Message>,
            ) -> impl Future<Output = Result<(), Error>> {
                self.sender.send(message)
            }

            /// [`Sender::send_text`].
            ///
            /// # Errors
            /// As [`Sender::send`].
            pub fn send_text(
                &self,
                text: impl Into<String>,
            ) -> impl Future<Output = Result<(), Error>> {
                self.sender.send_text(text)
            }

            /// [`Sender::send_binary`].
            ///
            /// # Errors
            /// As [`Sender::send`].
            pub fn send_binary(
                &self,
                data: impl Into<Bytes>,
            ) -> impl Future<Output = Result<(), Error>> {
                self.sender.send_binary(data)
            }

            /// [`Sender::try_send`].
            ///
            /// # Errors
            /// As [`Sender::try_send`].
            pub fn try_send(&self, message: impl Into<Message>) -> Result<(), TrySendError> {
                self.sender.try_send(message)
            }

            /// [`Sender::send_json`].
            ///
            /// # Errors
            /// As [`Sender::send_json`].
            pub async fn send_json<T: serde::Serialize>(&self, value: &T) -> Result<(), Error> {
                self.sender.send_json(value).await
            }

            /// [`Sender::send_frame`].
            ///
            /// # Errors
            /// As [`Sender::send_frame`].
            pub fn send_frame(&self, frame: Frame) -> impl Future<Output = Result<(), Error>> {
                self.sender.send_frame(frame)
            }

            /// [`Sender::ping`].
            ///
            /// # Errors
            /// As [`Sender::send_frame`].
            pub fn ping(
                &self,
                payload: impl Into<Bytes>,
            ) -> impl Future<Output = Result<(), Error>> {
                self.sender.ping(payload)
            }

            /// [`Sender::flush`].
            pub fn flush(&self) -> impl Future<Output = ()> {
                self.sender.flush()
            }

            /// [`Sender::close`].
            ///
            /// # Errors
            /// As [`Sender::close`].
            pub fn close(&self, reason: CloseReason) -> impl Future<Output = Result<(), Error>> {
                self.sender.close(reason)
            }

            /// [`Sender::close_now`].
            pub fn close_now(&self, reason: CloseReason) {
                self.sender.close_now(reason)
            }

            /// [`Sender::close_reason`].
            pub fn close_reason(&self) -> impl Future<Output = CloseReason> {
                self.sender.close_reason()
            }

            /// [`Sender::try_close_reason`].
            pub fn try_close_reason(&self) -> Option<CloseReason> {
                self.sender.try_close_reason()
            }

            /// [`Sender::terminate`].
            pub fn terminate(&self) {
                self.sender.terminate()
            }

            /// [`Sender::is_closed`].
            pub fn is_closed(&self) -> bool {
                self.sender.is_closed()
            }
        }

        /// Sends as [`Sender`]'s `Sink` does.
        impl futures_sink::Sink<Message> for $session {
            type Error = Error;

            fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
                Pin::new(&mut self.get_mut().sender).poll_ready(cx)
            }

            fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), Error> {
                Pin::new(&mut self.get_mut().sender).start_send(message)
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
                Pin::new(&mut self.get_mut().sender).poll_flush(cx)
            }

            fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
                Pin::new(&mut self.get_mut().sender).poll_close(cx)
            }
        }
    };
}

/// What the handler of a [`web_socket`](crate::App::web_socket) route gets:
/// whole messages in, messages out, the closing handshake and pings handled.
///
/// It has the [`Sender`]'s methods (`session.send(...)`), is a `Stream` of
/// its messages and a `Sink` for them, `session.sender()` gives a sender
/// for other tasks, and [`split`](Session::split) owned halves.
///
/// ```no_run
/// async fn echo(mut session: duplex::Session) -> Result<(), duplex::Error> {
///     while let Some(message) = session.recv().await? {
///         session.send(message).await?;
///     }
///     Ok(())
/// }
/// ```
pub struct Session {
    sender: Sender,
    request: Arc<Request>,
    protocol: Option<String>,
    extensions: Vec<ExtensionOffer>,
    ended: bool,
}

impl Session {
    pub(crate) fn new(
        sender: Sender,
        request: Arc<Request>,
        protocol: Option<String>,
        extensions: Vec<ExtensionOffer>,
    ) -> Self {
        Session {
            sender,
            request,
            protocol,
            extensions,
            ended: false,
        }
    }

    /// The extensions negotiated for this session, as the server answered
    /// them (name and parameters), in installation order.
    pub fn extensions(&self) -> &[ExtensionOffer] {
        &self.extensions
    }

    /// Waits for the next whole message.
    ///
    /// `Ok(None)` means the closing handshake completed (Ktor's `onClose`);
    /// an `Err` means the connection failed (`onError`). In both cases
    /// [`close_reason`](Sender::close_reason) is set.
    ///
    /// # Errors
    /// [`Error::Protocol`], [`Error::PingTimeout`] or [`Error::ConnectionLost`].
    ///
    /// # Cancel safety
    /// Cancel safe: a message is taken only when it is returned.
    pub async fn recv(&mut self) -> Result<Option<Message>, Error> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Message>, Error>> {
        let mut inner = self.sender.shared.lock();
        match poll_event(&mut inner, cx) {
            Poll::Ready(Ok(Some(Event::Message(m)))) => Poll::Ready(Ok(Some(m))),
            Poll::Ready(Ok(Some(Event::Encoded(encoded)))) => {
                let max = inner.conn.config().max_message_size;
                drop(inner);
                Poll::Ready(self.decode(encoded, max).map(Some))
            }
            // A default session's connection hands over messages only.
            Poll::Ready(Ok(Some(Event::Frame(_)))) => Poll::Ready(Err(Error::Closed)),
            Poll::Ready(Ok(None)) => {
                self.ended = true;
                Poll::Ready(Ok(None))
            }
            Poll::Ready(Err(e)) => {
                self.ended = true;
                Poll::Ready(Err(e))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Inflates (runs the extensions on) a message taken from the queue,
    /// under the codec's lock only. A message that does not decode fails
    /// the connection with the error's close code (1007 for bad UTF-8, 1009
    /// past `max_message_size`).
    #[cold]
    #[inline(never)]
    fn decode(&mut self, encoded: EncodedMessage, max: u64) -> Result<Message, Error> {
        let shared = &self.sender.shared;
        let decoded = match shared.lock_codec() {
            Some(mut codec) => codec.extensions.decode(encoded, max),
            None => Err(duplex_proto::ProtocolError::ReservedBits),
        };
        if decoded.is_ok() {
            counter!("duplex_extension_encoded_messages_total", "direction" => "received")
                .increment(1);
        }
        decoded.map_err(|err| {
            let mut inner = shared.lock();
            inner.conn.fail_with(err.clone());
            inner.wake_driver(None);
            drop(inner);
            self.ended = true;
            Error::Protocol(err)
        })
    }

    /// The messages as a `Stream`, ending after the closing handshake or
    /// after the error that failed the connection.
    pub fn incoming(&mut self) -> Incoming<'_> {
        Incoming { session: self }
    }

    /// Receives a message and decodes it with the content converter
    /// (Ktor's `receiveDeserialized`). The message is consumed even when it
    /// does not decode, and the session stays open.
    ///
    /// # Errors
    /// [`Error::Convert`] for a message that does not decode, or as
    /// [`recv`](Self::recv).
    pub async fn recv_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        match self.recv().await? {
            Some(message) => Ok(Some(convert::decode(&*self.sender.converter, &message)?)),
            None => Ok(None),
        }
    }
}

session_handle!(Session);

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("path", &self.request.path())
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

/// A session is a `Stream` of its messages, as [`Session::incoming`]: it
/// ends after the closing handshake, or after the error that failed the
/// connection.
impl Stream for Session {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        this.poll_recv(cx).map(Result::transpose)
    }
}

impl Session {
    /// Splits the session into owned halves that can move to different
    /// tasks: a [`Sender`] (cloneable) and a [`Receiver`].
    ///
    /// ```no_run
    /// # async fn demo(session: duplex::Session) {
    /// let (sender, mut receiver) = session.split();
    /// tokio::spawn(async move {
    ///     let _ = sender.send("from another task").await;
    /// });
    /// while let Ok(Some(message)) = receiver.recv().await {
    ///     println!("{message:?}");
    /// }
    /// # }
    /// ```
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender.clone(), Receiver { session: self })
    }
}

/// The receiving half of a [`Session`] (see [`Session::split`]): its
/// messages, as a `Stream` too, and its request.
pub struct Receiver {
    session: Session,
}

impl Receiver {
    /// [`Session::recv`].
    ///
    /// # Errors
    /// As [`Session::recv`].
    pub async fn recv(&mut self) -> Result<Option<Message>, Error> {
        self.session.recv().await
    }

    /// [`Session::recv_json`].
    ///
    /// # Errors
    /// As [`Session::recv_json`].
    pub async fn recv_json<T: serde::de::DeserializeOwned>(&mut self) -> Result<Option<T>, Error> {
        self.session.recv_json().await
    }

    /// The upgrade request.
    pub fn request(&self) -> &Request {
        self.session.request()
    }

    /// Joins the halves again (any sender of the session will do: they all
    /// feed the same connection).
    pub fn unsplit(self) -> Session {
        self.session
    }
}

impl Stream for Receiver {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().session).poll_next(cx)
    }
}

impl fmt::Debug for Receiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Receiver")
            .field("path", &self.session.request.path())
            .finish_non_exhaustive()
    }
}

/// The stream of a session's messages; see [`Session::incoming`].
pub struct Incoming<'a> {
    session: &'a mut Session,
}

impl Stream for Incoming<'_> {
    type Item = Result<Message, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.session.ended {
            return Poll::Ready(None);
        }
        this.session.poll_recv(cx).map(Result::transpose)
    }
}

/// What the handler of a [`web_socket_raw`](crate::App::web_socket_raw) route
/// gets: every frame as it arrived, Ping, Pong, Close and fragments included,
/// and nothing done for it (Ktor's `webSocketRaw`).
///
/// The RFC's rules are still enforced (a protocol error still fails the
/// connection). When the peer sends a Close, answer it with
/// [`close`](Sender::close); a handler that returns without closing gets a
/// Close 1000 sent for it, so the connection never hangs open.
pub struct RawSession {
    sender: Sender,
    request: Arc<Request>,
    protocol: Option<String>,
}

impl RawSession {
    pub(crate) fn new(
        sender: Sender,
        request: Arc<Request>,
        protocol: Option<String>,
        _extensions: Vec<ExtensionOffer>,
    ) -> Self {
        RawSession {
            sender,
            request,
            protocol,
        }
    }

    /// Waits for the next frame. `Ok(None)` once the connection has ended.
    ///
    /// # Errors
    /// As [`Session::recv`].
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn recv(&mut self) -> Result<Option<Frame>, Error> {
        poll_fn(|cx| {
            let mut inner = self.sender.shared.lock();
            poll_event(&mut inner, cx).map_ok(|event| {
                event.map(|e| match e {
                    Event::Frame(f) => f,
                    Event::Message(Message::Text(t)) => {
                        Frame::new(duplex_proto::OpCode::Text, t.into_bytes())
                    }
                    Event::Message(Message::Binary(b)) => {
                        Frame::new(duplex_proto::OpCode::Binary, b)
                    }
                    // Extensions run in message mode only: a raw session
                    // sees their frames as they arrived.
                    Event::Encoded(m) => Frame {
                        fin: true,
                        rsv: m.rsv,
                        opcode: m.opcode,
                        payload: m.payload,
                    },
                })
            })
        })
        .await
    }
}

session_handle!(RawSession);

impl fmt::Debug for RawSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawSession")
            .field("path", &self.request.path())
            .finish_non_exhaustive()
    }
}

/// The next event, the end of the session, or a registered wait.
fn poll_event(inner: &mut Inner, cx: &Context<'_>) -> Poll<Result<Option<Event>, Error>> {
    if let Some(event) = inner.take_event(Some(cx)) {
        return Poll::Ready(Ok(Some(event)));
    }
    let Some(termination) = inner.termination() else {
        inner.register_recv(cx);
        return Poll::Pending;
    };
    match termination {
        Termination::Closed(_) => Poll::Ready(Ok(None)),
        Termination::Failed(e) => Poll::Ready(Err(Error::Protocol(e))),
        Termination::PingTimeout => Poll::Ready(Err(Error::PingTimeout)),
        Termination::TooSlow => Poll::Ready(Err(Error::TooSlow)),
        Termination::CloseTimeout | Termination::Abnormal => {
            Poll::Ready(Err(Error::ConnectionLost))
        }
    }
}
