//! WebSocket routes as axum `MethodRouter`s: the upgrade, and the spawn of
//! the connection task.
//!
//! [`App`](crate::App) uses these; users with their own axum `Router` mount
//! them directly:
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use duplex::{Session, WebSockets};
//!
//! # async fn run() -> std::io::Result<()> {
//! let ws = WebSockets::default();
//! let router = Router::new()
//!     .route("/", get(|| async { "hello" }))
//!     .route("/echo", duplex::web_socket(&ws, |mut s: Session| async move {
//!         while let Ok(Some(m)) = s.recv().await {
//!             let _ = s.send(m).await;
//!         }
//!     }));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! axum::serve(listener, router).await
//! # }
//! ```

use std::{net::SocketAddr, sync::Arc};

use axum::{
    body::Body,
    extract::{ConnectInfo, FromRequestParts, RawPathParams},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{MethodRouter, any},
};
use duplex_proto::{Connection, ExtensionOffer, Mode};

use crate::{
    config::WebSockets,
    driver::{Driver, Peer},
    handler::Handler,
    handshake::{self, Rejection},
    lifecycle::SERVED,
    request::Request,
    session::{RawSession, Sender, Session},
    shared::{Inner, Shared},
    socket::Socket,
};

/// A `web_socket` route for an axum `Router`: a default [`Session`] per
/// connection, with no subprotocol.
///
/// The route fits a router of any state `S` (the handler does not read it:
/// clone what it needs into the closure):
///
/// ```no_run
/// use axum::{Router, extract::State, routing::get};
/// use duplex::{Session, WebSockets};
///
/// #[derive(Clone)]
/// struct AppState {
///     greeting: &'static str,
/// }
///
/// # async fn run() -> std::io::Result<()> {
/// let ws = WebSockets::default();
/// let state = AppState { greeting: "hello" };
/// let greeting = state.greeting;
/// let router: Router = Router::new()
///     .route("/", get(|State(s): State<AppState>| async move { s.greeting }))
///     .route(
///         "/ws",
///         duplex::web_socket(&ws, move |session: Session| async move {
///             let _ = session.send_text(greeting).await;
///         }),
///     )
///     .with_state(state);
/// axum::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?, router).await
/// # }
/// ```
///
/// Do not mount it with a second `.route` on a path that has its own `GET`
/// handler: axum merges the two and every `GET`, upgrades included, goes to
/// that handler. [`web_socket_or`] serves both on one path.
pub fn web_socket<S, H>(config: &WebSockets, handler: H) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
    H: Handler<Session>,
{
    web_socket_with_protocols(config, std::iter::empty::<String>(), handler)
}

