//! Incremental UTF-8 validation (RFC 6455 §8.1).
//!
//! A text message may arrive split across frames, and a frame across reads,
//! with a multi-byte character cut anywhere. The validator keeps the few bytes
//! of an unfinished character between calls and reports an error as soon as
//! the bytes seen so far cannot begin valid UTF-8: the connection fails on the
//! offending byte, not when the message ends.

use crate::error::ProtocolError;

/// Validates a byte stream as UTF-8, piece by piece.
#[derive(Debug, Default, Clone)]
pub struct Utf8Validator {
    /// The start of a character whose remaining bytes have not arrived.
    pending: [u8; 4],
    pending_len: usize,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub fn new() -> Self {
        Self::default()
    }

    /// Checks the next bytes of the stream.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] when the stream so far is not a prefix of
    /// valid UTF-8.
    pub fn feed(&mut self, mut input: &[u8]) -> Result<(), ProtocolError> {
        if self.pending_len > 0 {
            let needed = sequence_len(self.pending[0]);
            while self.pending_len < needed {
                let Some((&byte, rest)) = input.split_first() else {
                    break;
                };
                self.pending[self.pending_len] = byte;
                self.pending_len += 1;
                input = rest;
            }
            match simdutf8::compat::from_utf8(&self.pending[..self.pending_len]) {
                Ok(_) => self.pending_len = 0,
                Err(e) if e.error_len().is_none() => return Ok(()),
                Err(_) => return Err(ProtocolError::InvalidUtf8),
            }
        }
        if simdutf8::basic::from_utf8(input).is_ok() {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(input) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let tail = input.get(e.valid_up_to()..).unwrap_or_default();
                let slot = self
                    .pending
                    .get_mut(..tail.len())
                    .ok_or(ProtocolError::InvalidUtf8)?;
                slot.copy_from_slice(tail);
                self.pending_len = tail.len();
                Ok(())
            }
            Err(_) => Err(ProtocolError::InvalidUtf8),
        }
    }

    /// Ends the message: an unfinished character at the end is an error.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] when the message ends inside a character.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let complete = self.pending_len == 0;
        self.pending_len = 0;
        if complete {
            Ok(())
        } else {
            Err(ProtocolError::InvalidUtf8)
        }
    }
}

/// How long the character that starts with `lead` is; 1 for bytes that can
/// never lead, so that validation reports them at once.
fn sequence_len(lead: u8) -> usize {
    match lead {
        0xc2..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf4 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod rfc6455_8_1_utf8 {
    use super::*;

    fn feed_split(input: &[u8], cuts: &[usize]) -> Result<(), ProtocolError> {
        let mut v = Utf8Validator::new();
        let mut start = 0;
        for &cut in cuts {
            v.feed(&input[start..cut])?;
            start = cut;
        }
        v.feed(&input[start..])?;
        v.finish()
    }

    #[test]
    fn valid_text_split_at_every_point_is_accepted() {
        let text = "κόσμε 🌍 ok — ünïcödé";
        let bytes = text.as_bytes();
        for a in 0..=bytes.len() {
            for b in a..=bytes.len() {
                assert!(feed_split(bytes, &[a, b]).is_ok(), "cuts {a} {b}");
            }
        }
    }

    #[test]
    fn invalid_byte_fails_before_the_message_ends() {
        // "κόσμε" followed by an invalid code point U+110000 (f4 90 80 80).
        let mut v = Utf8Validator::new();
        v.feed("κόσμε".as_bytes()).unwrap();
        assert_eq!(v.feed(&[0xf4, 0x90]), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn invalid_continuation_is_seen_one_byte_at_a_time() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xce]).unwrap();
        assert_eq!(v.feed(&[0x41]), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn surrogates_and_overlongs_are_rejected() {
        for bad in [
            &[0xed, 0xa0, 0x80][..],
            &[0xc0, 0xaf],
            &[0xe0, 0x80, 0xaf],
            &[0xff],
        ] {
            let mut v = Utf8Validator::new();
            let failed_early = bad.iter().any(|b| v.feed(&[*b]).is_err());
            assert!(failed_early, "{bad:x?} accepted byte by byte");
        }
    }

    #[test]
    fn truncated_character_at_the_end_is_rejected() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2, 0x82]).unwrap();
        assert_eq!(v.finish(), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn validator_is_reusable_after_finish() {
        let mut v = Utf8Validator::new();
        v.feed(&[0xe2]).unwrap();
        assert!(v.finish().is_err());
        v.feed(b"abc").unwrap();
        assert!(v.finish().is_ok());
    }
}
