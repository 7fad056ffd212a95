//! A write timeout for HTTP connections before they become sessions.
//!
//! hyper has a timeout for reading a request head but none for writing a
//! response: a client that pipelines requests and never reads the answers
//! would hold its connection, and the answers, for ever. [`WriteDeadline`]
//! wraps the accepted stream and fails a write that has made no progress
//! for the write timeout, which ends the connection. It costs nothing while
//! the socket takes what is written: a timer exists only while a write
//! waits.
//!
//! An upgraded HTTP/1.1 connection over TCP is unwrapped again
//! (`socket.rs`): the session's own write timeout takes over. Over TLS the
//! wrapper stays inside the boxed stream, with the same timeout.

use std::{
    future::Future,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// `io` whose writes fail with `TimedOut` after `timeout` without progress.
pub(crate) struct WriteDeadline<I> {
    io: I,
    timeout: Duration,
    /// Armed when a write first waits, disarmed by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<I> WriteDeadline<I> {
    pub(crate) fn new(io: I, timeout: Duration) -> Self {
        WriteDeadline {
            io,
            timeout,
            stalled: None,
        }
    }

    pub(crate) fn into_inner(self) -> I {
        self.io
    }

    pub(crate) fn get_mut(&mut self) -> &mut I {
        &mut self.io
    }

    /// What to answer for a write that got `polled` from the stream.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.stalled = None;
                Poll::Ready(result)
            }
            Poll::Pending => {
                let timeout = self.timeout;
                let stalled = self.stalled.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + timeout))
                });
                ready!(stalled.as_mut().poll(cx));
                counter!("duplex_write_timeouts_total").increment(1);
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer took no byte of the response within the write timeout",
                )))
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.watch(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.watch(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const TIMEOUT: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn a_write_nobody_reads_fails_after_the_timeout_and_not_before() {
        let (ours, _theirs) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(ours, TIMEOUT);
        let start = Instant::now();
        let err = io.write_all(&[0; 1024]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(start.elapsed() >= TIMEOUT, "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn progress_rearms_the_timer() {
        let (ours, mut theirs) = tokio::io::duplex(64);
        let mut io = WriteDeadline::new(ours, TIMEOUT);
        let reader = tokio::spawn(async move {
            let mut buf = [0; 64];
            // Takes 64 bytes every 2/3 of the timeout: the whole write
            // takes longer than the timeout, but never stalls that long.
            for _ in 0..4 {
                tokio::time::sleep(TIMEOUT * 2 / 3).await;
                theirs.read_exact(&mut buf).await.unwrap();
            }
            theirs
        });
        let start = Instant::now();
        io.write_all(&[0; 64 * 4]).await.unwrap();
        assert!(start.elapsed() > TIMEOUT);
        drop(reader.await.unwrap());
    }
}
