//! The JSON protocol of `/chat` (see `PROTOCOL.md`): what a client may send,
//! what the server sends, and the checks on names, rooms and text.

use duplex::Message;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest user name and room name, in characters.
pub const MAX_NAME_CHARS: usize = 32;

/// Why a request was refused: the `code` of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a JSON object.
    BadJson,
    /// No `type`, or a `type` the server does not know.
    UnknownType,
    /// A field is missing or has the wrong JSON type.
    BadRequest,
    /// A binary WebSocket message: the protocol is text only.
    BinaryNotSupported,
    /// The request is larger than the server reads.
    TooLarge,
    /// More requests than the connection's token bucket allows.
    RateLimited,
    /// A request other than `hello` before `hello`.
    NotIdentified,
    /// A second `hello` on the same connection.
    AlreadyIdentified,
    /// A name that breaks the rules (length, characters).
    InvalidName,
    /// The name is used by another connection.
    NameTaken,
    /// A room name that breaks the rules.
    InvalidRoom,
    /// Joining more rooms than a connection may be in.
    TooManyRooms,
    /// Sending to, or leaving, a room the connection has not joined.
    NotInRoom,
    /// Empty text, or text with control characters.
    InvalidText,
    /// Text longer than the limit.
    TextTooLong,
    /// A direct message to a name nobody uses.
    UnknownUser,
    /// A direct message to oneself.
    InvalidRecipient,
    /// `hello` when the server has as many names in use as it allows; the
    /// connection is closed with 1013 after this error.
    ServerFull,
    /// Joining a room that has as many members as a room may have.
    RoomFull,
    /// Joining a new room when the server keeps as many rooms as it allows
    /// and none of them can be forgotten.
    ServerRoomsFull,
    /// The request needs Redis, which does not answer right now.
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotIdentified => "not_identified",
            ErrorCode::AlreadyIdentified => "already_identified",
            ErrorCode::InvalidName => "invalid_name",
            ErrorCode::NameTaken => "name_taken",
            ErrorCode::InvalidRoom => "invalid_room",
            ErrorCode::TooManyRooms => "too_many_rooms",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::InvalidText => "invalid_text",
            ErrorCode::TextTooLong => "text_too_long",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::InvalidRecipient => "invalid_recipient",
            ErrorCode::ServerFull => "server_full",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::ServerRoomsFull => "server_rooms_full",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// An `error` message: a stable code, a sentence for people, and what it
/// answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The stable code.
    pub code: ErrorCode,
    /// A sentence to show to a person.
    pub message: String,
    /// The `type` of the request it answers, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// The room the request named, when it named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// For `rate_limited`: when the next request will be accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl Problem {
    /// A problem with a code and a message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Problem {
            code,
            message: message.into(),
            request: None,
            room: None,
            retry_after_ms: None,
        }
    }

    /// Names the request it answers.
    #[must_use]
    pub fn request(mut self, request: &str) -> Self {
        self.request = Some(request.to_owned());
        self
    }

    /// Names the room of the request.
    #[must_use]
    pub fn room(mut self, room: &str) -> Self {
        self.room = Some(room.to_owned());
        self
    }
}

/// A request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Pick a name (first request). `token` reclaims the name from an older
    /// connection of the same client.
    Hello {
        /// The name wanted.
        name: String,
        /// The token of an earlier `welcome`.
        token: Option<String>,
    },
    /// Join a room; with `since`, recover what came after that id.
    Join {
        /// The room.
        room: String,
        /// The id of the last message the client has of the room.
        since: Option<String>,
        /// The room's epoch the client had `since` from.
        epoch: Option<String>,
    },
    /// The history of the direct messages with one person.
    DmHistory {
        /// The other person's name.
        with: String,
        /// The id of the last direct message the client has with them.
        since: Option<String>,
        /// The epoch the client had `since` from.
        epoch: Option<String>,
    },
    /// Leave a room.
    Leave {
        /// The room.
        room: String,
    },
    /// Say something in a room.
    Message {
        /// The room.
        room: String,
        /// The text.
        text: String,
    },
    /// Say something to one person.
    Dm {
        /// The recipient's name.
        to: String,
        /// The text.
        text: String,
    },
    /// Ask for a `pong`.
    Ping {
        /// Returned in the pong.
        id: Option<u64>,
    },
}

