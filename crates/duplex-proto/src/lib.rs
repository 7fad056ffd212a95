//! The WebSocket protocol (RFC 6455) as a value you feed: bytes and time in,
//! events and bytes out.
//!
//! This crate is the sans-I/O core of [duplex](https://docs.rs/duplex). It has
//! no sockets, never reads a clock, never spawns and does not depend on an
//! async runtime, so every rule can be tested with literal wire bytes and a
//! made-up clock, fuzzed, and reused under any I/O.
//!
//! - [`Connection`] is the state machine of one connection: framing,
//!   masking, fragmentation, UTF-8, control frames, the closing handshake,
//!   pings and limits. Its rustdoc gives the calling protocol.
//! - [`FrameHeader`], [`apply_mask`] and [`Utf8Validator`] are the pieces it
//!   is built from, public for tools that need them alone.
//! - [`accept_key`] and friends are the parts of the opening handshake that
//!   need no HTTP library.
//! - [`Extension`] and [`ExtensionFactory`] are the extension API (RFC 6455
//!   §9), and `Deflate` is permessage-deflate (RFC 7692) with all four
//!   parameters (the default feature `deflate`).
//! - Every failure is a [`ProtocolError`] that knows its close code.
#![deny(unsafe_code)]

mod close;
mod connection;
#[cfg(feature = "deflate")]
mod deflate;
mod error;
mod extension;
mod frame;
mod handshake;
mod mask;
mod message;
#[cfg(test)]
mod tests;
mod timer;
mod utf8;
mod write_queue;

pub use close::{CloseCode, CloseReason};
pub use connection::{
    Config, Connection, Encoding, Event, Mode, Role, SendError, Termination, encode_frame,
};
#[cfg(feature = "deflate")]
pub use deflate::{
    CompressPredicate, Deflate, DeflateExtension, DeflateParams, DeflateResponseError,
    PERMESSAGE_DEFLATE, compress_standalone,
};
pub use error::ProtocolError;
pub use extension::{
    EncodedMessage, Extension, ExtensionFactory, ExtensionOffer, ExtensionSyntaxError, Extensions,
    Negotiated, SharedEncoding, negotiate, parse_extensions,
};
pub use frame::{Frame, FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, Rsv};
pub use handshake::{accept_key, generate_key, header_has_token, header_tokens, is_valid_key};
pub use mask::apply_mask;
pub use message::{Message, Utf8Bytes};
pub use utf8::Utf8Validator;
pub use write_queue::WriteQueue;
