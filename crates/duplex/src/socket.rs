//! The socket under a connection task.
//!
//! hyper hands over an upgraded connection as a boxed `Upgraded`. When it is
//! a plain TCP stream (the usual case) we take the stream back: reads then
//! wait for readiness before any buffer exists, so an idle connection holds
//! no read buffer at all, and every read and write skips a dynamic dispatch.

use std::{
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
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (Socket::Tcp(parts.io.into_inner()), parts.read_buf),
            Err(upgraded) => (
                Socket::Other(Box::pin(TokioIo::new(upgraded))),
                Bytes::new(),
            ),
        }
    }

    /// Reads into `buf` with room for at least `chunk` bytes, reserved only
    /// once data is there (for TCP; other transports need the room before
    /// they are polled).
    pub(crate) fn poll_read_buf(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Socket::Tcp(tcp) => loop {
                ready!(tcp.poll_read_ready(cx))?;
                buf.reserve(chunk);
                let room = buf.capacity() - buf.len();
                let mut read = None;
                // A read that does not fill the room has drained the socket:
                // reporting it as WouldBlock inside `try_io` clears the
                // readiness seen before the read (as tokio's own `poll_read`
                // does), which saves the next read's EAGAIN. Clearing it
                // after the read instead could lose an edge that came in
                // between.
                let result = tcp.try_io(Interest::READABLE, || {
                    let n = tcp.try_read_buf(buf)?;
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
