//! What one HTTP/2 connection's streams hold, and when the connection
//! should end because of it.
//!
//! HTTP/2 lets a peer keep a connection open with no request at all (it
//! answers our PINGs), and keep responses in our memory by granting no
//! flow-control window (`SETTINGS_INITIAL_WINDOW_SIZE` 0): hyper then
//! holds each response, body included, until the window opens. The
//! [`Ledger`] counts the open streams and the responses not yet handed
//! over, so that the connection task can:
//! - close a connection with no open stream after the idle timeout (as
//!   HTTP/1.1's kept-alive connections are);
//! - drop a connection one of whose responses made no progress for the
//!   write timeout while its body had more to give (the peer, not the
//!   application, is what it waits for);
//! - answer 503 rather than build a response while the connection holds
//!   [`MAX_UNSENT`] bytes of responses already.
//!
//! WebSocket streams (RFC 8441) count as open for the session's life: the
//! request's extensions, where the [`OpenStream`] mark lives, stay with
//! the session's `Request`.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    task::{Context, Poll},
    time::Duration,
};

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::{sync::Notify, time::Instant};

/// The most bytes of responses one HTTP/2 connection may hold that its
/// peer has not taken; a request past it gets 503, and so does a response
/// that would pass it while others wait.
pub(crate) const MAX_UNSENT: usize = 256 << 10;

/// Why the connection should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// No open stream for the idle timeout.
    Idle,
    /// A response made no progress for the write timeout.
    Stalled,
}

/// The streams of one connection.
#[derive(Debug)]
pub(crate) struct Ledger {
    state: Mutex<State>,
    /// Told when the earliest deadline may have come closer.
    changed: Notify,
}

#[derive(Debug)]
struct State {
    open: usize,
    idle_since: Instant,
    next_id: u64,
    responses: HashMap<u64, Response>,
    unsent: usize,
}

#[derive(Debug)]
struct Response {
    /// The body's bytes not yet handed over: its whole length when known
    /// up front, else the chunk it last gave.
    bytes: usize,
    /// The length was not known up front: chunks are counted as they come.
    streamed: bool,
    progressed: Instant,
    /// The body's last poll was pending: the application, not the peer,
    /// has the next move.
    waiting_on_app: bool,
}

/// Marks a stream open while it lives (in the request's extensions, and
/// with the response body).
#[derive(Debug)]
pub(crate) struct OpenStream(Arc<Ledger>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut state = self.0.lock();
        state.open -= 1;
        if state.open == 0 {
            state.idle_since = Instant::now();
            drop(state);
            self.0.changed.notify_one();
        }
    }
}

