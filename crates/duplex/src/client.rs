//! Connecting as a client, to `ws://` and `wss://` (Ktor's
//! `client.webSocket(url) { … }`): the same sessions as on the server,
//! driven by the same connection task, in the client role (frames masked,
//! §5.1).
//!
//! ```no_run
//! # async fn run() -> Result<(), duplex::BoxError> {
//! let reply = duplex::Client::new()
//!     .connect("ws://127.0.0.1:8080/mirror", |mut session| async move {
//!         session.send("hello").await?;
//!         session.recv().await
//!     })
//!     .await??;
//! println!("{reply:?}");
//! # Ok(())
//! # }
//! ```
//!
//! permessage-deflate (feature `deflate`) is offered when asked for, with
//! the server's `Deflate` configuration (same parameters, read in the
//! client role):
//!
//! ```no_run
//! # #[cfg(feature = "deflate")]
//! # async fn run() -> Result<(), duplex::BoxError> {
//! let client = duplex::Client::new().deflate(duplex::Deflate::default());
//! client
//!     .connect("ws://127.0.0.1:8080/mirror", |mut session| async move {
//!         session.send("compressed when over 32 bytes: ..........").await
//!     })
//!     .await??;
//! # Ok(())
//! # }
//! ```

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use duplex_proto::{
    Connection, Extension, ExtensionOffer, Mode, Role, accept_key, generate_key, header_has_token,
    parse_extensions,
};
#[cfg(feature = "deflate")]
use duplex_proto::{Deflate, DeflateExtension, PERMESSAGE_DEFLATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, Version};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
};
#[cfg(feature = "tls")]
use tokio_rustls::{
    TlsConnector,
    rustls::{self, pki_types::ServerName},
};

mod h2;

pub use h2::Http2Connection;

use crate::{
    config::WebSockets,
    driver::{Driver, Peer},
    lifecycle::ShutdownSignal,
    request::Request,
    session::{Sender, Session},
    shared::{Inner, Shared},
    socket::Socket,
};

/// The request headers the client writes itself, lowercase as
/// `HeaderName` keeps them.
const HANDSHAKE_HEADERS: [&str; 7] = [
    "host",
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-extensions",
];

/// The largest response head accepted.
const MAX_HEAD: usize = 16 << 10;

/// Appends `headers` as request head lines, and the empty line that ends
/// the head.
pub(crate) fn push_header_lines(head: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

/// Why a client could not connect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The URL is not `ws://` or `wss://` with a host.
    #[error("invalid WebSocket URL: {0}")]
    InvalidUrl(String),
    /// Connecting, TLS or the handshake's I/O failed.
    #[error("connection failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server did not accept the upgrade as RFC 6455 §4.1 requires.
    #[error("handshake refused: {0}")]
    Handshake(String),
    /// The server answered the upgrade with this status instead of 101
    /// (403 from an origin check, 404 for an unknown path, 429 or 503 past
    /// its limits, …).
    #[error("handshake refused with status {0}")]
    Status(StatusCode),
    /// A header given to [`Client::header`] is not a valid HTTP header
    /// name or value (a CR or LF in it could inject headers), or is one the
    /// handshake writes itself: nothing was sent, no connection was made.
    #[error("invalid request header: {0}")]
    InvalidHeader(String),
    /// The server's `Sec-WebSocket-Extensions` answer is not one our offer
    /// allowed (RFC 6455 §9.1, RFC 7692 §7.1): an extension not offered,
    /// or a permessage-deflate parameter we did not allow.
    #[error("extension refused: {0}")]
    Extension(String),
    /// Connecting, TLS and the upgrade response took longer than
    /// [`Client::handshake_timeout`].
    #[error("the opening handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The session's handler did not finish (it panicked).
    #[error("the session handler did not finish")]
    HandlerFailed,
}

impl ClientError {
    /// The status of a refused upgrade ([`ClientError::Status`]).
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status(status) => Some(*status),
            _ => None,
        }
    }
}

/// Connects to WebSocket servers.
#[derive(Clone)]
pub struct Client {
    websockets: WebSockets,
    protocols: Vec<String>,
    headers: Vec<(String, String)>,
    #[cfg(feature = "tls")]
    tls: Option<Arc<rustls::ClientConfig>>,
    handshake_timeout: Duration,
    #[cfg(feature = "deflate")]
    deflate: Option<Deflate>,
    http2: bool,
}