/// A `web_socket` route that speaks the given subprotocols, in our order of
/// support. The client's first offer that is in the list is chosen; a
/// client that offers none of them gets 400, as in Ktor.
pub fn web_socket_with_protocols<S, H, I, P>(
    config: &WebSockets,
    protocols: I,
    handler: H,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
    H: Handler<Session>,
    I: IntoIterator<Item = P>,
    P: Into<String>,
{
    Endpoint::messages(config, protocols, handler).route()
}

/// A `web_socket_raw` route for an axum `Router`: a [`RawSession`] per
/// connection, every frame as it arrived and nothing automatic.
pub fn web_socket_raw<S, H>(config: &WebSockets, handler: H) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
    H: Handler<RawSession>,
{
    Endpoint::frames(config, handler).route()
}

/// A WebSocket and other handlers on one path (Ktor's `webSocket` next to a
/// `get` of the same path): a request with `Upgrade: websocket` goes to the
/// socket, any other to `other`, which answers as it would alone (its own
/// methods, its fallback, 405 for a method it lacks).
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use duplex::{Session, WebSockets};
///
/// # async fn run() -> std::io::Result<()> {
/// let ws = WebSockets::default();
/// let live = duplex::web_socket_or(
///     &ws,
///     |mut s: Session| async move {
///         while let Ok(Some(m)) = s.recv().await {
///             let _ = s.send(m).await;
///         }
///     },
///     get(|| async { "the page that opens the socket" }),
/// );
/// let router: Router = Router::new().route("/live", live);
/// axum::serve(tokio::net::TcpListener::bind("127.0.0.1:0").await?, router).await
/// # }
/// ```
///
/// The upgrade check wraps the routes `other` has when it is passed in:
/// add every method to `other` before, not to the result.
pub fn web_socket_or<S, H>(
    config: &WebSockets,
    handler: H,
    other: MethodRouter<S>,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
    H: Handler<Session>,
{
    web_socket_with_protocols_or(config, std::iter::empty::<String>(), handler, other)
}

/// [`web_socket_with_protocols`] and other handlers on one path, as
/// [`web_socket_or`].
pub fn web_socket_with_protocols_or<S, H, I, P>(
    config: &WebSockets,
    protocols: I,
    handler: H,
    other: MethodRouter<S>,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
    H: Handler<Session>,
    I: IntoIterator<Item = P>,
    P: Into<String>,
{
    Endpoint::messages(config, protocols, handler).route_or(other)
}

/// [`web_socket_raw`] and other handlers on one path, as [`web_socket_or`].
pub fn web_socket_raw_or<S, H>(
    config: &WebSockets,
    handler: H,
    other: MethodRouter<S>,
) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
    H: Handler<RawSession>,
{
    Endpoint::frames(config, handler).route_or(other)
}

/// Whether the request asks for a WebSocket (`Upgrade: websocket`); the
/// rest of the handshake is checked by the endpoint, which answers a
/// malformed upgrade with its own error rather than handing it to a page.
fn is_websocket_upgrade(request: &http::Request<Body>) -> bool {
    crate::h2::is_extended_connect(request)
        || request
            .headers()
            .get_all(http::header::UPGRADE)
            .iter()
            .any(|value| duplex_proto::header_has_token(value.as_bytes(), "websocket"))
}

type MakeSession<S> = fn(Sender, Arc<Request>, Option<String>, Vec<ExtensionOffer>) -> S;

/// One WebSocket endpoint: what every upgrade on its route needs.
struct Endpoint<Sess, H> {
    config: WebSockets,
    protocols: Arc<[String]>,
    mode: Mode,
    make_session: MakeSession<Sess>,
    handler: H,
}

impl<Sess, H: Clone> Clone for Endpoint<Sess, H> {
    fn clone(&self) -> Self {
        Endpoint {
            config: self.config.clone(),
            protocols: Arc::clone(&self.protocols),
            mode: self.mode,
            make_session: self.make_session,
            handler: self.handler.clone(),
        }
    }
}

impl<H: Handler<Session>> Endpoint<Session, H> {
    fn messages<I, P>(config: &WebSockets, protocols: I, handler: H) -> Self
    where
        I: IntoIterator<Item = P>,
        P: Into<String>,
    {
        Endpoint {
            config: config.clone(),
            protocols: protocols.into_iter().map(Into::into).collect(),
            mode: Mode::Messages,
            make_session: Session::new,
            handler,
        }
    }
}

impl<H: Handler<RawSession>> Endpoint<RawSession, H> {
    fn frames(config: &WebSockets, handler: H) -> Self {
        Endpoint {
            config: config.clone(),
            protocols: Arc::new([]),
            mode: Mode::Frames,
            make_session: RawSession::new,
            handler,
        }
    }
}

impl<Sess, H> Endpoint<Sess, H>
where
    Sess: Send + 'static,
    H: Handler<Sess>,
{
    fn serve(
        &self,
        request: http::Request<Body>,
    ) -> impl Future<Output = Response> + Send + use<Sess, H> {
        let this = self.clone();
        async move {
            upgrade(
                request,
                this.config,
                &this.protocols,
                this.mode,
                this.make_session,
                this.handler,
            )
            .await
        }
    }

    /// Every method: a request that is not a GET gets its answer (405)
    /// from the handshake checks.
    fn route<S: Clone + Send + Sync + 'static>(self) -> MethodRouter<S> {
        any(move |request: http::Request<Body>| self.serve(request))
    }

    fn route_or<S: Clone + Send + Sync + 'static>(self, other: MethodRouter<S>) -> MethodRouter<S> {
        // A layer over each of `other`'s routes and its fallback, so that
        // an upgrade is taken whatever methods `other` has, and any other
        // request is answered by `other` exactly as without the layer.
        other.layer(axum::middleware::from_fn(
            move |request: http::Request<Body>, next: Next| {
                let upgrade = if is_websocket_upgrade(&request) {
                    Ok(self.serve(request))
                } else {
                    Err(request)
                };
                async move {
                    match upgrade {
                        Ok(upgrade) => upgrade.await,
                        Err(request) => next.run(request).await,
                    }
                }
            },
        ))
    }
}

async fn upgrade<S, H>(
    request: http::Request<Body>,
    config: WebSockets,
    protocols: &[String],
    mode: Mode,
    make_session: MakeSession<S>,
    handler: H,
) -> Response
where
    S: Send + 'static,
    H: Handler<S>,
{
    let (mut parts, _body) = request.into_parts();
    // The `App` serving this route shuts this configuration's sessions down
    // with its own, whichever configuration the route was built with.
    let _ = SERVED.try_with(|served| served.note(&config.lifecycle));
    let remote_addr = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    if config.lifecycle.is_shutting_down() {
        return refuse(Rejection::ShuttingDown, parts.uri.path(), remote_addr);
    }
    let checked = if parts.version == http::Version::HTTP_2 {
        crate::h2::accept(
            &parts.method,
            &parts.uri,
            &parts.extensions,
            &parts.headers,
            protocols,
            &config.origins,
        )
    } else {
        handshake::accept(
            &parts.method,
            parts.version,
            &parts.headers,
            protocols,
            &config.origins,
        )
    };
    let mut accepted = match checked {
        Ok(accepted) => accepted,
        Err(rejection) => return refuse(rejection, parts.uri.path(), remote_addr),
    };
    // Raw sessions hand over frames untouched, so they take no extensions (as in Ktor).
    let factories: &[_] = if mode == Mode::Messages {
        &config.extensions
    } else {
        &[]
    };
    let negotiated = match handshake::negotiate_extensions(&parts.headers, factories, &mut accepted)
    {
        Ok(negotiated) => negotiated,
        Err(rejection) => return refuse(rejection, parts.uri.path(), remote_addr),
    };
    let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
        // HTTP/2 or a test harness without a connection behind the request.
        tracing::debug!(path = %parts.uri.path(), "request cannot be upgraded");
        return (
            http::StatusCode::BAD_REQUEST,
            "this connection cannot be upgraded\n",
        )
            .into_response();
    };
    let path_params = RawPathParams::from_request_parts(&mut parts, &())
        .await
        .map(|params| {
            params
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    if let Some(limit) = config.memory_budget {
        let address = config
            .admission
            .address_bytes(&config.limits, remote_addr.map(|addr| addr.ip()));
        if config.budget.is_full(limit, address.as_deref()) {
            return refuse(Rejection::MemoryFull, parts.uri.path(), remote_addr);
        }
    }
    // Checked last: a request refused for any other reason spends no token.
    let slot = match config.admission.admit(
        &config.limits,
        remote_addr.map(|addr| addr.ip()),
        Inner::now(),
    ) {
        Ok(slot) => slot,
        Err(rejection) => return refuse(rejection, parts.uri.path(), remote_addr),
    };

    // The mark that keeps an HTTP/2 connection from being idle goes with
    // the session's task, not its `Request`, which the application may
    // clone and keep after the session ends.
    let open_stream = parts
        .extensions
        .remove::<Arc<crate::stream_ledger::OpenStream>>();
    let request = Arc::new(Request {
        method: parts.method,
        uri: detach_uri(&parts.uri),
        version: parts.version,
        headers: detach_headers(&parts.headers),
        remote_addr,
        path_params,
        extensions: parts.extensions,
    });
    let response = accepted.response();
    let protocol = accepted.protocol;
    let lifecycle = config.lifecycle.clone();
    lifecycle.spawn(async move {
        // Held for the session's life: its place in the per-address count,
        // and its HTTP/2 stream's in its connection's.
        let slot = (slot, open_stream);
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!("upgrade failed: {err}");
                return;
            }
        };
        let peer = Peer::Session(Arc::clone(&request));
        let mut conn = Connection::new(config.proto_config(mode), Inner::now());
        let extension_names = negotiated.iter().map(|n| n.response.clone()).collect();
        conn.set_extensions(negotiated.into_iter().map(|n| n.extension).collect());
        let shared = Arc::new(Shared::new(conn));
        let sender = Sender::new(Arc::clone(&shared), Arc::clone(&config.converter));
        let session = make_session(sender, request, protocol, extension_names);
        let handler_future = handler.call(session);
        let shutdown = config.lifecycle.signal();
        gauge!("duplex_sessions").increment(1);
        let (socket, leftover) = Socket::from_upgraded(upgraded);
        Driver::new(
            socket,
            leftover,
            shared,
            handler_future,
            shutdown,
            config.write_timeout,
            peer,
        )
        // Made here, in the expression awaited, so that the task's future
        // holds it once (inside the driver), not also as a local.
        .with_charge(
            config
                .memory_budget
                .map(|limit| config.budget.charge(limit, slot.0.address_bytes().cloned())),
        )
        .await;
        gauge!("duplex_sessions").decrement(1);
    });
    response
}

