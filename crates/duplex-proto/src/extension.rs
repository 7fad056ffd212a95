//! Extensions (RFC 6455 §9): the `Sec-WebSocket-Extensions` grammar, the
//! negotiation a server runs, and the per-message processing of a
//! negotiated extension.
//!
//! An extension claims RSV bits. A message whose first frame carries some
//! of those bits was transformed by it; the others pass it untouched.
//! Outgoing messages go through the negotiated extensions in the order they
//! were installed, incoming ones in the reverse order, so that each undoes
//! what its peer did last.

use std::{fmt, sync::Arc, time::Duration};

use bytes::Bytes;

use crate::{
    error::ProtocolError,
    frame::{OpCode, Rsv},
    message::{Message, Utf8Bytes},
};

/// One `name; param; param=value` item of a `Sec-WebSocket-Extensions`
/// header: an offer from a client or an answer from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtensionOffer {
    /// The extension token, such as `permessage-deflate`.
    pub name: String,
    /// The parameters in order; a parameter without `=` has no value.
    /// Quoted values are unquoted.
    pub params: Vec<(String, Option<String>)>,
}

impl ExtensionOffer {
    /// An item with no parameters.
    pub fn new(name: impl Into<String>) -> Self {
        ExtensionOffer {
            name: name.into(),
            params: Vec::new(),
        }
    }

    /// Adds a parameter.
    #[must_use]
    pub fn param(mut self, name: impl Into<String>, value: Option<String>) -> Self {
        self.params.push((name.into(), value));
        self
    }
}

impl fmt::Display for ExtensionOffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        for (name, value) in &self.params {
            match value {
                Some(value) => write!(f, "; {name}={value}")?,
                None => write!(f, "; {name}")?,
            }
        }
        Ok(())
    }
}

/// A `Sec-WebSocket-Extensions` value that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Sec-WebSocket-Extensions header: {0}")]
pub struct ExtensionSyntaxError(pub &'static str);

/// Parses one `Sec-WebSocket-Extensions` value (§9.1) into its items, in
/// order. Call it once per header line and concatenate.
///
/// ```
/// use duplex_proto::parse_extensions;
/// let offers = parse_extensions("permessage-deflate; client_max_window_bits, x-foo; a=\"1\"").unwrap();
/// assert_eq!(offers[0].name, "permessage-deflate");
/// assert_eq!(offers[0].params, [("client_max_window_bits".to_string(), None)]);
/// assert_eq!(offers[1].params, [("a".to_string(), Some("1".to_string()))]);
/// ```
///
/// # Errors
/// [`ExtensionSyntaxError`] for anything outside the grammar: an empty
/// item, a bad token, an unterminated quote.
pub fn parse_extensions(value: &str) -> Result<Vec<ExtensionOffer>, ExtensionSyntaxError> {
    let mut parser = Parser {
        rest: value.as_bytes(),
    };
    let mut offers = Vec::new();
    loop {
        parser.skip_ws();
        if parser.rest.is_empty() {
            break;
        }
        if parser.eat(b',') {
            // Empty list items are allowed by the #rule.
            continue;
        }
        let name = parser
            .token()
            .ok_or(ExtensionSyntaxError("expected an extension name"))?;
        let mut offer = ExtensionOffer::new(name);
        loop {
            parser.skip_ws();
            if parser.eat(b';') {
                parser.skip_ws();
                let param = parser
                    .token()
                    .ok_or(ExtensionSyntaxError("expected a parameter name"))?;
                parser.skip_ws();
                let value = if parser.eat(b'=') {
                    parser.skip_ws();
                    Some(parser.value()?)
                } else {
                    None
                };
                offer.params.push((param, value));
            } else if parser.eat(b',') || parser.rest.is_empty() {
                break;
            } else {
                return Err(ExtensionSyntaxError("unexpected character"));
            }
        }
        offers.push(offer);
    }
    Ok(offers)
}

struct Parser<'a> {
    rest: &'a [u8],
}