impl Default for Client {
    fn default() -> Self {
        Client {
            websockets: WebSockets::default(),
            protocols: Vec::new(),
            headers: Vec::new(),
            #[cfg(feature = "tls")]
            tls: None,
            handshake_timeout: Duration::from_secs(10),
            #[cfg(feature = "deflate")]
            deflate: None,
            http2: false,
        }
    }
}

impl Client {
    /// A client with default options: the options of
    /// [`WebSockets::default`] (pings, limits), the Mozilla root
    /// certificates for `wss://`, a 10 s handshake timeout, no extension
    /// offered.
    pub fn new() -> Self {
        Self::default()
    }

    /// The session options: ping period, timeout, frame and message limits,
    /// buffers, content converter. Extensions installed there are not
    /// offered by the client; see [`deflate`](Self::deflate).
    #[must_use]
    pub fn websockets(mut self, websockets: WebSockets) -> Self {
        self.websockets = websockets;
        self
    }

    /// Offers these subprotocols, in order of preference.
    #[must_use]
    pub fn protocols<I, P>(mut self, protocols: I) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        self.protocols = protocols.into_iter().map(Into::into).collect();
        self
    }

    /// Adds a header to the upgrade request (authorization, origin, …).
    ///
    /// The name must be an HTTP token and the value free of control
    /// characters (CR and LF above all), and the name none of the headers
    /// the handshake writes itself (`Host`, `Upgrade`, `Connection`,
    /// `Sec-WebSocket-Key`, `-Version`, `-Protocol`, `-Extensions`):
    /// otherwise [`connect`](Self::connect) fails with
    /// [`ClientError::InvalidHeader`] before connecting.
    #[must_use]
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Offers permessage-deflate (RFC 7692) configured as `deflate`, read in
    /// the client role: `client_no_context_takeover` (default on) makes the
    /// client compress each message alone and says so,
    /// `server_no_context_takeover` (default on) asks the server to,
    /// `client_max_window_bits` is the client's largest window (the server
    /// may lower it) and `server_max_window_bits` below 15 limits the
    /// server's. The level, the size threshold and the predicate apply to
    /// what the client sends. A server's answer outside what the offer
    /// allows fails the handshake with [`ClientError::Extension`]; a server
    /// that declines leaves the session uncompressed. The answer is on
    /// [`Session::extensions`]. Not offered by default. Feature `deflate`.
    #[cfg(feature = "deflate")]
    #[must_use]
    pub fn deflate(mut self, deflate: Deflate) -> Self {
        self.deflate = Some(deflate);
        self
    }

    /// The longest that connecting, the TLS handshake and the upgrade
    /// response may take together; then [`ClientError::Timeout`].
    /// Default 10 s.
    #[must_use]
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The rustls configuration for `wss://` (to trust a private CA, for
    /// instance). Default: the Mozilla root certificates. Feature `tls`.
    #[cfg(feature = "tls")]
    #[must_use]
    pub fn tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Connects to `url`, runs `handler` with the session, and returns what
    /// it returned once the session has ended (the closing handshake
    /// completes after the handler returns, as on the server).
    ///
    /// # Errors
    /// [`ClientError`] when the connection or the opening handshake fails.
    pub async fn connect<F, Fut, T>(&self, url: &str, handler: F) -> Result<T, ClientError>
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        if self.http2 {
            let target = Target::parse(url)?;
            let connection = self.connect_http2(url).await?;
            return connection.connect(&target.path_and_query, handler).await;
        }
        let target = Target::parse(url)?;
        // Checked before anything is sent, so that a bad value never reaches
        // the socket.
        let headers = self.request_headers()?;
        let handshaken = tokio::time::timeout(self.handshake_timeout, async {
            let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
            tcp.set_nodelay(true)?;
            let remote_addr = tcp.peer_addr().ok();
            let socket = if target.secure {
                self.secure(tcp, &target, url, false).await?
            } else {
                Socket::Tcp(tcp)
            };
            self.handshake(socket, &target, headers, remote_addr).await
        })
        .await
        .map_err(|_| ClientError::Timeout(self.handshake_timeout))??;
        self.run(handshaken, Peer::Host(target.authority.clone()), handler)
            .await
    }

    /// TLS over `tcp` to a `wss://` target; with `h2`, ALPN asks for
    /// HTTP/2 and the server must choose it.
    #[cfg(feature = "tls")]
    async fn secure(
        &self,
        tcp: TcpStream,
        target: &Target,
        url: &str,
        h2: bool,
    ) -> Result<Socket, ClientError> {
        let mut config = self.tls.clone().unwrap_or_else(default_tls);
        if h2 {
            let mut with_alpn = (*config).clone();
            with_alpn.alpn_protocols = vec![b"h2".to_vec()];
            config = Arc::new(with_alpn);
        }
        let name = ServerName::try_from(target.host.clone())
            .map_err(|_| ClientError::InvalidUrl(url.to_owned()))?;
        let tls = TlsConnector::from(config).connect(name, tcp).await?;
        if h2 && tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(ClientError::Handshake(
                "the server did not choose h2 by ALPN".into(),
            ));
        }
        Ok(Socket::Other(Box::pin(tls)))
    }

    /// Without the `tls` feature [`Target::parse`] refuses `wss://`
    /// already; this keeps the connect paths the same.
    #[cfg(not(feature = "tls"))]
    async fn secure(
        &self,
        _: TcpStream,
        _: &Target,
        url: &str,
        _: bool,
    ) -> Result<Socket, ClientError> {
        Err(no_tls(url))
    }

    /// The `Sec-WebSocket-Extensions` offer, when there is one.
    fn extension_offer(&self) -> Option<String> {
        #[cfg(feature = "deflate")]
        return self.deflate.as_ref().map(|d| d.client_offer().to_string());
        #[cfg(not(feature = "deflate"))]
        return None;
    }

    /// Runs the session of a finished handshake in the caller's task.
    async fn run<F, Fut, T>(
        &self,
        handshaken: Handshaken,
        peer: Peer,
        handler: F,
    ) -> Result<T, ClientError>
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let Handshaken {
            socket,
            leftover,
            request,
            protocol,
            answers,
            extensions,
        } = handshaken;
        let mut config = self.websockets.proto_config(Mode::Messages);
        config.role = Role::Client;
        config.mask_outgoing = true;
        let mut conn = Connection::new(config, Inner::now());
        // `Shared::new` takes them out into the codec, as on the server.
        conn.set_extensions(extensions);
        let shared = Arc::new(Shared::new(conn));
        let sender = Sender::new(Arc::clone(&shared), Arc::clone(&self.websockets.converter));
        let session = Session::new(sender, Arc::new(request), protocol, answers);
        let (done, result) = oneshot::channel();
        let user = handler(session);
        let handler_future = Box::pin(async move {
            let _ = done.send(user.await);
            Ok(())
        });
        let never = ShutdownSignal::never();
        Driver::new(
            socket,
            leftover,
            shared,
            handler_future,
            never,
            self.websockets.write_timeout,
            peer,
        )
        .await;
        result.await.map_err(|_| ClientError::HandlerFailed)
    }

    /// The extra request headers, checked.
    fn request_headers(&self) -> Result<HeaderMap, ClientError> {
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ClientError::InvalidHeader(format!("name {name:?}")))?;
            if HANDSHAKE_HEADERS.contains(&name.as_str()) {
                // A second copy would break the handshake (two `Host`s are
                // a 400, a second key a wrong accept key).
                return Err(ClientError::InvalidHeader(format!(
                    "{name} is written by the client itself (see protocols() and deflate())"
                )));
            }
            let value = HeaderValue::from_bytes(value.as_bytes())
                .map_err(|_| ClientError::InvalidHeader(format!("value of {name}: {value:?}")))?;
            headers.append(name, value);
        }
        Ok(headers)
    }

    /// Writes the upgrade request and checks the 101 (§4.1).
    async fn handshake(
        &self,
        mut socket: Socket,
        target: &Target,
        request_headers: HeaderMap,
        remote_addr: Option<SocketAddr>,
    ) -> Result<Handshaken, ClientError> {
        let key = generate_key();
        let mut head = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
            target.path_and_query, target.authority
        );
        if !self.protocols.is_empty() {
            head.push_str(&format!(
                "Sec-WebSocket-Protocol: {}\r\n",
                self.protocols.join(", ")
            ));
        }
        if let Some(offer) = self.extension_offer() {
            head.push_str(&format!("Sec-WebSocket-Extensions: {offer}\r\n"));
        }
        let mut head = head.into_bytes();
        // Checked by `HeaderName` and `HeaderValue`: no CR, LF or NUL.
        push_header_lines(&mut head, &request_headers);
        socket.write_all(&head).await?;

        let mut buf = BytesMut::with_capacity(1024);
        let head_len = loop {
            if socket.read_buf(&mut buf).await? == 0 {
                return Err(ClientError::Handshake(
                    "connection closed during the handshake".into(),
                ));
            }
            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            if buf.len() > MAX_HEAD {
                return Err(ClientError::Handshake("response head too large".into()));
            }
        };
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        response
            .parse(&buf[..head_len])
            .map_err(|e| ClientError::Handshake(format!("malformed response: {e}")))?;
        match response.code {
            Some(101) => {}
            code => {
                return Err(code
                    .and_then(|code| StatusCode::from_u16(code).ok())
                    .map_or_else(
                        || ClientError::Handshake(format!("expected status 101, got {code:?}")),
                        ClientError::Status,
                    ));
            }
        }
        let headers: &[httparse::Header<'_>] = response.headers;
        let find = |name: &'static str| {
            headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        if !find("upgrade").any(|v| header_has_token(v, "websocket"))
            || !find("connection").any(|v| header_has_token(v, "upgrade"))
        {
            return Err(ClientError::Handshake(
                "missing Upgrade or Connection".into(),
            ));
        }
        let expected = accept_key(key.as_bytes());
        if !find("sec-websocket-accept").any(|v| v == expected.as_bytes()) {
            return Err(ClientError::Handshake("wrong Sec-WebSocket-Accept".into()));
        }
        let (answers, extensions) = self.accept_extensions(find("sec-websocket-extensions"))?;
        let protocol = self.accept_protocol(find("sec-websocket-protocol").next())?;
        let leftover = buf.split_off(head_len).freeze();
        let request = Request {
            method: Method::GET,
            uri: target.uri.clone(),
            version: Version::HTTP_11,
            headers: request_headers,
            remote_addr,
            path_params: Vec::new(),
            extensions: http::Extensions::new(),
        };
        Ok(Handshaken {
            socket,
            leftover,
            request,
            protocol,
            answers,
            extensions,
        })
    }

    /// Checks the server's `Sec-WebSocket-Protocol` against our offer.
    fn accept_protocol(&self, value: Option<&[u8]>) -> Result<Option<String>, ClientError> {
        let Some(value) = value else {
            return Ok(None);
        };
        let chosen = std::str::from_utf8(value)
            .unwrap_or_default()
            .trim()
            .to_owned();
        if !self.protocols.contains(&chosen) {
            return Err(ClientError::Handshake(format!(
                "unoffered subprotocol {chosen:?}"
            )));
        }
        Ok(Some(chosen))
    }

    /// Checks the `Sec-WebSocket-Extensions` answer against our offer
    /// (§4.1, §9.1: an extension not offered fails the connection) and
    /// builds the extensions it agreed.
    fn accept_extensions<'h>(
        &self,
        values: impl Iterator<Item = &'h [u8]>,
    ) -> Result<AgreedExtensions, ClientError> {
        let mut answers = Vec::new();
        for value in values {
            let value = std::str::from_utf8(value).map_err(|_| {
                ClientError::Extension("Sec-WebSocket-Extensions is not ASCII".into())
            })?;
            answers.extend(
                parse_extensions(value).map_err(|e| ClientError::Extension(e.to_string()))?,
            );
        }
        let mut extensions: Vec<Box<dyn Extension>> = Vec::new();
        for answer in &answers {
            extensions.push(self.agree(answer, extensions.len())?);
        }
        Ok((answers, extensions))
    }

    /// The extension `answer` agrees to, `earlier` answers having been
    /// agreed already: permessage-deflate once, when offered.
    #[cfg(feature = "deflate")]
    fn agree(
        &self,
        answer: &ExtensionOffer,
        earlier: usize,
    ) -> Result<Box<dyn Extension>, ClientError> {
        match &self.deflate {
            Some(deflate) if answer.name == PERMESSAGE_DEFLATE && earlier == 0 => {
                let params = deflate
                    .client_accept(answer)
                    .map_err(|e| ClientError::Extension(e.to_string()))?;
                Ok(Box::new(DeflateExtension::client(deflate.clone(), params)))
            }
            _ => Err(unoffered(answer)),
        }
    }

    /// Without `deflate` the client offers no extension, so any answer is
    /// one it did not offer.
    #[cfg(not(feature = "deflate"))]
    fn agree(&self, answer: &ExtensionOffer, _: usize) -> Result<Box<dyn Extension>, ClientError> {
        Err(unoffered(answer))
    }
}

