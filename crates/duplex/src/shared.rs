//! The state a connection task shares with its session handles.
//!
//! The protocol state machine itself lives here, behind one mutex: a send
//! from any task encodes straight into the connection's write queue, and a
//! receive takes straight from its event queue, with no channel between.
//! The lock is never held across an await. It is held for the framing of
//! a message (a header and a copy of a small payload: well under a
//! microsecond), for a pop, and by the connection task while it reads and
//! feeds the protocol.
//!
//! Extension work (permessage-deflate's compression and inflation) runs
//! under a second lock, the codec's, never under this one: a send encodes
//! first and takes the state lock only to queue the frame; the connection
//! hands over compressed messages as they arrived and a receive inflates
//! one after popping it. A hub delivery or the connection task never waits
//! for a compression. Lock order: codec, then state; never the reverse.

use std::{
    sync::{Mutex, MutexGuard, PoisonError},
    task::{Context, Waker},
    time::{Duration, Instant},
};

use duplex_proto::{Connection, Event, Extensions, Termination};

/// The shared half of a connection.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    /// The negotiated extensions, when there are any (boxed: most
    /// connections have none, and this is held per connection).
    codec: Option<Box<Mutex<Codec>>>,
    /// When the codec wants its idle state released (see
    /// [`Extensions::idle_timeout`]).
    pub(crate) codec_idle_timeout: Option<Duration>,
}

/// The extensions of a connection, run outside the state lock.
pub(crate) struct Codec {
    pub(crate) extensions: Extensions,
    /// The last encode, while state may be held since.
    pub(crate) last_encode: Option<Instant>,
}

pub(crate) struct Inner {
    pub(crate) conn: Connection,
    /// The connection task.
    driver_waker: Option<Waker>,
    /// A receive waiting for an event.
    recv_waker: Option<Waker>,
    /// Sends waiting for room in the write queue, with the bytes each
    /// waits to fit.
    send_wakers: Vec<(usize, Waker)>,
    /// Flushes waiting for `written` to reach their mark.
    flush_wakers: Vec<(u64, Waker)>,
    /// `close_reason` calls waiting for the end.
    close_wakers: Vec<Waker>,
    /// Bytes written to the socket since the start.
    pub(crate) written: u64,
    /// The socket is gone: nothing more is read or written.
    pub(crate) transport_done: bool,
    /// The handler asked to drop the connection at once.
    pub(crate) terminate_requested: bool,
    /// A waker of the handler's own task was due while that task ran: it
    /// polls its handler again instead of being woken.
    handler_woken: bool,
    /// The task stopped reading because the handler is behind.
    pub(crate) reading_paused: bool,
}

impl Shared {
    /// The limits are the connection's own: `max_pending_bytes` and
    /// `max_pending_events` bound the inbox, `max_queued_output` the outbox.
    ///
    /// The connection's extensions are taken out of it, to run under the
    /// codec's lock.
    pub(crate) fn new(mut conn: Connection) -> Self {
        let extensions = conn.detach_extensions();
        let codec_idle_timeout = extensions.idle_timeout();
        let codec = (!extensions.is_empty()).then(|| {
            Box::new(Mutex::new(Codec {
                extensions,
                last_encode: None,
            }))
        });
        Shared {
            codec,
            codec_idle_timeout,
            inner: Mutex::new(Inner {
                conn,
                driver_waker: None,
                recv_waker: None,
                send_wakers: Vec::new(),
                flush_wakers: Vec::new(),
                close_wakers: Vec::new(),
                written: 0,
                handler_woken: false,
                transport_done: false,
                terminate_requested: false,
                reading_paused: false,
            }),
        }
    }

