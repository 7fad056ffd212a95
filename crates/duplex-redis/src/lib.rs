//! A Redis pub/sub [`Backplane`] for [`duplex::Hub`]: run the same server in
//! several processes, give each hub a `RedisBackplane` on the same channel,
//! and a message published or broadcast on any of them reaches the
//! subscribers of all of them.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use duplex::{App, Hub, Session, WebSockets};
//!
//! let backplane = duplex_redis::RedisBackplane::connect("redis://127.0.0.1/", "chat").await?;
//! let hub = Hub::builder().backplane(backplane).build();
//! let app = App::new().install(WebSockets::default()).web_socket("/room", move |mut session: Session| {
//!     let hub = hub.clone();
//!     async move {
//!         let membership = hub.register(&session.sender());
//!         membership.join("room");
//!         while let Some(message) = session.recv().await? {
//!             hub.publish("room", message);
//!         }
//!         Ok::<_, duplex::Error>(())
//!     }
//! });
//! # Ok(()) }
//! ```
//!
//! What a node publishes goes to Redis and comes back like everyone else's,
//! so every node, the publishing one included, delivers each message once,
//! in the order its publisher sent them. Redis pub/sub keeps nothing: while
//! a node is cut off from Redis, what is published meanwhile does not reach
//! it (delivery is at most once), and the node logs the gap and reconnects.
//! [`Hub::send_to`](duplex::Hub::send_to) stays local: session ids belong to
//! one process.

use std::{
    fmt,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use duplex::{Backplane, BackplaneSink, Envelope, Message, Target};
use futures_util::StreamExt;
use redis::{Client, RedisError, aio::MultiplexedConnection, aio::PubSubStream};
use tokio::{runtime::Handle, sync::mpsc};

/// Envelopes waiting for the publishing connection. A node that publishes
/// faster than Redis takes them drops the excess (counted and logged) rather
/// than growing without bound.
const OUTBOX: usize = 64 * 1024;

/// Envelopes sent in one pipeline: one round trip for a burst.
const BATCH: usize = 256;

/// The first and the longest wait between attempts to reach Redis again.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// How often a quiet subscription checks that its hub still exists.
const HUB_CHECK: Duration = Duration::from_secs(1);

/// The wire format's version byte.
const VERSION: u8 = 1;

/// A [`Backplane`] over one Redis pub/sub channel.
pub struct RedisBackplane {
    client: Client,
    channel: String,
    runtime: Handle,
    outbox: mpsc::Sender<Bytes>,
    /// The subscription made by `connect`, until `start` hands it to the
    /// delivery task: nothing published after `connect` returns is missed.
    subscription: Mutex<Option<PubSubStream>>,
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("channel", &self.channel)
            .finish_non_exhaustive()
    }
}

impl RedisBackplane {
    /// Connects to Redis at `url` (`redis://host:port/`), subscribes to
    /// `channel` and starts the publishing task on the current runtime.
    ///
    /// # Errors
    /// When Redis cannot be reached or refuses the subscription.
    pub async fn connect(url: &str, channel: &str) -> Result<Arc<Self>, RedisError> {
        let client = Client::open(url)?;
        let publisher = client.get_multiplexed_async_connection().await?;
        let subscription = subscribe(&client, channel).await?;
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let runtime = Handle::current();
        runtime.spawn(publish_loop(
            client.clone(),
            channel.to_owned(),
            publisher,
            queued,
        ));
        Ok(Arc::new(RedisBackplane {
            client,
            channel: channel.to_owned(),
            runtime,
            outbox,
            subscription: Mutex::new(Some(subscription)),
        }))
    }
}

impl Backplane for RedisBackplane {
    fn start(&self, sink: BackplaneSink) {
        let subscription = self
            .subscription
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(subscription) = subscription else {
            tracing::error!(channel = %self.channel, "a RedisBackplane serves one hub; this one already has its hub");
            return;
        };
        self.runtime.spawn(deliver_loop(
            self.client.clone(),
            self.channel.clone(),
            subscription,
            sink,
        ));
    }

