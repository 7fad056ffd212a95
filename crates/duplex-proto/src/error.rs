//! Protocol errors, each mapped to the close code the RFC asks for.

use crate::close::CloseCode;

/// A rule of RFC 6455 that the peer broke. The connection fails with
/// [`ProtocolError::close_code`] and reads nothing more.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Opcodes 3-7 and 11-15 are reserved (§5.2).
    #[error("reserved opcode {0:#x}")]
    ReservedOpcode(u8),
    /// An RSV bit is set that no negotiated extension claims (§5.2).
    #[error("reserved bits set without an extension that claims them")]
    ReservedBits,
    /// A client frame arrived without a mask (§5.1).
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// A server frame arrived with a mask (§5.1).
    #[error("server frame is masked")]
    MaskedFrame,
    /// A 64-bit payload length with the most significant bit set (§5.2).
    #[error("payload length has its most significant bit set")]
    InvalidLength,
    /// A control frame longer than 125 bytes (§5.5).
    #[error("control frame payload longer than 125 bytes")]
    ControlFrameTooLong,
    /// A control frame without FIN (§5.5).
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// A continuation frame with no message in progress (§5.4).
    #[error("continuation frame without a message to continue")]
    UnexpectedContinuation,
    /// A new text or binary frame while a message is in progress (§5.4).
    #[error("new data frame while a fragmented message is in progress")]
    ExpectedContinuation,
    /// Text that is not UTF-8, in a message or a close reason (§8.1).
    #[error("invalid UTF-8 in text")]
    InvalidUtf8,
    /// A Close frame with a 1-byte payload (§5.5.1).
    #[error("close frame with a 1-byte payload")]
    InvalidClosePayload,
    /// A Close frame with a code that may not be sent (§7.4).
    #[error("invalid close code {0}")]
    InvalidCloseCode(u16),
    /// An extension could not undo its transformation of a message (corrupt
    /// compressed data, for instance).
    #[error("invalid extension data: {0}")]
    ExtensionData(String),
    /// A frame longer than the configured maximum frame size.
    #[error("Frame is too big: {size}. Max size is {max}")]
    FrameTooBig {
        /// The frame's payload length.
        size: u64,
        /// The configured limit.
        max: u64,
    },
    /// A message longer than the configured maximum message size.
    #[error("Message is too big: {size}. Max size is {max}")]
    MessageTooBig {
        /// The size reached so far.
        size: u64,
        /// The configured limit.
        max: u64,
    },
}

impl ProtocolError {
    /// The close code the RFC gives for this failure: 1007 for bad UTF-8,
    /// 1009 for sizes over the limits, 1002 for everything else.
    pub const fn close_code(&self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::ExtensionData(_) => {
                CloseCode::INVALID_PAYLOAD
            }
            ProtocolError::FrameTooBig { .. } | ProtocolError::MessageTooBig { .. } => {
                CloseCode::TOO_BIG
            }
            _ => CloseCode::PROTOCOL_ERROR,
        }
    }
}
