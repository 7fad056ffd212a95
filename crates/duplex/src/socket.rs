//! The socket under a connection task.
//!
//! hyper hands over an upgraded connection as a boxed `Upgraded`. When it is
//! a plain TCP stream (the usual case) we take the stream back: reads then
//! wait for readiness before any buffer exists, so an idle connection holds
//! no read buffer at all, and every read and write skips a dynamic dispatch.

use std::{
    cell::RefCell,
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Bytes, BytesMut};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite, Interest, ReadBuf},
    net::TcpStream,
};

use crate::write_deadline::WriteDeadline;

/// The size of a worker thread's scratch read buffer.
pub(crate) const SCRATCH_LEN: usize = 4096;

thread_local! {
    /// Where small reads land before they are copied out; see
    /// [`Socket::poll_read_buf`].
    static SCRATCH: RefCell<[u8; SCRATCH_LEN]> = const { RefCell::new([0; SCRATCH_LEN]) };
}

/// A connection's transport.
pub(crate) enum Socket {
    /// A TCP stream taken back from hyper.
    Tcp(TcpStream),
    /// Anything else: TLS, a connection hyper upgraded over another
    /// transport.
    Other(Pin<Box<dyn Io>>),
}

/// A byte stream a connection can run over.
pub(crate) trait Io: AsyncRead + AsyncWrite + Send {}

impl<T: AsyncRead + AsyncWrite + Send> Io for T {}

impl Socket {
    /// The transport of an upgraded connection, and the bytes hyper read
    /// past the request (the first frames, if the client did not wait).
    pub(crate) fn from_upgraded(upgraded: Upgraded) -> (Socket, Bytes) {
        // `App` serves through a `WriteDeadline` (the session's own write
        // timeout replaces it); other servers hand the bare stream.
        let upgraded = match upgraded.downcast::<TokioIo<WriteDeadline<TcpStream>>>() {
            Ok(parts) => {
                return (
                    Socket::Tcp(parts.io.into_inner().into_inner()),
                    parts.read_buf,
                );
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Socket::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => (
                Socket::Other(Box::pin(TokioIo::new(upgraded))),
                Bytes::new(),
            ),
        }
    }

    /// Reads up to `chunk` bytes (at least) and appends them to `buf`.
    ///
    /// Over TCP no memory is reserved before data is there. A read of up
    /// to [`SCRATCH_LEN`] bytes into an empty `buf` goes through the
    /// worker thread's scratch buffer and is copied into an allocation of
    /// its own size: small messages then cost a small allocation instead of
    /// a 4 KiB one (measured: the 4 KiB allocation and its free were a
    /// seventh of the instructions of a small echo), and a message kept by
    /// the handler pins only its own bytes. Larger reads, and reads that
    /// continue a partial frame, go straight into `buf`. Other transports
    /// need the room before they are polled.
    pub(crate) fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Socket::Tcp(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                // A partial frame is continued in place: through the scratch
                // buffer it would be copied again on every read.
                let through_scratch = buf.is_empty() && chunk <= SCRATCH_LEN;
                let room = if through_scratch {
                    SCRATCH_LEN
                } else {
                    buf.reserve(chunk);
                    buf.capacity() - buf.len()
                };
                let mut read = None;
                // A read that does not fill the room has drained the socket:
                // reporting it as WouldBlock inside `try_io` clears the
                // readiness seen before the read (as tokio's own `poll_read`
                // does), which saves the next read's EAGAIN. Clearing it
                // after the read instead could lose an edge that came in
                // between.
                let result = tcp.try_io(Interest::READABLE, || {
                    let n = if through_scratch {
                        SCRATCH.with_borrow_mut(|scratch| {
                            let n = tcp.try_read(&mut scratch[..])?;
                            *buf = BytesMut::from(&scratch[..n]);
                            Ok::<_, io::Error>(n)
                        })?
                    } else {
                        tcp.try_read_buf(buf)?
                    };
                    read = Some(n);
                    if n > 0 && n < room {
                        Err(io::ErrorKind::WouldBlock.into())
                    } else {
                        Ok(n)
                    }
                });
                match (result, read) {
                    (Ok(n), _) => return Poll::Ready(Ok(n)),
                    (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => {
                        return Poll::Ready(Ok(n));
                    }
                    // Stale readiness, now cleared: wait for the next edge.
                    (Err(e), None) if e.kind() == io::ErrorKind::WouldBlock => {}
                    (Err(e), _) => return Poll::Ready(Err(e)),
                }
            },
            Socket::Other(io) => {
                buf.reserve(chunk);
                tokio_util::io::poll_read_buf(io.as_mut(), cx, buf)
            }
        }
    }

    /// Whether the peer of a TCP stream reset it or ended it (its FIN, even
    /// behind bytes not read yet), found without taking a byte: how a connection that may
    /// not read (the memory budget stopped it) still lets go of a peer
    /// that left. When nothing is there the task is woken at the next
    /// readiness; when unread bytes are, it is not, and the caller looks
    /// again later. Always false for other transports.
    pub(crate) fn peer_left(&mut self, cx: &mut Context<'_>) -> bool {
        let Socket::Tcp(tcp) = self else {
            return false;
        };
        // A FIN behind unread bytes: the kernel says so (EPOLLRDHUP) even
        // though a peek would see the bytes first.
        let ready = std::pin::pin!(tcp.ready(Interest::READABLE));
        if let Poll::Ready(Ok(ready)) = std::future::Future::poll(ready, cx)
            && (ready.is_read_closed() || ready.is_error())
        {
            return true;
        }
        let mut byte = [0u8; 1];
        let mut peeked = ReadBuf::new(&mut byte);
        match tcp.poll_peek(cx, &mut peeked) {
            Poll::Ready(Ok(n)) => n == 0,
            Poll::Ready(Err(_)) => true,
            Poll::Pending => false,
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Socket::Other(io) => io.as_mut().poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Socket {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(tcp) => Pin::new(tcp).poll_write(cx, data),
            Socket::Other(io) => io.as_mut().poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Socket::Tcp(tcp) => Pin::new(tcp).poll_write_vectored(cx, slices),
            Socket::Other(io) => io.as_mut().poll_write_vectored(cx, slices),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Socket::Tcp(tcp) => tcp.is_write_vectored(),
            Socket::Other(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(tcp) => Pin::new(tcp).poll_flush(cx),
            Socket::Other(io) => io.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Socket::Tcp(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Socket::Other(io) => io.as_mut().poll_shutdown(cx),
        }
    }
}