/// Answers a refused upgrade: counted by reason, and logged at `info`
/// with the peer, the path, the status and the reason, within the log
/// limit (a flood of bad handshakes cannot flood the log; the next line
/// that passes says how many were left out).
fn refuse(rejection: Rejection, path: &str, peer: Option<SocketAddr>) -> Response {
    let reason = rejection.metric_label();
    counter!("duplex_upgrades_refused_total", "reason" => reason).increment(1);
    if let Some(skipped) = crate::log_limit::REFUSALS.admit() {
        tracing::info!(
            peer = %Peer::Addr(peer),
            path,
            status = rejection.status().as_u16(),
            reason,
            skipped,
            "WebSocket upgrade refused: {rejection}"
        );
    }
    rejection.into_response()
}

/// A copy of `headers` in allocations of its own. hyper's header values are
/// slices of its whole read buffer, which would otherwise stay alive (8 KiB
/// or more) for the session's life through the [`Request`].
///
/// The values share one allocation: a copy per value cost a seventh of the
/// instructions of a whole handshake.
fn detach_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let total = headers.values().map(|v| v.len()).sum();
    let mut values = bytes::BytesMut::with_capacity(total);
    for value in headers.values() {
        values.extend_from_slice(value.as_bytes());
    }
    let mut values = values.freeze();
    let mut copy = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let own = values.split_to(value.len());
        let Ok(value) = http::HeaderValue::from_maybe_shared(own) else {
            continue;
        };
        // Names are already owned: standard ones are static, and the
        // others are copied out of the buffer when hyper parses them.
        copy.append(name.clone(), value);
    }
    copy
}

/// A copy of `uri` that does not point into hyper's read buffer.
fn detach_uri(uri: &http::Uri) -> http::Uri {
    uri.to_string().parse().unwrap_or_else(|_| uri.clone())
}