    fn publish(&self, envelope: Envelope) {
        let Some(encoded) = encode(&envelope) else {
            tracing::warn!("topic name over 65,535 bytes: message not published");
            return;
        };
        match self.outbox.try_send(encoded) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("duplex_redis_dropped_total").increment(1);
                tracing::warn!(channel = %self.channel, "Redis is behind: message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!(channel = %self.channel, "the publishing task is gone: message dropped");
            }
        }
    }
}

async fn subscribe(client: &Client, channel: &str) -> Result<PubSubStream, RedisError> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    Ok(pubsub.into_on_message())
}

/// Hands every message of the channel to the hub, until the hub is gone.
async fn deliver_loop(
    client: Client,
    channel: String,
    mut subscription: PubSubStream,
    sink: BackplaneSink,
) {
    let mut hub_check = tokio::time::interval(HUB_CHECK);
    hub_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        loop {
            tokio::select! {
                message = subscription.next() => {
                    let Some(message) = message else { break };
                    match decode(message.get_payload_bytes()) {
                        Ok(envelope) => sink.deliver(envelope),
                        Err(err) => tracing::warn!(%channel, "undecodable message on the channel: {err}"),
                    }
                }
                _ = hub_check.tick() => {}
            }
            if sink.is_closed() {
                // The hub is gone: the subscription goes with this task.
                return;
            }
        }
        if sink.is_closed() {
            return;
        }
        tracing::warn!(%channel, "Redis subscription lost; messages published until it is back are missed here");
        let mut wait = FIRST_RETRY;
        subscription = loop {
            tokio::time::sleep(wait).await;
            if sink.is_closed() {
                return;
            }
            match subscribe(&client, &channel).await {
                Ok(subscription) => break subscription,
                Err(err) => {
                    tracing::warn!(%channel, "cannot subscribe again: {err}");
                    wait = (wait * 2).min(LAST_RETRY);
                }
            }
        };
        tracing::info!(%channel, "Redis subscription back");
    }
}

/// Publishes the queued envelopes in order, a burst per round trip, until
/// the backplane is dropped.
async fn publish_loop(
    client: Client,
    channel: String,
    connection: MultiplexedConnection,
    mut queued: mpsc::Receiver<Bytes>,
) {
    let mut connection = Some(connection);
    let mut batch = Vec::with_capacity(BATCH);
    let mut wait = FIRST_RETRY;
    while queued.recv_many(&mut batch, BATCH).await > 0 {
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match client.get_multiplexed_async_connection().await {
                Ok(conn) => {
                    tracing::info!(%channel, "Redis publishing connection back");
                    wait = FIRST_RETRY;
                    connection.insert(conn)
                }
                Err(err) => {
                    drop_batch(&channel, &mut batch, &err);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(LAST_RETRY);
                    continue;
                }
            },
        };
        let mut pipe = redis::pipe();
        for payload in &batch {
            pipe.publish(&channel, &payload[..]).ignore();
        }
        match pipe.query_async::<()>(conn).await {
            Ok(()) => batch.clear(),
            Err(err) => {
                drop_batch(&channel, &mut batch, &err);
                connection = None;
            }
        }
    }
}

/// Pub/sub keeps nothing for later, so neither do we: a burst that could not
/// be published is dropped, counted and logged.
fn drop_batch(channel: &str, batch: &mut Vec<Bytes>, err: &RedisError) {
    metrics::counter!("duplex_redis_dropped_total").increment(batch.len() as u64);
    tracing::warn!(%channel, dropped = batch.len(), "cannot publish to Redis: {err}");
    batch.clear();
}

