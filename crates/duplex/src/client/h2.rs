//! The client over HTTP/2 (RFC 8441): one connection, a WebSocket per
//! extended CONNECT stream.

use std::{future::Future, sync::Arc, time::Duration};

use axum::body::Body;
use bytes::Bytes;
use http::{HeaderValue, Method, Version, header};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::oneshot};

/// How often the connection's task looks for the server's
/// `SETTINGS_ENABLE_CONNECT_PROTOCOL` until it has come.
const SETTINGS_POLL: Duration = Duration::from_millis(1);

use super::{Client, ClientError, Handshaken, Target};
use crate::{driver::Peer, request::Request, session::Session, socket::Socket};

/// An HTTP/2 connection to a server, on which each
/// [`connect`](Self::connect) opens one more WebSocket (an extended
/// CONNECT, RFC 8441 §4): many sessions share its one TCP connection.
///
/// Made by [`Client::connect_http2`]. Clones share the connection; it
/// closes once every clone is dropped and its sessions have ended.
///
/// ```no_run
/// # async fn run() -> Result<(), duplex::BoxError> {
/// let connection = duplex::Client::new()
///     .connect_http2("ws://127.0.0.1:8080")
///     .await?;
/// let (a, b) = tokio::join!(
///     connection.connect("/mirror", |mut s| async move { s.send("one").await }),
///     connection.connect("/mirror", |mut s| async move { s.send("two").await }),
/// );
/// a??;
/// b??;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Http2Connection {
    client: Client,
    target: Arc<Target>,
    remote_addr: Option<std::net::SocketAddr>,
    send: SendRequest<Body>,
}

impl std::fmt::Debug for Http2Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Connection")
            .field("authority", &self.target.authority)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Whether [`connect`](Self::connect) speaks HTTP/2 (RFC 8441): over
    /// `ws://` with prior knowledge (the server must speak HTTP/2 in
    /// clear, as [`App::serve`](crate::App::serve) does), over `wss://` by
    /// ALPN `h2`. Each `connect` then opens a connection of its own; to
    /// share one, see [`connect_http2`](Self::connect_http2). Default false
    /// (HTTP/1.1).
    #[must_use]
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// Opens an HTTP/2 connection to the server of `url` (`ws://host:port`
    /// or `wss://…`; a path is ignored) and waits until the server has
    /// advertised `SETTINGS_ENABLE_CONNECT_PROTOCOL` (RFC 8441 §3), all
    /// within [`handshake_timeout`](Self::handshake_timeout).
    ///
    /// # Errors
    /// [`ClientError`]: the URL, connecting, TLS (a server that does not
    /// choose `h2` by ALPN), the HTTP/2 handshake, or a server that does not
    /// allow extended CONNECT ([`ClientError::Handshake`]).
    pub async fn connect_http2(&self, url: &str) -> Result<Http2Connection, ClientError> {
        let target = Target::parse(url)?;
        let timeout = self.handshake_timeout;
        let (send, remote_addr) = tokio::time::timeout(timeout, self.open_http2(&target, url))
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        Ok(Http2Connection {
            client: self.clone(),
            target: Arc::new(target),
            remote_addr,
            send,
        })
    }

    async fn open_http2(
        &self,
        target: &Target,
        url: &str,
    ) -> Result<(SendRequest<Body>, Option<std::net::SocketAddr>), ClientError> {
        let tcp = TcpStream::connect((target.host.as_str(), target.port)).await?;
        tcp.set_nodelay(true)?;
        let remote_addr = tcp.peer_addr().ok();
        let io: Socket = if target.secure {
            self.secure(tcp, target, url, true).await?
        } else {
            Socket::Tcp(tcp)
        };
        let (send, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|e| ClientError::Handshake(format!("HTTP/2 handshake: {e}")))?;
        // RFC 8441 §3: no `:protocol` before the server has allowed it. Its
        // SETTINGS is the first frame it sends, read by the task hyper
        // spawned for the connection; the flag raises no wake-up, so the
        // task that dispatches our requests looks at it every millisecond
        // until it is there.
        let (allowed, is_allowed) = oneshot::channel();
        let authority = target.authority.clone();
        tokio::spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let mut allowed = Some(allowed);
            let result = loop {
                // Done looking once the flag is there or nobody waits for it
                // (the caller timed out).
                if allowed.as_ref().is_some_and(|tx| tx.is_closed()) {
                    allowed = None;
                } else if allowed.is_some() && connection.is_extended_connect_protocol_enabled() {
                    let _ = allowed.take().map(|tx| tx.send(()));
                }
                if allowed.is_none() {
                    break connection.await;
                }
                tokio::select! {
                    result = connection.as_mut() => break result,
                    () = tokio::time::sleep(SETTINGS_POLL) => {}
                }
            };
            if let Err(err) = result {
                tracing::debug!(peer = %authority, "HTTP/2 connection ended: {err}");
            }
        });
        is_allowed.await.map_err(|_| {
            ClientError::Handshake(
                "the HTTP/2 connection ended before the server's SETTINGS".into(),
            )
        })?;
        Ok((send, remote_addr))
    }
}

