//! The `App` builder: install the configuration, route WebSocket endpoints
//! next to plain HTTP routes, serve, shut down gracefully.

use std::{future::Future, io, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Body,
    extract::ConnectInfo,
    routing::MethodRouter,
    serve::{Listener, ListenerExt, TapIo},
};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_service::Service;

#[cfg(feature = "tls")]
use crate::tls::{TlsListener, rustls};
use crate::{
    address_limit::AddressLimit,
    body_deadline::IdleBody,
    config::WebSockets,
    endpoint,
    handler::Handler,
    lifecycle::{SERVED, ServedConfigs},
    session::{RawSession, Session},
    write_deadline::WriteDeadline,
};

type Mount = Box<dyn FnOnce(Router, &WebSockets) -> Router + Send>;

/// A server: a WebSockets configuration, WebSocket routes and plain HTTP
/// routes (an axum `Router` underneath).
///
/// ```no_run
/// use duplex::{App, Session, WebSockets};
/// use std::time::Duration;
///
/// # async fn run() -> std::io::Result<()> {
/// App::new()
///     .install(WebSockets::default().ping_period(Some(Duration::from_secs(15))))
///     .web_socket("/echo", |mut session: Session| async move {
///         while let Some(message) = session.recv().await? {
///             session.send(message).await?;
///         }
///         Ok::<_, duplex::Error>(())
///     })
///     .route("/health", axum::routing::get(|| async { "ok" }))
///     .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
///     .await
/// # }
/// ```
pub struct App {
    websockets: WebSockets,
    mounts: Vec<Mount>,
    router: Router,
    shutdown_grace: Duration,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    max_connections: usize,
    max_connections_per_ip: Option<usize>,
    raise_open_files: bool,
    http2: bool,
}

impl Default for App {
    fn default() -> Self {
        App {
            websockets: WebSockets::default(),
            mounts: Vec::new(),
            router: Router::new(),
            shutdown_grace: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 32 * 1024,
            max_connections: 10_000,
            max_connections_per_ip: Some(1_000),
            raise_open_files: true,
            http2: true,
        }
    }
}

impl App {
    /// An app with the default configuration and no routes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs the WebSockets configuration. Routes use it whatever the
    /// order of the calls.
    #[must_use]
    pub fn install(mut self, websockets: WebSockets) -> Self {
        self.websockets = websockets;
        self
    }

    /// The configuration, also the handle for [`WebSockets::shutdown`].
    pub fn websockets(&self) -> &WebSockets {
        &self.websockets
    }

    /// A WebSocket endpoint with a default [`Session`] (Ktor's `webSocket`).
    /// Path parameters (`/rooms/{room}`) are in
    /// [`Request::path_param`](crate::Request::path_param).
    #[must_use]
    pub fn web_socket<H: Handler<Session>>(self, path: &str, handler: H) -> Self {
        self.web_socket_with_protocols(path, std::iter::empty::<String>(), handler)
    }

