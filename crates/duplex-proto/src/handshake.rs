//! The pieces of the opening handshake (RFC 6455 §4) that need no HTTP
//! library: the key, the accept value and header token lists.

use base64::{Engine, engine::general_purpose::STANDARD};
use sha1::{Digest, Sha1};

/// The GUID that §1.3 appends to the client's key.
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key` (§4.2.2):
/// base64 of the SHA-1 of the key and the GUID.
///
/// ```
/// // The example of RFC 6455 §1.3.
/// assert_eq!(
///     duplex_proto::accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
///     "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
/// );
/// ```
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(ACCEPT_GUID);
    STANDARD.encode(sha.finalize())
}

/// Whether a `Sec-WebSocket-Key` is valid: base64 of exactly 16 bytes (§4.1).
pub fn is_valid_key(key: &[u8]) -> bool {
    // 24 characters decode to at most 18 bytes; the buffer spares an allocation.
    let mut raw = [0u8; 18];
    key.len() == 24 && STANDARD.decode_slice(key, &mut raw) == Ok(16)
}

/// A fresh random `Sec-WebSocket-Key` for a client.
pub fn generate_key() -> String {
    STANDARD.encode(rand::random::<[u8; 16]>())
}

/// Whether a comma-separated header value holds `token`, compared without
/// regard to ASCII case (`Connection: keep-alive, Upgrade`).
pub fn header_has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The items of a comma-separated header value, trimmed, empty ones left out.
pub fn header_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|item| !item.is_empty())
}

#[cfg(test)]
mod rfc6455_4_opening_handshake {
    use super::*;

    #[test]
    fn accept_key_matches_section_1_3() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn key_must_decode_to_sixteen_bytes() {
        assert!(is_valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_valid_key(generate_key().as_bytes()));
        assert!(!is_valid_key(b"dGhlIHNhbXBsZQ=="));
        assert!(!is_valid_key(b"not base64 at all!!!!!!!"));
        assert!(!is_valid_key(b""));
    }

    #[test]
    fn token_lists_are_case_insensitive() {
        assert!(header_has_token(b"keep-alive, Upgrade", "upgrade"));
        assert!(header_has_token(b"UPGRADE", "upgrade"));
        assert!(!header_has_token(b"keep-alive", "upgrade"));
        assert!(!header_has_token(b"upgraded", "upgrade"));
        let items: Vec<_> = header_tokens(b" chat , , superchat").collect();
        assert_eq!(items, [&b"chat"[..], b"superchat"]);
    }
}
