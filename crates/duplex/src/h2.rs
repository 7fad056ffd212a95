//! HTTP/2 next to HTTP/1.1 on one listener, and WebSockets over HTTP/2
//! streams (RFC 8441).
//!
//! A connection is told apart before hyper sees it: over TLS by the ALPN
//! the handshake agreed, in clear by peeking for the HTTP/2 connection
//! preface (prior knowledge, RFC 9113 §3.3). Peeking consumes nothing, so
//! an HTTP/1.1 connection still reaches hyper as the bare `TcpStream` and
//! an upgraded one is taken back as such (`socket.rs`). hyper-util's
//! automatic builder would read the preface into a rewind buffer and wrap
//! the stream, losing that.
//!
//! An HTTP/2 connection advertises `SETTINGS_ENABLE_CONNECT_PROTOCOL`
//! (RFC 8441 §3); each extended CONNECT with `:protocol websocket` (§4) is
//! a request to the same routes, checked by [`accept`] instead of the
//! HTTP/1.1 checks, answered 200 (§5), and its stream becomes the session's
//! socket through hyper's upgrade, so that every session of the connection
//! is its own task sharing the one TCP connection.

use std::{convert::Infallible, future::Future, io, time::Duration};

use axum::body::Body;
use http::{HeaderMap, HeaderValue, Method, header};
use hyper::{body::Incoming, ext::Protocol, server::conn::http1, server::conn::http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_util::sync::CancellationToken;

use crate::{
    handshake::{Accepted, Origins, Rejection, choose_protocol},
    stream_ledger::{Ledger, Tracked, Verdict},
    write_deadline::WriteDeadline,
};

/// The client connection preface of HTTP/2 (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The `:protocol` of a WebSocket over HTTP/2 (RFC 8441 §4).
pub(crate) const WEBSOCKET: &str = "websocket";

/// ALPN of [`App::serve_tls`](crate::App::serve_tls) when the rustls
/// configuration names none: HTTP/2 first, as browsers prefer.
#[cfg(feature = "tls")]
pub(crate) const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// How many bytes of the preface tell HTTP/2 from HTTP/1.1: "PRI ".
const SNIFFED: usize = 4;

/// The longest pause between two looks at a split preface.
const MAX_PREFACE_WAIT: Duration = Duration::from_millis(500);

/// How long an idle HTTP/2 connection's GOAWAY may take to leave.
const IDLE_GOAWAY_WAIT: Duration = Duration::from_secs(1);

/// Streams one HTTP/2 connection may have open at once: WebSockets and
/// plain requests together.
const MAX_CONCURRENT_STREAMS: u32 = 256;

/// The flow-control window of one stream: what a peer may send on it
/// before the server has read it. 64 KiB, RFC 9113's initial 65,535 bytes
/// rounded up: enough for a WebSocket message a round trip on a LAN.
const STREAM_WINDOW: u32 = 64 * 1024;

/// The window of one whole connection: what all its streams may have sent
/// and the server not read.
const CONNECTION_WINDOW: u32 = 256 * 1024;

/// A connection the server accepted, which can say whether its client
/// speaks HTTP/2.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether to serve the connection with HTTP/2; an error or EOF ends
    /// it.
    fn speaks_h2(&mut self) -> impl Future<Output = io::Result<bool>> + Send;
}

/// What the first bytes of a clear-text connection say of its protocol.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preface {
    /// Not the HTTP/2 preface: HTTP/1.1.
    Http1,
    /// The HTTP/2 preface, or enough of it to tell ("PRI " begins no
    /// HTTP/1.1 request: RFC 9113 §3.4 reserved the method for it).
    Http2,
    /// Too few bytes to tell (none, "P", "PR" or "PRI").
    NeedMore,
}

/// Tells HTTP/2 prior knowledge from HTTP/1.1 by the bytes read so far.
/// A verdict other than [`Preface::NeedMore`] stays the same whatever
/// bytes follow. Public for the fuzz target only.
#[doc(hidden)]
pub fn sniff_preface(bytes: &[u8]) -> Preface {
    // Four bytes decide: what follows is HTTP/2's to check (a bad rest of
    // the preface is its connection error), so the verdict never changes.
    let n = bytes.len().min(SNIFFED);
    if bytes[..n] != PREFACE[..n] {
        Preface::Http1
    } else if n == SNIFFED {
        Preface::Http2
    } else {
        Preface::NeedMore
    }
}

