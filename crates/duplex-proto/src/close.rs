//! Close codes and close frames (RFC 6455 §5.5.1, §7.4).

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::ProtocolError;

/// A close status code (RFC 6455 §7.4).
///
/// Any `u16` can be held; [`CloseCode::is_sendable`] says whether it may
/// appear in a Close frame on the wire. The registered codes are
/// associated constants, and duplex itself closes with these:
///
/// | constant | code | duplex closes with it when |
/// |---|---|---|
/// | [`NORMAL`](Self::NORMAL) | 1000 | a handler returns |
/// | [`GOING_AWAY`](Self::GOING_AWAY) | 1001 | the server shuts down |
/// | [`PROTOCOL_ERROR`](Self::PROTOCOL_ERROR) | 1002 | the peer broke RFC 6455 |
/// | [`INVALID_PAYLOAD`](Self::INVALID_PAYLOAD) | 1007 | a text message is not UTF-8 |
/// | [`POLICY_VIOLATION`](Self::POLICY_VIOLATION) | 1008 | the peer is too slow to read (its Ping never left) |
/// | [`TOO_BIG`](Self::TOO_BIG) | 1009 | a frame or message passes its limit |
/// | [`INTERNAL_ERROR`](Self::INTERNAL_ERROR) | 1011 | a Ping timeout, a handler's error or panic |
/// | [`TRY_AGAIN_LATER`](Self::TRY_AGAIN_LATER) | 1013 | the memory budget sheds a session |
///
/// The others: [`UNSUPPORTED_DATA`](Self::UNSUPPORTED_DATA) (1003),
/// [`MANDATORY_EXTENSION`](Self::MANDATORY_EXTENSION) (1010),
/// [`SERVICE_RESTART`](Self::SERVICE_RESTART) (1012),
/// [`BAD_GATEWAY`](Self::BAD_GATEWAY) (1014), and the reserved
/// [`NO_STATUS`](Self::NO_STATUS) (1005), [`ABNORMAL`](Self::ABNORMAL)
/// (1006) and [`TLS_HANDSHAKE`](Self::TLS_HANDSHAKE) (1015), which
/// describe an end and are never sent. Applications use 4000-4999.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CloseCode(pub u16);

macro_rules! close_codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $text:literal; )*) => {
        impl CloseCode {
            $( $(#[$doc])* pub const $name: CloseCode = CloseCode($value); )*

            /// The registered name of this code, if it has one.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $( $value => Some($text), )*
                    _ => None,
                }
            }
        }
    };
}

close_codes! {
    /// 1000: the purpose of the connection is fulfilled.
    NORMAL = 1000, "normal closure";
    /// 1001: the endpoint is going away (server shutdown, page navigation).
    GOING_AWAY = 1001, "going away";
    /// 1002: the peer broke the protocol.
    PROTOCOL_ERROR = 1002, "protocol error";
    /// 1003: a data type the endpoint cannot accept.
    UNSUPPORTED_DATA = 1003, "unsupported data";
    /// 1005: reserved; stands for "the Close frame had no status code". Never sent.
    NO_STATUS = 1005, "no status received";
    /// 1006: reserved; stands for "closed without a Close frame". Never sent.
    ABNORMAL = 1006, "abnormal closure";
    /// 1007: a text message was not valid UTF-8, or data was inconsistent with its type.
    INVALID_PAYLOAD = 1007, "invalid frame payload data";
    /// 1008: the message violates the endpoint's policy.
    POLICY_VIOLATION = 1008, "policy violation";
    /// 1009: a frame or message is too big to process.
    TOO_BIG = 1009, "message too big";
    /// 1010: the client expected an extension the server did not negotiate.
    MANDATORY_EXTENSION = 1010, "mandatory extension";
    /// 1011: the server met an unexpected condition.
    INTERNAL_ERROR = 1011, "internal error";
    /// 1012: the service is restarting.
    SERVICE_RESTART = 1012, "service restart";
    /// 1013: try again later (temporary overload).
    TRY_AGAIN_LATER = 1013, "try again later";
    /// 1014: a gateway received an invalid response upstream.
    BAD_GATEWAY = 1014, "bad gateway";
    /// 1015: reserved; stands for "the TLS handshake failed". Never sent.
    TLS_HANDSHAKE = 1015, "TLS handshake failure";
}

impl CloseCode {
    /// Whether this code may be carried by a Close frame on the wire:
    /// 1000-1003, 1007-1014 and the application range 3000-4999.
    /// Everything else, 1004-1006 and 1015 included, is a protocol error when
    /// received (RFC 6455 §7.4.1, §7.4.2).
    pub const fn is_sendable(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

impl fmt::Debug for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "CloseCode({} {name})", self.0),
            None => write!(f, "CloseCode({})", self.0),
        }
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{} ({name})", self.0),
            None => write!(f, "{}", self.0),
        }
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> Self {
        CloseCode(code)
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> Self {
        code.0
    }
}

