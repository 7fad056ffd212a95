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
    response::{IntoResponse, Response},
    routing::{MethodRouter, any},
};
use duplex_proto::{Connection, ExtensionOffer, Mode};

use crate::{
    config::WebSockets,
    driver::{Driver, Peer},
    handler::Handler,
    handshake::{self, Rejection},
    request::Request,
    session::{RawSession, Sender, Session},
    shared::{Inner, Shared},
    socket::Socket,
};

/// A `web_socket` route for an axum `Router`: a default [`Session`] per
/// connection, with no subprotocol.
pub fn web_socket<H: Handler<Session>>(config: &WebSockets, handler: H) -> MethodRouter {
    web_socket_with_protocols(config, std::iter::empty::<String>(), handler)
}

/// A `web_socket` route that speaks the given subprotocols, in our order of
/// support. The client's first offer that is in the list is chosen; a
/// client that offers none of them gets 400, as in Ktor.
pub fn web_socket_with_protocols<H, I, P>(
    config: &WebSockets,
    protocols: I,
    handler: H,
) -> MethodRouter
where
    H: Handler<Session>,
    I: IntoIterator<Item = P>,
    P: Into<String>,
{
    let protocols = protocols.into_iter().map(Into::into).collect();
    endpoint(config, protocols, Mode::Messages, Session::new, handler)
}

/// A `web_socket_raw` route for an axum `Router`: a [`RawSession`] per
/// connection, every frame as it arrived and nothing automatic.
pub fn web_socket_raw<H: Handler<RawSession>>(config: &WebSockets, handler: H) -> MethodRouter {
    endpoint(config, Vec::new(), Mode::Frames, RawSession::new, handler)
}

type MakeSession<S> = fn(Sender, Arc<Request>, Option<String>, Vec<ExtensionOffer>) -> S;

fn endpoint<S, H>(
    config: &WebSockets,
    protocols: Vec<String>,
    mode: Mode,
    make_session: MakeSession<S>,
    handler: H,
) -> MethodRouter
where
    S: Send + 'static,
    H: Handler<S>,
{
    let config = config.clone();
    let protocols: Arc<[String]> = protocols.into();
    any(move |request: http::Request<Body>| {
        let config = config.clone();
        let protocols = Arc::clone(&protocols);
        let handler = handler.clone();
        async move { upgrade(request, config, &protocols, mode, make_session, handler).await }
    })
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
    if config.lifecycle.is_shutting_down() {
        return Rejection::ShuttingDown.into_response();
    }
    let mut accepted = match handshake::accept(
        &parts.method,
        parts.version,
        &parts.headers,
        protocols,
        &config.origins,
    ) {
        Ok(accepted) => accepted,
        Err(rejection) => {
            tracing::debug!(path = %parts.uri.path(), "WebSocket upgrade rejected: {rejection}");
            return rejection.into_response();
        }
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
        Err(rejection) => {
            tracing::debug!(path = %parts.uri.path(), "WebSocket upgrade rejected: {rejection}");
            return rejection.into_response();
        }
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
    let remote_addr = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    // Checked last: a request refused for any other reason spends no token.
    let slot = match config.admission.admit(
        &config.limits,
        remote_addr.map(|addr| addr.ip()),
        Inner::now(),
    ) {
        Ok(slot) => slot,
        Err(rejection) => {
            tracing::debug!(path = %parts.uri.path(), peer = ?remote_addr, "WebSocket upgrade refused: {rejection}");
            metrics::counter!("duplex_upgrades_refused_total", "reason" => rejection.metric_label())
                .increment(1);
            return rejection.into_response();
        }
    };
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
        // Held for the session's life: its place in the per-address count.
        let _slot = slot;
        let upgraded = match on_upgrade.await {
            Ok(upgraded) => upgraded,
            Err(err) => {
                tracing::debug!("upgrade failed: {err}");
                return;
            }
        };
        let peer = Peer::Addr(remote_addr);
        let mut conn = Connection::new(config.proto_config(mode), Inner::now());
        let extension_names = negotiated.iter().map(|n| n.response.clone()).collect();
        conn.set_extensions(negotiated.into_iter().map(|n| n.extension).collect());
        let shared = Arc::new(Shared::new(conn));
        let sender = Sender::new(Arc::clone(&shared), Arc::clone(&config.converter));
        let session = make_session(sender, request, protocol, extension_names);
        let handler_future = handler.call(session);
        let shutdown = config.lifecycle.signal();
        metrics::gauge!("duplex_sessions").increment(1);
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
        .await;
        metrics::gauge!("duplex_sessions").decrement(1);
    });
    response
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
