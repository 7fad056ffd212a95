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
//!
//! # When Redis stops answering
//!
//! A Redis that is down refuses connections, which is quick to see; one that
//! is frozen (`kill -STOP`, a swapping host) or cut off by a half-open
//! connection says nothing at all, so every wait on it has a deadline. The
//! defaults, all settable through [`RedisBackplane::builder`]:
//!
//! | setting | default | bounds |
//! |---|---|---|
//! | [`ping_interval`](RedisBackplaneBuilder::ping_interval) | 1 s | the pause between a PONG and the next PING on the subscription |
//! | [`response_timeout`](RedisBackplaneBuilder::response_timeout) | 2 s | the wait for a PONG, for the answer to a burst of PUBLISH, for SUBSCRIBE's |
//! | [`connection_timeout`](RedisBackplaneBuilder::connection_timeout) | 2 s | opening a connection: TCP and the handshake |
//! | [`tcp_keepalive`](RedisBackplaneBuilder::tcp_keepalive) | 15 s | idle time before the kernel probes the publishing connection |
//! | [`retry_at_start`](RedisBackplaneBuilder::retry_at_start) | off | whether `connect` waits for Redis or fails |
//!
//! - **Subscription.** The subscribed connection is sent a PING (which
//!   RESP2 allows in subscribed mode) `ping_interval` after the previous
//!   PONG. A PONG late by more than `response_timeout` means the
//!   subscription is dead: so a Redis that stops answering is noticed
//!   within `ping_interval + response_timeout` (**3 s** by default, plus a
//!   few milliseconds of timer and scheduling delay), whatever
//!   the traffic. The node then logs "Redis subscription unresponsive" at
//!   warn, counts it in `duplex_redis_stalls_total{connection="subscription"}`,
//!   drops the connection and subscribes again with backoff (100 ms,
//!   doubling, at most 10 s between attempts, each attempt bounded by
//!   `connection_timeout + response_timeout`). A subscription that Redis
//!   closes (a restart) is replaced the same way, at once.
//! - **Publishing.** [`Backplane::publish`] never waits: it queues the
//!   envelope for the publishing task (65,536 at most; the excess is
//!   dropped). A burst that Redis does not answer within `response_timeout`
//!   is counted in `duplex_redis_stalls_total{connection="publishing"}`, its
//!   envelopes in `duplex_redis_dropped_total` (their fate is unknown: a
//!   Redis that resumes may still deliver them), logged at warn, and the
//!   connection is replaced with the same backoff. While there is no
//!   publishing connection, `publish` drops at once, counted in
//!   `duplex_redis_dropped_total`, so nothing stale is sent when Redis is
//!   back. TCP keepalive probes the publishing connection while it is idle.
//!   The subscription's connection gets no keepalive (the redis crate opens
//!   it with no socket settings); its PING does that job in seconds.
//! - **State.** [`RedisBackplane::is_connected`] and the gauge
//!   `duplex_redis_connected{channel}` (1 or 0) say whether both
//!   connections are up; [`RedisBackplane::stalls`] counts the stalls seen.
//! - **At start.** [`RedisBackplane::connect`] fails with an error when
//!   Redis cannot be reached: refused at once, unanswered within
//!   `2 × connection_timeout + response_timeout` (6 s by default). With
//!   [`retry_at_start`](RedisBackplaneBuilder::retry_at_start), it instead
//!   keeps trying with the same backoff, logging each failure at warn, and
//!   returns when Redis answers (wrap it in `tokio::time::timeout` for an
//!   overall limit). Either way, once it returns, nothing published is
//!   missed by the subscription.

#![forbid(unsafe_code)]