impl Request {
    /// The `type` of the request.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "hello",
            Request::Join { .. } => "join",
            Request::Leave { .. } => "leave",
            Request::Message { .. } => "message",
            Request::Dm { .. } => "dm",
            Request::Ping { .. } => "ping",
            Request::DmHistory { .. } => "dm_history",
        }
    }
}

#[derive(Deserialize)]
struct HelloFields {
    name: String,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Deserialize)]
struct RoomFields {
    room: String,
}

#[derive(Deserialize)]
struct JoinFields {
    room: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    epoch: Option<String>,
}

#[derive(Deserialize)]
struct DmHistoryFields {
    with: String,
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    epoch: Option<String>,
}

#[derive(Deserialize)]
struct MessageFields {
    room: String,
    text: String,
}

#[derive(Deserialize)]
struct DmFields {
    to: String,
    text: String,
}

#[derive(Deserialize)]
struct PingFields {
    #[serde(default)]
    id: Option<u64>,
}

/// Parses one request.
///
/// # Errors
/// `bad_json`, `unknown_type` or `bad_request`.
pub fn parse(text: &str) -> Result<Request, Problem> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| Problem::new(ErrorCode::BadJson, format!("Not valid JSON: {e}")))?;
    let Some(kind) = value.as_object().map(|o| o.get("type")) else {
        return Err(Problem::new(
            ErrorCode::BadJson,
            "A request is a JSON object with a \"type\" field",
        ));
    };
    let Some(kind) = kind.and_then(Value::as_str).map(str::to_owned) else {
        return Err(Problem::new(
            ErrorCode::UnknownType,
            "A request needs a \"type\" string",
        ));
    };
    fn fields<T: serde::de::DeserializeOwned>(value: Value, kind: &str) -> Result<T, Problem> {
        T::deserialize(value).map_err(|e| {
            Problem::new(
                ErrorCode::BadRequest,
                format!("Bad \"{kind}\" request: {e}"),
            )
            .request(kind)
        })
    }
    Ok(match kind.as_str() {
        "hello" => {
            let f: HelloFields = fields(value, &kind)?;
            Request::Hello {
                name: f.name,
                token: f.token,
            }
        }
        "join" => {
            let f: JoinFields = fields(value, &kind)?;
            Request::Join {
                room: f.room,
                since: f.since,
                epoch: f.epoch,
            }
        }
        "dm_history" => {
            let f: DmHistoryFields = fields(value, &kind)?;
            Request::DmHistory {
                with: f.with,
                since: f.since,
                epoch: f.epoch,
            }
        }
        "leave" => Request::Leave {
            room: fields::<RoomFields>(value, &kind)?.room,
        },
        "message" => {
            let f: MessageFields = fields(value, &kind)?;
            Request::Message {
                room: f.room,
                text: f.text,
            }
        }
        "dm" => {
            let f: DmFields = fields(value, &kind)?;
            Request::Dm {
                to: f.to,
                text: f.text,
            }
        }
        "ping" => Request::Ping {
            id: fields::<PingFields>(value, &kind)?.id,
        },
        _ => {
            let mut shown: String = kind.chars().take(40).collect();
            if shown.len() < kind.len() {
                shown.push('…');
            }
            return Err(Problem::new(
                ErrorCode::UnknownType,
                format!("Unknown request type \"{shown}\""),
            ));
        }
    })
}

fn name_char_ok(c: char) -> bool {
    c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '.')
}

fn check_label(raw: &str, what: &str) -> Result<String, String> {
    let label = raw.trim();
    let chars = label.chars().count();
    if chars == 0 {
        return Err(format!("A {what} cannot be empty"));
    }
    if chars > MAX_NAME_CHARS {
        return Err(format!(
            "A {what} has at most {MAX_NAME_CHARS} characters ({chars} given)"
        ));
    }
    if let Some(bad) = label.chars().find(|&c| !name_char_ok(c)) {
        return Err(format!(
            "A {what} may hold letters, digits, spaces and - _ . only, not {bad:?}"
        ));
    }
    if label.contains("  ") {
        return Err(format!("A {what} cannot hold two spaces in a row"));
    }
    Ok(label.to_owned())
}

