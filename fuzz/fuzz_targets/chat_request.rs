//! duplex-chat's request parser and input checks on arbitrary text.
//!
//! Checks: a parsed request is the JSON object it came from; a refusal has
//! one of the parser's three codes; a name, room or text the checks accept
//! keeps to the rules of PROTOCOL.md and is accepted again unchanged. The
//! key a name is compared by is stable: the key of a key is itself, case
//! in ASCII and look-alike characters (a character replaced by its
//! confusable skeleton) do not change it. The identity of a token is a
//! fixed 128-bit hash, never the token.
#![no_main]

use duplex_chat::protocol::{
    self, ErrorCode, MAX_NAME_CHARS, Request, check_name, check_room, check_text, identity,
    is_token, name_key,
};

const MAX_TEXT_CHARS: usize = 2000;
const MAX_TEXT_BYTES: usize = 4096;

fn check_label(label: &str) {
    let chars = label.chars().count();
    assert!((1..=MAX_NAME_CHARS).contains(&chars), "{label:?}");
    assert_eq!(label.trim(), label);
    assert!(!label.contains("  "), "{label:?}");
    assert!(
        label
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.')),
        "{label:?}"
    );
}

fn check_key(name: &str) {
    let key = name_key(name);
    assert_eq!(name_key(&key), key, "{name:?}");
    assert_eq!(name_key(&name.to_ascii_uppercase()), key, "{name:?}");
    assert_eq!(name_key(&name.to_ascii_lowercase()), key, "{name:?}");
    // Each character outside ASCII replaced by its skeleton: the same name.
    let looks_alike: String = name
        .chars()
        .flat_map(|c| {
            let mut buf = [0; 4];
            let one: Vec<char> = if c.is_ascii() {
                vec![c]
            } else {
                unicode_security::skeleton(c.encode_utf8(&mut buf)).collect()
            };
            one
        })
        .collect();
    assert_eq!(name_key(&looks_alike), key, "{name:?} and {looks_alike:?}");
}

fn check_token(token: &str) {
    let id = identity(token);
    assert_eq!(id.len(), 32);
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(identity(token), id);
    assert_ne!(id, token);
}

fn checks(raw: &str) {
    if let Ok(name) = check_name(raw) {
        check_label(&name);
        assert_eq!(check_name(&name).as_deref(), Ok(name.as_str()));
        check_key(&name);
    }
    if is_token(raw) {
        check_token(raw);
    }
    if let Ok(room) = check_room(raw) {
        check_label(&room);
        assert_eq!(room.to_lowercase(), room);
        assert_eq!(check_room(&room).as_deref(), Ok(room.as_str()));
    }
    match check_text(raw, MAX_TEXT_CHARS, MAX_TEXT_BYTES) {
        Ok(text) => {
            assert!(!text.trim().is_empty());
            assert_eq!(text.trim_end(), text);
            assert!(text.chars().count() <= MAX_TEXT_CHARS);
            assert!(text.len() <= MAX_TEXT_BYTES);
            assert!(
                !text
                    .chars()
                    .any(|c| c.is_control() && c != '\n' && c != '\t'),
                "{text:?}"
            );
            assert_eq!(
                check_text(&text, MAX_TEXT_CHARS, MAX_TEXT_BYTES).as_deref(),
                Ok(text.as_str())
            );
        }
        Err(problem) => assert!(matches!(
            problem.code,
            ErrorCode::InvalidText | ErrorCode::TextTooLong
        )),
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    checks(text);
    let request = match protocol::parse(text) {
        Ok(request) => request,
        Err(problem) => {
            assert!(
                matches!(
                    problem.code,
                    ErrorCode::BadJson | ErrorCode::UnknownType | ErrorCode::BadRequest
                ),
                "{problem:?}"
            );
            return;
        }
    };
    let value: serde_json::Value = serde_json::from_str(text).expect("parsed, so JSON");
    let object = value.as_object().expect("parsed, so an object");
    assert_eq!(
        object.get("type").and_then(|t| t.as_str()),
        Some(request.kind())
    );
    let field = |name: &str| object.get(name).and_then(|v| v.as_str());
    match &request {
        Request::Hello { name, token } => {
            assert_eq!(field("name"), Some(name.as_str()));
            assert_eq!(field("token"), token.as_deref());
            checks(name);
            if let Some(token) = token.as_deref().filter(|t| is_token(t)) {
                check_token(token);
            }
        }
        Request::Join { room, since, epoch } => {
            assert_eq!(field("room"), Some(room.as_str()));
            assert_eq!(field("since"), since.as_deref());
            assert_eq!(field("epoch"), epoch.as_deref());
            checks(room);
        }
        Request::Leave { room } => {
            assert_eq!(field("room"), Some(room.as_str()));
            checks(room);
        }
        Request::DmHistory { with, since, epoch } => {
            assert_eq!(field("with"), Some(with.as_str()));
            assert_eq!(field("since"), since.as_deref());
            assert_eq!(field("epoch"), epoch.as_deref());
            checks(with);
        }
        Request::Message { room, text } => {
            assert_eq!(field("room"), Some(room.as_str()));
            assert_eq!(field("text"), Some(text.as_str()));
            checks(room);
            checks(text);
        }
        Request::Dm { to, text } => {
            assert_eq!(field("to"), Some(to.as_str()));
            assert_eq!(field("text"), Some(text.as_str()));
            checks(to);
            checks(text);
        }
        Request::Ping { id } => {
            assert_eq!(object.get("id").and_then(|v| v.as_u64()), *id);
        }
    }
});
