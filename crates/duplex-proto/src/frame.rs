//! Frame headers (RFC 6455 §5.2): decoding from partial input, encoding with
//! the minimal length form.

use bytes::Bytes;

use crate::error::ProtocolError;

/// The longest header: 2 bytes, an 8-byte length and a 4-byte mask key.
pub const MAX_HEADER_LEN: usize = 14;

/// The largest payload a control frame may carry (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame's opcode (§5.2). Reserved opcodes never become an `OpCode`: they
/// fail decoding with [`ProtocolError::ReservedOpcode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpCode {
    /// 0x0: continues a fragmented message.
    Continuation,
    /// 0x1: the first frame of a text message.
    Text,
    /// 0x2: the first frame of a binary message.
    Binary,
    /// 0x8: starts or answers the closing handshake.
    Close,
    /// 0x9: asks the peer for a Pong.
    Ping,
    /// 0xA: answers a Ping, or a one-way heartbeat.
    Pong,
}

impl OpCode {
    /// The opcode for a wire value.
    ///
    /// # Errors
    /// [`ProtocolError::ReservedOpcode`] for 3-7 and 11-15.
    pub const fn from_wire(value: u8) -> Result<Self, ProtocolError> {
        match value {
            0x0 => Ok(OpCode::Continuation),
            0x1 => Ok(OpCode::Text),
            0x2 => Ok(OpCode::Binary),
            0x8 => Ok(OpCode::Close),
            0x9 => Ok(OpCode::Ping),
            0xA => Ok(OpCode::Pong),
            other => Err(ProtocolError::ReservedOpcode(other)),
        }
    }

    /// The wire value.
    pub const fn to_wire(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }

    /// Close, Ping and Pong are control frames (§5.5).
    pub const fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// The RSV1-3 bits of a frame, as the low three bits `0b(rsv1)(rsv2)(rsv3)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rsv(pub u8);

impl Rsv {
    /// No bit set.
    pub const NONE: Rsv = Rsv(0);
    /// RSV1, used by permessage-deflate (RFC 7692).
    pub const RSV1: Rsv = Rsv(0b100);
    /// RSV2.
    pub const RSV2: Rsv = Rsv(0b010);
    /// RSV3.
    pub const RSV3: Rsv = Rsv(0b001);

    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Whether every bit of `other` is set here.
    pub const fn contains(self, other: Rsv) -> bool {
        self.0 & other.0 == other.0
    }

    /// The bits set in either.
    pub const fn union(self, other: Rsv) -> Rsv {
        Rsv(self.0 | other.0)
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Whether this is the final frame of its message.
    pub fin: bool,
    /// The RSV bits.
    pub rsv: Rsv,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, if the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// The payload length.
    pub payload_len: u64,
}

impl FrameHeader {
    /// Decodes a header from the start of `buf`.
    ///
    /// Returns `Ok(None)` when `buf` does not yet hold the whole header, and
    /// otherwise the header and how many bytes it took. Only what the header
    /// alone can break is checked here (reserved opcodes, the length's top
    /// bit); rules that depend on the connection are checked by its caller.
    ///
    /// # Errors
    /// [`ProtocolError::ReservedOpcode`] or [`ProtocolError::InvalidLength`].
    pub fn decode(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let [b0, b1, rest @ ..] = buf else {
            return Ok(None);
        };
        let opcode = OpCode::from_wire(b0 & 0x0f)?;
        let masked = b1 & 0x80 != 0;
        let (payload_len, rest, len_bytes) = match b1 & 0x7f {
            126 => match rest {
                [a, b, rest @ ..] => (u64::from(u16::from_be_bytes([*a, *b])), rest, 2),
                _ => return Ok(None),
            },
            127 => match rest.split_first_chunk::<8>() {
                Some((len, rest)) => {
                    let len = u64::from_be_bytes(*len);
                    if len >> 63 != 0 {
                        return Err(ProtocolError::InvalidLength);
                    }
                    (len, rest, 8)
                }
                None => return Ok(None),
            },
            small => (u64::from(small), rest, 0),
        };
        let mask = if masked {
            match rest.first_chunk::<4>() {
                Some(key) => Some(*key),
                None => return Ok(None),
            }
        } else {
            None
        };
        let header = FrameHeader {
            fin: b0 & 0x80 != 0,
            rsv: Rsv((b0 >> 4) & 0b111),
            opcode,
            mask,
            payload_len,
        };
        Ok(Some((header, 2 + len_bytes + if masked { 4 } else { 0 })))
    }

