//! The errors a session reports.

use duplex_proto::{ProtocolError, SendError};

use crate::convert::ConvertError;

/// What went wrong on a session.
///
/// When a receive returns one of the connection-ending errors
/// ([`Protocol`](Error::Protocol), [`PingTimeout`](Error::PingTimeout),
/// [`TooSlow`](Error::TooSlow), [`ConnectionLost`](Error::ConnectionLost)),
/// the session's
/// [`close_reason`](crate::Sender::close_reason) is already set.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The peer broke RFC 6455; the connection was failed with the error's
    /// close code (1002, 1007 or 1009).
    #[error("the peer broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// No Pong answered our Ping within the timeout; the connection was
    /// closed with 1011 "Ping timeout".
    #[error("ping timeout")]
    PingTimeout,
    /// The peer read so little of what it was sent that our Ping was
    /// still waiting to leave when its Pong was due; the connection was
    /// closed with 1008 "Peer too slow to read".
    #[error("the peer was too slow to read")]
    TooSlow,
    /// The transport ended without a closing handshake (1006), or the
    /// peer did not answer our Close in time.
    #[error("connection lost without a closing handshake")]
    ConnectionLost,
    /// The session is closing or closed: nothing more can be sent.
    #[error("the session is closed")]
    Closed,
    /// The frame cannot be sent as given (a control payload over 125 bytes,
    /// a broken fragment sequence, a reserved close code).
    #[error("cannot send: {0}")]
    Send(SendError),
    /// A message did not convert to or from the requested type; the session
    /// stays open.
    #[error(transparent)]
    Convert(#[from] ConvertError),
}

impl From<SendError> for Error {
    fn from(err: SendError) -> Self {
        match err {
            SendError::Closed => Error::Closed,
            other => Error::Send(other),
        }
    }
}

/// A boxed error, what handlers may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
