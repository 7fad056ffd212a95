//! Content converters: typed values to and from messages (Ktor's
//! `contentConverter`, `sendSerialized` and `receiveDeserialized`).

use duplex_proto::Message;

/// Why a value did not convert.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConvertError {
    /// The converter does not read this kind of message (a JSON converter
    /// given a binary message, for instance).
    #[error("the converter does not accept {0} messages")]
    UnsupportedMessage(&'static str),
    /// The payload is not a valid encoding of the requested type; the
    /// source is the error the format reported (with its position, for
    /// [`JsonConverter`]).
    #[error("could not decode the message: {0}")]
    Decode(#[source] crate::BoxError),
    /// The value could not be encoded; the source is the format's error.
    #[error("could not encode the value: {0}")]
    Encode(#[source] crate::BoxError),
    /// No content converter is installed: duplex was built without its
    /// `json` feature and no [`WebSockets::content_converter`](crate::WebSockets::content_converter)
    /// was set (Ktor's `WebsocketConverterNotFoundException`).
    #[error("no content converter is installed (WebSockets::content_converter)")]
    NoConverter,
}

/// The deserializer a converter hands to the caller's visitor.
pub type ErasedDeserializer<'a, 'de> = &'a mut dyn erased_serde::Deserializer<'de>;

/// Turns typed values into messages and back, for
/// [`send_json`](crate::Sender::send_json) and
/// [`recv_json`](crate::Session::recv_json).
///
/// The trait is object-safe (values pass through `erased_serde`), so one
/// converter is installed on the configuration and shared by every session.
pub trait ContentConverter: Send + Sync + 'static {
    /// Encodes `value` as a message.
    ///
    /// # Errors
    /// [`ConvertError::Encode`] when the value cannot be represented.
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Message, ConvertError>;

    /// Decodes `message` by handing a deserializer over its payload to `visit`.
    ///
    /// # Errors
    /// [`ConvertError::UnsupportedMessage`] or [`ConvertError::Decode`].
    fn decode(
        &self,
        message: &Message,
        visit: &mut dyn for<'a, 'de> FnMut(
            ErasedDeserializer<'a, 'de>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), ConvertError>;
}

/// The converter a configuration starts with: JSON with the `json`
/// feature, otherwise none.
pub(crate) fn default_converter() -> std::sync::Arc<dyn ContentConverter> {
    #[cfg(feature = "json")]
    return std::sync::Arc::new(JsonConverter);
    #[cfg(not(feature = "json"))]
    return std::sync::Arc::new(NoConverter);
}

/// Stands in for a converter when none is installed: every call is
/// [`ConvertError::NoConverter`].
#[cfg(not(feature = "json"))]
struct NoConverter;

#[cfg(not(feature = "json"))]
impl ContentConverter for NoConverter {
    fn encode(&self, _: &dyn erased_serde::Serialize) -> Result<Message, ConvertError> {
        Err(ConvertError::NoConverter)
    }

    fn decode(
        &self,
        _: &Message,
        _: &mut dyn for<'a, 'de> FnMut(
            ErasedDeserializer<'a, 'de>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), ConvertError> {
        Err(ConvertError::NoConverter)
    }
}

/// JSON through `serde_json`, in text messages: the default converter
/// (feature `json`).
#[cfg(feature = "json")]
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonConverter;

#[cfg(feature = "json")]
impl ContentConverter for JsonConverter {
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Message, ConvertError> {
        serde_json::to_string(value)
            .map(Message::from)
            .map_err(|e| ConvertError::Encode(e.into()))
    }

    fn decode(
        &self,
        message: &Message,
        visit: &mut dyn for<'a, 'de> FnMut(
            ErasedDeserializer<'a, 'de>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), ConvertError> {
        let Message::Text(text) = message else {
            return Err(ConvertError::UnsupportedMessage("binary"));
        };
        let mut json = serde_json::Deserializer::from_str(text);
        let mut erased = <dyn erased_serde::Deserializer>::erase(&mut json);
        visit(&mut erased).map_err(|e| ConvertError::Decode(e.into()))?;
        json.end().map_err(|e| ConvertError::Decode(e.into()))
    }
}

/// Decodes a `T` from `message` with `converter`.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    converter: &dyn ContentConverter,
    message: &Message,
) -> Result<T, ConvertError> {
    let mut out = None;
    converter.decode(message, &mut |de| {
        out = Some(erased_serde::deserialize::<T>(de)?);
        Ok(())
    })?;
    out.ok_or_else(|| ConvertError::Decode("the converter produced no value".into()))
}

#[cfg(all(test, not(feature = "json")))]
mod no_converter_tests {
    use super::*;

    #[test]
    fn without_json_nothing_converts() {
        let converter = default_converter();
        assert!(matches!(
            converter.encode(&1u8),
            Err(ConvertError::NoConverter)
        ));
        let err = decode::<u8>(&*converter, &Message::text("1")).unwrap_err();
        assert!(matches!(err, ConvertError::NoConverter));
    }
}

#[cfg(all(test, feature = "json"))]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Task {
        name: String,
        priority: u8,
    }

    #[test]
    fn json_round_trip() {
        let task = Task {
            name: "write tests".into(),
            priority: 1,
        };
        let msg = JsonConverter.encode(&task).unwrap();
        assert_eq!(
            msg.as_text(),
            Some(r#"{"name":"write tests","priority":1}"#)
        );
        assert_eq!(decode::<Task>(&JsonConverter, &msg).unwrap(), task);
    }

    #[test]
    fn malformed_json_is_a_decode_error() {
        let err = decode::<Task>(&JsonConverter, &Message::text("{nope")).unwrap_err();
        assert!(matches!(err, ConvertError::Decode(_)));
        let err = decode::<Task>(
            &JsonConverter,
            &Message::text(r#"{"name":"x","priority":1} trailing"#),
        )
        .unwrap_err();
        assert!(matches!(err, ConvertError::Decode(_)));
        let source = std::error::Error::source(&err).expect("the format's error is the source");
        assert!(source.to_string().contains("trailing"), "{source}");
    }

    #[test]
    fn binary_is_unsupported_by_json() {
        let err = decode::<Task>(&JsonConverter, &Message::binary(vec![1, 2])).unwrap_err();
        assert!(matches!(err, ConvertError::UnsupportedMessage("binary")));
    }
}
