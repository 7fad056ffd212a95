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
mod handler;
mod handshake;
mod hub;
mod lifecycle;
mod request;
mod session;
mod shared;
mod socket;
pub mod tls;

pub use app::App;
pub use axum;
pub use client::{Client, ClientError, connect};
pub use config::{ExtensionConflict, WebSockets};
pub use convert::{ContentConverter, ConvertError, ErasedDeserializer, JsonConverter};
pub use duplex_proto as proto;
pub use duplex_proto::{
    CloseCode, CloseReason, Deflate, Extension, ExtensionFactory, ExtensionOffer, Frame, Message,
    OpCode, Rsv, Utf8Bytes,
};
pub use endpoint::{web_socket, web_socket_raw, web_socket_with_protocols};
pub use error::{BoxError, Error};
pub use handler::{Handler, IntoOutcome};
pub use handshake::Rejection;
pub use hub::{
    Backplane, BackplaneSink, Envelope, Hub, HubBuilder, InMemoryBackplane, Membership, SessionId,
    SlowConsumer, Target,
};
pub use request::Request;
pub use session::{Incoming, RawSession, Sender, Session, TrySendError};