/// Why a connection closed: a code and a short UTF-8 reason.
///
/// On the wire the reason must fit a control frame: at most 123 bytes.
/// [`CloseReason::new`] cuts a longer reason at a character boundary.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CloseReason {
    /// The status code.
    pub code: CloseCode,
    /// The reason text, at most [`CloseReason::MAX_REASON_LEN`] bytes.
    pub reason: String,
}

impl CloseReason {
    /// The longest reason a Close frame can carry: 125 bytes less the code.
    pub const MAX_REASON_LEN: usize = 123;

    /// A close reason; a reason longer than 123 bytes is cut at a character
    /// boundary.
    ///
    /// ```
    /// use duplex_proto::{CloseCode, CloseReason};
    /// let r = CloseReason::new(CloseCode::NORMAL, "Client said BYE");
    /// assert_eq!(r.code.0, 1000);
    /// ```
    pub fn new(code: impl Into<CloseCode>, reason: impl Into<String>) -> Self {
        let mut reason = reason.into();
        if reason.len() > Self::MAX_REASON_LEN {
            let mut cut = Self::MAX_REASON_LEN;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        CloseReason {
            code: code.into(),
            reason,
        }
    }

    /// 1000 with an empty reason.
    pub fn normal() -> Self {
        Self::new(CloseCode::NORMAL, "")
    }

    /// Parses a Close frame's payload (RFC 6455 §5.5.1).
    ///
    /// An empty payload means "no status" and yields 1005.
    ///
    /// # Errors
    /// A 1-byte payload or a code that may not be sent is
    /// [`ProtocolError::InvalidClosePayload`] or
    /// [`ProtocolError::InvalidCloseCode`]; a reason that is not UTF-8 is
    /// [`ProtocolError::InvalidUtf8`].
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        match payload {
            [] => Ok(CloseReason::new(CloseCode::NO_STATUS, "")),
            [_] => Err(ProtocolError::InvalidClosePayload),
            [hi, lo, reason @ ..] => {
                let code = CloseCode(u16::from_be_bytes([*hi, *lo]));
                if !code.is_sendable() {
                    return Err(ProtocolError::InvalidCloseCode(code.0));
                }
                let reason =
                    simdutf8::basic::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
                Ok(CloseReason {
                    code,
                    reason: reason.to_owned(),
                })
            }
        }
    }

    /// The Close frame payload for this reason; empty for 1005, which
    /// means "no status" and must not be sent as a code.
    pub fn to_payload(&self) -> Bytes {
        if self.code == CloseCode::NO_STATUS {
            return Bytes::new();
        }
        let mut out = BytesMut::with_capacity(2 + self.reason.len());
        out.put_u16(self.code.0);
        out.put_slice(self.reason.as_bytes());
        out.freeze()
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason.is_empty() {
            write!(f, "{}", self.code)
        } else {
            write!(f, "{}: {}", self.code, self.reason)
        }
    }
}

#[cfg(test)]
mod rfc6455_7_4_close_codes {
    use super::*;

    #[test]
    fn sendable_codes_match_the_registry() {
        for code in [
            1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
        ] {
            assert!(CloseCode(code).is_sendable(), "{code}");
        }
        for code in [3000, 3999, 4000, 4999] {
            assert!(CloseCode(code).is_sendable(), "{code}");
        }
        for code in [
            0, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000, 65535,
        ] {
            assert!(!CloseCode(code).is_sendable(), "{code}");
        }
    }

    #[test]
    fn parse_empty_payload_is_no_status() {
        assert_eq!(CloseReason::parse(&[]).unwrap().code, CloseCode::NO_STATUS);
    }

    #[test]
    fn parse_one_byte_payload_is_a_protocol_error() {
        assert_eq!(
            CloseReason::parse(&[0x03]),
            Err(ProtocolError::InvalidClosePayload)
        );
    }

    #[test]
    fn parse_reserved_code_is_a_protocol_error() {
        for code in [999u16, 1005, 1006, 1015, 2999, 5000] {
            let payload = code.to_be_bytes();
            assert_eq!(
                CloseReason::parse(&payload),
                Err(ProtocolError::InvalidCloseCode(code))
            );
        }
    }

    #[test]
    fn parse_invalid_utf8_reason_is_1007() {
        let err = CloseReason::parse(&[0x03, 0xe8, 0xce, 0xba, 0xe1]).unwrap_err();
        assert_eq!(err, ProtocolError::InvalidUtf8);
        assert_eq!(err.close_code(), CloseCode::INVALID_PAYLOAD);
    }

    #[test]
    fn round_trip_code_and_reason() {
        let r = CloseReason::new(CloseCode(4000), "bye ✓");
        assert_eq!(CloseReason::parse(&r.to_payload()).unwrap(), r);
    }

    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        let r = CloseReason::new(CloseCode::NORMAL, "é".repeat(100));
        assert!(r.reason.len() <= CloseReason::MAX_REASON_LEN);
        assert!(r.to_payload().len() <= 125);
    }
}
