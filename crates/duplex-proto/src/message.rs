//! Whole messages, as a default session's handler sees them.

use std::{fmt, ops::Deref};

use bytes::Bytes;

/// Bytes that are valid UTF-8: a text message's payload, shared without a copy.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Utf8Bytes(Bytes);

impl Utf8Bytes {
    /// Wraps bytes that were already validated.
    ///
    /// Callers in this crate pass only payloads that [`crate::Utf8Validator`]
    /// accepted in full; that is the invariant `as_str` relies on.
    pub(crate) fn from_validated(bytes: Bytes) -> Self {
        debug_assert!(std::str::from_utf8(&bytes).is_ok());
        Utf8Bytes(bytes)
    }

    /// A static string, without a copy.
    pub const fn from_static(s: &'static str) -> Self {
        Utf8Bytes(Bytes::from_static(s.as_bytes()))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor either validates the bytes
        // (`TryFrom<Bytes>`), takes them from a `str`/`String`, or is
        // `from_validated`, whose callers hand over only bytes that the
        // incremental validator accepted completely (see connection.rs,
        // `finish_text`). `Bytes` is immutable, so the bytes stay valid.
        // Exercised by `utf8_bytes_round_trip` below and every text test.
        #[allow(unsafe_code)]
        unsafe {
            std::str::from_utf8_unchecked(&self.0)
        }
    }

    /// The underlying bytes.
    pub fn as_bytes(&self) -> &Bytes {
        &self.0
    }

    /// Gives up the UTF-8 guarantee and returns the bytes.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

impl Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Utf8Bytes(Bytes::from(s))
    }
}

impl From<&str> for Utf8Bytes {
    fn from(s: &str) -> Self {
        Utf8Bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = std::str::Utf8Error;
    fn try_from(bytes: Bytes) -> Result<Self, Self::Error> {
        std::str::from_utf8(&bytes)?;
        Ok(Utf8Bytes(bytes))
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A whole data message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message, valid UTF-8.
    Text(Utf8Bytes),
    /// A binary message.
    Binary(Bytes),
}

impl Message {
    /// A text message.
    pub fn text(text: impl Into<Utf8Bytes>) -> Self {
        Message::Text(text.into())
    }

    /// A binary message.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Message::Binary(data.into())
    }

    /// The payload, whatever the type.
    pub fn payload(&self) -> &Bytes {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The text, if this is a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(t) => Some(t.as_str()),
            Message::Binary(_) => None,
        }
    }

    /// The text, if this is a text message: the same as
    /// [`as_text`](Self::as_text), under tungstenite's name.
    pub fn to_text(&self) -> Option<&str> {
        self.as_text()
    }

    /// Whether this is a text message.
    pub fn is_text(&self) -> bool {
        matches!(self, Message::Text(_))
    }

    /// Whether this is a binary message.
    pub fn is_binary(&self) -> bool {
        matches!(self, Message::Binary(_))
    }

    /// The text of a text message, without a copy.
    ///
    /// # Errors
    /// A binary message is not decoded: it is handed back as it was
    /// (`Err(self)`), so that the caller can still use it. To read a binary
    /// payload as UTF-8, use `Utf8Bytes::try_from(message.into_data())`.
    pub fn into_text(self) -> Result<Utf8Bytes, Message> {
        match self {
            Message::Text(t) => Ok(t),
            binary @ Message::Binary(_) => Err(binary),
        }
    }

    /// The payload, whatever the type, without a copy.
    pub fn into_data(self) -> Bytes {
        match self {
            Message::Text(t) => t.into_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The payload length in bytes.
    pub fn len(&self) -> usize {
        self.payload().len()
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.payload().is_empty()
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s.into())
    }
}

impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::Text(s.into())
    }
}

impl From<Utf8Bytes> for Message {
    fn from(s: Utf8Bytes) -> Self {
        Message::Text(s)
    }
}

impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::Binary(b)
    }
}

impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b.into())
    }
}

impl From<&[u8]> for Message {
    fn from(b: &[u8]) -> Self {
        Message::Binary(Bytes::copy_from_slice(b))
    }
}

impl From<Message> for Bytes {
    fn from(message: Message) -> Self {
        message.into_data()
    }
}

impl From<Utf8Bytes> for String {
    fn from(text: Utf8Bytes) -> Self {
        text.as_str().to_owned()
    }
}

impl From<Utf8Bytes> for Bytes {
    fn from(text: Utf8Bytes) -> Self {
        text.into_bytes()
    }
}

