//! A minimal WebSocket client for load generation: a fixed handshake, frames
//! masked once ahead of time and sent as they are, and a reader that counts
//! frames and skips their payloads without copying or unmasking them.
//!
//! The reader accepts masked frames from the server too: the raw TCP echo
//! returns the client's own (masked) bytes.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, Interest},
    net::{TcpSocket, TcpStream},
};

/// The key of the handshake (RFC 6455 §1.3's example): the client is not
/// under test, every connection may use the same one.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The `Sec-WebSocket-Accept` that answers [`KEY`].
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The mask key of every frame the client sends.
pub const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Text frame opcode.
pub const OP_TEXT: u8 = 0x1;
/// Binary frame opcode.
pub const OP_BINARY: u8 = 0x2;
/// Close frame opcode.
pub const OP_CLOSE: u8 = 0x8;

/// Opens a TCP connection to `addr`, from `source` if given (a loopback
/// address of its own, so that many connections do not exhaust one
/// address's ephemeral ports), and completes the opening handshake for
/// `path`. Returns the stream and the bytes read past the response.
///
/// # Errors
/// Connection or handshake failure, or no answer within `timeout`.
pub async fn connect(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    timeout: Duration,
    extra_headers: &str,
) -> io::Result<(TcpStream, Vec<u8>)> {
    let connected = connect_negotiated(addr, source, path, timeout, extra_headers).await?;
    Ok((connected.stream, connected.leftover))
}

/// An open connection and what its handshake agreed.
#[derive(Debug)]
pub struct Connected {
    /// The socket.
    pub stream: TcpStream,
    /// The bytes read past the response.
    pub leftover: Vec<u8>,
    /// The response's `Sec-WebSocket-Extensions` value, if it had one.
    pub extensions: Option<String>,
}

/// As [`connect`], and returns the extensions the server accepted.
///
/// # Errors
/// As [`connect`].
pub async fn connect_negotiated(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    timeout: Duration,
    extra_headers: &str,
) -> io::Result<Connected> {
    tokio::time::timeout(timeout, connect_inner(addr, source, path, extra_headers))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))?
}

async fn connect_inner(
    addr: SocketAddr,
    source: Option<IpAddr>,
    path: &str,
    extra_headers: &str,
) -> io::Result<Connected> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let mut stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed during the handshake",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find(&buf, b"\r\n\r\n") {
            break pos + 4;
        }
        if buf.len() > 16 << 10 {
            return Err(io::Error::other("handshake response too long"));
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    if !head.starts_with("HTTP/1.1 101") {
        let status = head.lines().next().unwrap_or_default().to_owned();
        return Err(io::Error::other(format!("upgrade refused: {status}")));
    }
    let accepted = head.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("sec-websocket-accept") && value.trim() == ACCEPT
        })
    });
    if !accepted {
        return Err(io::Error::other("wrong or missing Sec-WebSocket-Accept"));
    }
    let extensions = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    });
    Ok(Connected {
        stream,
        leftover: buf[end..].to_vec(),
        extensions,
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Appends one whole client frame (FIN set, masked with [`MASK`]) to `out`.
pub fn push_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    push_frame_rsv1(out, opcode, false, payload);
}

/// As [`push_frame`], with RSV1 set if `rsv1` (a permessage-deflate
/// compressed message, RFC 7692 §6).
pub fn push_frame_rsv1(out: &mut Vec<u8>, opcode: u8, rsv1: bool, payload: &[u8]) {
    let rsv = if rsv1 { 0x40 } else { 0 };
    out.push(0x80 | rsv | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&MASK);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, byte) in out[start..].iter_mut().enumerate() {
        *byte ^= MASK[i % 4];
    }
}

/// A frame the reader finished.
#[derive(Debug, Clone, Copy)]
pub struct FrameInfo<'a> {
    /// Its opcode.
    pub opcode: u8,
    /// Whether FIN was set.
    pub fin: bool,
    /// Whether RSV1 was set (compressed, with permessage-deflate).
    pub rsv1: bool,
    /// Its payload length.
    pub len: u64,
    /// The payload, unmasked, for frames of at most [`PEEK_MAX`] bytes (or
    /// the reader's own bound, [`FrameReader::with_peek`]); larger payloads
    /// are skipped unread.
    pub payload: Option<&'a [u8]>,
}