/// Why a message on the channel is not an envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header says.
    Truncated,
    /// Not written by this version of the backplane.
    Version(u8),
    /// An unknown message kind or target.
    Kind(u8),
    /// A text message or topic name that is not UTF-8.
    Utf8,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("truncated"),
            DecodeError::Version(v) => write!(f, "unknown format version {v}"),
            DecodeError::Kind(k) => write!(f, "unknown kind or target {k}"),
            DecodeError::Utf8 => f.write_str("text that is not UTF-8"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// An envelope on the wire: the version, the message kind (0 text,
/// 1 binary), the target (0 every session, 1 a topic, then its name's
/// length as two bytes, big-endian, and the name), then the payload. `None`
/// for a topic name too long for the length field.
pub fn encode(envelope: &Envelope) -> Option<Bytes> {
    let (kind, payload) = match &envelope.message {
        Message::Text(text) => (0u8, text.as_bytes()),
        Message::Binary(data) => (1u8, data),
    };
    let topic = match &envelope.target {
        Target::All => None,
        Target::Topic(topic) => Some((u16::try_from(topic.len()).ok()?, topic)),
    };
    let mut out =
        BytesMut::with_capacity(5 + topic.map_or(0, |(n, _)| usize::from(n)) + payload.len());
    out.put_u8(VERSION);
    out.put_u8(kind);
    match topic {
        None => out.put_u8(0),
        Some((len, name)) => {
            out.put_u8(1);
            out.put_u16(len);
            out.put_slice(name.as_bytes());
        }
    }
    out.put_slice(payload);
    Some(out.freeze())
}

/// The envelope in a message written by [`encode`].
///
/// # Errors
/// See [`DecodeError`].
pub fn decode(wire: &[u8]) -> Result<Envelope, DecodeError> {
    let [version, kind, target, rest @ ..] = wire else {
        return Err(DecodeError::Truncated);
    };
    if *version != VERSION {
        return Err(DecodeError::Version(*version));
    }
    let (target, payload) = match target {
        0 => (Target::All, rest),
        1 => {
            let [hi, lo, rest @ ..] = rest else {
                return Err(DecodeError::Truncated);
            };
            let len = usize::from(u16::from_be_bytes([*hi, *lo]));
            if rest.len() < len {
                return Err(DecodeError::Truncated);
            }
            let (name, payload) = rest.split_at(len);
            let name = std::str::from_utf8(name).map_err(|_| DecodeError::Utf8)?;
            (Target::Topic(name.to_owned()), payload)
        }
        other => return Err(DecodeError::Kind(*other)),
    };
    let message = match kind {
        0 => {
            let text = std::str::from_utf8(payload).map_err(|_| DecodeError::Utf8)?;
            Message::text(text)
        }
        1 => Message::binary(Bytes::copy_from_slice(payload)),
        other => return Err(DecodeError::Kind(*other)),
    };
    Ok(Envelope { target, message })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(envelope: Envelope) {
        let wire = encode(&envelope).expect("encodes");
        assert_eq!(decode(&wire), Ok(envelope));
    }

    #[test]
    fn envelopes_survive_the_wire() {
        roundtrip(Envelope {
            target: Target::All,
            message: Message::text("hello"),
        });
        roundtrip(Envelope {
            target: Target::Topic("room ∑".into()),
            message: Message::binary(vec![0u8, 255, 1]),
        });
        roundtrip(Envelope {
            target: Target::Topic(String::new()),
            message: Message::text(""),
        });
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert_eq!(decode(b""), Err(DecodeError::Truncated));
        assert_eq!(decode(&[2, 0, 0]), Err(DecodeError::Version(2)));
        assert_eq!(decode(&[1, 7, 0]), Err(DecodeError::Kind(7)));
        assert_eq!(decode(&[1, 0, 9]), Err(DecodeError::Kind(9)));
        assert_eq!(decode(&[1, 0, 1, 0, 5, b'a']), Err(DecodeError::Truncated));
        assert_eq!(decode(&[1, 0, 0, 0xff]), Err(DecodeError::Utf8));
        assert_eq!(decode(&[1, 1, 1, 0, 1, 0xff]), Err(DecodeError::Utf8));
    }

    #[test]
    fn a_topic_too_long_for_the_length_field_is_not_encoded() {
        let envelope = Envelope {
            target: Target::Topic("x".repeat(70_000)),
            message: Message::text("hi"),
        };
        assert_eq!(encode(&envelope), None);
    }
}