impl Transport for TcpStream {
    async fn speaks_h2(&mut self) -> io::Result<bool> {
        let mut buf = [0u8; SNIFFED];
        // A peek returns at once with the bytes already there, so waiting
        // for the rest of a split preface means peeking again later; the
        // wait doubles each time, so that a peer that sends one byte and
        // stops costs a few wake-ups a second, not a spinning task.
        let mut wait = Duration::from_millis(1);
        loop {
            let n = self.peek(&mut buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            match sniff_preface(&buf[..n]) {
                Preface::Http1 => return Ok(false),
                // HTTP/2's own reader takes the rest as it comes.
                Preface::Http2 => return Ok(true),
                Preface::NeedMore => {}
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(MAX_PREFACE_WAIT);
        }
    }
}

impl<I: Transport> Transport for WriteDeadline<I> {
    fn speaks_h2(&mut self) -> impl Future<Output = io::Result<bool>> + Send {
        self.get_mut().speaks_h2()
    }
}

#[cfg(feature = "tls")]
impl Transport for tokio_rustls::server::TlsStream<TcpStream> {
    async fn speaks_h2(&mut self) -> io::Result<bool> {
        Ok(self.get_ref().1.alpn_protocol() == Some(b"h2"))
    }
}

/// The rustls configuration with [`ALPN`] when it names no protocol.
#[cfg(feature = "tls")]
pub(crate) fn with_alpn(
    config: std::sync::Arc<tokio_rustls::rustls::ServerConfig>,
) -> std::sync::Arc<tokio_rustls::rustls::ServerConfig> {
    if !config.alpn_protocols.is_empty() {
        return config;
    }
    let mut with_alpn = (*config).clone();
    with_alpn.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    std::sync::Arc::new(with_alpn)
}

/// hyper's HTTP/1.1 and HTTP/2 connection builders, configured once for
/// every connection of a listener.
pub(crate) struct Http {
    http1: http1::Builder,
    /// None: HTTP/1.1 only.
    http2: Option<http2::Builder<TokioExecutor>>,
    header_read_timeout: Duration,
    write_timeout: Duration,
}

impl Http {
    /// Request heads take at most `header_read_timeout` and `max_header_bytes`
    /// in either version; an HTTP/2 connection with no open stream is
    /// closed after `header_read_timeout`, and one whose peer takes nothing
    /// of a response for `write_timeout` is dropped.
    pub(crate) fn new(
        header_read_timeout: Duration,
        write_timeout: Duration,
        max_header_bytes: usize,
        h2: bool,
    ) -> Self {
        let mut http1 = http1::Builder::new();
        // A client that never finishes its request head is dropped.
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(Some(header_read_timeout))
            .max_header_size(max_header_bytes)
            .max_buf_size(max_header_bytes.max(64 * 1024));
        let http2 = h2.then(|| {
            let mut http2 = http2::Builder::new(TokioExecutor::new());
            http2
                .timer(TokioTimer::new())
                .enable_connect_protocol()
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                // What a peer may send before the server reads it: the
                // memory budget cannot count or pause what hyper holds
                // below a session, so it is kept small (hyper's default
                // is 1 MiB per stream and connection).
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
                // A peer that vanished without a FIN holds no HTTP/2
                // connection (and its sessions' streams) for longer than
                // this; the sessions' own pings see it too.
                .keep_alive_interval(Some(header_read_timeout))
                .keep_alive_timeout(header_read_timeout);
            http2
        });
        Http {
            http1,
            http2,
            header_read_timeout,
            write_timeout,
        }
    }

    /// Serves one connection until it ends; on `stopping`, shuts it down
    /// gracefully (HTTP/1.1: after the request in flight; HTTP/2: GOAWAY,
    /// and the streams open, sessions included, run to their end).
    pub(crate) async fn serve_connection<I, S>(
        &self,
        mut io: I,
        service: S,
        stopping: CancellationToken,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: Transport,
        S: hyper::service::Service<
                http::Request<Incoming>,
                Response = http::Response<Body>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        // An HTTP/2 connection is idle from its accept: the time spent
        // telling its version counts.
        let accepted = tokio::time::Instant::now();
        let h2 = match &self.http2 {
            None => false,
            Some(_) => {
                tokio::select! {
                    found = tokio::time::timeout(self.header_read_timeout, io.speaks_h2()) => {
                        found.map_err(|_| "timed out before the first request")??
                    }
                    () = stopping.cancelled() => return Ok(()),
                }
            }
        };
        match (&self.http2, h2) {
            (Some(http2), true) => {
                let ledger = Ledger::new(accepted);
                let service = Tracked {
                    inner: service,
                    ledger: std::sync::Arc::clone(&ledger),
                };
                let connection = http2.serve_connection(TokioIo::new(io), service);
                let mut connection = std::pin::pin!(connection);
                let verdict = tokio::select! {
                    result = connection.as_mut() => return Ok(result?),
                    () = stopping.cancelled() => None,
                    verdict = ledger.watch(self.header_read_timeout, self.write_timeout) => Some(verdict),
                };
                match verdict {
                    // Server shutdown: the streams open, sessions included,
                    // run to their end (`serve` bounds the wait).
                    None => {
                        connection.as_mut().graceful_shutdown();
                        tokio::select! {
                            result = connection.as_mut() => Ok(result?),
                            verdict = ledger.watch(Duration::MAX, self.write_timeout) => {
                                debug_assert_eq!(verdict, Verdict::Stalled);
                                Err(stalled())
                            }
                        }
                    }
                    Some(Verdict::Idle) => {
                        // GOAWAY, then the end: a peer that answers nothing
                        // would keep hyper waiting for the PING of its
                        // graceful shutdown, and no stream needs the time.
                        connection.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(IDLE_GOAWAY_WAIT, connection).await;
                        Err("idle HTTP/2 connection closed".into())
                    }
                    Some(Verdict::Stalled) => Err(stalled()),
                }
            }
            _ => {
                let connection = self
                    .http1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades();
                let mut connection = std::pin::pin!(connection);
                tokio::select! {
                    result = connection.as_mut() => return Ok(result?),
                    () = stopping.cancelled() => {}
                }
                connection.as_mut().graceful_shutdown();
                Ok(connection.await?)
            }
        }
    }
}

/// Counts a connection dropped for a stalled response, and says why.
fn stalled() -> Box<dyn std::error::Error + Send + Sync> {
    counter!("duplex_write_timeouts_total").increment(1);
    "HTTP/2 peer took no byte of a response within the write timeout".into()
}

/// Whether `request` is an extended CONNECT for a WebSocket (RFC 8441 §4).
pub(crate) fn is_extended_connect<B>(request: &http::Request<B>) -> bool {
    request.method() == Method::CONNECT
        && request
            .extensions()
            .get::<Protocol>()
            .is_some_and(|p| p.as_str() == WEBSOCKET)
}

/// Checks an HTTP/2 request for a WebSocket (RFC 8441 §4 and §5): an
/// extended CONNECT with `:protocol websocket` and `Sec-WebSocket-Version:
/// 13`, no key (the stream needs no proof of a WebSocket server), and the
/// same `Origin` and subprotocol checks as over HTTP/1.1, the origin
/// compared with `:authority`.
pub(crate) fn accept(
    method: &Method,
    uri: &http::Uri,
    extensions: &http::Extensions,
    headers: &HeaderMap,
    protocols: &[String],
    origins: &Origins,
) -> Result<Accepted, Rejection> {
    if *method != Method::CONNECT {
        // A GET to a WebSocket route is a page request, as over HTTP/1.1;
        // another method is refused as there.
        return Err(if *method == Method::GET {
            Rejection::NotUpgrade
        } else {
            Rejection::MethodNotGet
        });
    }
    match extensions.get::<Protocol>() {
        None => return Err(Rejection::NotUpgrade),
        Some(protocol) if protocol.as_str() != WEBSOCKET => {
            return Err(Rejection::UnsupportedProtocol);
        }
        Some(_) => {}
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes().trim_ascii() != b"13")
    {
        return Err(Rejection::UnsupportedVersion);
    }
    // `:authority` plays `Host`'s part (RFC 9113 §8.3.1); a `Host` header
    // sent as well names the same host.
    let authority = uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let host = headers.get(header::HOST).or(authority.as_ref());
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origins.allows(origin.as_bytes(), host)
    {
        return Err(Rejection::OriginNotAllowed);
    }
    Ok(Accepted {
        accept: None,
        protocol: choose_protocol(headers, protocols)?,
        extensions: None,
    })
}

#[cfg(test)]
mod rfc9113_3_4_preface {
    use super::*;

    #[test]
    fn four_bytes_of_the_preface_are_http2_and_anything_else_http1() {
        assert_eq!(sniff_preface(b""), Preface::NeedMore);
        assert_eq!(sniff_preface(b"P"), Preface::NeedMore);
        assert_eq!(sniff_preface(b"PR"), Preface::NeedMore);
        assert_eq!(sniff_preface(b"PRI"), Preface::NeedMore);
        assert_eq!(sniff_preface(b"PRI "), Preface::Http2);
        assert_eq!(sniff_preface(b"PRIX / HTTP/1.1\r\n"), Preface::Http1);
        assert_eq!(sniff_preface(PREFACE), Preface::Http2);
        assert_eq!(sniff_preface(b"PUT / HTTP/1.1\r\n"), Preface::Http1);
        assert_eq!(sniff_preface(b"POST"), Preface::Http1);
        assert_eq!(sniff_preface(b"GET / HTTP/1.1\r\n"), Preface::Http1);
        assert_eq!(sniff_preface(b"PRX"), Preface::Http1);
        // Found by the fuzz target: the verdict at four bytes holds, a bad
        // rest of the preface is HTTP/2's connection error.
        assert_eq!(sniff_preface(b"PRI * HTTP/2.0z"), Preface::Http2);
    }
}

#[cfg(test)]
mod rfc8441_4_extended_connect {
    use super::*;
    use http::{StatusCode, Uri};

    fn check(
        method: Method,
        protocol: Option<&'static str>,
        headers: &HeaderMap,
    ) -> Result<Accepted, Rejection> {
        let mut extensions = http::Extensions::new();
        if let Some(protocol) = protocol {
            extensions.insert(Protocol::from_static(protocol));
        }
        let uri: Uri = "http://chat.example:8080/echo".parse().unwrap();
        accept(
            &method,
            &uri,
            &extensions,
            headers,
            &[],
            &Origins::default(),
        )
    }

    fn good() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h
    }

    #[test]
    fn connect_with_protocol_websocket_is_answered_200_without_accept_key() {
        let accepted = check(Method::CONNECT, Some("websocket"), &good()).unwrap();
        let response = accepted.response();
        assert_eq!(response.status(), StatusCode::OK);
        for name in [
            header::UPGRADE,
            header::CONNECTION,
            header::SEC_WEBSOCKET_ACCEPT,
        ] {
            assert!(!response.headers().contains_key(&name), "{name}");
        }
    }

    #[test]
    fn each_missing_piece_has_its_status() {
        let status = |m, p, h: &HeaderMap| check(m, p, h).unwrap_err().status();
        assert_eq!(
            status(Method::CONNECT, None, &good()),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(Method::CONNECT, Some("webtransport"), &good()),
            StatusCode::NOT_IMPLEMENTED
        );
        assert_eq!(status(Method::GET, None, &good()), StatusCode::BAD_REQUEST);
        assert_eq!(
            status(Method::POST, None, &good()),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            status(Method::CONNECT, Some("websocket"), &HeaderMap::new()),
            StatusCode::UPGRADE_REQUIRED
        );
    }

    #[test]
    fn origin_is_checked_against_the_authority() {
        let mut own = good();
        own.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://chat.example:8080"),
        );
        assert!(check(Method::CONNECT, Some("websocket"), &own).is_ok());
        let mut foreign = good();
        foreign.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert_eq!(
            check(Method::CONNECT, Some("websocket"), &foreign).unwrap_err(),
            Rejection::OriginNotAllowed
        );
    }
}