    /// Encodes the header into `out` with the shortest length form (§5.2)
    /// and returns how many bytes it wrote.
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        out[0] = (u8::from(self.fin) << 7) | ((self.rsv.0 & 0b111) << 4) | self.opcode.to_wire();
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let mut at = match self.payload_len {
            len @ 0..=125 => {
                out[1] = mask_bit | len as u8;
                2
            }
            len @ 126..=0xffff => {
                out[1] = mask_bit | 126;
                out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            len => {
                out[1] = mask_bit | 127;
                out[2..10].copy_from_slice(&len.to_be_bytes());
                10
            }
        };
        if let Some(key) = self.mask {
            out[at..at + 4].copy_from_slice(&key);
            at += 4;
        }
        at
    }
}

/// A frame as it travels: what a raw session receives and may send.
///
/// Payloads are unmasked. Text payloads of a whole message are valid UTF-8;
/// a single fragment may end inside a character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Whether this is the final frame of its message.
    pub fin: bool,
    /// The RSV bits.
    pub rsv: Rsv,
    /// The opcode.
    pub opcode: OpCode,
    /// The unmasked payload.
    pub payload: Bytes,
}

impl Frame {
    /// A final frame with no RSV bits.
    pub fn new(opcode: OpCode, payload: impl Into<Bytes>) -> Self {
        Frame {
            fin: true,
            rsv: Rsv::NONE,
            opcode,
            payload: payload.into(),
        }
    }

    /// Marks this frame as not final (a fragment with more to come).
    #[must_use]
    pub fn with_fin(mut self, fin: bool) -> Self {
        self.fin = fin;
        self
    }
}

#[cfg(test)]
mod rfc6455_5_2_base_framing {
    use super::*;

    fn header(opcode: OpCode, len: u64, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv: Rsv::NONE,
            opcode,
            mask,
            payload_len: len,
        }
    }

    #[test]
    fn lengths_use_the_minimal_encoding() {
        let mut out = [0; MAX_HEADER_LEN];
        for (len, expected) in [
            (0u64, 2),
            (125, 2),
            (126, 4),
            (0xffff, 4),
            (0x10000, 10),
            (u64::MAX >> 1, 10),
        ] {
            assert_eq!(
                header(OpCode::Binary, len, None).encode(&mut out),
                expected,
                "{len}"
            );
        }
    }

    #[test]
    fn decode_inverts_encode() {
        let mut out = [0; MAX_HEADER_LEN];
        for len in [0u64, 1, 125, 126, 127, 65535, 65536, 1 << 40] {
            for mask in [None, Some([1, 2, 3, 4])] {
                for opcode in [
                    OpCode::Text,
                    OpCode::Binary,
                    OpCode::Continuation,
                    OpCode::Ping,
                ] {
                    let h = FrameHeader {
                        fin: len % 2 == 0,
                        rsv: Rsv::RSV1,
                        opcode,
                        mask,
                        payload_len: len,
                    };
                    let n = h.encode(&mut out);
                    assert_eq!(FrameHeader::decode(&out[..n]), Ok(Some((h, n))));
                }
            }
        }
    }

    #[test]
    fn partial_headers_ask_for_more_at_every_length() {
        let mut out = [0; MAX_HEADER_LEN];
        let n = header(OpCode::Binary, 70000, Some([9, 9, 9, 9])).encode(&mut out);
        for cut in 0..n {
            assert_eq!(FrameHeader::decode(&out[..cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn reserved_opcodes_are_errors() {
        for op in (3..=7).chain(11..=15) {
            assert_eq!(
                FrameHeader::decode(&[0x80 | op, 0x80, 0, 0, 0, 0]),
                Err(ProtocolError::ReservedOpcode(op))
            );
        }
    }

    #[test]
    fn length_with_top_bit_set_is_an_error() {
        let mut buf = vec![0x82, 127];
        buf.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(FrameHeader::decode(&buf), Err(ProtocolError::InvalidLength));
    }

    #[test]
    fn rfc_example_single_frame_unmasked_text() {
        // §5.7: 0x81 0x05 "Hello".
        let (h, n) = FrameHeader::decode(&[0x81, 0x05, b'H']).unwrap().unwrap();
        assert_eq!(n, 2);
        assert!(h.fin);
        assert_eq!(h.opcode, OpCode::Text);
        assert_eq!(h.payload_len, 5);
        assert_eq!(h.mask, None);
    }
}
