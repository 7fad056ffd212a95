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

/// JSON through `serde_json`, in text messages: the default converter.
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonConverter;

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

#[cfg(test)]
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