impl Parser<'_> {
    fn skip_ws(&mut self) {
        while let [b' ' | b'\t', rest @ ..] = self.rest {
            self.rest = rest;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        match self.rest.split_first() {
            Some((&b, rest)) if b == byte => {
                self.rest = rest;
                true
            }
            _ => false,
        }
    }

    fn token(&mut self) -> Option<String> {
        let len = self.rest.iter().take_while(|&&b| is_tchar(b)).count();
        if len == 0 {
            return None;
        }
        let (token, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(String::from_utf8_lossy(token).into_owned())
    }

    fn value(&mut self) -> Result<String, ExtensionSyntaxError> {
        if !self.eat(b'"') {
            return self
                .token()
                .ok_or(ExtensionSyntaxError("expected a parameter value"));
        }
        let mut out = Vec::new();
        loop {
            match self.rest.split_first() {
                None => return Err(ExtensionSyntaxError("unterminated quoted string")),
                Some((b'"', rest)) => {
                    self.rest = rest;
                    break;
                }
                Some((b'\\', [escaped, rest @ ..])) => {
                    out.push(*escaped);
                    self.rest = rest;
                }
                Some((&b, rest)) => {
                    out.push(b);
                    self.rest = rest;
                }
            }
        }
        // §9.1: a quoted value must still be a token once unquoted.
        if out.is_empty() || !out.iter().all(|&b| is_tchar(b)) {
            return Err(ExtensionSyntaxError("quoted value is not a token"));
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// RFC 7230 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A negotiated extension, one per connection: it transforms whole
/// messages (Ktor's `WebSocketExtension`).
pub trait Extension: Send + fmt::Debug {
    /// The extension token.
    fn name(&self) -> &str;

    /// The RSV bits it claims.
    fn rsv(&self) -> Rsv;

    /// Transforms an outgoing message. Returns the payload to send and the
    /// RSV bits to set on its first frame (none when it left the message as
    /// it was).
    ///
    /// # Errors
    /// A [`ProtocolError`] fails the connection with its close code.
    fn encode(&mut self, opcode: OpCode, payload: Bytes) -> Result<(Rsv, Bytes), ProtocolError>;

    /// Undoes the transformation on an incoming message whose first frame
    /// carried some of this extension's bits. The result may not exceed
    /// `max_size` bytes: stop and fail with
    /// [`ProtocolError::MessageTooBig`] as soon as it would.
    ///
    /// # Errors
    /// A [`ProtocolError`] fails the connection with its close code.
    fn decode(
        &mut self,
        opcode: OpCode,
        rsv: Rsv,
        payload: Bytes,
        max_size: u64,
    ) -> Result<Bytes, ProtocolError>;

    /// Whether this extension encodes every message the same way, whatever
    /// came before: then connections whose encodings have equal keys can
    /// share one encoding of a broadcast message. `None` (the default) means
    /// each connection must encode for itself.
    fn shared_encoding(&self) -> Option<SharedEncoding> {
        None
    }

    /// How long after the connection's last outgoing message the extension
    /// wants [`release_idle`](Self::release_idle) called: `None` (the
    /// default) when it keeps nothing worth releasing between messages.
    fn idle_timeout(&self) -> Option<Duration> {
        None
    }

    /// The connection has sent nothing for [`idle_timeout`](Self::idle_timeout):
    /// drop state that the next message can rebuild (a compressor may always
    /// start again from an empty window; an inflate window the peer relies
    /// on may not be dropped).
    fn release_idle(&mut self) {}
}

/// A whole incoming message that extensions transformed and that is still
/// in its wire form: what a [`Connection`](crate::Connection) whose
/// extensions were taken out with
/// [`detach_extensions`](crate::Connection::detach_extensions) hands over as
/// [`Event::Encoded`](crate::Event::Encoded), for
/// [`Extensions::decode`] to undo outside whatever lock guards the
/// connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedMessage {
    /// Text or binary.
    pub opcode: OpCode,
    /// The RSV bits of its first frame: the extensions that transformed it.
    pub rsv: Rsv,
    /// The payload as it arrived, fragments joined and unmasked.
    pub payload: Bytes,
}

/// The extensions negotiated for one connection, in installation order: the
/// per-message work of RFC 6455 §9 (compression, for permessage-deflate).
///
/// A [`Connection`](crate::Connection) runs them itself when given them with
/// [`set_extensions`](crate::Connection::set_extensions). A caller that
/// shares the connection between tasks behind a lock takes them out with
/// [`detach_extensions`](crate::Connection::detach_extensions) and runs
/// [`encode`](Self::encode) and [`decode`](Self::decode) itself, so that
/// the lock is not held while a message is compressed or inflated.
#[derive(Debug, Default)]
pub struct Extensions {
    list: Vec<Box<dyn Extension>>,
}

impl Extensions {
    /// The extensions of one connection, in installation order.
    pub fn new(list: Vec<Box<dyn Extension>>) -> Self {
        Extensions { list }
    }

    /// Whether none was negotiated.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The RSV bits they claim together.
    pub fn rsv(&self) -> Rsv {
        self.list
            .iter()
            .fold(Rsv::NONE, |acc, e| acc.union(e.rsv()))
    }

    /// The extensions.
    pub fn iter(&self) -> impl Iterator<Item = &dyn Extension> {
        self.list.iter().map(|e| &**e)
    }

    /// The shared encoding of a connection whose only extension has one.
    pub fn shared_encoding(&self) -> Option<SharedEncoding> {
        match self.list.as_slice() {
            [only] => only.shared_encoding(),
            _ => None,
        }
    }

    /// The shortest [`Extension::idle_timeout`] among them.
    pub fn idle_timeout(&self) -> Option<Duration> {
        self.list.iter().filter_map(|e| e.idle_timeout()).min()
    }

    /// Calls [`Extension::release_idle`] on each.
    pub fn release_idle(&mut self) {
        for extension in &mut self.list {
            extension.release_idle();
        }
    }

    /// Transforms an outgoing message through each extension, in
    /// installation order: the RSV bits for its first frame and the payload.
    ///
    /// # Errors
    /// The first extension's error; it fails the connection.
    pub fn encode(
        &mut self,
        opcode: OpCode,
        mut payload: Bytes,
    ) -> Result<(Rsv, Bytes), ProtocolError> {
        let mut rsv = Rsv::NONE;
        for extension in &mut self.list {
            let (bits, encoded) = extension.encode(opcode, payload)?;
            rsv = rsv.union(bits);
            payload = encoded;
        }
        Ok((rsv, payload))
    }

    /// Undoes the extensions that marked `message`, last installed first,
    /// with `max_size` as the limit of every result, then checks text as
    /// UTF-8.
    ///
    /// # Errors
    /// The extension's error ([`ProtocolError::MessageTooBig`] past
    /// `max_size`), or [`ProtocolError::InvalidUtf8`]; either fails the
    /// connection.
    pub fn decode(
        &mut self,
        message: EncodedMessage,
        max_size: u64,
    ) -> Result<Message, ProtocolError> {
        let EncodedMessage {
            opcode,
            rsv,
            mut payload,
        } = message;
        for extension in self.list.iter_mut().rev() {
            if rsv.0 & extension.rsv().0 != 0 {
                payload = extension.decode(opcode, rsv, payload, max_size)?;
            }
        }
        if opcode == OpCode::Text {
            if simdutf8::basic::from_utf8(&payload).is_err() {
                return Err(ProtocolError::InvalidUtf8);
            }
            Ok(Message::Text(Utf8Bytes::from_validated(payload)))
        } else {
            Ok(Message::Binary(payload))
        }
    }
}

type EncodeFn = dyn Fn(OpCode, &[u8]) -> Result<(Rsv, Bytes), ProtocolError> + Send + Sync;

/// A stateless encoding that connections can share (see
/// [`Extension::shared_encoding`]).
#[derive(Clone)]
pub struct SharedEncoding {
    key: Arc<str>,
    encode: Arc<EncodeFn>,
}

impl SharedEncoding {
    /// An encoding identified by `key`: two encodings with equal keys must
    /// produce the same bytes for the same message.
    pub fn new(
        key: impl Into<Arc<str>>,
        encode: impl Fn(OpCode, &[u8]) -> Result<(Rsv, Bytes), ProtocolError> + Send + Sync + 'static,
    ) -> Self {
        SharedEncoding {
            key: key.into(),
            encode: Arc::new(encode),
        }
    }

    /// The identity of the encoding.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Encodes a message: the RSV bits for its frame and the payload.
    ///
    /// # Errors
    /// As [`Extension::encode`].
    pub fn encode(&self, opcode: OpCode, payload: &[u8]) -> Result<(Rsv, Bytes), ProtocolError> {
        (self.encode)(opcode, payload)
    }
}

impl fmt::Debug for SharedEncoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedEncoding").field(&self.key).finish()
    }
}

impl PartialEq for SharedEncoding {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}

impl Eq for SharedEncoding {}

/// What negotiation produced: the parameters to answer with and the
/// extension for this connection.
pub struct Negotiated {
    /// The item for the `Sec-WebSocket-Extensions` response header.
    pub response: ExtensionOffer,
    /// The per-connection extension.
    pub extension: Box<dyn Extension>,
}

impl fmt::Debug for Negotiated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Negotiated")
            .field("response", &self.response)
            .finish_non_exhaustive()
    }
}