use std::{
    fmt,
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::{BufMut, Bytes, BytesMut};
use duplex::{Backplane, BackplaneSink, Envelope, Message, Target};
use futures_util::StreamExt;
use redis::{
    AsyncConnectionConfig, Client, ErrorKind, RedisError, RedisResult, Value,
    aio::{MultiplexedConnection, PubSubSink, PubSubStream},
    io::tcp::{TcpSettings, socket2::TcpKeepalive},
};
use tokio::{runtime::Handle, sync::mpsc, time::Instant};

mod metric_descriptions;
pub use metric_descriptions::{METRICS, describe_metrics};

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

/// Keepalive probes sent before the kernel gives up on an idle connection.
#[cfg(any(target_os = "linux", target_os = "android"))]
const KEEPALIVE_PROBES: u32 = 3;

/// The wire format's version byte.
const VERSION: u8 = 1;

/// A [`Backplane`] over one Redis pub/sub channel.
pub struct RedisBackplane {
    link: Arc<Link>,
    runtime: Handle,
    outbox: mpsc::Sender<Bytes>,
    /// The subscription made by `connect`, until `start` hands it to the
    /// delivery task: nothing published after `connect` returns is missed.
    subscription: Mutex<Option<Subscription>>,
}

impl fmt::Debug for RedisBackplane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackplane")
            .field("channel", &self.link.channel)
            .field("connected", &self.is_connected())
            .field("stalls", &self.stalls())
            .finish_non_exhaustive()
    }
}

impl RedisBackplane {
    /// Connects to Redis at `url` (`redis://host:port/`) with the default
    /// settings (see the [crate] docs), subscribes to `channel` and starts
    /// the publishing task on the current runtime.
    ///
    /// # Errors
    /// When Redis cannot be reached, does not answer in time or refuses the
    /// subscription.
    pub async fn connect(url: &str, channel: &str) -> Result<Arc<Self>, RedisError> {
        Self::builder(url, channel).connect().await
    }

    /// A backplane on `channel` of the Redis at `url`, with settings other
    /// than the defaults.
    pub fn builder(url: &str, channel: &str) -> RedisBackplaneBuilder {
        RedisBackplaneBuilder {
            url: url.to_owned(),
            channel: channel.to_owned(),
            ping_interval: Duration::from_secs(1),
            response_timeout: Duration::from_secs(2),
            connection_timeout: Duration::from_secs(2),
            tcp_keepalive: Some(Duration::from_secs(15)),
            retry_at_start: false,
        }
    }

    /// Whether both connections to Redis are up: the subscription answered
    /// its last PING in time and the publishing connection is open. False
    /// from the moment either is found dead or stalled until it is back.
    /// The subscription is only watched once the backplane has its hub.
    pub fn is_connected(&self) -> bool {
        self.link.health.is_connected()
    }

    /// How many times Redis stopped answering a live connection of this
    /// backplane in time (a PING on the subscription or a burst of PUBLISH);
    /// also counted, per connection, in `duplex_redis_stalls_total`.
    pub fn stalls(&self) -> u64 {
        self.link.health.stalls.load(Ordering::Relaxed)
    }
}

/// Settings for a [`RedisBackplane`], from [`RedisBackplane::builder`]. The
/// [crate] docs say what each bounds and what happens when it is hit.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `connect`"]
pub struct RedisBackplaneBuilder {
    url: String,
    channel: String,
    ping_interval: Duration,
    response_timeout: Duration,
    connection_timeout: Duration,
    tcp_keepalive: Option<Duration>,
    retry_at_start: bool,
}

impl RedisBackplaneBuilder {
    /// The pause between a PONG on the subscription and the next PING
    /// (default 1 s). Not zero.
    pub fn ping_interval(mut self, interval: Duration) -> Self {
        self.ping_interval = interval;
        self
    }

    /// The longest wait for Redis to answer a PING, a burst of PUBLISH or a
    /// SUBSCRIBE (default 2 s). Not zero.
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// The longest wait for a new connection, TCP and handshake (default
    /// 2 s). Not zero.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// TCP keepalive on the publishing connection: the idle time before the
    /// first probe and between probes (on Linux, after 3 unanswered probes
    /// the kernel closes the connection); `None` leaves it off (default
    /// 15 s).
    pub fn tcp_keepalive(mut self, idle: Option<Duration>) -> Self {
        self.tcp_keepalive = idle;
        self
    }

    /// When Redis cannot be reached at start: `false` (the default), `connect`
    /// returns the error; `true`, it keeps trying with backoff (100 ms,
    /// doubling, at most 10 s), logging each failure at warn, until Redis
    /// answers.
    pub fn retry_at_start(mut self, retry: bool) -> Self {
        self.retry_at_start = retry;
        self
    }

