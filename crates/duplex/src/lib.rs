//! duplex: a WebSocket server framework, Ktor's server WebSockets plugin
//! rebuilt as idiomatic, fast Rust.
//!
//! An echo server:
//!
//! ```no_run
//! use duplex::{App, Session};
//!
//! #[tokio::main]
//! async fn main() -> std::io::Result<()> {
//!     App::new()
//!         .web_socket("/echo", |mut session: Session| async move {
//!             while let Some(message) = session.recv().await? {
//!                 session.send(message).await?;
//!             }
//!             Ok::<_, duplex::Error>(())
//!         })
//!         .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
//!         .await
//! }
//! ```
//!
//! # The pieces
//! - [`App`] installs a [`WebSockets`] configuration (ping period, timeout,
//!   frame and message limits, masking, buffers, origins, content converter)
//!   and routes `web_socket` endpoints next to plain axum routes. Users with
//!   their own axum `Router` mount [`web_socket`] and [`web_socket_raw`] in it.
//! - A default [`Session`] answers pings, pings the peer and times it out,
//!   reassembles fragments and completes the closing handshake: its handler
//!   sees whole messages. A [`RawSession`] hands over every frame.
//! - [`Sender`] sends from any task; [`Session::recv`] and
//!   [`Session::incoming`] receive; [`Sender::close_reason`] says how it
//!   ended.
//!
//! # Sessions and Ktor's events
//! `onConnect` is the start of the handler; `onMessage` each
//! [`Session::recv`] that returns a message; `onClose` a `recv` that returns
//! `Ok(None)`; `onError` a `recv` that returns `Err`. In both of the last two
//! [`Sender::close_reason`] is set.
//!
//! # Authentication
//! Check the upgrade request in an axum middleware in front of the route:
//! it answers 401 or 403 before any 101, and what it puts in the request's
//! extensions (any `Clone + Send + Sync` value) the session reads with
//! [`Request::extension`]. The examples `auth_bearer` and `auth_cookie` are
//! whole servers.
//!
//! ```no_run
//! use axum::{extract::Request, http::StatusCode, middleware::{self, Next}, response::{IntoResponse, Response}};
//! use duplex::{App, Session};
//!
//! #[derive(Clone)]
//! struct User(String);
//!
//! async fn require_token(mut request: Request, next: Next) -> Response {
//!     match request.headers().get("authorization").and_then(|v| v.to_str().ok()) {
//!         Some("Bearer alice-token") => {
//!             request.extensions_mut().insert(User("alice".into()));
//!             next.run(request).await
//!         }
//!         _ => StatusCode::UNAUTHORIZED.into_response(),
//!     }
//! }
//!
//! # async fn run() -> std::io::Result<()> {
//! let app = App::new();
//! let ws = app.websockets().clone();
//! let route = duplex::web_socket(&ws, |session: Session| async move {
//!     let user = session.request().extension::<User>().cloned();
//!     let _ = session.send_text(format!("hello, {}", user.map_or_else(String::new, |u| u.0))).await;
//! })
//! .layer(middleware::from_fn(require_token));
//! app.route("/ws", route)
//!     .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
//!     .await
//! # }
//! ```
//!
//! # Limits
//! Everything a peer can make the server hold is bounded by default; each
//! setter of [`WebSockets`] and [`App`] states its default: frame and
//! message sizes, the inbox and outbox (Pongs count), the write timeout for
//! a peer that stops reading, Ping and Close timeouts, sessions in all and
//! per address, the handshake rate per address, request head size and
//! read time, HTTP connections, and the `Origin` check (same-origin by
//! default).
//!
//! # Testing
//! `duplex::testing` (the default feature `testing`) serves an [`App`] on a
//! loopback port and connects sessions and raw clients to it in one call.
//!
//! # Features
//! All on by default; without any, duplex is the server (routes, sessions,
//! limits, HTTP/1.1 and HTTP/2, user extensions and converters).
//! - `tls`: `App::serve_tls`, `duplex::tls` and, with `client`, `wss://`.
//! - `client`: `Client` and `connect`.
//! - `json`: `JsonConverter`, the default converter (without it,
//!   `send_json` and `recv_json` fail with [`ConvertError::NoConverter`]
//!   until [`WebSockets::content_converter`] installs one).
//! - `deflate`: `Deflate`, permessage-deflate (RFC 7692).
//! - `hub`: `Hub` and its backplanes.
//! - `metrics`: counters and gauges through the `metrics` facade.
//! - `testing`: `duplex::testing` (implies `client`).
//!
//! # The protocol
//! RFC 6455 itself lives in the sans-I/O crate [`duplex_proto`], re-exported
//! here as [`proto`].
#![deny(unsafe_code)]