/// Payloads up to this size are handed over whole; larger ones are skipped.
pub const PEEK_MAX: usize = 4096;

/// Reads frames from a stream into a fixed buffer and finds their
/// boundaries.
#[derive(Debug)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Payload bytes of the current large frame still to skip.
    skip: u64,
    /// The large frame being skipped: opcode, FIN, RSV1, length.
    skipping: Option<(u8, bool, bool, u64)>,
    /// Payloads up to this size are handed over whole.
    peek_max: usize,
}

impl FrameReader {
    /// A reader with a `capacity`-byte buffer (at least 2 × [`PEEK_MAX`])
    /// that starts with `leftover`, the bytes read past the handshake.
    pub fn new(capacity: usize, leftover: &[u8]) -> Self {
        Self::with_peek(capacity, leftover, PEEK_MAX)
    }

    /// As [`FrameReader::new`], handing over payloads of up to `peek_max`
    /// bytes whole (the buffer is at least twice that): for a client that
    /// must read large messages, such as a chat room's member list.
    pub fn with_peek(capacity: usize, leftover: &[u8], peek_max: usize) -> Self {
        let capacity = capacity.max(2 * peek_max + 16).max(leftover.len());
        let mut buf = vec![0u8; capacity];
        buf[..leftover.len()].copy_from_slice(leftover);
        FrameReader {
            buf,
            start: 0,
            end: leftover.len(),
            skip: 0,
            skipping: None,
            peek_max,
        }
    }

    /// Parses bytes that came some other way than a socket (an HTTP/2
    /// stream's DATA), as [`FrameReader::parse`] does after a read: as much
    /// as fits at a time, then the frames it completed.
    ///
    /// # Errors
    /// As [`FrameReader::parse`].
    pub fn feed(
        &mut self,
        mut data: &[u8],
        mut on_frame: impl FnMut(FrameInfo<'_>),
    ) -> io::Result<()> {
        while !data.is_empty() {
            if self.end == self.buf.len() {
                self.compact();
            }
            // Never empty after compacting: the buffer holds two peeked
            // frames and parse leaves at most one incomplete.
            let n = data.len().min(self.buf.len() - self.end);
            self.buf[self.end..self.end + n].copy_from_slice(&data[..n]);
            self.end += n;
            data = &data[n..];
            self.parse(&mut on_frame)?;
        }
        Ok(())
    }

    /// Reads what the socket has without waiting (`try_read`).
    ///
    /// A read shorter than the room it had drained the socket: readiness is
    /// cleared then, as tokio's own `poll_read` does, so that the next poll
    /// waits for new data instead of costing a read that finds nothing.
    ///
    /// # Errors
    /// As `TcpStream::try_read`, `WouldBlock` included.
    pub fn try_read(&mut self, stream: &TcpStream) -> io::Result<usize> {
        if self.end == self.buf.len() {
            self.compact();
        }
        let room = &mut self.buf[self.end..];
        let space = room.len();
        let mut drained = 0;
        let result = stream.try_io(Interest::READABLE, || match stream.try_read(room) {
            Ok(n) if n > 0 && n < space => {
                drained = n;
                Err(io::ErrorKind::WouldBlock.into())
            }
            other => other,
        });
        let n = match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && drained > 0 => drained,
            other => other?,
        };
        self.end += n;
        Ok(n)
    }