/// A user name, trimmed: 1-32 letters, digits, single spaces, `-`, `_`, `.`.
///
/// # Errors
/// `invalid_name`.
pub fn check_name(raw: &str) -> Result<String, Problem> {
    check_label(raw, "name").map_err(|m| Problem::new(ErrorCode::InvalidName, m))
}

/// The key a name is known by: two names with the same key are one name
/// (unique among the people connected, and where a `dm` goes).
///
/// Built with the confusable skeletons of Unicode TS #39
/// (`unicode-security`'s tables): every character outside ASCII becomes
/// its skeleton (the Cyrillic `А` and `В` become `A` and `B`, as they look),
/// then the whole is lowercased, then skeleton and lowercase again until
/// that changes nothing. So `Alice`, `ALICE`, `Аlice` and `Вob`'s `Bob` are
/// each one name, and a key's key is itself. ASCII is lowercased before
/// its skeleton is taken, so that `I` is `i` (ignoring case) rather than
/// `l` (which the skeleton makes of it). The name shown stays as its holder
/// typed it. A key is for comparing, never shown: it need not obey the
/// rules of [`check_name`] (the skeleton of `m` is `rn`).
pub fn name_key(name: &str) -> String {
    let mut buf = [0; 4];
    let mut key = String::with_capacity(name.len());
    for c in name.trim().chars() {
        if c.is_ascii() {
            key.push(c);
        } else {
            key.extend(unicode_security::skeleton(c.encode_utf8(&mut buf)));
        }
    }
    key = key.to_lowercase();
    // The skeleton may hold capitals (`0` becomes `O`) whose lowercase has
    // a skeleton of its own; a few rounds reach the fixed point.
    for _ in 0..NAME_KEY_ROUNDS {
        let next = unicode_security::skeleton(&key)
            .collect::<String>()
            .to_lowercase();
        if next == key {
            break;
        }
        key = next;
    }
    key
}

/// Rounds of [`name_key`] at most.
const NAME_KEY_ROUNDS: usize = 4;

/// Hex digits of a `welcome` token: 128 random bits.
pub const TOKEN_HEX_DIGITS: usize = 32;

/// Whether `token` has the shape of a `welcome` token (32 lowercase hex
/// digits). Another string in `hello` is ignored: the connection gets a
/// new identity and token.
pub fn is_token(token: &str) -> bool {
    token.len() == TOKEN_HEX_DIGITS
        && token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The identity a token proves: the first 128 bits of SHA-256 over a label
/// and the token, in hex. Direct conversations are kept under the two
/// identities; the identity is stored (in memory, in Redis) and never the
/// token, so what is stored does not let anyone sign in as anyone.
pub fn identity(token: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"duplex-chat identity\n")
        .chain_update(token.as_bytes())
        .finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// A room name, trimmed and lowercased: the rules of [`check_name`].
///
/// # Errors
/// `invalid_room`.
pub fn check_room(raw: &str) -> Result<String, Problem> {
    // Lowercased before the checks: lowercasing can add characters ("İ"
    // becomes "i" and a combining dot), and the name kept must itself obey
    // the rules.
    check_label(&raw.to_lowercase(), "room name")
        .map_err(|m| Problem::new(ErrorCode::InvalidRoom, m))
}

/// The text of a message: not blank, at most `max_chars` characters and
/// `max_bytes` bytes of UTF-8, no control characters but newline and tab (a
/// carriage return is dropped).
///
/// # Errors
/// `invalid_text` or `text_too_long`.
pub fn check_text(raw: &str, max_chars: usize, max_bytes: usize) -> Result<String, Problem> {
    let text: String = raw.chars().filter(|&c| c != '\r').collect();
    let text = text.trim_end();
    if text.trim().is_empty() {
        return Err(Problem::new(
            ErrorCode::InvalidText,
            "A message cannot be empty",
        ));
    }
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(Problem::new(
            ErrorCode::TextTooLong,
            format!("A message has at most {max_chars} characters ({chars} given)"),
        ));
    }
    if text.len() > max_bytes {
        return Err(Problem::new(
            ErrorCode::TextTooLong,
            format!(
                "A message has at most {max_bytes} bytes of UTF-8 ({} given)",
                text.len()
            ),
        ));
    }
    if text
        .chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
    {
        return Err(Problem::new(
            ErrorCode::InvalidText,
            "A message cannot hold control characters",
        ));
    }
    Ok(text.to_owned())
}