    /// Connects to Redis, subscribes to the channel and starts the
    /// publishing task on the current runtime.
    ///
    /// # Errors
    /// When the URL or a setting is invalid; and, unless retrying at start,
    /// when Redis cannot be reached, does not answer in time or refuses the
    /// subscription.
    pub async fn connect(self) -> Result<Arc<RedisBackplane>, RedisError> {
        for (name, value) in [
            ("ping_interval", self.ping_interval),
            ("response_timeout", self.response_timeout),
            ("connection_timeout", self.connection_timeout),
        ] {
            if value.is_zero() {
                return Err(RedisError::from((
                    ErrorKind::InvalidClientConfig,
                    "a RedisBackplane timing is zero",
                    name.to_owned(),
                )));
            }
        }
        let client = Client::open(self.url.as_str())?;
        let mut tcp = TcpSettings::default();
        if let Some(idle) = self.tcp_keepalive {
            let keepalive = TcpKeepalive::new().with_time(idle);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            let keepalive = keepalive.with_interval(idle).with_retries(KEEPALIVE_PROBES);
            tcp = tcp.set_keepalive(keepalive);
        }
        let link = Arc::new(Link {
            health: Health::new(&self.channel),
            client,
            channel: self.channel,
            publisher: AsyncConnectionConfig::new()
                .set_connection_timeout(self.connection_timeout)
                .set_response_timeout(self.response_timeout)
                .set_tcp_settings(tcp),
            ping_interval: self.ping_interval,
            response_timeout: self.response_timeout,
            connection_timeout: self.connection_timeout,
        });
        let mut wait = FIRST_RETRY;
        let (publisher, subscription) = loop {
            match link.open().await {
                Ok(both) => break both,
                Err(err) if self.retry_at_start => {
                    tracing::warn!(channel = %link.channel, "Redis unreachable at start, next attempt in {wait:?}: {err}");
                    tokio::time::sleep(wait).await;
                    wait = backoff(wait);
                }
                Err(err) => return Err(err),
            }
        };
        link.health.set(Connection::Publishing, true);
        link.health.set(Connection::Subscription, true);
        let (outbox, queued) = mpsc::channel(OUTBOX);
        let runtime = Handle::current();
        runtime.spawn(publish_loop(link.clone(), publisher, queued));
        Ok(Arc::new(RedisBackplane {
            link,
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
            tracing::error!(channel = %self.link.channel, "a RedisBackplane serves one hub; this one already has its hub");
            return;
        };
        self.runtime
            .spawn(deliver_loop(self.link.clone(), subscription, sink));
    }

    fn publish(&self, envelope: Envelope) {
        let Some(encoded) = encode(&envelope) else {
            tracing::warn!("topic name over 65,535 bytes: message not published");
            return;
        };
        if !self.link.health.is_up(Connection::Publishing) {
            // The publishing task logs the outage itself, once per attempt.
            metrics::counter!("duplex_redis_dropped_total").increment(1);
            return;
        }
        match self.outbox.try_send(encoded) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                metrics::counter!("duplex_redis_dropped_total").increment(1);
                tracing::warn!(channel = %self.link.channel, "Redis is behind: message dropped");
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::warn!(channel = %self.link.channel, "the publishing task is gone: message dropped");
            }
        }
    }
}

/// What both tasks need to reach Redis.
struct Link {
    client: Client,
    channel: String,
    /// The publishing connection's timeouts and socket settings.
    publisher: AsyncConnectionConfig,
    ping_interval: Duration,
    response_timeout: Duration,
    connection_timeout: Duration,
    health: Health,
}

impl Link {
    async fn open(&self) -> RedisResult<(MultiplexedConnection, Subscription)> {
        let publisher = self.open_publisher().await?;
        let subscription = self.subscribe().await?;
        Ok((publisher, subscription))
    }

    async fn open_publisher(&self) -> RedisResult<MultiplexedConnection> {
        self.client
            .get_multiplexed_async_connection_with_config(&self.publisher)
            .await
    }

