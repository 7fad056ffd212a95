//! The connection task: one future per connection that drives the socket,
//! the protocol, the timers and the user's handler together, the way hyper's
//! HTTP/1 dispatcher drives I/O and a service in one task.
//!
//! Each poll runs rounds of: watch the shutdown, then (under the lock) fire
//! timers, read and feed the protocol, poll the handler, and (under the
//! lock again) write everything queued and watch that the peer takes it. Replies
//! that the handler produces for one read leave in one write (corking),
//! without waiting for anything later. Rounds repeat while they make progress,
//! at most [`MAX_ROUNDS`] times before yielding to other tasks.

use std::{
    any::Any,
    future::Future,
    io::IoSlice,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use duplex_proto::{CloseCode, CloseReason, Termination};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::socket::Socket;

use crate::{
    budget::Charge,
    error::BoxError,
    lifecycle::ShutdownSignal,
    shared::{Inner, Shared},
};

/// Rounds per poll before yielding: enough to drain a burst, few enough that
/// one busy connection cannot starve the others on its worker (hyper uses 16).
const MAX_ROUNDS: usize = 16;

/// Reads per round: a fast sender cannot keep one round reading forever.
const MAX_READS_PER_ROUND: usize = 4;

/// The first read size: small, for connections that exchange small
/// messages. A read that fills its room doubles the next one, up to
/// [`MAX_READ_CHUNK`]; a read under a quarter of it halves it again (the
/// adaptive strategy of hyper's read buffer). It is the scratch buffer's
/// size, so that small reads go through that buffer.
const READ_CHUNK: usize = crate::socket::SCRATCH_LEN;

/// The largest read: enough for several mid-sized frames per syscall.
const MAX_READ_CHUNK: usize = 64 * 1024;

/// Slices per vectored write.
const MAX_IOVECS: usize = 64;

/// How often a connection the memory budget stopped reading looks whether
/// its peer has left.
const BUDGET_PROBE: Duration = Duration::from_secs(1);

/// How long a connection that holds bytes may wait for the memory budget
/// before it is closed with 1013: as long as a Pong may take.
const BUDGET_PAUSE: Duration = Duration::from_secs(15);

/// How long to keep reading (and discarding) after our side has closed, so
/// that unread input does not turn our FIN into a reset that destroys the
/// Close frame in flight.
const LINGER: Duration = Duration::from_secs(2);

/// Who is at the other end, for log lines: formatted only when a line is
/// written.
pub(crate) enum Peer {
    /// A client's address, when the server knows it.
    Addr(Option<std::net::SocketAddr>),
    /// A server session's client: its address and the path it asked for.
    Session(Arc<crate::Request>),
    /// The server a client connected to.
    #[cfg(feature = "client")]
    Host(String),
}

impl Peer {
    /// The path of a server session, for log lines.
    fn path(&self) -> &str {
        match self {
            Peer::Session(request) => request.path(),
            _ => "",
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Addr(Some(addr)) => addr.fmt(f),
            Peer::Addr(None) => f.write_str("unknown"),
            Peer::Session(request) => Peer::Addr(request.remote_addr()).fmt(f),
            #[cfg(feature = "client")]
            Peer::Host(host) => f.write_str(host),
        }
    }
}

pub(crate) type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// Where the transport is in its life.
enum Transport<T> {
    /// Reading and writing.
    Open(T),
    /// The protocol is closed and the queue written: our FIN is being sent.
    ShuttingDown(T),
    /// Our FIN is out; read and discard until the peer's FIN or the deadline.
    Lingering(T, Instant),
    /// The socket is dropped.
    Gone,
}

/// The future of one connection. Spawn it; it ends when both the transport
/// and the handler are done.
#[must_use = "a connection does nothing unless spawned"]
pub(crate) struct Driver {
    shared: Arc<Shared>,
    task: Task,
}

/// The connection task's own state: apart from the shared state, so that a
/// poll can lock the one while it works on the other (without cloning the
/// `Arc`, whose atomic increment was a sixth of the task's own time on a
/// small echo).
struct Task {
    transport: Transport<Socket>,
    /// Input not consumed yet: a partial frame, the bytes that came with
    /// the upgrade request, or whole frames left while input was paused.
    read_buf: BytesMut,
    /// How much the next read asks for.
    read_chunk: usize,
    handler: Option<HandlerFuture>,
    shutdown: Option<ShutdownSignal>,
    sleep: Pin<Box<tokio::time::Sleep>>,
    sleep_deadline: Option<Instant>,
    /// Reading stopped because the handler's inbox is full.
    read_waits_for_handler: bool,
    /// Reading stopped because the write queue is full: the peer reads
    /// slower than it makes us write (Pongs to a Ping flood, echoes).
    read_waits_for_output: bool,
    /// What this connection holds, in its configuration's memory budget;
    /// reading stops while the budget says so, and it wakes the task.
    charge: Option<Charge>,
    /// When to look again whether the peer of a connection the budget
    /// stopped reading has left.
    budget_probe: Option<Instant>,
    /// Since when the budget has kept this connection from reading.
    budget_paused_since: Option<Instant>,
    /// How long queued output may wait for the peer to take any of it.
    write_timeout: Duration,
    /// When the queued output is abandoned if nothing more is written:
    /// set while the queue is not empty, moved on by every write.
    write_deadline: Option<Instant>,
    /// When a graceful shutdown gives up on this session: the handler is
    /// dropped and the socket closed, whatever either is doing.
    shutdown_deadline: Option<Instant>,
    /// Whether the end was announced to waiters.
    end_announced: bool,
    /// When queued output must be abandoned: set when the protocol closes
    /// with bytes still queued, so that a peer that stopped reading cannot
    /// hold the connection open.
    drain_deadline: Option<Instant>,
    /// When the extensions' idle state (a compressor kept for context
    /// takeover) is released if nothing is sent before.
    codec_deadline: Option<Instant>,
    /// For log lines.
    peer: Peer,
}

impl Driver {
    pub(crate) fn new(
        io: Socket,
        leftover: bytes::Bytes,
        shared: Arc<Shared>,
        handler: HandlerFuture,
        shutdown: ShutdownSignal,
        write_timeout: Duration,
        peer: Peer,
    ) -> Self {
        let task = Task {
            transport: Transport::Open(io),
            read_chunk: READ_CHUNK,
            read_buf: BytesMut::from(&leftover[..]),
            handler: Some(handler),
            shutdown: Some(shutdown),
            read_waits_for_handler: false,
            read_waits_for_output: false,
            charge: None,
            budget_probe: None,
            budget_paused_since: None,
            write_timeout,
            write_deadline: None,
            shutdown_deadline: None,
            sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
            sleep_deadline: None,
            end_announced: false,
            drain_deadline: None,
            codec_deadline: None,
            peer,
        };
        Driver { shared, task }
    }

    /// Counts what the connection holds in a memory budget, which may stop
    /// its reading.
    pub(crate) fn with_charge(mut self, charge: Option<Charge>) -> Self {
        self.task.charge = charge;
        self
    }
}

impl Task {
    /// Polls the handler once; true if it finished.
    fn poll_handler(&mut self, shared: &Shared, cx: &mut Context<'_>) -> bool {
        let Some(handler) = self.handler.as_mut() else {
            return false;
        };
        let outcome = match catch_unwind(AssertUnwindSafe(|| handler.as_mut().poll(cx))) {
            Ok(Poll::Pending) => return false,
            Ok(Poll::Ready(result)) => result.map_err(HandlerFailure::Error),
            Err(panic) => Err(HandlerFailure::Panic(panic)),
        };
        self.handler = None;
        let mut inner = shared.lock();
        let reason = match outcome {
            Ok(()) => CloseReason::normal(),
            Err(failure) if failure.is_the_peers() => {
                // A handler that passes on what `recv` or `send` returned
                // (`?`) when the peer broke the rules, timed out or went
                // away: routine on a server, and the connection has already
                // ended with its own code.
                tracing::debug!(peer = %self.peer, "WebSocket handler ended on the peer's error: {failure}");
                CloseReason::normal()
            }
            Err(failure) => {
                tracing::error!(peer = %self.peer, "WebSocket handler failed: {failure}");
                // Details could be sensitive: the peer only learns that it failed.
                CloseReason::new(CloseCode::INTERNAL_ERROR, "Internal error")
            }
        };
        if inner.conn.can_send() {
            let _ = inner.conn.close(Inner::now(), reason);
        }
        true
    }

    /// The graceful shutdown: on its signal, Close 1001; at its deadline,
    /// the handler is dropped and the socket closed, whatever either is
    /// doing, so that the server's grace period holds. True if the round
    /// must run again.
    fn drive_shutdown(&mut self, shared: &Shared, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut again = false;
        if let Some(shutdown) = self.shutdown.as_mut()
            && shutdown.poll(cx)
        {
            self.shutdown_deadline = shutdown.deadline();
            self.shutdown = None;
            let reason = CloseReason::new(CloseCode::GOING_AWAY, "Server shutting down");
            let mut inner = shared.lock();
            if inner.conn.can_send() {
                let _ = inner.conn.close(now, reason);
            }
            again = true;
        }
        if let Some(deadline) = self.shutdown_deadline {
            if now >= deadline {
                self.shutdown_deadline = None;
                tracing::debug!(peer = %self.peer, "shutdown grace period over; dropping the session");
                self.handler = None;
                shared.lock().conn.terminate();
                if !matches!(self.transport, Transport::Gone) {
                    self.transport = Transport::Gone;
                }
                again = true;
            } else if matches!(self.transport, Transport::Gone) && self.handler.is_some() {
                // Nothing else arms the timer once the socket is gone.
                again |= self.arm_sleep(deadline, cx, now);
            }
        }
        again
    }

    /// The first half of a round, under the lock: timers, and reading into
    /// the protocol. True if the round must be run again whatever the
    /// handler does (reads were cut short, the state changed).
    fn drive_input(&mut self, inner: &mut Inner, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut again = false;
        if inner.set_driver_waker(cx) {
            // Registrations made with the old waker would wake nobody.
            self.sleep_deadline = None;
        }
        if inner.terminate_requested {
            self.transport = Transport::Gone;
        }
        if inner.reading_paused {
            inner.conn.defer_pong_timeout(now);
        }
        if let Some(since) = self.budget_paused_since {
            self.budget_pause(inner, since, now);
        }
        if inner.conn.poll_timeout().is_some_and(|at| at <= now) {
            inner.conn.handle_timeout(now);
            again = true;
        }
        again |= self.read(inner, cx, now);
        again
    }

    /// The second half of a round, under the lock, after the handler ran:
    /// write what is queued, move the transport towards its end, arm the
    /// timer. True if the round must be run again.
    fn drive_output(&mut self, inner: &mut Inner, cx: &mut Context<'_>, now: Instant) -> bool {
        if inner.terminate_requested {
            self.transport = Transport::Gone;
        }
        let wrote = self.write(inner, cx);
        self.watch_writes(inner, wrote, now);
        let mut budget_again = false;
        if let Some(charge) = self.charge.as_mut() {
            charge.set(
                inner.conn.held_input_bytes()
                    + inner.conn.write_queue_len()
                    + self.read_buf.capacity(),
            );
            // The handler or the peer took enough of what this connection
            // held: read again now, not at the next probe.
            budget_again = self.budget_paused_since.is_some() && charge.allowed();
        }
        let mut again = self.finish_transport(inner, cx, now) | budget_again;
        if (inner.conn.is_closed() || inner.transport_done) && !self.end_announced {
            self.end_announced = true;
            if let Some(termination) = inner.termination() {
                let reason = termination.close_reason();
                if is_routine(reason.code) {
                    tracing::debug!(
                        peer = %self.peer,
                        path = self.peer.path(),
                        code = reason.code.0,
                        reason = %reason.reason,
                        "WebSocket session ended"
                    );
                } else if let Some(skipped) = crate::log_limit::ABNORMAL_ENDS.admit() {
                    tracing::info!(
                        peer = %self.peer,
                        path = self.peer.path(),
                        code = reason.code.0,
                        reason = %reason.reason,
                        skipped,
                        "WebSocket session ended abnormally"
                    );
                }
            }
            inner.wake_all();
        }
        if std::mem::take(&mut self.read_waits_for_handler) && !inner.reading_paused {
            // The handler drained its inbox far enough: read again.
            again = true;
        }
        if self.read_waits_for_output && !inner.conn.outbox_full() {
            // The peer took enough of our output: read again.
            self.read_waits_for_output = false;
            again = true;
        }
        again |= self.arm_timer(inner, cx, now);
        again
    }

    /// Whether the handler must be polled again: a receive it waits in has
    /// an event, or something it waits for (room to send, a flush, the end)
    /// came while the task was running.
    fn handler_wanted(inner: &mut Inner, cx: &Context<'_>) -> bool {
        let woken = inner.take_handler_woken();
        woken || (inner.conn.pending_events().0 > 0 && inner.wake_receiver(cx))
    }

    /// While the memory budget keeps this connection from reading: a Pong
    /// it cannot read must not time out a peer that answered (so the wait
    /// for it restarts), and a connection still holding bytes after
    /// [`BUDGET_PAUSE`] is closed with 1013 "Try Again Later", so that the
    /// server sheds what it holds instead of holding it for as long as the
    /// peers care to wait. One that holds nothing waits on.
    fn budget_pause(&mut self, inner: &mut Inner, since: Instant, now: Instant) {
        let Some(charge) = self.charge.as_ref() else {
            return;
        };
        if charge.allowed() {
            // Reading stopped for another reason since (the inbox): the
            // pause is over.
            self.budget_paused_since = None;
            return;
        }
        inner.conn.defer_pong_timeout(now);
        let holds = charge.held() > 0;
        if holds && now >= since + BUDGET_PAUSE && inner.conn.can_send() {
            tracing::debug!(peer = %self.peer, "paused by the memory budget for {BUDGET_PAUSE:?}; closing");
            counter!("duplex_memory_budget_closes_total").increment(1);
            let reason = CloseReason::new(CloseCode::TRY_AGAIN_LATER, "Server short of memory");
            let _ = inner.conn.close(now, reason);
        }
    }

    /// Reads until the socket has nothing more (which registers the task
    /// for its next readiness), the inbox is full, or the per-round limit.
    /// True if the round must run again: reading was cut short by the
    /// limit, or the input ended.
    fn read(&mut self, inner: &mut Inner, cx: &mut Context<'_>, now: Instant) -> bool {
        self.budget_probe = None;
        let Transport::Open(io) = &mut self.transport else {
            return false;
        };
        if !self.read_buf.is_empty() {
            // Frames left while input was paused, or a partial frame (then
            // a no-op), or what came with the upgrade request.
            inner.conn.handle_input(now, &mut self.read_buf);
        }
        let mut again = true;
        for _ in 0..MAX_READS_PER_ROUND {
            if !inner.conn.wants_input() {
                again = false;
                break;
            }
            if inner.conn.inbox_full() {
                inner.reading_paused = true;
                self.read_waits_for_handler = true;
                again = false;
                break;
            }
            if inner.conn.outbox_full() {
                // No more input until the peer reads: a flood of Pings it
                // never reads the Pongs of holds at most this queue.
                self.read_waits_for_output = true;
                again = false;
                break;
            }
            if let Some(charge) = self.charge.as_mut() {
                if !charge.may_read(cx) {
                    // The budget wakes this task when the use falls; a
                    // peer that leaves meanwhile is looked for now and
                    // then, or its bytes would stay held until the end of
                    // the pause.
                    self.budget_paused_since.get_or_insert(now);
                    if io.peer_left(cx) {
                        inner.conn.handle_eof(now);
                    } else {
                        self.budget_probe = Some(now + BUDGET_PROBE);
                    }
                    again = false;
                    break;
                }
                self.budget_paused_since = None;
            }
            let room = (self.read_buf.capacity() - self.read_buf.len()).max(self.read_chunk);
            match io.poll_read_buf(cx, &mut self.read_buf, self.read_chunk) {
                Poll::Ready(Ok(0)) => {
                    inner.conn.handle_eof(now);
                    break;
                }
                Poll::Ready(Ok(n)) => {
                    self.read_chunk = if n >= room {
                        (self.read_chunk * 2).min(MAX_READ_CHUNK)
                    } else if n < self.read_chunk / 4 {
                        (self.read_chunk / 2).max(READ_CHUNK)
                    } else {
                        self.read_chunk
                    };
                    let queued = inner.conn.pending_events().0;
                    inner.conn.handle_input(now, &mut self.read_buf);
                    // Counted per read, not per message: the hot path stays lean.
                    let messages = inner.conn.pending_events().0.saturating_sub(queued);
                    counter!("duplex_bytes_received_total").increment(n as u64);
                    counter!("duplex_messages_received_total").increment(messages as u64);
                }
                Poll::Ready(Err(err)) => {
                    tracing::debug!(peer = %self.peer, "read failed: {err}");
                    inner.conn.handle_eof(now);
                    break;
                }
                Poll::Pending => {
                    again = false;
                    break;
                }
            }
        }
        if self.read_buf.is_empty() {
            // Everything was consumed: an idle connection keeps no buffer.
            self.read_buf = BytesMut::new();
        }
        again
    }

    /// Writes the queue until it is empty or the socket is full; what
    /// the writes unblock is woken. True if any byte was written.
    fn write(&mut self, inner: &mut Inner, cx: &mut Context<'_>) -> bool {
        let io = match &mut self.transport {
            Transport::Open(io) | Transport::ShuttingDown(io) => io,
            _ => return false,
        };
        let mut wrote = false;
        let written_before = inner.written;
        loop {
            let queue = inner.conn.write_queue();
            if queue.is_empty() {
                break;
            }
            let first = queue.chunk();
            let result = if first.len() == queue.len() {
                Pin::new(&mut *io).poll_write(cx, first)
            } else {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = queue.chunks_vectored(&mut slices);
                Pin::new(&mut *io).poll_write_vectored(cx, &slices[..n])
            };
            match result {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    inner.conn.terminate();
                    self.transport = Transport::Gone;
                    wrote = true;
                    break;
                }
                Poll::Ready(Ok(written)) => {
                    inner.conn.write_queue().advance(written);
                    inner.written += written as u64;
                    wrote = true;
                }
                Poll::Pending => break,
            }
        }
        if wrote {
            counter!("duplex_bytes_sent_total").increment(inner.written - written_before);
            if let Transport::Open(io) | Transport::ShuttingDown(io) = &mut self.transport {
                // A no-op on TCP; TLS streams need it to push their records.
                let _ = Pin::new(io).poll_flush(cx);
            }
            inner.on_written();
        }
        wrote
    }

    /// Drops the connection when queued output has waited `write_timeout`
    /// without the peer taking a byte of it: a peer that stops reading
    /// (a zero receive window) cannot hold its session, its queue and a
    /// handler waiting in `send` for longer than that.
    fn watch_writes(&mut self, inner: &mut Inner, wrote: bool, now: Instant) {
        let waiting = inner.conn.write_queue_len() > 0
            && matches!(
                self.transport,
                Transport::Open(_) | Transport::ShuttingDown(_)
            );
        if !waiting {
            self.write_deadline = None;
            return;
        }
        if wrote || self.write_deadline.is_none() {
            self.write_deadline = Some(now + self.write_timeout);
            return;
        }
        if self.write_deadline.is_some_and(|at| now >= at) {
            tracing::debug!(
                peer = %self.peer,
                queued = inner.conn.write_queue_len(),
                "peer read nothing for {:?}; dropping the connection",
                self.write_timeout
            );
            counter!("duplex_write_timeouts_total").increment(1);
            inner.conn.terminate();
            self.transport = Transport::Gone;
            self.write_deadline = None;
        }
    }

    /// Closes the socket once the protocol is closed and its queue written.
    fn finish_transport(&mut self, inner: &mut Inner, cx: &mut Context<'_>, now: Instant) -> bool {
        let mut progress = false;
        loop {
            let next = match std::mem::replace(&mut self.transport, Transport::Gone) {
                Transport::Open(io)
                    if inner.conn.is_closed() && inner.conn.write_queue_len() == 0 =>
                {
                    Transport::ShuttingDown(io)
                }
                Transport::Open(io) if inner.conn.is_closed() => {
                    let deadline = match inner.conn.termination() {
                        // The peer already failed to answer for close_timeout.
                        Some(Termination::CloseTimeout) => now,
                        _ => *self
                            .drain_deadline
                            .get_or_insert(now + inner.conn.config().close_timeout),
                    };
                    self.drain_deadline = Some(deadline);
                    if now >= deadline {
                        tracing::debug!(peer = %self.peer, "peer stopped reading; dropping the connection");
                        inner.conn.terminate();
                        Transport::Gone
                    } else {
                        self.transport = Transport::Open(io);
                        return progress;
                    }
                }
                Transport::ShuttingDown(mut io) => match Pin::new(&mut io).poll_shutdown(cx) {
                    Poll::Ready(_) => Transport::Lingering(io, now + LINGER),
                    Poll::Pending => {
                        self.transport = Transport::ShuttingDown(io);
                        return progress;
                    }
                },
                Transport::Lingering(mut io, deadline) => {
                    if now >= deadline || drain(&mut io, cx, &mut self.read_buf) {
                        Transport::Gone
                    } else {
                        self.transport = Transport::Lingering(io, deadline);
                        return progress;
                    }
                }
                Transport::Gone => {
                    if !inner.transport_done {
                        inner.transport_done = true;
                        self.read_buf = BytesMut::new();
                        inner.conn.handle_eof(now);
                        inner.wake_all();
                        progress = true;
                    }
                    return progress;
                }
                open => {
                    self.transport = open;
                    return progress;
                }
            };
            self.transport = next;
            progress = true;
        }
    }

    /// Releases the extensions' idle state once nothing was encoded for
    /// their idle timeout, and sets the deadline at which to look again.
    /// The codec lock is only tried: a send holding it is not idle.
    fn watch_codec(&mut self, shared: &Shared, idle: Duration, now: Instant) {
        let Ok(mut codec) = shared.try_lock_codec() else {
            // A send holds it: it wakes this task when its frame is queued,
            // and the next round looks again (a stale deadline would only
            // make rounds spin meanwhile).
            self.codec_deadline = None;
            return;
        };
        self.codec_deadline = match codec.last_encode {
            Some(at) if now >= at + idle => {
                codec.extensions.release_idle();
                codec.last_encode = None;
                None
            }
            Some(at) => Some(at + idle),
            None => None,
        };
    }

    /// Points the one timer at the earliest deadline; true if it has passed.
    fn arm_timer(&mut self, inner: &Inner, cx: &mut Context<'_>, now: Instant) -> bool {
        let linger = match &self.transport {
            Transport::Lingering(_, at) => Some(*at),
            Transport::Open(_) => self.drain_deadline,
            _ => None,
        };
        let deadline = [
            inner.conn.poll_timeout(),
            linger,
            self.write_deadline,
            self.shutdown_deadline,
            self.codec_deadline,
            self.budget_probe,
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(deadline) = deadline else {
            self.sleep_deadline = None;
            return false;
        };
        self.arm_sleep(deadline, cx, now)
    }

    /// Points the one timer at `deadline`; true if it has passed.
    fn arm_sleep(&mut self, deadline: Instant, cx: &mut Context<'_>, now: Instant) -> bool {
        if deadline <= now {
            return true;
        }
        if self
            .sleep_deadline
            .is_some_and(|armed| armed > now && armed <= deadline)
        {
            // Armed, with this task's waker, for this deadline or an
            // earlier one, which re-arms it when it fires. Not resetting it
            // for a later one matters: the write deadline moves on with
            // every write, and each reset takes the timer wheel's lock.
            return false;
        }
        self.sleep_deadline = Some(deadline);
        self.sleep.as_mut().reset(deadline.into());
        self.sleep.as_mut().poll(cx).is_ready()
    }
}

/// Whether a session that ended with `code` ended as sessions do: closed
/// normally (1000), going away (1001, a closed tab or a shutdown), or with
/// a Close that had no code (1005). Every other end (a protocol error, a
/// peer that vanished or stopped reading, a Ping timeout) is logged at
/// `info`, within the log limit.
fn is_routine(code: CloseCode) -> bool {
    matches!(
        code,
        CloseCode::NORMAL | CloseCode::GOING_AWAY | CloseCode::NO_STATUS
    )
}

/// Reads and discards; true once the peer's FIN (or an error) arrives.
fn drain<T: AsyncRead + Unpin>(io: &mut T, cx: &mut Context<'_>, buf: &mut BytesMut) -> bool {
    loop {
        buf.clear();
        if buf.capacity() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf) {
            Poll::Ready(Ok(0) | Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return false,
        }
    }
}

impl Future for Driver {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Driver { shared, task: this } = self.get_mut();
        // Who woke the task is unknown: the handler gets a poll.
        let mut handler_due = true;
        for _ in 0..MAX_ROUNDS {
            // A round: read, let the handler answer, write. The replies to
            // one read leave in one write, and an echo takes one round.
            let transport_live =
                !matches!(this.transport, Transport::Gone) || !shared.lock().transport_done;
            let now = Inner::now();
            let mut again = this.drive_shutdown(shared, cx, now);
            if transport_live {
                let mut inner = shared.lock();
                again |= this.drive_input(&mut inner, cx, now);
                handler_due |= Task::handler_wanted(&mut inner, cx);
            }
            if std::mem::take(&mut handler_due) {
                again |= this.poll_handler(shared, cx);
            }
            if let Some(idle) = shared.codec_idle_timeout {
                this.watch_codec(shared, idle, now);
            }
            if transport_live {
                let mut inner = shared.lock();
                again |= this.drive_output(&mut inner, cx, now);
                handler_due |= Task::handler_wanted(&mut inner, cx);
            }
            if this.handler.is_none() && matches!(this.transport, Transport::Gone) {
                if shared.lock().transport_done {
                    return Poll::Ready(());
                }
                continue;
            }
            if !again && !handler_due {
                return Poll::Pending;
            }
        }
        // Still busy: yield, and come back after the others had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

enum HandlerFailure {
    Error(BoxError),
    Panic(Box<dyn Any + Send>),
}

impl HandlerFailure {
    /// Whether the handler only returned the session's report of what the
    /// peer did (a protocol error, a ping timeout, a lost connection, a
    /// session already closed by the peer).
    fn is_the_peers(&self) -> bool {
        let HandlerFailure::Error(err) = self else {
            return false;
        };
        matches!(
            err.downcast_ref::<crate::Error>(),
            Some(
                crate::Error::Protocol(_)
                    | crate::Error::PingTimeout
                    | crate::Error::TooSlow
                    | crate::Error::ConnectionLost
                    | crate::Error::Closed
            )
        )
    }
}

impl std::fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HandlerFailure::Error(err) => write!(f, "{err}"),
            HandlerFailure::Panic(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(non-text panic payload)");
                write!(f, "panicked: {message}")
            }
        }
    }
}