/// One message of a room, as sent and as kept in its history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatLine {
    /// The room stream's id, `"<ms>-<seq>"`: increases within a room.
    pub id: String,
    /// The room.
    pub room: String,
    /// The sender's name.
    pub from: String,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch, on the server's clock.
    pub ts: u64,
}

/// The id of an entry of a room's (or DM pair's) stream: Redis's stream id
/// shape, `"<ms>-<seq>"`, ordered by `ms` then `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    /// Milliseconds since the Unix epoch (when the entry was added, or
    /// later if the clock went back).
    pub ms: u64,
    /// Which entry of that millisecond.
    pub seq: u64,
}

impl StreamId {
    /// The id after `self` for an entry added at `now_ms`: that
    /// millisecond, or `self`'s with the next `seq` when the clock did not
    /// move on (or went back).
    pub fn next(self, now_ms: u64) -> StreamId {
        if now_ms > self.ms {
            StreamId { ms: now_ms, seq: 0 }
        } else {
            StreamId {
                ms: self.ms,
                seq: self.seq.saturating_add(1),
            }
        }
    }

    /// Parses `"<ms>-<seq>"` (or `"<ms>"`, seq 0, as Redis does).
    pub fn parse(text: &str) -> Option<StreamId> {
        let (ms, seq) = text.split_once('-').unwrap_or((text, "0"));
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return None;
        }
        Some(StreamId {
            ms: ms.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// A direct message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectLine {
    /// The id in the pair's stream, shaped as [`ChatLine::id`].
    pub id: String,
    /// The sender's name.
    pub from: String,
    /// The recipient's name.
    pub to: String,
    /// The text.
    pub text: String,
    /// Milliseconds since the Unix epoch.
    pub ts: u64,
}

/// The limits in force, sent in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Limits {
    /// Longest name and room name, in characters.
    pub name_chars: usize,
    /// Longest message text, in characters.
    pub text_chars: usize,
    /// Longest message text, in bytes of UTF-8.
    pub text_bytes: usize,
    /// Requests per second, on average (0: no limit).
    pub rate: f64,
    /// Requests allowed at once.
    pub burst: u32,
    /// Rooms a connection may be in at once.
    pub rooms: usize,
    /// Messages of a room sent on joining it, at most.
    pub history: usize,
    /// Bytes of the `history` of `joined`, at most.
    pub history_bytes: usize,
    /// Members a room may have.
    pub room_members: usize,
}

/// A room in the `directory`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RoomInfo {
    /// The room.
    pub name: String,
    /// How many are in it.
    pub members: usize,
}

