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
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_service::Service;

use crate::{
    config::WebSockets,
    endpoint,
    handler::Handler,
    session::{RawSession, Session},
    tls::{TlsListener, rustls},
};

type Mount = Box<dyn FnOnce(Router, &WebSockets) -> Router + Send>;

/// How long a client may take to send its request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
}

impl Default for App {
    fn default() -> Self {
        App {
            websockets: WebSockets::default(),
            mounts: Vec::new(),
            router: Router::new(),
            shutdown_grace: Duration::from_secs(10),
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

    /// How long [`serve`](Self::serve) waits for sessions to close after the
    /// shutdown signal. Default 10 s.
    #[must_use]
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.shutdown_grace = grace;
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
    /// shutdown grace.
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
    /// shuts down gracefully.
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
        let listener = TlsListener::new(listener, config)?.tap_io(|_| {});
        self.serve_listener(listener, signal).await
    }

    /// The accept loop: each connection is served by hyper's HTTP/1 with
    /// upgrades, directly on the accepted stream. (axum's `serve` would first
    /// peek at the bytes to tell HTTP/2 from HTTP/1 and wrap the stream, so
    /// an upgraded connection could never be taken back as a `TcpStream`.)
    async fn serve_listener<L, T, F>(self, mut listener: TapIo<L, T>, signal: F) -> io::Result<()>
    where
        L: Listener<Addr = SocketAddr>,
        L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        T: FnMut(&mut L::Io) + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let websockets = self.websockets.clone();
        let grace = self.shutdown_grace;
        let router = self.into_router();
        // Stops HTTP connections between requests on shutdown; upgraded ones
        // are the sessions' business (1001 through `WebSockets::shutdown`).
        let stopping = CancellationToken::new();
        let connections = TaskTracker::new();
        let mut http = hyper::server::conn::http1::Builder::new();
        // A client that never finishes its request head is dropped.
        http.timer(TokioTimer::new())
            .header_read_timeout(Some(HEADER_READ_TIMEOUT));
        let mut signal = std::pin::pin!(signal);
        loop {
            let (io, peer) = tokio::select! {
                accepted = listener.accept() => accepted,
                () = &mut signal => break,
            };
            let router = router.clone();
            let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
                let mut request = request.map(Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                Service::call(&mut router.clone(), request)
            });
            let connection = http
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let stopping = stopping.clone();
            connections.spawn(async move {
                let mut connection = std::pin::pin!(connection);
                let result = tokio::select! {
                    result = connection.as_mut() => result,
                    () = stopping.cancelled() => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                };
                if let Err(err) = result {
                    tracing::debug!(%peer, "HTTP connection ended: {err}");
                }
            });
        }
        tracing::info!("shutting down");
        let ws = websockets.clone();
        tokio::spawn(async move { ws.shutdown(grace).await });
        stopping.cancel();
        connections.close();
        if tokio::time::timeout(grace, connections.wait())
            .await
            .is_err()
        {
            tracing::warn!("HTTP connections still open after the shutdown grace period");
        }
        websockets.shutdown(grace).await;
        Ok(())
    }
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