impl Http2Connection {
    /// Opens a WebSocket on `path` (path and query, `/chat?room=1`) as a
    /// new stream of this connection, runs `handler` with the session in
    /// the caller's task and returns what it returned once the session has
    /// ended, as [`Client::connect`]. The request and the 200 take at most
    /// the client's handshake timeout.
    ///
    /// # Errors
    /// [`ClientError`]: a refused CONNECT ([`ClientError::Status`]), the
    /// stream reset, the connection gone, or the answer's subprotocol or
    /// extensions not ones offered.
    pub async fn connect<F, Fut, T>(&self, path: &str, handler: F) -> Result<T, ClientError>
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let client = &self.client;
        let headers = client.request_headers()?;
        let timeout = client.handshake_timeout;
        let handshaken = tokio::time::timeout(timeout, self.open_stream(path, headers))
            .await
            .map_err(|_| ClientError::Timeout(timeout))??;
        client
            .run(
                handshaken,
                Peer::Host(self.target.authority.clone()),
                handler,
            )
            .await
    }

    async fn open_stream(
        &self,
        path: &str,
        extra: http::HeaderMap,
    ) -> Result<Handshaken, ClientError> {
        let client = &self.client;
        let target = &self.target;
        let path = if path.starts_with('/') {
            path.to_owned()
        } else {
            format!("/{path}")
        };
        let scheme = if target.secure { "https" } else { "http" };
        let invalid = || ClientError::InvalidUrl(path.clone());
        // `:scheme`, `:authority` and `:path` (RFC 8441 §4).
        let uri: http::Uri = format!("{scheme}://{}{path}", target.authority)
            .parse()
            .map_err(|_| invalid())?;
        let session_uri: http::Uri = format!(
            "{}://{}{path}",
            if target.secure { "wss" } else { "ws" },
            target.authority
        )
        .parse()
        .map_err(|_| invalid())?;
        let mut request = http::Request::new(Body::empty());
        *request.method_mut() = Method::CONNECT;
        *request.uri_mut() = uri;
        *request.version_mut() = Version::HTTP_2;
        request
            .extensions_mut()
            .insert(hyper::ext::Protocol::from_static(crate::h2::WEBSOCKET));
        let headers = request.headers_mut();
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        if !client.protocols.is_empty() {
            let offer = HeaderValue::from_str(&client.protocols.join(", "))
                .map_err(|_| ClientError::InvalidHeader("Sec-WebSocket-Protocol".into()))?;
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, offer);
        }
        if let Some(offer) = client.extension_offer() {
            let offer = HeaderValue::from_str(&offer)
                .map_err(|_| ClientError::InvalidHeader("Sec-WebSocket-Extensions".into()))?;
            headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, offer);
        }
        for (name, value) in &extra {
            headers.append(name.clone(), value.clone());
        }
        let mut send = self.send.clone();
        send.ready()
            .await
            .map_err(|e| ClientError::Handshake(format!("HTTP/2 connection: {e}")))?;
        let mut response = send
            .send_request(request)
            .await
            .map_err(|e| ClientError::Handshake(format!("extended CONNECT: {e}")))?;
        // RFC 8441 §5: a 2xx opens the WebSocket; anything else refuses it.
        let status = response.status();
        if !status.is_success() {
            return Err(ClientError::Status(status));
        }
        let answer = response.headers();
        let (answers, extensions) = client.accept_extensions(
            answer
                .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
                .iter()
                .map(HeaderValue::as_bytes),
        )?;
        let protocol = client.accept_protocol(
            answer
                .get(header::SEC_WEBSOCKET_PROTOCOL)
                .map(HeaderValue::as_bytes),
        )?;
        let upgraded = hyper::upgrade::on(&mut response)
            .await
            .map_err(|e| ClientError::Handshake(format!("the stream did not open: {e}")))?;
        let request = Request {
            method: Method::CONNECT,
            uri: session_uri,
            version: Version::HTTP_2,
            headers: extra,
            remote_addr: self.remote_addr,
            path_params: Vec::new(),
            extensions: http::Extensions::new(),
        };
        Ok(Handshaken {
            socket: Socket::Other(Box::pin(TokioIo::new(upgraded))),
            leftover: Bytes::new(),
            request,
            protocol,
            answers,
            extensions,
        })
    }
}