    /// Reads, waiting for data.
    ///
    /// # Errors
    /// As `AsyncReadExt::read`.
    pub async fn read<R: AsyncReadExt + Unpin>(&mut self, stream: &mut R) -> io::Result<usize> {
        if self.end == self.buf.len() {
            self.compact();
        }
        let n = stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Calls `on_frame` for every frame completed by the bytes read so far.
    ///
    /// # Errors
    /// A frame header that no server may send (a 64-bit length with the top
    /// bit set).
    pub fn parse(&mut self, mut on_frame: impl FnMut(FrameInfo<'_>)) -> io::Result<()> {
        loop {
            if self.skip > 0 {
                let available = (self.end - self.start) as u64;
                let n = available.min(self.skip);
                self.start += n as usize;
                self.skip -= n;
                if self.skip > 0 {
                    break;
                }
                if let Some((opcode, fin, rsv1, len)) = self.skipping.take() {
                    on_frame(FrameInfo {
                        opcode,
                        fin,
                        rsv1,
                        len,
                        payload: None,
                    });
                }
                continue;
            }
            let data = &self.buf[self.start..self.end];
            let Some((opcode, fin, len, mask, head)) = parse_header(data)? else {
                break;
            };
            let rsv1 = data[0] & 0x40 != 0;
            if len <= self.peek_max as u64 {
                let total = head + len as usize;
                if data.len() < total {
                    break;
                }
                let payload = &mut self.buf[self.start + head..self.start + total];
                if let Some(key) = mask {
                    for (i, byte) in payload.iter_mut().enumerate() {
                        *byte ^= key[i % 4];
                    }
                }
                on_frame(FrameInfo {
                    opcode,
                    fin,
                    rsv1,
                    len,
                    payload: Some(payload),
                });
                self.start += total;
            } else {
                self.start += head;
                self.skip = len;
                self.skipping = Some((opcode, fin, rsv1, len));
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < self.peek_max + 16 {
            self.compact();
        }
        Ok(())
    }

    fn compact(&mut self) {
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
    }
}

/// A frame header: (opcode, fin, payload length, mask, header length), or
/// `None` if incomplete.
type Header = (u8, bool, u64, Option<[u8; 4]>, usize);

fn parse_header(data: &[u8]) -> io::Result<Option<Header>> {
    let [b0, b1, ..] = *data else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let opcode = b0 & 0x0f;
    let masked = b1 & 0x80 != 0;
    let (len, mut head) = match b1 & 0x7f {
        126 => {
            let Some(bytes) = data.get(2..4) else {
                return Ok(None);
            };
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let Some(bytes) = data.get(2..10) else {
                return Ok(None);
            };
            let len = u64::from_be_bytes(bytes.try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(io::Error::other("frame length with the top bit set"));
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        let Some(key) = data.get(head..head + 4) else {
            return Ok(None);
        };
        head += 4;
        Some(key.try_into().expect("4 bytes"))
    } else {
        None
    };
    Ok(Some((opcode, fin, len, mask, head)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_every_size_are_found_across_split_reads() {
        let mut wire = Vec::new();
        let sizes = [0usize, 20, 125, 126, 4096, 4097, 70_000, 1 << 20];
        for &size in &sizes {
            push_frame(&mut wire, OP_BINARY, &vec![7u8; size]);
        }
        for step in [1usize, 3, 1000, 65_536, usize::MAX] {
            let mut reader = FrameReader::new(64 << 10, &[]);
            let mut found = Vec::new();
            let mut fed = 0;
            while fed < wire.len() {
                let room = reader.buf.len() - reader.end;
                let n = step.min(wire.len() - fed).min(room);
                reader.buf[reader.end..reader.end + n].copy_from_slice(&wire[fed..fed + n]);
                reader.end += n;
                fed += n;
                reader
                    .parse(|f| {
                        if let Some(p) = f.payload {
                            assert!(p.iter().all(|&b| b == 7));
                        }
                        found.push(f.len as usize);
                    })
                    .unwrap();
            }
            assert_eq!(found, sizes, "step {step}");
        }
    }

    #[test]
    fn fed_bytes_give_the_same_frames_as_reads() {
        let mut wire = Vec::new();
        let sizes = [0usize, 20, 4096, 4097, 70_000, 300_000];
        for &size in &sizes {
            push_frame(&mut wire, OP_TEXT, &vec![b'x'; size]);
        }
        for step in [1usize, 7, 4096, 100_000, wire.len()] {
            let mut reader = FrameReader::new(64 << 10, &[]);
            let mut found = Vec::new();
            for chunk in wire.chunks(step) {
                reader
                    .feed(chunk, |f| {
                        if let Some(p) = f.payload {
                            assert!(p.iter().all(|&b| b == b'x'));
                        }
                        found.push(f.len as usize);
                    })
                    .unwrap();
            }
            assert_eq!(found, sizes, "step {step}");
        }
    }
}