impl Ledger {
    /// A connection accepted at `accepted`, idle since then.
    pub(crate) fn new(accepted: Instant) -> Arc<Self> {
        Arc::new(Ledger {
            state: Mutex::new(State {
                open: 0,
                idle_since: accepted,
                next_id: 0,
                responses: HashMap::new(),
                unsent: 0,
            }),
            changed: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A stream has opened.
    pub(crate) fn open(self: &Arc<Self>) -> Arc<OpenStream> {
        self.lock().open += 1;
        Arc::new(OpenStream(Arc::clone(self)))
    }

    /// Whether the connection already holds [`MAX_UNSENT`] bytes.
    pub(crate) fn full(&self) -> bool {
        self.lock().unsent >= MAX_UNSENT
    }

    /// The response to send for `response`: itself with its body tracked,
    /// or 503 when it would take the connection past [`MAX_UNSENT`].
    pub(crate) fn track(
        self: &Arc<Self>,
        response: http::Response<Body>,
        open: Arc<OpenStream>,
    ) -> http::Response<Body> {
        use http_body::Body as _;
        if response.body().is_end_stream() {
            return response;
        }
        let exact = response.body().size_hint().exact();
        let bytes = exact.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX));
        let id = {
            let mut state = self.lock();
            // One response larger than the bound still goes out alone.
            if state.unsent > 0 && state.unsent.saturating_add(bytes) > MAX_UNSENT {
                drop(state);
                counter!("duplex_http2_responses_refused_total").increment(1);
                return busy();
            }
            state.unsent += bytes;
            let id = state.next_id;
            state.next_id += 1;
            state.responses.insert(
                id,
                Response {
                    bytes,
                    streamed: exact.is_none(),
                    progressed: Instant::now(),
                    waiting_on_app: false,
                },
            );
            id
        };
        self.changed.notify_one();
        response.map(|inner| {
            Body::new(TrackedBody {
                inner,
                ledger: Arc::clone(self),
                id,
                _open: open,
                rest: Bytes::new(),
            })
        })
    }

    /// Resolves when the connection should end, and why.
    pub(crate) async fn watch(&self, idle_timeout: Duration, write_timeout: Duration) -> Verdict {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let state = self.lock();
                // A deadline past what `Instant` can hold is never.
                let idle = (state.open == 0)
                    .then(|| state.idle_since.checked_add(idle_timeout))
                    .flatten()
                    .map(|at| (at, Verdict::Idle));
                let stalled = state
                    .responses
                    .values()
                    .filter(|r| !r.waiting_on_app)
                    .filter_map(|r| r.progressed.checked_add(write_timeout))
                    .min()
                    .map(|at| (at, Verdict::Stalled));
                idle.into_iter().chain(stalled).min_by_key(|(at, _)| *at)
            };
            match next {
                None => notified.await,
                Some((at, verdict)) if at <= Instant::now() => return verdict,
                // Progress since only moves a deadline later: on waking,
                // the loop looks again.
                Some((at, _)) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(at) => {}
                        () = notified => {}
                    }
                }
            }
        }
    }
}

/// The answer for a request the connection cannot take now.
pub(crate) fn busy() -> http::Response<Body> {
    http::Response::builder()
        .status(http::StatusCode::SERVICE_UNAVAILABLE)
        .header(http::header::RETRY_AFTER, "1")
        .body(Body::empty())
        .unwrap_or_default()
}

/// A response body whose progress the ledger follows.
struct TrackedBody {
    inner: Body,
    ledger: Arc<Ledger>,
    id: u64,
    _open: Arc<OpenStream>,
    rest: Bytes,
}

/// The largest piece of a response body handed to hyper at once. hyper
/// gives h2 a piece as soon as the stream has any window and drops the
/// body once it has the last one: whole, a body granted one byte of
/// window would leave the ledger while h2 still held all of it. In pieces
/// (the last byte alone), at most two wait in hyper and h2 per stream, the
/// body stays counted until all but one byte has gone, and each piece sent
/// is progress.
const CHUNK: usize = 16 * 1024;

impl TrackedBody {
    /// Counts a chunk of `len` bytes from a body of unknown length in
    /// place of its last one; false if that would take the connection past
    /// [`MAX_UNSENT`] while others hold bytes too.
    fn count_chunk(&self, len: usize) -> bool {
        let mut state = self.ledger.lock();
        let unsent = state.unsent;
        let Some(response) = state.responses.get_mut(&self.id) else {
            return true;
        };
        if !response.streamed {
            return true;
        }
        let others = unsent - response.bytes;
        if others > 0 && others.saturating_add(len) > MAX_UNSENT {
            return false;
        }
        response.bytes = len;
        state.unsent = others + len;
        true
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let piece = if self.rest.is_empty() {
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                    let data = frame.into_data().unwrap_or_default();
                    if !self.count_chunk(data.len()) {
                        // The connection holds its bound already: this
                        // stream is reset rather than kept waiting.
                        counter!("duplex_http2_responses_refused_total").increment(1);
                        return Poll::Ready(Some(Err(axum::Error::new(
                            "HTTP/2 connection holds 256 KiB of unsent responses",
                        ))));
                    }
                    self.rest = data;
                    None
                }
                other => Some(other),
            }
        } else {
            None
        };
        let polled = match piece {
            Some(other) => other,
            None => {
                let mut n = self.rest.len().min(CHUNK);
                // The body's last byte goes alone: hyper hands h2 a piece
                // only once the one before has left, so the body, and its
                // place in the ledger, stays until all but that byte has
                // been sent, instead of ending while h2 still holds a piece
                // the peer never takes.
                if n == self.rest.len() && n > 1 && self.inner.is_end_stream() {
                    n -= 1;
                }
                let head = self.rest.split_to(n);
                Poll::Ready(Some(Ok(Frame::data(head))))
            }
        };
        // A body the application had not filled yet now waits on the
        // peer: the watcher, which ignored it, must look again.
        let mut woke = false;
        {
            let mut state = self.ledger.lock();
            if let Some(response) = state.responses.get_mut(&self.id) {
                woke = response.waiting_on_app && polled.is_ready();
                response.waiting_on_app = polled.is_pending();
                if polled.is_ready() {
                    response.progressed = Instant::now();
                }
            }
        }
        if woke {
            self.ledger.changed.notify_one();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let extra = self.rest.len() as u64;
        // The upper bound first: a lower one above it panics.
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + extra);
        }
        hint.set_lower(hint.lower() + extra);
        hint
    }
}

