//! The duplex chat server: a chat page for browsers (`GET /`) over a JSON
//! protocol on `/chat` (see `PROTOCOL.md`), the brief's plain-text chat on
//! `/chat/plain`, its echo on `/echo`, the `/mirror` that conformance suites
//! and benchmarks use, and Prometheus metrics on `/metrics`.
//!
//! The binary serves [`app_with`]; tests mount it on a free port.

#![deny(unsafe_code)]

use std::{
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use duplex::axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use duplex::metrics::{Kind, Metric, Unit};
use duplex::{App, CloseCode, CloseReason, Error, Hub, Message, Session, WebSockets};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

mod chat;
pub mod memory;
pub mod protocol;

pub use chat::{
    BEAT, Chat, ChatOptions, DIRECTORY_MAX, HEALTH_PERIOD, REPLACED, RedisOptions, RedisStartError,
    SNAPSHOT_MAX, TTL,
};

use chat::TokenBucket;

/// Every route of the server, with the default chat options.
pub fn app(websockets: WebSockets) -> App {
    app_with(websockets, ChatOptions::default())
}

/// Every route of the server.
///
/// `/chat` and `/chat/plain` read at most 64 KiB a message (or four times
/// the largest request, if more), whatever `websockets` says: a chat
/// request is small, and anything up to that size gets a `too_large` error
/// (a notice on `/chat/plain`) rather than a closed connection.
///
/// `/echo` and `/mirror` read at most [`ChatOptions::echo_max_message`]
/// bytes a message and frame (64 KiB by default), and less if `websockets`
/// says so.
///
/// Both chats are rate-limited per connection by `options`; `/echo` and
/// `/mirror` are not: they are for conformance suites and benchmarks, which
/// need to send as fast as they can (put them behind a proxy, or leave them
/// to the library's connection limits, on a public server).
pub fn app_with(websockets: WebSockets, options: ChatOptions) -> App {
    app_for(websockets, Chat::new(options))
}

/// Every route of the server around `chat` (one made with
/// [`Chat::with_redis`], for example), with `chat`'s options; as
/// [`app_with`] otherwise.
pub fn app_for(websockets: WebSockets, chat: Chat) -> App {
    public_app_for(websockets, chat).merge(metrics_router())
}

/// Every route but `/metrics`, for a server that serves its metrics on a
/// listener of their own ([`metrics_app`], `--metrics-addr`), out of the
/// public's reach: a scrape renders every series, which a stranger should
/// not be able to ask for at will.
pub fn public_app_for(websockets: WebSockets, chat: Chat) -> App {
    let options = chat.options().clone();
    let limit = (options.max_request_bytes() as u64 * 4).max(64 << 10);
    let chat_websockets = websockets
        .clone()
        .max_message_size(limit)
        .max_frame_size(limit.min(websockets.get_max_frame_size()));
    let echo_limit = options
        .echo_max_message
        .clamp(1, websockets.get_max_message_size());
    let echo_websockets = websockets
        .clone()
        .max_message_size(echo_limit)
        .max_frame_size(echo_limit.min(websockets.get_max_frame_size()));
    let plain = ChatRoom::new(&options);
    App::new()
        .install(websockets)
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }),
        )
        .route(
            "/app.css",
            get(|| async { asset("text/css; charset=utf-8", APP_CSS) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }),
        )
        .route(
            "/favicon.svg",
            get(|| async { asset("image/svg+xml", FAVICON) }),
        )
        .route(
            "/chat",
            duplex::web_socket(&chat_websockets, move |session| chat.clone().serve(session)),
        )
        .route(
            "/chat/plain",
            duplex::web_socket(&chat_websockets, move |session| plain.clone().join(session)),
        )
        .route("/echo", duplex::web_socket(&echo_websockets, echo))
        .route("/mirror", duplex::web_socket(&echo_websockets, mirror))
}