/// Installed on a server: negotiates an extension for each connection
/// (Ktor's `WebSocketExtensionFactory`).
pub trait ExtensionFactory: Send + Sync + fmt::Debug + 'static {
    /// The extension token offers are matched against (exactly).
    fn name(&self) -> &str;

    /// The RSV bits the extension claims; two installed extensions may not
    /// share one.
    fn rsv(&self) -> Rsv;

    /// Picks one of the client's offers of this extension (given in the
    /// client's order of preference), or declines them all with `None`.
    fn negotiate(&self, offers: &[&ExtensionOffer]) -> Option<Negotiated>;
}

/// Runs server-side negotiation: for each installed factory, in order, the
/// client's offers with its name. Returns the accepted extensions in
/// installation order.
pub fn negotiate(
    factories: &[std::sync::Arc<dyn ExtensionFactory>],
    offers: &[ExtensionOffer],
) -> Vec<Negotiated> {
    let mut taken = Rsv::NONE;
    let mut accepted = Vec::new();
    for factory in factories {
        let mine: Vec<&ExtensionOffer> =
            offers.iter().filter(|o| o.name == factory.name()).collect();
        if mine.is_empty() || taken.0 & factory.rsv().0 != 0 {
            continue;
        }
        if let Some(negotiated) = factory.negotiate(&mine) {
            taken = taken.union(factory.rsv());
            accepted.push(negotiated);
        }
    }
    accepted
}