    /// A new subscription to the channel. The redis crate's pub/sub
    /// connection takes no timeouts of its own, hence the ones here.
    async fn subscribe(&self) -> RedisResult<Subscription> {
        let pubsub = within(
            self.connection_timeout,
            "connecting",
            self.client.get_async_pubsub(),
        )
        .await?;
        let (mut commands, messages) = pubsub.split();
        within(
            self.response_timeout,
            "SUBSCRIBE",
            commands.subscribe(&self.channel),
        )
        .await?;
        Ok(Subscription { commands, messages })
    }

    /// Counts a live connection that stopped answering.
    fn stalled(&self, connection: Connection) {
        self.health.stalls.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("duplex_redis_stalls_total", "connection" => connection.name())
            .increment(1);
    }
}

/// The two halves of a subscribed connection: PINGs go out on `commands`,
/// the channel's messages come in on `messages`.
struct Subscription {
    commands: PubSubSink,
    messages: PubSubStream,
}

#[derive(Debug, Clone, Copy)]
enum Connection {
    Publishing,
    Subscription,
}

impl Connection {
    fn name(self) -> &'static str {
        match self {
            Connection::Publishing => "publishing",
            Connection::Subscription => "subscription",
        }
    }
}

/// Whether each connection is up, for `is_connected`, the gauge and
/// `publish`.
struct Health {
    channel: String,
    publishing: AtomicBool,
    subscription: AtomicBool,
    stalls: AtomicU64,
}

impl Health {
    fn new(channel: &str) -> Health {
        Health {
            channel: channel.to_owned(),
            publishing: AtomicBool::new(false),
            subscription: AtomicBool::new(false),
            stalls: AtomicU64::new(0),
        }
    }

    fn flag(&self, connection: Connection) -> &AtomicBool {
        match connection {
            Connection::Publishing => &self.publishing,
            Connection::Subscription => &self.subscription,
        }
    }

    fn is_up(&self, connection: Connection) -> bool {
        self.flag(connection).load(Ordering::Relaxed)
    }

    fn is_connected(&self) -> bool {
        self.is_up(Connection::Publishing) && self.is_up(Connection::Subscription)
    }

    fn set(&self, connection: Connection, up: bool) {
        self.flag(connection).store(up, Ordering::Relaxed);
        let connected = if self.is_connected() { 1.0 } else { 0.0 };
        metrics::gauge!("duplex_redis_connected", "channel" => self.channel.clone()).set(connected);
    }
}

/// `future`, or a timeout error after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    future: impl Future<Output = RedisResult<T>>,
) -> RedisResult<T> {
    tokio::time::timeout(limit, future)
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("Redis did not answer within {limit:?} ({what})"),
            )
            .into())
        })
}

fn backoff(wait: Duration) -> Duration {
    (wait * 2).min(LAST_RETRY)
}

/// Why a subscription stopped serving.
enum Ended {
    HubGone,
    Closed,
    Unanswered,
    PingFailed(RedisError),
}

/// Hands every message of the channel to the hub, until the hub is gone,
/// subscribing again whenever the subscription dies.
async fn deliver_loop(link: Arc<Link>, mut subscription: Subscription, sink: BackplaneSink) {
    let channel = &link.channel;
    loop {
        match serve(&link, &mut subscription, &sink).await {
            // The hub is gone: the subscription goes with this task.
            Ended::HubGone => return,
            Ended::Closed => {
                tracing::warn!(%channel, "Redis subscription lost; messages published until it is back are missed here");
            }
            Ended::Unanswered => {
                link.stalled(Connection::Subscription);
                tracing::warn!(%channel, "Redis subscription unresponsive: no PONG within {:?}; reconnecting, messages published until it is back are missed here", link.response_timeout);
            }
            Ended::PingFailed(err) => {
                tracing::warn!(%channel, "Redis subscription lost ({err}); messages published until it is back are missed here");
            }
        }
        link.health.set(Connection::Subscription, false);
        let mut wait = FIRST_RETRY;
        subscription = loop {
            tokio::time::sleep(wait).await;
            if sink.is_closed() {
                return;
            }
            match link.subscribe().await {
                Ok(subscription) => break subscription,
                Err(err) => {
                    tracing::warn!(%channel, "cannot subscribe again: {err}");
                    wait = backoff(wait);
                }
            }
        };
        link.health.set(Connection::Subscription, true);
        tracing::info!(%channel, "Redis subscription back");
    }
}