/// `/metrics` alone (Prometheus text format), to serve on a listener of
/// its own: `--metrics-addr`.
pub fn metrics_app() -> App {
    App::new().merge(metrics_router())
}

fn metrics_router() -> duplex::axum::Router {
    let metrics = prometheus();
    duplex::axum::Router::new().route("/metrics", get(move || render_metrics(metrics.clone())))
}

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_CSS: &str = include_str!("../static/app.css");
const APP_JS: &str = include_str!("../static/app.js");
const FAVICON: &str = include_str!("../static/favicon.svg");

/// The page's resources: everything from this server, nothing inline.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        ],
        body,
    )
        .into_response()
}

/// The Prometheus recorder of this process, installed on first use, with
/// duplex's metrics ([`duplex::metrics::METRICS`]) and the chat's
/// ([`METRICS`]) described and at zero, so that the first scrape lists them
/// all. `None` if another `metrics` recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => {
                duplex::metrics::describe();
                duplex::metrics::describe_metrics(METRICS);
                Some(handle)
            }
            Err(err) => {
                tracing::warn!("no Prometheus metrics: {err}");
                None
            }
        })
        .clone()
}

/// The chat's own metrics, beside duplex's.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "duplex_chat_users",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Names in use on /chat.",
        label: None,
    },
    Metric {
        name: "duplex_chat_rooms",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "Rooms the chat keeps (with members or history).",
        label: None,
    },
    Metric {
        name: "duplex_chat_messages_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Chat messages accepted on /chat, to a room or direct.",
        label: Some(("kind", &["room", "direct"])),
    },
    Metric {
        name: "duplex_chat_errors_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Error replies sent on /chat, by code (PROTOCOL.md).",
        label: Some((
            "code",
            &[
                "bad_json",
                "unknown_type",
                "bad_request",
                "binary_not_supported",
                "too_large",
                "rate_limited",
                "not_identified",
                "already_identified",
                "invalid_name",
                "name_taken",
                "invalid_room",
                "too_many_rooms",
                "not_in_room",
                "invalid_text",
                "text_too_long",
                "unknown_user",
                "invalid_recipient",
                "server_full",
                "room_full",
                "server_rooms_full",
                "unavailable",
            ],
        )),
    },
    Metric {
        name: "duplex_chat_redis_up",
        kind: Kind::Gauge,
        unit: Unit::Count,
        help: "1 while Redis answers this node's PINGs (with --redis-url), else 0.",
        label: None,
    },
    Metric {
        name: "duplex_chat_redis_stalls_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Times Redis stopped answering (two PINGs a second apart unanswered), or the subscription went deaf.",
        label: None,
    },
    Metric {
        name: "duplex_chat_redis_reconnects_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Times Redis answered again after being marked down.",
        label: None,
    },
    Metric {
        name: "duplex_chat_redis_gaps_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Times a room's stream no longer held messages this node had not delivered (members got a gap event).",
        label: None,
    },
    Metric {
        name: "duplex_chat_rate_limited_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Requests refused by a connection's rate limit, on /chat and /chat/plain.",
        label: None,
    },
    Metric {
        name: "duplex_chat_plain_refused_total",
        kind: Kind::Counter,
        unit: Unit::Count,
        help: "Connections to /chat/plain turned away because the chat was full.",
        label: None,
    },
];

async fn render_metrics(handle: Option<PrometheusHandle>) -> Response {
    match handle {
        Some(handle) => {
            handle.run_upkeep();
            (
                [(
                    header::CONTENT_TYPE,
                    "text/plain; version=0.0.4; charset=utf-8",
                )],
                handle.render(),
            )
                .into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "another metrics recorder is installed\n",
        )
            .into_response(),
    }
}