    /// Locks the state. A panic never happens under this lock in our code;
    /// should one happen in a future version, the state is still coherent
    /// enough to close the connection, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the codec unless it is busy; `Err` when busy or absent.
    pub(crate) fn try_lock_codec(&self) -> Result<MutexGuard<'_, Codec>, ()> {
        match self.codec.as_ref().map(|codec| codec.try_lock()) {
            Some(Ok(guard)) => Ok(guard),
            Some(Err(std::sync::TryLockError::Poisoned(p))) => Ok(p.into_inner()),
            _ => Err(()),
        }
    }

    /// Whether the connection has extensions to run.
    pub(crate) fn has_codec(&self) -> bool {
        self.codec.is_some()
    }

    /// Locks the codec, if the connection has extensions. Poisoning is
    /// ignored: an extension that panicked mid-message leaves at worst a
    /// stream the peer rejects (1007), on this connection only.
    pub(crate) fn lock_codec(&self) -> Option<MutexGuard<'_, Codec>> {
        self.codec
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

impl Inner {
    /// Remembers the connection task's waker; true if it changed.
    pub(crate) fn set_driver_waker(&mut self, cx: &Context<'_>) -> bool {
        match &self.driver_waker {
            Some(w) if w.will_wake(cx.waker()) => false,
            _ => {
                self.driver_waker = Some(cx.waker().clone());
                true
            }
        }
    }

    /// Whether a wake-up meant for the connection task's own handler was
    /// held back (see [`wake_from_driver`](Self::wake_from_driver)).
    pub(crate) fn take_handler_woken(&mut self) -> bool {
        std::mem::take(&mut self.handler_woken)
    }

    /// Wakes `waker` on behalf of the running connection task: a waker of
    /// that task itself is not woken (which would only schedule another
    /// poll) but noted, and the task polls its handler again.
    fn wake_from_driver(driver: Option<&Waker>, handler_woken: &mut bool, waker: Waker) {
        if driver.is_some_and(|d| d.will_wake(&waker)) {
            *handler_woken = true;
        } else {
            waker.wake();
        }
    }

    /// Wakes the connection task, unless `cx` belongs to it: a handler polled
    /// by the task itself needs no wake-up, the task writes after polling it.
    pub(crate) fn wake_driver(&self, cx: Option<&Context<'_>>) {
        if let Some(w) = &self.driver_waker
            && !cx.is_some_and(|cx| w.will_wake(cx.waker()))
        {
            w.wake_by_ref();
        }
    }

    /// Whether a send may queue `frame_len` bytes now (a message's frame,
    /// [`Connection::frame_len`], or a frame already encoded): they fit in
    /// what is left of the outgoing buffer, or nothing is queued (see
    /// [`Connection::outbox_has_room_for`]). The bound is the one at which
    /// the connection stops reading, so that what it queues by itself
    /// (Pongs) and what senders queue share one limit.
    pub(crate) fn has_room_for(&self, frame_len: usize) -> bool {
        self.conn.outbox_has_room_for(frame_len)
    }

    /// Takes the next event for a receiver, resuming reading when the inbox
    /// has drained to a quarter of its bound.
    pub(crate) fn take_event(&mut self, cx: Option<&Context<'_>>) -> Option<Event> {
        let event = self.conn.poll_event()?;
        if self.reading_paused {
            let (count, bytes) = self.conn.pending_events();
            let config = self.conn.config();
            if count < config.max_pending_events / 4 && bytes < config.max_pending_bytes / 4 {
                self.reading_paused = false;
                self.wake_driver(cx);
            }
        }
        Some(event)
    }