type Pong =
    Pin<Box<dyn Future<Output = Result<RedisResult<Value>, tokio::time::error::Elapsed>> + Send>>;

/// Delivers the messages of one subscription and PINGs it, until it or the
/// hub is gone.
async fn serve(link: &Link, subscription: &mut Subscription, sink: &BackplaneSink) -> Ended {
    let mut hub_check = tokio::time::interval(HUB_CHECK);
    hub_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let next_ping = tokio::time::sleep(link.ping_interval);
    tokio::pin!(next_ping);
    // At most one PING in flight: its PONG, or its deadline.
    let mut pong: Option<Pong> = None;
    loop {
        tokio::select! {
            message = subscription.messages.next() => {
                let Some(message) = message else { return Ended::Closed };
                match decode(message.get_payload_bytes()) {
                    Ok(envelope) => sink.deliver(envelope),
                    Err(err) => tracing::warn!(channel = %link.channel, "undecodable message on the channel: {err}"),
                }
            }
            () = &mut next_ping, if pong.is_none() => {
                let mut commands = subscription.commands.clone();
                let limit = link.response_timeout;
                pong = Some(Box::pin(async move {
                    tokio::time::timeout(limit, commands.ping::<Value>()).await
                }));
            }
            answer = async { pong.as_mut().expect("the branch runs with a PING in flight").await }, if pong.is_some() => {
                pong = None;
                match answer {
                    Ok(Ok(_)) => next_ping.as_mut().reset(Instant::now() + link.ping_interval),
                    Ok(Err(err)) => return Ended::PingFailed(err),
                    Err(_) => return Ended::Unanswered,
                }
            }
            _ = hub_check.tick() => {}
        }
        if sink.is_closed() {
            return Ended::HubGone;
        }
    }
}

/// Publishes the queued envelopes in order, a burst per round trip, until
/// the backplane is dropped, replacing the connection whenever it fails.
async fn publish_loop(
    link: Arc<Link>,
    connection: MultiplexedConnection,
    mut queued: mpsc::Receiver<Bytes>,
) {
    let channel = &link.channel;
    let mut connection = Some(connection);
    let mut batch = Vec::with_capacity(BATCH);
    let mut wait = FIRST_RETRY;
    loop {
        let conn = match connection.as_mut() {
            Some(conn) => conn,
            None => match link.open_publisher().await {
                Ok(conn) => {
                    tracing::info!(%channel, "Redis publishing connection back");
                    wait = FIRST_RETRY;
                    link.health.set(Connection::Publishing, true);
                    connection.insert(conn)
                }
                Err(err) => {
                    tracing::warn!(%channel, "cannot reach Redis to publish, next attempt in {wait:?}: {err}");
                    // What was queued before the outage was known is stale
                    // by now.
                    let mut stale = 0;
                    while queued.try_recv().is_ok() {
                        stale += 1;
                    }
                    metrics::counter!("duplex_redis_dropped_total").increment(stale);
                    tokio::time::sleep(wait).await;
                    wait = backoff(wait);
                    if queued.is_closed() {
                        return;
                    }
                    continue;
                }
            },
        };
        if queued.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let mut pipe = redis::pipe();
        for payload in &batch {
            pipe.publish(channel, &payload[..]).ignore();
        }
        match pipe.query_async::<()>(conn).await {
            Ok(()) => batch.clear(),
            Err(err) => {
                link.health.set(Connection::Publishing, false);
                if err.is_timeout() {
                    link.stalled(Connection::Publishing);
                    tracing::warn!(%channel, dropped = batch.len(), "Redis did not answer a publish within {:?}; reconnecting", link.response_timeout);
                    metrics::counter!("duplex_redis_dropped_total").increment(batch.len() as u64);
                    batch.clear();
                } else {
                    drop_batch(channel, &mut batch, &err);
                }
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