// The `metrics` facade's macros, or with the feature off a value whose
// methods do nothing: call sites stay the same either way.
#[cfg(feature = "metrics")]
macro_rules! counter {
    ($($arg:tt)*) => { ::metrics::counter!($($arg)*) };
}
#[cfg(feature = "metrics")]
macro_rules! gauge {
    ($($arg:tt)*) => { ::metrics::gauge!($($arg)*) };
}
#[cfg(not(feature = "metrics"))]
macro_rules! counter {
    ($name:literal $(, $key:literal => $value:expr)* $(,)?) => {{
        $(let _ = ($key, $value);)*
        $crate::NoMetric
    }};
}
#[cfg(not(feature = "metrics"))]
macro_rules! gauge {
    ($name:literal $(, $key:literal => $value:expr)* $(,)?) => {{
        $(let _ = ($key, $value);)*
        $crate::NoMetric
    }};
}

/// What `counter!` and `gauge!` give without the `metrics` feature.
#[cfg(not(feature = "metrics"))]
#[derive(Clone, Copy)]
pub(crate) struct NoMetric;

#[cfg(not(feature = "metrics"))]
impl NoMetric {
    #[inline]
    pub(crate) fn increment<T>(self, _: T) {}
    #[inline]
    pub(crate) fn decrement<T>(self, _: T) {}
    #[inline]
    #[cfg_attr(not(feature = "hub"), allow(dead_code))]
    pub(crate) fn set<T>(self, _: T) {}
}

mod address_limit;
mod admission;
mod app;
mod body_deadline;
mod budget;
#[cfg(feature = "client")]
mod client;
mod config;
mod convert;
mod driver;
mod endpoint;
mod error;
mod h2;
mod handler;
mod handshake;
#[cfg(feature = "hub")]
mod hub;
mod lifecycle;
mod log_limit;
#[cfg(feature = "metrics")]
pub mod metrics;
mod request;
mod session;
mod shared;
mod socket;
mod stream_ledger;
#[cfg(feature = "testing")]
pub mod testing;
#[cfg(feature = "tls")]
pub mod tls;
#[cfg(feature = "hub")]
pub mod topics;
mod write_deadline;

pub use app::App;

/// Pure functions of the server's, public for the fuzz targets only.
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::h2::{Preface, sniff_preface};
}
pub use axum;
/// The byte buffers of messages and frames ([`Message::binary`], payloads).
pub use bytes;
#[cfg(feature = "client")]
pub use client::{Client, ClientError, Http2Connection, connect};
pub use config::{ExtensionConflict, WebSockets};
#[cfg(feature = "json")]
pub use convert::JsonConverter;
pub use convert::{ContentConverter, ConvertError, ErasedDeserializer};
pub use duplex_proto as proto;
#[cfg(feature = "deflate")]
pub use duplex_proto::Deflate;
pub use duplex_proto::{
    CloseCode, CloseReason, Extension, ExtensionFactory, ExtensionOffer, Frame, Message, OpCode,
    Rsv, Utf8Bytes,
};
pub use endpoint::{
    web_socket, web_socket_or, web_socket_raw, web_socket_raw_or, web_socket_with_protocols,
    web_socket_with_protocols_or,
};
/// The crate of [`ContentConverter`]'s signatures, for implementing one.
pub use erased_serde;
pub use error::{BoxError, Error};
/// `Sink`, which [`Sender`] and the sessions implement.
pub use futures_sink::Sink;
pub use handler::{Handler, IntoOutcome};
pub use handshake::Rejection;
/// The HTTP types of [`Request`] (headers, method, URI, status).
pub use http;
#[cfg(feature = "hub")]
pub use hub::{
    Backplane, BackplaneSink, Envelope, Hub, HubBuilder, InMemoryBackplane, Membership, SessionId,
    SlowConsumer, Target,
};
pub use request::Request;
pub use session::{Incoming, RawSession, Receiver, Sender, Session, TrySendError};