/// A message from the server.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// The answer to `hello`.
    Welcome {
        /// The name, as the server keeps it.
        name: &'a str,
        /// The connection's id.
        id: u64,
        /// Send it in a later `hello` to take the name over from this
        /// connection.
        token: &'a str,
        /// Changes when the server restarts (history is not kept across).
        instance: &'a str,
        /// The rooms the connection is in already (taken over from an
        /// older connection).
        rooms: Vec<&'a str>,
        /// The limits in force.
        limits: Limits,
    },
    /// Rooms and people online; sent on connecting and shortly after
    /// changes.
    Directory {
        /// The rooms the server knows (the 500 fullest), by name.
        rooms: Vec<RoomInfo>,
        /// The names in use, sorted (the first 500).
        users: Vec<&'a str>,
        /// How many names are in use.
        online: usize,
    },
    /// The answer to `join`. (The server builds it with [`joined`] from
    /// lines kept serialised; this variant is its reference shape.)
    Joined {
        /// The room.
        room: &'a str,
        /// The epoch of the room's stream.
        epoch: &'a str,
        /// With `since` in the `join`: whether `history` is everything
        /// after it.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// Who is in it, sorted.
        members: Vec<&'a str>,
        /// Its last messages, or those after `since`, oldest first.
        history: &'a [ChatLine],
    },
    /// The answer to `dm_history`.
    DmHistory {
        /// The other person, as asked.
        with: &'a str,
        /// The epoch of the pair's stream.
        epoch: &'a str,
        /// With `since`: whether `history` is everything after it.
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        /// The direct messages, oldest first, without `type`.
        history: &'a [DirectLine],
    },
    /// Messages of a room were lost between the last one sent and the
    /// next (Redis lost them, or trimmed them before this node could read
    /// them): they cannot be recovered. Later messages follow as usual.
    Gap {
        /// The room.
        room: &'a str,
        /// The room's epoch from here on (it changes when Redis lost the
        /// stream).
        epoch: &'a str,
    },
    /// Whether the node reaches Redis (`up` or `down`).
    Status {
        /// `up` or `down`.
        redis: &'a str,
    },
    /// The answer to `leave`.
    Left {
        /// The room.
        room: &'a str,
    },
    /// Someone joined or left a room (sent to its members).
    Presence {
        /// The room.
        room: &'a str,
        /// `join` or `leave`.
        event: &'a str,
        /// Who.
        name: &'a str,
        /// How many are in the room now.
        count: usize,
    },
    /// A message in a room. (The server builds it with [`message`] from
    /// the line kept serialised; this variant is its reference shape.)
    Message(&'a ChatLine),
    /// A direct message (to its recipient, and back to its sender).
    Dm(&'a DirectLine),
    /// The answer to `ping`.
    Pong {
        /// The ping's id.
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    /// A refused request.
    Error(&'a Problem),
}

impl Event<'_> {
    /// The event as a WebSocket text message.
    pub fn to_message(&self) -> Message {
        Message::from(serde_json::to_string(self).expect("events serialize"))
    }
}

/// The fields of a room message after its `id`, serialised once:
/// `"room":…,"from":…,"text":…,"ts":…}` (without the opening brace). The
/// `message` event and each entry of a `joined` history are this behind
/// their own opening, so a line is serialised once however often it is
/// sent.
pub fn line_tail(room: &str, from: &str, text: &str, ts: u64) -> String {
    #[derive(Serialize)]
    struct Tail<'a> {
        room: &'a str,
        from: &'a str,
        text: &'a str,
        ts: u64,
    }
    let mut json = serde_json::to_string(&Tail {
        room,
        from,
        text,
        ts,
    })
    .expect("a line serializes");
    // A struct serializes as an object: "{" then the fields.
    json.remove(0);
    json
}

/// The bytes one line of [`line_tail`] takes in a `joined` history: its
/// opening, the longest id, the tail and a separating comma.
pub fn history_entry_len(tail: &str) -> usize {
    r#"{"id":"","#.len() + MAX_ID_LEN + tail.len() + 1
}

/// The longest id: two `u64` and a dash.
pub const MAX_ID_LEN: usize = 41;

/// The `message` event of the line with this id and [`line_tail`].
pub fn message(id: &str, tail: &str) -> Message {
    let mut json = String::with_capacity(80 + tail.len());
    json.push_str(r#"{"type":"message","id":""#);
    json.push_str(id);
    json.push_str("\",");
    json.push_str(tail);
    Message::from(json)
}

/// The `joined` event: the room's epoch, whether `since` was recovered
/// (when it was given), the members, sorted, and the history as `(id,
/// tail)` pairs of [`line_tail`], oldest first.
pub fn joined<'a, M, H>(
    room: &str,
    epoch: &str,
    recovered: Option<bool>,
    members: M,
    history: H,
) -> Message
where
    M: IntoIterator<Item = &'a str>,
    H: IntoIterator<Item = (&'a str, &'a str)>,
{
    let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut json = String::from(r#"{"type":"joined","room":"#);
    json.push_str(&quoted(room));
    json.push_str(r#","epoch":"#);
    json.push_str(&quoted(epoch));
    if let Some(recovered) = recovered {
        json.push_str(if recovered {
            r#","recovered":true"#
        } else {
            r#","recovered":false"#
        });
    }
    json.push_str(r#","members":["#);
    for (i, member) in members.into_iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&quoted(member));
    }
    json.push_str(r#"],"history":["#);
    for (i, (id, tail)) in history.into_iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(r#"{"id":""#);
        json.push_str(id);
        json.push_str("\",");
        json.push_str(tail);
    }
    json.push_str("]}");
    Message::from(json)
}

/// The fields of a direct message after its `id`, serialised once, as
/// [`line_tail`] for rooms: `"from":…,"to":…,"text":…,"ts":…}`.
pub fn dm_tail(from: &str, to: &str, text: &str, ts: u64) -> String {
    #[derive(Serialize)]
    struct Tail<'a> {
        from: &'a str,
        to: &'a str,
        text: &'a str,
        ts: u64,
    }
    let mut json = serde_json::to_string(&Tail { from, to, text, ts }).expect("a line serializes");
    json.remove(0);
    json
}

/// A direct message's [`DirectLine`] JSON from its id and [`dm_tail`].
pub fn dm_line(id: &str, tail: &str) -> String {
    let mut json = String::with_capacity(48 + tail.len());
    json.push_str(r#"{"id":""#);
    json.push_str(id);
    json.push_str("\",");
    json.push_str(tail);
    json
}

/// The `dm` event of a direct message kept as [`DirectLine`]'s JSON.
pub fn dm_event(line_json: &str) -> Message {
    let mut json = String::with_capacity(12 + line_json.len());
    json.push_str(r#"{"type":"dm","#);
    json.push_str(line_json.strip_prefix('{').unwrap_or(line_json));
    Message::from(json)
}

/// The `dm_history` answer, with the lines as [`DirectLine`]'s JSON.
pub fn dm_history<'a, H>(with: &str, epoch: &str, recovered: Option<bool>, history: H) -> Message
where
    H: IntoIterator<Item = &'a str>,
{
    let quoted = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut json = String::from(r#"{"type":"dm_history","with":"#);
    json.push_str(&quoted(with));
    json.push_str(r#","epoch":"#);
    json.push_str(&quoted(epoch));
    if let Some(recovered) = recovered {
        json.push_str(if recovered {
            r#","recovered":true"#
        } else {
            r#","recovered":false"#
        });
    }
    json.push_str(r#","history":["#);
    for (i, line) in history.into_iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(line);
    }
    json.push_str("]}");
    Message::from(json)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_and_bad_ones_get_codes() {
        assert_eq!(
            parse(r#"{"type":"hello","name":"Ada"}"#),
            Ok(Request::Hello {
                name: "Ada".into(),
                token: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"message","room":"general","text":"hi","extra":1}"#),
            Ok(Request::Message {
                room: "general".into(),
                text: "hi".into()
            })
        );
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(Request::Ping { id: None }));
        assert_eq!(parse("nope").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(parse("[1]").unwrap_err().code, ErrorCode::BadJson);
        assert_eq!(parse("{}").unwrap_err().code, ErrorCode::UnknownType);
        assert_eq!(
            parse(r#"{"type":"shout"}"#).unwrap_err().code,
            ErrorCode::UnknownType
        );
        let missing = parse(r#"{"type":"join"}"#).unwrap_err();
        assert_eq!(missing.code, ErrorCode::BadRequest);
        assert_eq!(missing.request.as_deref(), Some("join"));
        assert_eq!(
            parse(r#"{"type":"dm","to":"x","text":5}"#)
                .unwrap_err()
                .code,
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn stream_ids_order_and_parse() {
        let a = StreamId { ms: 5, seq: 0 };
        assert_eq!(a.next(9), StreamId { ms: 9, seq: 0 });
        assert_eq!(a.next(5), StreamId { ms: 5, seq: 1 });
        assert_eq!(a.next(3), StreamId { ms: 5, seq: 1 }, "the clock went back");
        assert!(StreamId { ms: 5, seq: 10 } > StreamId { ms: 5, seq: 9 });
        assert!(StreamId { ms: 6, seq: 0 } > StreamId { ms: 5, seq: 9 });
        assert_eq!(StreamId::parse("17-3"), Some(StreamId { ms: 17, seq: 3 }));
        assert_eq!(StreamId::parse("17"), Some(StreamId { ms: 17, seq: 0 }));
        assert_eq!(StreamId { ms: 17, seq: 3 }.to_string(), "17-3");
        for bad in [
            "",
            "-",
            "a-1",
            "1-",
            "1--2",
            "+1-2",
            "99999999999999999999999-0",
        ] {
            assert_eq!(StreamId::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn names_and_rooms_follow_the_rules() {
        assert_eq!(check_name("  Zoë_2.0 "), Ok("Zoë_2.0".into()));
        assert_eq!(check_name("Ada Lovelace"), Ok("Ada Lovelace".into()));
        assert_eq!(check_name(&"x".repeat(32)).unwrap().len(), 32);
        for bad in ["", "   ", "a<b", "x\ny", "a  b", &"x".repeat(33), "💥"] {
            assert_eq!(
                check_name(bad).unwrap_err().code,
                ErrorCode::InvalidName,
                "{bad:?}"
            );
        }
        assert_eq!(check_room(" Random Stuff "), Ok("random stuff".into()));
        assert_eq!(check_room("#x").unwrap_err().code, ErrorCode::InvalidRoom);
    }

    #[test]
    fn look_alike_names_share_a_key() {
        let alice = name_key("Alice");
        for same in [
            "alice",
            " ALICE ",
            "\u{410}lice",
            "\u{410}l\u{456}ce",
            "\u{391}LICE",
            "A\u{13de}ice",
            "\u{1d5a0}lice",
        ] {
            assert_eq!(name_key(same), alice, "{same:?}");
        }
        assert_eq!(name_key("\u{412}ob"), name_key("Bob"), "a Cyrillic Ve");
        for other in ["Alicia", "Bob", "Al ice", "Al-ice"] {
            assert_ne!(name_key(other), alice, "{other:?}");
        }
        assert_eq!(name_key("Ada"), "ada");
        assert_eq!(name_key("m"), name_key("rn"), "TS #39: m looks like rn");
        assert_eq!(name_key("Zoë"), name_key("Zoe\u{308}"), "normalised");
        // The key of a key is itself.
        for name in ["Alice", "ΣΟΦΊΑ", "Zoë_2.0", "0O0", "İstanbul", "ǅemal", "ﬀ"] {
            let key = name_key(name);
            assert_eq!(name_key(&key), key, "{name:?}");
        }
    }

    /// What the chat_request fuzz target checks of keys, for every
    /// character of the Basic Multilingual Plane a name may hold that its
    /// skeleton or lowercasing changes, alone and between letters: a key's
    /// key is itself, and a character replaced by its skeleton is the same
    /// name.
    #[test]
    fn keys_are_stable_for_every_character_a_name_may_hold() {
        let mut buf = [0; 4];
        for c in (0..=0xffff_u32).filter_map(char::from_u32) {
            let Ok(name) = check_name(c.encode_utf8(&mut buf)) else {
                continue;
            };
            let plain =
                unicode_security::skeleton(&name).eq(name.chars()) && name.to_lowercase() == name;
            if plain {
                continue;
            }
            for name in [name.clone(), format!("A{name}b")] {
                let key = name_key(&name);
                assert_eq!(name_key(&key), key, "{name:?}");
                let skeleton: String = name
                    .chars()
                    .flat_map(|c| {
                        let mut buf = [0; 4];
                        if c.is_ascii() {
                            vec![c]
                        } else {
                            unicode_security::skeleton(c.encode_utf8(&mut buf)).collect()
                        }
                    })
                    .collect();
                assert_eq!(name_key(&skeleton), key, "{name:?} and {skeleton:?}");
                assert_eq!(name_key(&name.to_ascii_uppercase()), key, "{name:?}");
            }
        }
    }

    #[test]
    fn an_identity_is_a_fixed_hash_of_its_token() {
        let token = "5f0c2a9e41d37b86a0e9c3d2f1b4a7e8";
        assert!(is_token(token));
        for bad in [
            "",
            "secret",
            &token[1..],
            &token.to_uppercase(),
            &format!("{token}0"),
        ] {
            assert!(!is_token(bad), "{bad:?}");
        }
        let id = identity(token);
        assert_eq!(id.len(), 32);
        assert_eq!(id, identity(token));
        assert_ne!(id, identity("5f0c2a9e41d37b86a0e9c3d2f1b4a7e9"));
        assert!(!id.contains(token) && id != token);
    }

    /// Found by the chat_request fuzz target: "İ" lowercases to "i" and
    /// U+0307, which a room name may not hold, and 32 of them to 64
    /// characters. The room kept must pass its own check.
    #[test]
    fn lowercased_room_names_follow_the_rules_too() {
        assert_eq!(
            check_room("İ").unwrap_err().code,
            ErrorCode::InvalidRoom,
            "{:?}",
            check_room("İ")
        );
        assert!(check_room(&"İ".repeat(32)).is_err());
        for ok in ["Ärger", "ΣΟΦΊΑ", "Lobby 2"] {
            let room = check_room(ok).unwrap();
            assert_eq!(check_room(&room), Ok(room.clone()), "{ok:?}");
        }
    }

    #[test]
    fn text_is_bounded_and_clean() {
        assert_eq!(
            check_text("hi\r\nthere  \n", 10, 40),
            Ok("hi\nthere".into())
        );
        assert_eq!(
            check_text("  \n", 10, 40).unwrap_err().code,
            ErrorCode::InvalidText
        );
        assert_eq!(
            check_text(&"é".repeat(11), 10, 40).unwrap_err().code,
            ErrorCode::TextTooLong
        );
        assert_eq!(
            check_text(&"é".repeat(10), 10, 40).unwrap().chars().count(),
            10
        );
        // Ten characters, but 40 bytes.
        assert_eq!(
            check_text(&"𝄞".repeat(10), 10, 39).unwrap_err().code,
            ErrorCode::TextTooLong
        );
        assert_eq!(check_text(&"𝄞".repeat(10), 10, 40).unwrap().len(), 40);
        assert_eq!(
            check_text("bell\u{7}", 10, 40).unwrap_err().code,
            ErrorCode::InvalidText
        );
    }

    #[test]
    fn events_serialize_with_their_type() {
        let line = ChatLine {
            id: "1-0".into(),
            room: "general".into(),
            from: "Ada".into(),
            text: "hi".into(),
            ts: 5,
        };
        let Message::Text(text) = Event::Message(&line).to_message() else {
            panic!("text expected");
        };
        assert_eq!(
            text.as_str(),
            r#"{"type":"message","id":"1-0","room":"general","from":"Ada","text":"hi","ts":5}"#
        );
        let problem = Problem::new(ErrorCode::NameTaken, "taken").request("hello");
        let Message::Text(text) = Event::Error(&problem).to_message() else {
            panic!("text expected");
        };
        assert_eq!(
            text.as_str(),
            r#"{"type":"error","code":"name_taken","message":"taken","request":"hello"}"#
        );
    }

    #[test]
    fn lines_serialised_once_read_as_the_reference_events() {
        let lines = [
            ChatLine {
                id: "1732531234567-7".into(),
                room: "général".into(),
                from: "Zoë \"Z\"".into(),
                text: "a\nb\t𝄞 \\ </script>".into(),
                ts: 1_732_531_234_567,
            },
            ChatLine {
                id: format!("{}-{}", u64::MAX, u64::MAX),
                room: "général".into(),
                from: "Ada".into(),
                text: "x".into(),
                ts: 0,
            },
        ];
        let tails: Vec<String> = lines
            .iter()
            .map(|l| line_tail(&l.room, &l.from, &l.text, l.ts))
            .collect();
        let value = |m: Message| -> Value {
            let Message::Text(text) = m else {
                panic!("text expected")
            };
            serde_json::from_str(text.as_str()).expect("JSON")
        };
        for (line, tail) in lines.iter().zip(&tails) {
            assert_eq!(
                value(message(&line.id, tail)),
                value(Event::Message(line).to_message())
            );
        }
        let members = ["Ada", "Zoë \"Z\""];
        let built = joined(
            "général",
            "e1",
            Some(true),
            members,
            lines
                .iter()
                .zip(&tails)
                .map(|(l, t)| (l.id.as_str(), t.as_str())),
        );
        let Message::Text(text) = &built else {
            panic!("text expected")
        };
        let reference = Event::Joined {
            room: "général",
            epoch: "e1",
            recovered: Some(true),
            members: members.to_vec(),
            history: &lines,
        };
        assert_eq!(value(built.clone()), value(reference.to_message()));
        // The budget of an entry covers what it takes.
        let history_len: usize = tails.iter().map(|t| history_entry_len(t)).sum();
        let envelope = text.len() - text.find(r#""history":["#).expect("history");
        assert!(envelope <= history_len + r#""history":[]}"#.len());
        assert_eq!(
            value(joined("x", "e", None, [], [])),
            serde_json::json!({"type": "joined", "room": "x", "epoch": "e", "members": [], "history": []})
        );
    }
}