#[cfg(test)]
mod rfc6455_9_1_negotiating_extensions {
    use super::*;

    #[test]
    fn several_offers_and_parameters() {
        let offers = parse_extensions(
            "permessage-deflate; client_max_window_bits; server_max_window_bits=10 , permessage-deflate",
        )
        .unwrap();
        assert_eq!(offers.len(), 2);
        assert_eq!(
            offers[0].params,
            [
                ("client_max_window_bits".to_string(), None),
                ("server_max_window_bits".to_string(), Some("10".to_string()))
            ]
        );
        assert!(offers[1].params.is_empty());
    }

    #[test]
    fn quoted_values_are_unquoted() {
        let offers = parse_extensions(r#"x; a="12"; b = "tok\en""#).unwrap();
        assert_eq!(offers[0].params[0].1.as_deref(), Some("12"));
        assert_eq!(offers[0].params[1].1.as_deref(), Some("token"));
    }

    #[test]
    fn bad_syntax_is_an_error_not_a_panic() {
        for bad in [
            "permessage-deflate; ",
            "; x",
            "a b",
            "x; a=\"unterminated",
            "x; a=\"has space\"",
            "x; a=",
            "x;;",
            "é",
            "x; a=\"\"",
        ] {
            assert!(parse_extensions(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn empty_items_are_skipped() {
        assert_eq!(parse_extensions(" , a ,, b").unwrap().len(), 2);
        assert!(parse_extensions("").unwrap().is_empty());
    }

    #[test]
    fn display_round_trips() {
        let offer = ExtensionOffer::new("permessage-deflate")
            .param("server_no_context_takeover", None)
            .param("client_max_window_bits", Some("12".into()));
        let text = offer.to_string();
        assert_eq!(
            text,
            "permessage-deflate; server_no_context_takeover; client_max_window_bits=12"
        );
        assert_eq!(parse_extensions(&text).unwrap(), [offer]);
    }
}