impl Drop for TrackedBody {
    fn drop(&mut self) {
        let mut state = self.ledger.lock();
        if let Some(response) = state.responses.remove(&self.id) {
            state.unsent -= response.bytes;
        }
    }
}

/// `inner` with every request's stream counted in `ledger`.
pub(crate) struct Tracked<S> {
    pub(crate) inner: S,
    pub(crate) ledger: Arc<Ledger>,
}

impl<S> hyper::service::Service<http::Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<
            http::Request<Incoming>,
            Response = http::Response<Body>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<http::Response<Body>, Infallible>> + Send>>;

    fn call(&self, mut request: http::Request<Incoming>) -> Self::Future {
        if self.ledger.full() {
            counter!("duplex_http2_responses_refused_total").increment(1);
            return Box::pin(std::future::ready(Ok(busy())));
        }
        let open = self.ledger.open();
        request.extensions_mut().insert(Arc::clone(&open));
        let ledger = Arc::clone(&self.ledger);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(ledger.track(response, open))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_millis(200);
    const WRITE: Duration = Duration::from_millis(400);

    fn ok(body: &'static str) -> http::Response<Body> {
        http::Response::new(Body::from(body))
    }

    #[tokio::test]
    async fn a_connection_without_streams_is_idle_after_the_idle_timeout() {
        let ledger = Ledger::new(Instant::now());
        let start = Instant::now();
        assert_eq!(ledger.watch(IDLE, WRITE).await, Verdict::Idle);
        assert!(start.elapsed() >= IDLE);
        // An open stream (a WebSocket) keeps it; its end starts the clock.
        let open = ledger.open();
        let closed_at = Instant::now() + IDLE * 2;
        let (verdict, ()) = tokio::join!(ledger.watch(IDLE, WRITE), async {
            tokio::time::sleep_until(closed_at).await;
            drop(open);
        });
        assert_eq!(verdict, Verdict::Idle);
        assert!(Instant::now() >= closed_at + IDLE);
    }

    #[tokio::test]
    async fn a_response_never_taken_stalls_after_the_write_timeout() {
        let ledger = Ledger::new(Instant::now());
        let open = ledger.open();
        let response = ledger.track(ok("metrics"), open);
        let start = Instant::now();
        assert_eq!(ledger.watch(IDLE, WRITE).await, Verdict::Stalled);
        assert!(start.elapsed() >= WRITE);
        drop(response);
        assert_eq!(ledger.lock().unsent, 0);
        assert_eq!(ledger.lock().open, 0);
    }

    #[test]
    fn responses_past_the_bound_get_503_and_one_large_one_goes_alone() {
        let ledger = Ledger::new(Instant::now());
        let big = || http::Response::new(Body::from(vec![0u8; MAX_UNSENT * 2 / 3]));
        let first = ledger.track(big(), ledger.open());
        assert_eq!(first.status(), http::StatusCode::OK);
        let second = ledger.track(big(), ledger.open());
        assert_eq!(second.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        drop(first);
        let huge = http::Response::new(Body::from(vec![0u8; MAX_UNSENT * 2]));
        let alone = ledger.track(huge, ledger.open());
        assert_eq!(alone.status(), http::StatusCode::OK);
        assert!(ledger.full());
    }
}
