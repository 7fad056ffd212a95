//! The duplex chat server: a chat page for browsers (`GET /`) over a JSON
//! protocol on `/chat` (see `PROTOCOL.md`), the brief's plain-text chat on
//! `/chat/plain`, its echo on `/echo`, the `/mirror` that conformance suites
//! and benchmarks use, and Prometheus metrics on `/metrics`.
//!
//! The binary serves [`app_with`]; tests mount it on a free port.

use std::sync::{
    Arc, Mutex, OnceLock,
    atomic::{AtomicU64, Ordering},
};

use duplex::axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use duplex::{App, CloseCode, CloseReason, Error, Message, Sender, Session, WebSockets};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

mod chat;
pub mod protocol;

pub use chat::{Chat, ChatOptions, DIRECTORY_MAX, REPLACED};

/// Every route of the server, with the default chat options.
pub fn app(websockets: WebSockets) -> App {
    app_with(websockets, ChatOptions::default())
}

/// Every route of the server.
///
/// `/chat` reads at most 64 KiB a message (or four times the largest
/// request, if more), whatever `websockets` says: a chat request is small,
/// and anything up to that size gets a `too_large` error rather than a
/// closed connection.
pub fn app_with(websockets: WebSockets, options: ChatOptions) -> App {
    let limit = (options.max_request_bytes() as u64 * 4).max(64 << 10);
    let chat_websockets = websockets
        .clone()
        .max_message_size(limit)
        .max_frame_size(limit.min(websockets.get_max_frame_size()));
    let chat = Chat::new(options);
    let plain = ChatRoom::default();
    let metrics = prometheus();
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
        .route("/metrics", get(move || render_metrics(metrics.clone())))
        .route(
            "/chat",
            duplex::web_socket(&chat_websockets, move |session| chat.clone().serve(session)),
        )
        .web_socket("/chat/plain", move |session| plain.clone().join(session))
        .web_socket("/echo", echo)
        .web_socket("/mirror", mirror)
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

/// The Prometheus recorder of this process, installed on first use. `None`
/// if another `metrics` recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(err) => {
                tracing::warn!("no Prometheus metrics: {err}");
                None
            }
        })
        .clone()
}

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
        if text.as_str() == "bye" {
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
/// gets a name, and every message goes to everyone as "[name]: text".
#[derive(Clone, Default)]
struct ChatRoom {
    members: Arc<Mutex<std::collections::BTreeMap<u64, Sender>>>,
    next_id: Arc<AtomicU64>,
}

impl ChatRoom {
    async fn join(self, mut session: Session) -> Result<(), Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let name = format!("user{id}");
        let count = {
            let mut members = self.lock();
            members.insert(id, session.sender());
            members.len()
        };
        let result = async {
            session
                .send(format!("You are connected! There are {count} users here."))
                .await?;
            while let Some(message) = session.recv().await? {
                if let Message::Text(text) = message {
                    self.broadcast(Message::from(format!("[{name}]: {text}")));
                }
            }
            Ok(())
        }
        .await;
        self.lock().remove(&id);
        result
    }

    /// Sends to every member without waiting on any: a member whose buffer
    /// is full misses this message rather than slowing the room.
    fn broadcast(&self, message: Message) {
        let members: Vec<Sender> = self.lock().values().cloned().collect();
        for member in members {
            if let Err(err) = member.try_send(message.clone()) {
                tracing::debug!("chat message not delivered: {err}");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, Sender>> {
        self.members
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