/// A `Sec-WebSocket-Extensions` answer to nothing the client offered.
fn unoffered(answer: &ExtensionOffer) -> ClientError {
    ClientError::Extension(format!(
        "the server answered with {answer}, which we did not offer"
    ))
}

/// The server's `Sec-WebSocket-Extensions` items and the extensions they
/// agreed.
type AgreedExtensions = (Vec<ExtensionOffer>, Vec<Box<dyn Extension>>);

/// What a successful opening handshake leaves.
struct Handshaken {
    socket: Socket,
    /// Bytes the server sent past the 101's head.
    leftover: Bytes,
    request: Request,
    protocol: Option<String>,
    /// The server's `Sec-WebSocket-Extensions` items.
    answers: Vec<ExtensionOffer>,
    extensions: Vec<Box<dyn Extension>>,
}

/// Connects with a default [`Client`]; see [`Client::connect`].
///
/// # Errors
/// As [`Client::connect`].
pub async fn connect<F, Fut, T>(url: &str, handler: F) -> Result<T, ClientError>
where
    F: FnOnce(Session) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    Client::new().connect(url, handler).await
}

/// Why a `wss://` URL cannot be used without the `tls` feature.
#[cfg(not(feature = "tls"))]
fn no_tls(url: &str) -> ClientError {
    ClientError::InvalidUrl(format!("{url} (wss:// needs duplex's `tls` feature)"))
}