    /// A WebSocket endpoint that speaks these subprotocols (Ktor's
    /// `webSocket(path, protocol)`); see
    /// [`endpoint::web_socket_with_protocols`](crate::web_socket_with_protocols).
    #[must_use]
    pub fn web_socket_with_protocols<H, I, P>(
        mut self,
        path: &str,
        protocols: I,
        handler: H,
    ) -> Self
    where
        H: Handler<Session>,
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        let path = path.to_owned();
        let protocols: Vec<String> = protocols.into_iter().map(Into::into).collect();
        self.mounts.push(Box::new(move |router, ws| {
            router.route(
                &path,
                endpoint::web_socket_with_protocols(ws, protocols, handler),
            )
        }));
        self
    }

    /// A WebSocket endpoint with a [`RawSession`] (Ktor's `webSocketRaw`).
    #[must_use]
    pub fn web_socket_raw<H: Handler<RawSession>>(mut self, path: &str, handler: H) -> Self {
        let path = path.to_owned();
        self.mounts.push(Box::new(move |router, ws| {
            router.route(&path, endpoint::web_socket_raw(ws, handler))
        }));
        self
    }

    /// A plain HTTP route.
    #[must_use]
    pub fn route(mut self, path: &str, method_router: MethodRouter) -> Self {
        self.router = self.router.route(path, method_router);
        self
    }

    /// Merges a whole axum `Router` of plain routes.
    #[must_use]
    pub fn merge(mut self, router: Router) -> Self {
        self.router = self.router.merge(router);
        self
    }

    /// How long [`serve`](Self::serve) waits for sessions and HTTP
    /// connections to close after the shutdown signal; then the sessions
    /// still open are dropped, their handlers with them, and `serve`
    /// returns. Default 10 s.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
        self
    }

    /// How long a client may take to send a request head (the upgrade
    /// request included), and how long a kept-alive HTTP connection may
    /// stay idle between requests, or an HTTP/2 connection with no open
    /// stream; then the connection is closed. Default 10 s (hyper's own:
    /// 30 s, and none for HTTP/2).
    ///
    /// Responses have a write timeout too, the sessions'
    /// ([`WebSockets::write_timeout`], 20 s): an HTTP connection whose peer
    /// takes no byte of a response for that long (pipelined requests whose
    /// answers are never read; an HTTP/2 stream granted no window) is
    /// dropped.
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// The largest request head (request line and headers) accepted; a
    /// larger one gets 431 and the connection is closed. Default 32 KiB;
    /// at least 8 KiB.
    #[must_use]
    pub fn max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = bytes.max(8 * 1024);
        self
    }

    /// The most HTTP connections open at once that have not become
    /// sessions (sessions have [`WebSockets::max_sessions`]); a connection
    /// accepted beyond it is closed at once. Default 10,000.
    #[must_use]
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// The most HTTP connections not yet sessions that one client address
    /// may hold ([`WebSockets::ipv6_prefix`] says what one IPv6 address
    /// is); a connection beyond it is closed at once, so one address
    /// cannot take every place of [`max_connections`](Self::max_connections).
    /// An HTTP/2 connection counts for as long as it is open, WebSocket
    /// streams on it included. `None` removes the limit (behind a proxy,
    /// where every client has the proxy's address). Default 1,000.
    #[must_use]
    pub fn max_connections_per_ip(mut self, connections: Option<usize>) -> Self {
        self.max_connections_per_ip = connections;
        self
    }

    /// Whether [`serve`](Self::serve) raises the process's soft limit of
    /// open files to its hard limit (on Unix), so that the default soft
    /// limit of 1,024 does not cap the server at about a thousand
    /// connections. Default true; the limit obtained is logged.
    #[must_use]
    pub fn raise_open_files_limit(mut self, raise: bool) -> Self {
        self.raise_open_files = raise;
        self
    }

    /// Whether [`serve`](Self::serve) and [`serve_tls`](Self::serve_tls)
    /// speak HTTP/2 besides HTTP/1.1: in clear to clients that start with
    /// the HTTP/2 preface (prior knowledge), over TLS to those that choose
    /// `h2` by ALPN (offered first when the rustls configuration names no
    /// protocol). Over HTTP/2 every WebSocket route also accepts an
    /// extended CONNECT (RFC 8441): the same handler, session, limits and
    /// shutdown, each session a stream of the connection. Default true.
    #[must_use]
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// The axum `Router` with every route mounted, to serve it yourself.
    pub fn into_router(self) -> Router {
        let websockets = self.websockets;
        self.mounts
            .into_iter()
            .fold(self.router, |router, mount| mount(router, &websockets))
    }

    /// Serves until Ctrl-C or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    /// An I/O error of the listener.
    pub async fn serve(self, listener: TcpListener) -> io::Result<()> {
        self.serve_with_shutdown(listener, shutdown_signal()).await
    }

    /// Serves until `signal` completes, then stops accepting, closes every
    /// session with 1001 "Server shutting down" and waits for them, up to the
    /// shutdown grace. Every session means those of every WebSocket route
    /// this App has served, whichever [`WebSockets`] it was built with (a
    /// route mounted with [`route`](Self::route) or [`merge`](Self::merge)
    /// included): each route notes its configuration on its first request.
    ///
    /// # Errors
    /// An I/O error of the listener.
    pub async fn serve_with_shutdown<F>(self, listener: TcpListener, signal: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let listener = listener.tap_io(|tcp| {
            // Frames are whole when written; Nagle would only delay them.
            let _ = tcp.set_nodelay(true);
        });
        self.serve_listener(listener, signal).await
    }

    /// Serves `wss://` and `https://` over TLS until Ctrl-C or SIGTERM, then
    /// shuts down gracefully (feature `tls`).
    ///
    /// ```no_run
    /// # async fn run(cert: Vec<duplex::tls::rustls::pki_types::CertificateDer<'static>>,
    /// #              key: duplex::tls::rustls::pki_types::PrivateKeyDer<'static>) -> std::io::Result<()> {
    /// use duplex::tls::rustls;
    /// let config = rustls::ServerConfig::builder()
    ///     .with_no_client_auth()
    ///     .with_single_cert(cert, key)
    ///     .map_err(std::io::Error::other)?;
    /// duplex::App::new()
    ///     .serve_tls(tokio::net::TcpListener::bind("127.0.0.1:8443").await?, config.into())
    ///     .await
    /// # }
    /// ```
    ///
    /// # Errors
    /// An I/O error of the listener.
    #[cfg(feature = "tls")]
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
    ) -> io::Result<()> {
        self.serve_tls_with_shutdown(listener, config, shutdown_signal())
            .await
    }

    /// [`serve_tls`](Self::serve_tls) until `signal` completes.
    ///
    /// # Errors
    /// An I/O error of the listener.
    #[cfg(feature = "tls")]
    pub async fn serve_tls_with_shutdown<F>(
        self,
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        signal: F,
    ) -> io::Result<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        // TLS sets no-delay itself; the tap gives axum the listener shape
        // it knows how to report peer addresses for.
        let config = if self.http2 {
            crate::h2::with_alpn(config)
        } else {
            config
        };
        let listener =
            TlsListener::bind(listener, config, self.websockets.limits.ipv6_prefix)?.tap_io(|_| {});
        self.serve_listener(listener, signal).await
    }

    /// The accept loop: each connection is served by hyper's HTTP/1 with
    /// upgrades, or its HTTP/2, directly on the accepted stream (`h2.rs`
    /// tells them apart without reading; axum's `serve` would read the first
    /// bytes into a buffer and wrap the stream, so an upgraded connection
    /// could never be taken back as a `TcpStream`).
    async fn serve_listener<L, T, F>(self, mut listener: TapIo<L, T>, signal: F) -> io::Result<()>
    where
        L: Listener<Addr = SocketAddr>,
        L::Io: crate::h2::Transport,
        T: FnMut(&mut L::Io) + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        if self.raise_open_files {
            raise_open_files_limit();
        }
        // Every series at zero from the first scrape, if a recorder is
        // installed (registering again resets nothing).
        #[cfg(feature = "metrics")]
        crate::metrics::describe();
        let websockets = self.websockets.clone();
        let grace = self.shutdown_grace;
        let max_connections = self.max_connections;
        let per_address = self
            .max_connections_per_ip
            .map(|max| AddressLimit::new(max, websockets.limits.ipv6_prefix));
        let write_timeout = websockets.write_timeout;
        let header_read_timeout = self.header_read_timeout;
        let http = Arc::new(crate::h2::Http::new(
            self.header_read_timeout,
            write_timeout,
            self.max_header_bytes,
            self.http2,
        ));
        let router = self.into_router();
        // Every WebSocket route notes its configuration here on its first
        // request, whichever configuration it was built with.
        let served = ServedConfigs::default();
        // Stops HTTP connections between requests on shutdown; upgraded ones
        // are the sessions' business (1001 through `WebSockets::shutdown`).
        let stopping = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut signal = std::pin::pin!(signal);
        loop {
            let (io, peer) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut signal => break,
            };
            if connections.len() >= max_connections {
                // Accepted and closed at once, so that the backlog does not
                // fill with connections that would wait for nothing.
                tracing::debug!(%peer, "too many HTTP connections; closing a new one");
                counter!("duplex_connections_refused_total").increment(1);
                drop(io);
                continue;
            }
            let place = match &per_address {
                None => None,
                Some(limit) => match limit.enter(peer.ip()) {
                    Some(place) => Some(place),
                    None => {
                        tracing::debug!(%peer, "too many HTTP connections from one address; closing a new one");
                        counter!("duplex_connections_refused_total").increment(1);
                        drop(io);
                        continue;
                    }
                },
            };
            let io = WriteDeadline::new(io, write_timeout);
            let router = router.clone();
            let served = served.clone();
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let mut request =
                    request.map(|body| Body::new(IdleBody::new(body, header_read_timeout)));
                request.extensions_mut().insert(ConnectInfo(peer));
                // A task-local rather than a request extension: the
                // extensions stay with the session's request, and one more
                // entry would grow every session's map.
                SERVED.scope(served.clone(), Service::call(&mut router.clone(), request))
            });
            let stopping = stopping.clone();
            let http = Arc::clone(&http);
            connections.spawn(async move {
                // Held until hyper is done with the connection: after an
                // upgrade, the session counts under the session limits.
                let _place = place;
                if let Err(err) = http.serve_connection(io, service, stopping).await {
                    tracing::debug!(%peer, "HTTP connection ended: {err}");
                }
            });
        }
        tracing::info!("shutting down");
        // One deadline for both: sessions and HTTP connections close
        // together, and `serve` returns within the grace period.
        let deadline = tokio::time::Instant::now() + grace;
        let ws = websockets.clone();
        let sessions = tokio::spawn(async move { served.shutdown(&ws.lifecycle, grace).await });
        stopping.cancel();
        connections.close();
        if tokio::time::timeout_at(deadline, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("HTTP connections still open after the shutdown grace period");
        }
        let _ = sessions.await;
        Ok(())
    }
}

/// Raises the soft limit of open files to the hard limit, once per process.
fn raise_open_files_limit() {
    static RAISED: std::sync::Once = std::sync::Once::new();
    RAISED.call_once(|| {
        #[cfg(unix)]
        match rlimit::increase_nofile_limit(u64::MAX) {
            Ok(limit) => tracing::info!("open files limit: {limit}"),
            Err(err) => tracing::warn!("cannot raise the open files limit: {err}"),
        }
    });
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
