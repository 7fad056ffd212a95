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
//! [`testing`] (the default feature `testing`) serves an [`App`] on a
//! loopback port and connects sessions and raw clients to it in one call.
//!
//! # The protocol
//! RFC 6455 itself lives in the sans-I/O crate [`duplex_proto`], re-exported
//! here as [`proto`].
#![deny(unsafe_code)]

mod admission;
mod app;
mod client;
mod config;
mod convert;
mod driver;
mod endpoint;
mod error;
mod h2;
mod handler;
mod handshake;
mod hub;
mod lifecycle;
pub mod metrics;
mod request;
mod session;
mod shared;
mod socket;
#[cfg(feature = "testing")]
pub mod testing;
pub mod tls;

pub use app::App;
pub use axum;
/// The byte buffers of messages and frames ([`Message::binary`], payloads).
pub use bytes;
pub use client::{Client, ClientError, connect};
pub use config::{ExtensionConflict, WebSockets};
pub use convert::{ContentConverter, ConvertError, ErasedDeserializer, JsonConverter};
pub use duplex_proto as proto;
pub use duplex_proto::{
    CloseCode, CloseReason, Deflate, Extension, ExtensionFactory, ExtensionOffer, Frame, Message,
    OpCode, Rsv, Utf8Bytes,
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
pub use hub::{
    Backplane, BackplaneSink, Envelope, Hub, HubBuilder, InMemoryBackplane, Membership, SessionId,
    SlowConsumer, Target,
};
pub use request::Request;
pub use session::{Incoming, RawSession, Receiver, Sender, Session, TrySendError};