#[cfg(feature = "tls")]
fn default_tls() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    // The provider is named rather than taken from the process default,
    // which is ambiguous when another crate enables a second one.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3");
    Arc::new(builder.with_root_certificates(roots).with_no_client_auth())
}

/// A parsed `ws://` or `wss://` URL.
struct Target {
    secure: bool,
    host: String,
    port: u16,
    authority: String,
    path_and_query: String,
    uri: Uri,
}

impl Target {
    fn parse(url: &str) -> Result<Target, ClientError> {
        let invalid = || ClientError::InvalidUrl(url.to_owned());
        let uri: Uri = url.parse().map_err(|_| invalid())?;
        let secure = match uri.scheme_str() {
            Some("ws") => false,
            #[cfg(feature = "tls")]
            Some("wss") => true,
            #[cfg(not(feature = "tls"))]
            Some("wss") => return Err(no_tls(url)),
            _ => return Err(invalid()),
        };
        let authority = uri.authority().ok_or_else(invalid)?.clone();
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if host.is_empty() {
            return Err(invalid());
        }
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Target {
            secure,
            host,
            port,
            authority: authority.as_str().to_owned(),
            path_and_query,
            uri,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed_with_default_ports() {
        let t = Target::parse("ws://example.com/chat?room=1").unwrap();
        assert_eq!(
            (t.secure, t.host.as_str(), t.port),
            (false, "example.com", 80)
        );
        assert_eq!(t.path_and_query, "/chat?room=1");
        #[cfg(feature = "tls")]
        {
            let t = Target::parse("wss://[::1]:9443").unwrap();
            assert_eq!((t.secure, t.host.as_str(), t.port), (true, "::1", 9443));
            assert_eq!(t.path_and_query, "/");
        }
        #[cfg(not(feature = "tls"))]
        assert!(matches!(
            Target::parse("wss://[::1]:9443"),
            Err(ClientError::InvalidUrl(why)) if why.contains("`tls` feature")
        ));
        for bad in ["http://x/", "ws://", "not a url", "ws:///path"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
