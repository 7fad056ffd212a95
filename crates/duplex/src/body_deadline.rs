//! A deadline on request bodies that stop arriving.
//!
//! A handler that reads a request body waits for as long as the peer takes
//! to send it: a peer that starts a body and never finishes it would hold
//! the handler, and over HTTP/2 up to 256 of them per connection, for
//! ever. [`IdleBody`] fails the body when no frame of it has come for the
//! header read timeout, so the handler's extractor answers (axum: 400) and
//! the stream ends. A timer exists only while the body waits.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::BoxError;

/// A request body that fails after `timeout` without a frame.
pub(crate) struct IdleBody {
    inner: Incoming,
    timeout: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
}

impl IdleBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration) -> Self {
        IdleBody {
            inner,
            timeout,
            waiting: None,
        }
    }
}

impl http_body::Body for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = None;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
            Poll::Pending => {
                let timeout = this.timeout;
                let waiting = this.waiting.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + timeout))
                });
                ready!(waiting.as_mut().poll(cx));
                tracing::debug!("request body idle for {timeout:?}; failed");
                Poll::Ready(Some(Err(
                    "no request body frame within the header read timeout".into(),
                )))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