    pub(crate) fn register_recv(&mut self, cx: &Context<'_>) {
        match &self.recv_waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => self.recv_waker = Some(cx.waker().clone()),
        }
    }

    /// Registers a send waiting for room for `frame_len` bytes. A task
    /// polled again while it waits (the connection task polls its handler
    /// on each of its wake-ups, which a peer's pings cause) replaces its
    /// entry: the list holds one per waiting task, not one per poll.
    pub(crate) fn register_send(&mut self, frame_len: usize, cx: &Context<'_>) {
        let waker = cx.waker();
        match self
            .send_wakers
            .iter_mut()
            .find(|(_, w)| w.will_wake(waker))
        {
            Some(entry) => entry.0 = entry.0.min(frame_len),
            None => self.send_wakers.push((frame_len, waker.clone())),
        }
    }

    pub(crate) fn register_flush(&mut self, mark: u64, cx: &Context<'_>) {
        self.flush_wakers.push((mark, cx.waker().clone()));
    }

    pub(crate) fn register_close(&mut self, cx: &Context<'_>) {
        self.close_wakers.push(cx.waker().clone());
    }

    /// Wakes a waiting receiver. Returns true when it is the connection task
    /// itself, which then polls its handler again instead.
    pub(crate) fn wake_receiver(&mut self, cx: &Context<'_>) -> bool {
        match self.recv_waker.take() {
            Some(w) if w.will_wake(cx.waker()) => true,
            Some(w) => {
                w.wake();
                false
            }
            None => false,
        }
    }

    /// Wakes what bytes leaving the queue can unblock: sends whose message
    /// now fits and flushes whose mark was reached. Called by the
    /// connection task only.
    pub(crate) fn on_written(&mut self) {
        let driver = self.driver_waker.as_ref();
        let woken = &mut self.handler_woken;
        let mut i = 0;
        while i < self.send_wakers.len() {
            if self.conn.outbox_has_room_for(self.send_wakers[i].0) {
                let (_, w) = self.send_wakers.swap_remove(i);
                Self::wake_from_driver(driver, woken, w);
            } else {
                i += 1;
            }
        }
        let written = self.written;
        let done = self.transport_done;
        let mut i = 0;
        while i < self.flush_wakers.len() {
            if done || self.flush_wakers[i].0 <= written {
                let (_, w) = self.flush_wakers.swap_remove(i);
                Self::wake_from_driver(driver, woken, w);
            } else {
                i += 1;
            }
        }
    }

    /// Wakes everyone: the connection has ended or the transport is gone.
    /// Called by the connection task only.
    pub(crate) fn wake_all(&mut self) {
        let driver = self.driver_waker.as_ref();
        let woken = &mut self.handler_woken;
        let waiting = self.recv_waker.take().into_iter();
        for w in waiting
            .chain(self.send_wakers.drain(..).map(|(_, w)| w))
            .chain(self.close_wakers.drain(..))
        {
            Self::wake_from_driver(driver, woken, w);
        }
        self.on_written();
    }

    /// The termination, once known.
    pub(crate) fn termination(&self) -> Option<Termination> {
        self.conn
            .termination()
            .cloned()
            .or_else(|| self.transport_done.then_some(Termination::Abnormal))
    }

    pub(crate) fn now() -> Instant {
        tokio::time::Instant::now().into_std()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_proto::{Config, Role};
    use std::{
        sync::Arc,
        task::{Wake, Waker},
    };

    struct Task;

    impl Wake for Task {
        fn wake(self: Arc<Self>) {}
    }

    #[test]
    fn a_send_polled_again_while_it_waits_keeps_one_entry() {
        let conn = Connection::new(Config::new(Role::Server), std::time::Instant::now());
        let shared = Shared::new(conn);
        let mut inner = shared.lock();
        let waker = Waker::from(Arc::new(Task));
        let cx = Context::from_waker(&waker);
        for _ in 0..10_000 {
            inner.register_send(3 << 20, &cx);
        }
        inner.register_send(100, &cx);
        assert_eq!(inner.send_wakers.len(), 1);
        assert_eq!(inner.send_wakers[0].0, 100, "woken for the smaller send");
        // Another task waiting has its own entry.
        let other = Waker::from(Arc::new(Task));
        inner.register_send(3 << 20, &Context::from_waker(&other));
        assert_eq!(inner.send_wakers.len(), 2);
    }
}