/// The brief's echo: asks for a name, greets each line, closes on "bye".
async fn echo(mut session: Session) -> Result<(), Error> {
    session.send("Please enter your name").await?;
    while let Some(message) = session.recv().await? {
        let Message::Text(text) = message else {
            continue;
        };
        if text.as_str().eq_ignore_ascii_case("bye") {
            session
                .close(CloseReason::new(CloseCode::NORMAL, "Client said BYE"))
                .await?;
        } else {
            session.send(format!("Hi, {text}!")).await?;
        }
    }
    Ok(())
}

/// Returns every text and binary message unchanged.
async fn mirror(mut session: Session) -> Result<(), Error> {
    while let Some(message) = session.recv().await? {
        session.send(message).await?;
    }
    Ok(())
}

/// The brief's multiple-sessions example, on `/chat/plain`: each connection
/// gets a name, and every line goes to everyone as "[name]: text".
///
/// It is one room, held to the limits of `/chat`: at most
/// [`ChatOptions::max_members_per_room`] people (one more is told so and
/// closed with 1013), lines of at most [`ChatOptions::max_text_bytes`], and
/// the same token bucket per connection (lines over it are dropped, with one
/// notice a second). Lines fan out through a [`Hub`]: framed once, queued
/// without waiting, and a reader too slow to keep up misses lines rather
/// than slowing the room.
#[derive(Clone)]
struct ChatRoom {
    hub: Hub,
    members: Arc<AtomicUsize>,
    next_id: Arc<AtomicU64>,
    options: Arc<ChatOptions>,
}

/// The hub topic of `/chat/plain`.
const PLAIN_TOPIC: &str = "plain";

/// A place in `/chat/plain`, given back on drop.
struct Seat(Arc<AtomicUsize>);

impl Drop for Seat {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ChatRoom {
    fn new(options: &ChatOptions) -> Self {
        ChatRoom {
            hub: Hub::new(),
            members: Arc::default(),
            next_id: Arc::default(),
            options: Arc::new(options.clone()),
        }
    }

    async fn join(self, mut session: Session) -> Result<(), Error> {
        let max = self.options.max_members_per_room;
        let count = self.members.fetch_add(1, Ordering::AcqRel) + 1;
        let _seat = Seat(Arc::clone(&self.members));
        if count > max {
            metrics::counter!("duplex_chat_plain_refused_total").increment(1);
            session
                .send(format!("The chat is full ({max} users); try again later."))
                .await?;
            return session
                .close(CloseReason::new(
                    CloseCode::TRY_AGAIN_LATER,
                    "Chat full, try again later",
                ))
                .await;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("user{id}");
        let me = self.hub.register(&session.sender());
        me.join(PLAIN_TOPIC);
        session
            .send(format!("You are connected! There are {count} users here."))
            .await?;
        let mut bucket = TokenBucket::new(self.options.rate, self.options.burst);
        let mut quiet_until: Option<Instant> = None;
        let max_bytes = self.options.max_text_bytes;
        while let Some(message) = session.recv().await? {
            let Message::Text(text) = message else {
                continue;
            };
            let now = Instant::now();
            let notice = if bucket.take(now).is_err() {
                metrics::counter!("duplex_chat_rate_limited_total").increment(1);
                Some(format!(
                    "Slow down: at most {} lines a second (bursts of {}); \
                     lines sent meanwhile are dropped.",
                    self.options.rate, self.options.burst
                ))
            } else if text.len() > max_bytes {
                Some(format!(
                    "A line has at most {max_bytes} bytes ({} given); it was dropped.",
                    text.len()
                ))
            } else {
                self.hub
                    .publish(PLAIN_TOPIC, Message::from(format!("[{name}]: {text}")));
                None
            };
            // One notice a second at most: a flood must not become a flood
            // of notices.
            if let Some(notice) = notice
                && quiet_until.is_none_or(|t| now >= t)
            {
                quiet_until = Some(now + Duration::from_secs(1));
                self.hub.send_to(me.id(), Message::from(notice));
            }
        }
        Ok(())
    }
}