impl From<&String> for Utf8Bytes {
    fn from(s: &String) -> Self {
        Utf8Bytes::from(s.as_str())
    }
}

impl From<&String> for Message {
    fn from(s: &String) -> Self {
        Message::Text(s.into())
    }
}

impl<const N: usize> From<&'static [u8; N]> for Message {
    fn from(b: &'static [u8; N]) -> Self {
        Message::Binary(Bytes::from_static(b))
    }
}

impl PartialEq<String> for Utf8Bytes {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl AsRef<str> for Utf8Bytes {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Utf8Bytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_bytes_round_trip() {
        let t = Utf8Bytes::try_from(Bytes::from_static("héllo".as_bytes())).unwrap();
        assert_eq!(t.as_str(), "héllo");
        assert_eq!(&*t, "héllo");
        assert!(Utf8Bytes::try_from(Bytes::from_static(&[0xff])).is_err());
        let v = Utf8Bytes::from_validated(Bytes::from_static(b"ok"));
        assert_eq!(v, "ok");
    }

    #[test]
    fn kind_predicates() {
        let text = Message::text("hi");
        let binary = Message::binary(vec![1u8, 2]);
        assert!(text.is_text() && !text.is_binary());
        assert!(binary.is_binary() && !binary.is_text());
    }

    #[test]
    fn text_accessors_see_text_only() {
        let text = Message::text(String::from("héllo"));
        assert_eq!(text.as_text(), Some("héllo"));
        assert_eq!(text.to_text(), Some("héllo"));
        let binary = Message::binary(&b"h\xc3\xa9llo"[..]);
        assert_eq!(binary.as_text(), None, "valid UTF-8, but binary");
        assert_eq!(binary.to_text(), None);
    }

    #[test]
    fn into_text_keeps_the_bytes_and_hands_binary_back() {
        let payload = Bytes::from_static(b"shared");
        let text = Message::Text(Utf8Bytes::try_from(payload.clone()).unwrap());
        let got = text.into_text().unwrap();
        assert_eq!(got, "shared");
        assert_eq!(got.as_bytes().as_ptr(), payload.as_ptr(), "no copy");
        let binary = Message::binary(vec![0xffu8, 0]);
        let back = binary.clone().into_text().unwrap_err();
        assert_eq!(back, binary);
    }

    #[test]
    fn into_data_is_the_payload_of_either_kind() {
        let payload = Bytes::from(vec![7u8; 100]);
        let binary = Message::binary(payload.clone());
        let data = binary.into_data();
        assert_eq!(data, payload);
        assert_eq!(data.as_ptr(), payload.as_ptr(), "no copy");
        assert_eq!(Message::text("abc").into_data(), Bytes::from_static(b"abc"));
        assert_eq!(Bytes::from(Message::text("x")), Bytes::from_static(b"x"));
    }

    #[test]
    fn conversions_pick_the_message_kind() {
        let owned = String::from("owned");
        let cases: [(Message, bool, &[u8]); 8] = [
            (Message::from("str"), true, b"str"),
            (Message::from(owned.clone()), true, b"owned"),
            (Message::from(&owned), true, b"owned"),
            (
                Message::from(Utf8Bytes::from_static("static")),
                true,
                b"static",
            ),
            (Message::from(vec![1u8, 2]), false, &[1, 2]),
            (Message::from(&[3u8, 4][..]), false, &[3, 4]),
            (Message::from(Bytes::from_static(&[5])), false, &[5]),
            (Message::from(b"raw"), false, b"raw"),
        ];
        for (message, is_text, payload) in cases {
            assert_eq!(message.is_text(), is_text, "{message:?}");
            assert_eq!(&message.payload()[..], payload, "{message:?}");
        }
        let text: Utf8Bytes = "back".into();
        assert_eq!(String::from(text.clone()), "back");
        assert_eq!(Bytes::from(text.clone()), Bytes::from_static(b"back"));
        assert_eq!(text, String::from("back"));
        let as_str: &str = text.as_ref();
        assert_eq!(as_str, "back");
    }

    #[test]
    fn constructors_take_any_text_or_bytes() {
        assert_eq!(Message::text("a"), Message::Text(Utf8Bytes::from("a")));
        assert_eq!(Message::text(String::from("a")), Message::text("a"));
        assert_eq!(
            Message::binary(Bytes::from_static(b"b")),
            Message::binary(b"b".to_vec())
        );
        assert_eq!(Message::binary(&b"b"[..]), Message::binary(vec![b'b']));
    }
}
