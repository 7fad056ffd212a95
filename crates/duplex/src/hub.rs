//! Many sessions: a registry with ids, topics (rooms) that sessions join
//! and leave, and publishing to a topic, to one session or to all.
//!
//! A published message is framed once per distinct encoding (plain, or a
//! stateless permessage-deflate configuration) and the same bytes go to
//! every subscriber's write queue. Publishing never waits: a subscriber whose
//! outgoing buffer is full is handled by the [`SlowConsumer`] policy, so one
//! slow peer neither slows the publisher nor the others.
//!
//! A publisher subscribed to the topic it publishes to receives its own
//! message, as every other member does; [`Hub::publish_except`] leaves one
//! session out ("everyone but me"). Typed values go through the hub's
//! [`ContentConverter`] (JSON unless the builder says otherwise), encoded
//! once for all subscribers: [`Hub::publish_json`], [`Hub::broadcast_json`].
//!
//! ```no_run
//! use duplex::{App, Hub, Message, Session};
//!
//! # async fn run() -> std::io::Result<()> {
//! let hub = Hub::new();
//! App::new()
//!     .web_socket("/room", move |mut session: Session| {
//!         let hub = hub.clone();
//!         async move {
//!             let me = hub.register(&session.sender());
//!             me.join("lobby");
//!             while let Ok(Some(message)) = session.recv().await {
//!                 hub.publish("lobby", message);
//!             }
//!             // Dropping `me` leaves every topic.
//!         }
//!     })
//!     .serve(tokio::net::TcpListener::bind("127.0.0.1:8080").await?)
//!     .await
//! # }
//! ```

use std::{
    collections::{HashMap, HashSet},
    fmt,
    sync::{
        Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use duplex_proto::{CloseCode, CloseReason, Encoding, Message, OpCode, Rsv, encode_frame};

use crate::{
    config::WebSockets,
    convert::{ContentConverter, ConvertError, default_converter},
    session::{Sender, TrySendError},
};

/// A session's id in a [`Hub`], unique for the hub's life (not across the
/// nodes of a backplane: each hub counts from 1).
///
/// It serializes as its number, and displays as it: `{"from":7}`, `"7"`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What happens to a subscriber whose outgoing buffer is full when a
/// message is published to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowConsumer {
    /// Skip the message for that subscriber and count it
    /// (`duplex_hub_dropped_total`).
    Drop,
    /// Close the subscriber with this code: 1008 (policy violation) or
    /// 1013 (try again later) are the usual choices.
    Close(CloseCode),
}

/// Where a published message goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every member of a topic.
    Topic(String),
    /// Every registered session.
    All,
}

/// A message on its way through a [`Backplane`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Where it goes.
    pub target: Target,
    /// What it is.
    pub message: Message,
}

/// The link between the hubs of several processes: whatever is published on
/// any of them reaches the subscribers of all of them.
///
/// A backplane must hand every envelope published on any node, this one
/// included, to each node's [`BackplaneSink`] exactly once, in publish
/// order for each publisher. `publish` must not block: queue and return.
pub trait Backplane: Send + Sync + 'static {
    /// Starts delivering to `sink`; called once, when the hub is built.
    fn start(&self, sink: BackplaneSink);
    /// Sends an envelope to every node.
    fn publish(&self, envelope: Envelope);
}

/// The local end of a backplane: it fans an envelope out to this node's
/// sessions.
#[derive(Clone)]
pub struct BackplaneSink {
    hub: Weak<HubInner>,
}

impl BackplaneSink {
    /// Delivers an envelope to this node's subscribers. Does nothing once
    /// the hub is gone.
    pub fn deliver(&self, envelope: Envelope) {
        if let Some(hub) = self.hub.upgrade() {
            hub.deliver(&envelope);
        }
    }

    /// Whether the hub is gone: a backplane can stop its work for it.
    pub fn is_closed(&self) -> bool {
        self.hub.strong_count() == 0
    }
}

impl fmt::Debug for BackplaneSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackplaneSink").finish_non_exhaustive()
    }
}

/// One process: delivery is a direct call. The default backplane.
#[derive(Debug, Default)]
pub struct InMemoryBackplane {
    sink: OnceLock<BackplaneSink>,
}

impl Backplane for InMemoryBackplane {
    fn start(&self, sink: BackplaneSink) {
        let _ = self.sink.set(sink);
    }

    fn publish(&self, envelope: Envelope) {
        if let Some(sink) = self.sink.get() {
            sink.deliver(envelope);
        }
    }
}

/// Builds a [`Hub`].
pub struct HubBuilder {
    slow_consumer: SlowConsumer,
    backplane: Option<Arc<dyn Backplane>>,
    converter: Arc<dyn ContentConverter>,
}

impl HubBuilder {
    /// The policy for subscribers whose buffer is full. Default
    /// [`SlowConsumer::Drop`].
    #[must_use]
    pub fn slow_consumer(mut self, policy: SlowConsumer) -> Self {
        self.slow_consumer = policy;
        self
    }

    /// The backplane that joins several processes. Default: in memory.
    #[must_use]
    pub fn backplane(mut self, backplane: Arc<dyn Backplane>) -> Self {
        self.backplane = Some(backplane);
        self
    }

    /// The converter of [`Hub::publish_json`], [`Hub::broadcast_json`] and
    /// [`Hub::send_json_to`]. Default: JSON (`JsonConverter`, feature `json`;
    /// without it none, and those calls return [`ConvertError::NoConverter`]).
    ///
    /// Give it the converter the sessions use, so that what the hub
    /// publishes reads as what [`Sender::send_json`] sends:
    /// [`content_converter_of`](Self::content_converter_of) takes a
    /// configuration's.
    #[must_use]
    pub fn content_converter(mut self, converter: impl ContentConverter) -> Self {
        self.converter = Arc::new(converter);
        self
    }

    /// The content converter installed on `websockets` (its
    /// [`WebSockets::content_converter`]), shared rather than copied.
    #[must_use]
    pub fn content_converter_of(mut self, websockets: &WebSockets) -> Self {
        self.converter = Arc::clone(&websockets.converter);
        self
    }

    /// The hub.
    pub fn build(self) -> Hub {
        let local = self.backplane.is_none();
        let backplane = self
            .backplane
            .unwrap_or_else(|| Arc::new(InMemoryBackplane::default()));
        let inner = Arc::new(HubInner {
            registry: RwLock::new(Registry::default()),
            next_id: AtomicU64::new(1),
            slow_consumer: self.slow_consumer,
            backplane: Arc::clone(&backplane),
            local,
            converter: self.converter,
            skips: Skips::default(),
        });
        backplane.start(BackplaneSink {
            hub: Arc::downgrade(&inner),
        });
        Hub { inner }
    }
}

/// A registry of live sessions and their topics; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

impl fmt::Debug for Hub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hub")
            .field("sessions", &self.session_count())
            .finish_non_exhaustive()
    }
}

struct HubInner {
    registry: RwLock<Registry>,
    next_id: AtomicU64,
    slow_consumer: SlowConsumer,
    backplane: Arc<dyn Backplane>,
    /// The backplane is the default in-memory one: a publish is delivered
    /// here and nowhere else.
    local: bool,
    converter: Arc<dyn ContentConverter>,
    skips: Skips,
}

/// Sessions to leave out of publishes of their own that went out through a
/// backplane and have not come back to this node yet
/// ([`Hub::publish_except`]).
///
/// The envelope carries no exclusion (its wire format is the backplane's),
/// so it is recognised when it comes back by its target and message. An
/// equal envelope from another node may arrive first and be the one left
/// out: the session then gets the other copy, the same bytes.
#[derive(Default)]
struct Skips {
    /// How many entries `list` holds: checked without the lock, so that a
    /// hub that never excludes pays one atomic load per delivery.
    pending: AtomicUsize,
    list: Mutex<std::collections::VecDeque<(SessionId, Envelope)>>,
}

/// Exclusions waiting for their envelope; past this the oldest is dropped
/// (a backplane that loses messages never brings some of them back).
const MAX_PENDING_SKIPS: usize = 1024;

impl Skips {
    fn push(&self, id: SessionId, envelope: Envelope) {
        let mut list = self.lock();
        if list.len() == MAX_PENDING_SKIPS {
            list.pop_front();
        }
        list.push_back((id, envelope));
        self.pending.store(list.len(), Ordering::Release);
    }

    /// The session to leave out of `envelope`, if one waits for it.
    fn take(&self, envelope: &Envelope) -> Option<SessionId> {
        if self.pending.load(Ordering::Acquire) == 0 {
            return None;
        }
        let mut list = self.lock();
        let index = list.iter().position(|(_, e)| e == envelope)?;
        let (id, _) = list.remove(index)?;
        self.pending.store(list.len(), Ordering::Release);
        Some(id)
    }

    /// Forgets a session's exclusions: it is gone.
    fn forget(&self, id: SessionId) {
        if self.pending.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut list = self.lock();
        list.retain(|(skip, _)| *skip != id);
        self.pending.store(list.len(), Ordering::Release);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<(SessionId, Envelope)>> {
        self.list
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<SessionId, Member>,
    topics: HashMap<Arc<str>, HashSet<SessionId>>,
}

struct Member {
    sender: Sender,
    encoding: Encoding,
    topics: HashSet<Arc<str>>,
}

impl Hub {
    /// A hub with the in-memory backplane and [`SlowConsumer::Drop`].
    pub fn new() -> Hub {
        Hub::builder().build()
    }

    /// A builder to choose the policy, the backplane and the content
    /// converter.
    pub fn builder() -> HubBuilder {
        HubBuilder {
            slow_consumer: SlowConsumer::Drop,
            backplane: None,
            converter: default_converter(),
        }
    }

    /// Registers a session. It stays registered, and in the topics it
    /// joins, until the returned [`Membership`] is dropped.
    pub fn register(&self, sender: &Sender) -> Membership {
        let id = SessionId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let member = Member {
            sender: sender.clone(),
            encoding: sender.encoding(),
            topics: HashSet::new(),
        };
        let mut registry = self.inner.write();
        registry.sessions.insert(id, member);
        gauge!("duplex_hub_sessions").set(registry.sessions.len() as f64);
        drop(registry);
        Membership {
            hub: self.clone(),
            id,
        }
    }

    /// Publishes to every member of `topic`, on every node. Never waits.
    ///
    /// The publisher, if it is a member of `topic`, receives the message
    /// too; [`publish_except`](Self::publish_except) leaves it out.
    pub fn publish(&self, topic: &str, message: impl Into<Message>) {
        self.inner.backplane.publish(Envelope {
            target: Target::Topic(topic.to_owned()),
            message: message.into(),
        });
    }

    /// Publishes to every member of `topic`, on every node, except the
    /// session `except` of this node ("everyone but me": pass the
    /// publisher's [`Membership::id`]). Never waits.
    ///
    /// With a backplane, the other nodes get the message as from
    /// [`publish`](Self::publish); this node leaves `except` out when the
    /// message comes back to it.
    pub fn publish_except(&self, topic: &str, message: impl Into<Message>, except: SessionId) {
        self.inner.publish_except(
            Envelope {
                target: Target::Topic(topic.to_owned()),
                message: message.into(),
            },
            except,
        );
    }

    /// Publishes to every registered session, on every node. Never waits.
    pub fn broadcast(&self, message: impl Into<Message>) {
        self.inner.backplane.publish(Envelope {
            target: Target::All,
            message: message.into(),
        });
    }

    /// Publishes to every registered session, on every node, except the
    /// session `except` of this node, as [`publish_except`](Self::publish_except).
    pub fn broadcast_except(&self, message: impl Into<Message>, except: SessionId) {
        self.inner.publish_except(
            Envelope {
                target: Target::All,
                message: message.into(),
            },
            except,
        );
    }

    /// Encodes `value` once with the hub's content converter and publishes
    /// it to every member of `topic`, as [`publish`](Self::publish).
    ///
    /// # Errors
    /// [`ConvertError::Encode`] if the value does not encode; nothing is
    /// published then.
    pub fn publish_json<T: serde::Serialize>(
        &self,
        topic: &str,
        value: &T,
    ) -> Result<(), ConvertError> {
        let message = self.encode(value)?;
        self.publish(topic, message);
        Ok(())
    }

    /// [`publish_json`](Self::publish_json) without the session `except`,
    /// as [`publish_except`](Self::publish_except).
    ///
    /// # Errors
    /// [`ConvertError::Encode`] if the value does not encode.
    pub fn publish_json_except<T: serde::Serialize>(
        &self,
        topic: &str,
        value: &T,
        except: SessionId,
    ) -> Result<(), ConvertError> {
        let message = self.encode(value)?;
        self.publish_except(topic, message, except);
        Ok(())
    }

    /// Encodes `value` once with the hub's content converter and publishes
    /// it to every registered session, as [`broadcast`](Self::broadcast).
    ///
    /// # Errors
    /// [`ConvertError::Encode`] if the value does not encode.
    pub fn broadcast_json<T: serde::Serialize>(&self, value: &T) -> Result<(), ConvertError> {
        let message = self.encode(value)?;
        self.broadcast(message);
        Ok(())
    }

    /// Encodes `value` with the hub's content converter and sends it to one
    /// session of this node, as [`send_to`](Self::send_to).
    ///
    /// # Errors
    /// [`ConvertError::Encode`] if the value does not encode.
    pub fn send_json_to<T: serde::Serialize>(
        &self,
        id: SessionId,
        value: &T,
    ) -> Result<bool, ConvertError> {
        let message = self.encode(value)?;
        Ok(self.send_to(id, message))
    }

    /// `value` as a message, through the hub's content converter.
    ///
    /// # Errors
    /// [`ConvertError::Encode`] if the value does not encode.
    pub fn encode<T: serde::Serialize>(&self, value: &T) -> Result<Message, ConvertError> {
        self.inner.converter.encode(value)
    }

    /// Sends to one session of this node. Returns false if it is not
    /// registered (any more), or could not take the message.
    pub fn send_to(&self, id: SessionId, message: impl Into<Message>) -> bool {
        let message = message.into();
        let registry = self.inner.read();
        let Some(member) = registry.sessions.get(&id) else {
            return false;
        };
        let mut frames = EncodedOnce::new(&message);
        let queued = self.inner.offer(member, &message, &mut frames);
        if let Some(bytes) = queued {
            count_deliveries(1, bytes);
        }
        queued.is_some()
    }

    /// The sessions of this node in `topic`, in id order.
    pub fn members(&self, topic: &str) -> Vec<SessionId> {
        let registry = self.inner.read();
        let mut members: Vec<SessionId> = registry
            .topics
            .get(topic)
            .map(|m| m.iter().copied().collect())
            .unwrap_or_default();
        members.sort();
        members
    }

    /// The topics with at least one member on this node.
    pub fn topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = self
            .inner
            .read()
            .topics
            .keys()
            .map(|t| t.to_string())
            .collect();
        topics.sort();
        topics
    }

    /// How many sessions are registered on this node.
    pub fn session_count(&self) -> usize {
        self.inner.read().sessions.len()
    }
}

impl HubInner {
    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish_except(&self, envelope: Envelope, except: SessionId) {
        if self.local {
            self.deliver_except(&envelope, Some(except));
        } else {
            self.skips.push(except, envelope.clone());
            self.backplane.publish(envelope);
        }
    }

    /// Fans an envelope out to this node's sessions.
    fn deliver(&self, envelope: &Envelope) {
        let except = self.skips.take(envelope);
        self.deliver_except(envelope, except);
    }

    /// Fans an envelope out to this node's sessions but `except`.
    fn deliver_except(&self, envelope: &Envelope, except: Option<SessionId>) {
        let message = &envelope.message;
        let mut frames = EncodedOnce::new(message);
        let registry = self.read();
        let mut delivered = 0u64;
        let mut bytes = 0u64;
        let mut offer = |(id, member): (&SessionId, &Member)| {
            if Some(*id) == except {
                return;
            }
            if let Some(queued) = self.offer(member, message, &mut frames) {
                delivered += 1;
                bytes += queued;
            }
        };
        match &envelope.target {
            Target::Topic(topic) => {
                if let Some(ids) = registry.topics.get(topic.as_str()) {
                    ids.iter()
                        .filter_map(|id| registry.sessions.get_key_value(id))
                        .for_each(&mut offer);
                }
            }
            Target::All => registry.sessions.iter().for_each(&mut offer),
        }
        counter!("duplex_hub_published_total").increment(1);
        count_deliveries(delivered, bytes);
    }

    /// Hands a message to one member without waiting; applies the
    /// slow-consumer policy when its buffer is full.
    /// Returns the bytes queued (the frame, or the payload where the session
    /// encodes for itself), or `None` when it did not take the message.
    fn offer(&self, member: &Member, message: &Message, frames: &mut EncodedOnce) -> Option<u64> {
        let result = match &member.encoding {
            Encoding::Unique => member
                .sender
                .try_send(message.clone())
                .map(|()| message.len()),
            encoding => match frames.get(encoding) {
                Some(bytes) => {
                    #[cfg(test)]
                    tests::note_queued_frame(bytes);
                    member.sender.try_send_encoded(bytes).map(|()| bytes.len())
                }
                None => member
                    .sender
                    .try_send(message.clone())
                    .map(|()| message.len()),
            },
        };
        match result {
            Ok(bytes) => Some(bytes as u64),
            Err(TrySendError::Closed) => None,
            Err(TrySendError::Busy) => {
                counter!("duplex_hub_dropped_total").increment(1);
                None
            }
            Err(TrySendError::Full) => {
                match self.slow_consumer {
                    SlowConsumer::Drop => {
                        counter!("duplex_hub_dropped_total").increment(1);
                    }
                    SlowConsumer::Close(code) => {
                        counter!("duplex_hub_slow_consumer_closes_total").increment(1);
                        member
                            .sender
                            .close_now(CloseReason::new(code, "Too slow to keep up"));
                    }
                }
                None
            }
        }
    }
}

/// Deliveries and the bytes they queued (frames as written, compressed
/// where the session compresses).
fn count_deliveries(deliveries: u64, bytes: u64) {
    counter!("duplex_hub_deliveries_total").increment(deliveries);
    counter!("duplex_hub_bytes_out_total").increment(bytes);
}

/// One message framed at most once per encoding.
struct EncodedOnce {
    opcode: OpCode,
    payload: Bytes,
    plain: Option<Bytes>,
    shared: Vec<(Arc<str>, Option<Bytes>)>,
}

impl EncodedOnce {
    fn new(message: &Message) -> Self {
        let opcode = match message {
            Message::Text(_) => OpCode::Text,
            Message::Binary(_) => OpCode::Binary,
        };
        EncodedOnce {
            opcode,
            payload: message.payload().clone(),
            plain: None,
            shared: Vec::new(),
        }
    }

    /// The wire bytes for `encoding`; `None` if the encoding failed (the
    /// caller then lets the session encode for itself).
    fn get(&mut self, encoding: &Encoding) -> Option<&Bytes> {
        match encoding {
            Encoding::Plain => {
                let (opcode, payload) = (self.opcode, &self.payload);
                Some(
                    self.plain
                        .get_or_insert_with(|| encode_frame(opcode, Rsv::NONE, payload)),
                )
            }
            Encoding::Shared(shared) => {
                let index = match self
                    .shared
                    .iter()
                    .position(|(key, _)| &**key == shared.key())
                {
                    Some(index) => index,
                    None => {
                        let frame = shared
                            .encode(self.opcode, &self.payload)
                            .ok()
                            .map(|(rsv, payload)| encode_frame(self.opcode, rsv, &payload));
                        self.shared.push((shared.key().into(), frame));
                        self.shared.len() - 1
                    }
                };
                self.shared[index].1.as_ref()
            }
            Encoding::Unique => None,
        }
    }
}

/// A session's place in a [`Hub`]: join and leave topics through it.
/// Dropping it leaves every topic and unregisters the session.
pub struct Membership {
    hub: Hub,
    id: SessionId,
}

impl Membership {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The hub.
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// Joins a topic (again: nothing happens).
    pub fn join(&self, topic: &str) {
        let mut registry = self.hub.inner.write();
        let registry = &mut *registry;
        let Some(member) = registry.sessions.get_mut(&self.id) else {
            return;
        };
        let topic: Arc<str> = registry
            .topics
            .get_key_value(topic)
            .map_or_else(|| Arc::from(topic), |(key, _)| Arc::clone(key));
        member.topics.insert(Arc::clone(&topic));
        registry.topics.entry(topic).or_default().insert(self.id);
        gauge!("duplex_hub_topics").set(registry.topics.len() as f64);
    }

    /// Leaves a topic; a topic with no members left is removed.
    pub fn leave(&self, topic: &str) {
        let mut registry = self.hub.inner.write();
        if let Some(member) = registry.sessions.get_mut(&self.id) {
            member.topics.remove(topic);
        }
        remove_from_topic(&mut registry, topic, self.id);
        gauge!("duplex_hub_topics").set(registry.topics.len() as f64);
    }

    /// The topics this session is in.
    pub fn topics(&self) -> Vec<String> {
        let registry = self.hub.inner.read();
        let mut topics: Vec<String> = registry
            .sessions
            .get(&self.id)
            .map(|m| m.topics.iter().map(|t| t.to_string()).collect())
            .unwrap_or_default();
        topics.sort();
        topics
    }
}

fn remove_from_topic(registry: &mut Registry, topic: &str, id: SessionId) {
    if let Some(members) = registry.topics.get_mut(topic) {
        members.remove(&id);
        if members.is_empty() {
            registry.topics.remove(topic);
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        let mut registry = self.hub.inner.write();
        if let Some(member) = registry.sessions.remove(&self.id) {
            for topic in &member.topics {
                remove_from_topic(&mut registry, topic, self.id);
            }
        }
        gauge!("duplex_hub_sessions").set(registry.sessions.len() as f64);
        gauge!("duplex_hub_topics").set(registry.topics.len() as f64);
        drop(registry);
        self.hub.inner.skips.forget(self.id);
    }
}

impl fmt::Debug for Membership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Membership").field("id", &self.id).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::Sender;
    use std::cell::RefCell;

    thread_local! {
        /// (address, length) of every pre-encoded frame `offer` handed to a
        /// subscriber on this thread; the in-memory backplane delivers on
        /// the publishing thread, so a test sees its own publishes only.
        static QUEUED_FRAMES: RefCell<Vec<(usize, usize)>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn note_queued_frame(frame: &Bytes) {
        QUEUED_FRAMES.with(|q| q.borrow_mut().push((frame.as_ptr() as usize, frame.len())));
    }

    fn take_queued_frames() -> Vec<(usize, usize)> {
        QUEUED_FRAMES.with(|q| std::mem::take(&mut *q.borrow_mut()))
    }

    fn texts(sender: &Sender) -> Vec<String> {
        sender
            .take_written()
            .into_iter()
            .filter(|f| f.opcode == OpCode::Text)
            .map(|f| String::from_utf8(f.payload.to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn fan_out_to_1000_sessions_delivers_every_message_in_order_per_publisher() {
        let hub = Hub::new();
        let senders: Vec<Sender> = (0..1000).map(|_| Sender::detached(1 << 20)).collect();
        let memberships: Vec<Membership> = senders.iter().map(|s| hub.register(s)).collect();
        for m in &memberships {
            m.join("room");
        }
        let publishers = 4;
        let per_publisher = 50;
        std::thread::scope(|scope| {
            for p in 0..publishers {
                let hub = hub.clone();
                scope.spawn(move || {
                    for i in 0..per_publisher {
                        hub.publish("room", format!("{p}:{i}"));
                    }
                });
            }
        });
        for sender in &senders {
            let got = texts(sender);
            assert_eq!(got.len(), publishers * per_publisher);
            for p in 0..publishers {
                let mine: Vec<usize> = got
                    .iter()
                    .filter_map(|t| t.strip_prefix(&format!("{p}:")))
                    .map(|i| i.parse().unwrap())
                    .collect();
                assert_eq!(
                    mine,
                    (0..per_publisher).collect::<Vec<_>>(),
                    "publisher {p}"
                );
            }
        }
    }

    #[test]
    fn topics_are_separate_and_direct_messages_go_to_one() {
        let hub = Hub::new();
        let (a, b, c) = (
            Sender::detached(1 << 20),
            Sender::detached(1 << 20),
            Sender::detached(1 << 20),
        );
        let (ma, mb, mc) = (hub.register(&a), hub.register(&b), hub.register(&c));
        ma.join("red");
        mb.join("red");
        mc.join("blue");
        hub.publish("red", "to red");
        hub.publish("blue", "to blue");
        assert!(hub.send_to(mb.id(), "just b"));
        hub.broadcast("everyone");
        assert_eq!(texts(&a), ["to red", "everyone"]);
        assert_eq!(texts(&b), ["to red", "just b", "everyone"]);
        assert_eq!(texts(&c), ["to blue", "everyone"]);
        assert_eq!(hub.members("red"), [ma.id(), mb.id()]);
        assert_eq!(hub.topics(), ["blue", "red"]);
    }

    /// Publishes 50 messages to a subscriber whose buffer holds 100 bytes
    /// and to one with room for all; returns (stalled, healthy) and their
    /// memberships, which keep them in topic "t".
    fn publish_to_stalled_and_healthy(hub: &Hub) -> (Sender, Sender, [Membership; 2]) {
        let stalled = Sender::detached(100);
        let healthy = Sender::detached(1 << 20);
        let (ms, mh) = (hub.register(&stalled), hub.register(&healthy));
        ms.join("t");
        mh.join("t");
        for i in 0..50 {
            hub.publish("t", format!("message number {i:03}"));
        }
        (stalled, healthy, [ms, mh])
    }

    #[test]
    fn a_stalled_subscriber_is_dropped_for_while_others_keep_receiving() {
        let hub = Hub::new();
        let (stalled, healthy, _memberships) = publish_to_stalled_and_healthy(&hub);
        let expected: Vec<String> = (0..50).map(|i| format!("message number {i:03}")).collect();
        assert_eq!(texts(&healthy), expected);
        // Each message is a 20-byte frame (2-byte header, 18-byte text): the
        // stalled one took messages while its queue was under 100 bytes, so
        // the first five and nothing after them.
        assert_eq!(texts(&stalled), expected[..5]);
        assert!(!stalled.is_closed());
        // Dropped for, not disconnected: with room again it gets the next.
        hub.publish("t", "after the stall");
        assert_eq!(texts(&stalled), ["after the stall"]);
        assert_eq!(texts(&healthy), ["after the stall"]);
    }

    #[test]
    fn a_stalled_subscriber_is_closed_under_the_close_policy() {
        let hub = Hub::builder()
            .slow_consumer(SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER))
            .build();
        let (stalled, healthy, _memberships) = publish_to_stalled_and_healthy(&hub);
        assert_eq!(texts(&healthy).len(), 50);
        assert!(stalled.is_closed());
        // The five messages that fitted, then the Close and nothing else.
        let frames = stalled.take_written();
        assert_eq!(frames.len(), 6, "{frames:?}");
        assert!(frames[..5].iter().all(|f| f.opcode == OpCode::Text));
        let close = &frames[5];
        assert_eq!(close.opcode, OpCode::Close);
        assert_eq!(
            u16::from_be_bytes([close.payload[0], close.payload[1]]),
            1013
        );
        assert_eq!(&close.payload[2..], b"Too slow to keep up");
    }

    #[test]
    fn dropping_memberships_leaves_no_entries_behind() {
        let hub = Hub::new();
        let senders: Vec<Sender> = (0..100).map(|_| Sender::detached(1 << 20)).collect();
        let memberships: Vec<Membership> = senders.iter().map(|s| hub.register(s)).collect();
        for (i, m) in memberships.iter().enumerate() {
            m.join(&format!("room-{}", i % 7));
            m.join("all");
        }
        assert_eq!(hub.session_count(), 100);
        assert_eq!(hub.topics().len(), 8);
        memberships.into_iter().for_each(drop);
        assert_eq!(hub.session_count(), 0);
        assert!(hub.topics().is_empty());
        let registry = hub.inner.read();
        assert!(registry.sessions.is_empty() && registry.topics.is_empty());
    }

    #[test]
    fn leaving_the_last_member_removes_the_topic() {
        let hub = Hub::new();
        let s = Sender::detached(1 << 20);
        let m = hub.register(&s);
        m.join("x");
        m.join("x");
        assert_eq!(m.topics(), ["x"]);
        m.leave("x");
        assert!(hub.topics().is_empty());
        assert!(m.topics().is_empty());
    }

    #[test]
    fn a_message_is_framed_once_for_every_plain_subscriber() {
        let hub = Hub::new();
        let senders: Vec<Sender> = (0..3).map(|_| Sender::detached(1 << 20)).collect();
        let memberships: Vec<Membership> = senders.iter().map(|s| hub.register(s)).collect();
        memberships.iter().for_each(|m| m.join("t"));
        take_queued_frames();
        for round in 0..2u8 {
            hub.publish("t", Message::binary(vec![round; 10_000]));
            // Through `deliver`: every subscriber was handed one frame, and
            // all of them the same allocation (framed once, shared by
            // reference), header included.
            let queued = take_queued_frames();
            assert_eq!(queued.len(), senders.len(), "round {round}: {queued:?}");
            assert!(
                queued.iter().all(|q| *q == queued[0]),
                "round {round}: one frame for all, got {queued:?}"
            );
            assert_eq!(queued[0].1, 10_000 + 4, "a 16-bit length header");
            for s in &senders {
                let written = s.take_written();
                assert_eq!(written.len(), 1);
                assert_eq!(written[0].opcode, OpCode::Binary);
                assert_eq!(&written[0].payload[..], &[round; 10_000][..]);
            }
        }
    }

    /// A backplane that keeps what is published and delivers nothing, as
    /// one that lost every message would.
    #[derive(Default)]
    struct BlackHole(std::sync::Mutex<Vec<Envelope>>);

    impl Backplane for BlackHole {
        fn start(&self, _: BackplaneSink) {}
        fn publish(&self, envelope: Envelope) {
            self.0.lock().unwrap().push(envelope);
        }
    }

    #[test]
    fn exclusions_waiting_for_a_lost_envelope_are_bounded_and_go_with_the_session() {
        let backplane = Arc::new(BlackHole::default());
        let hub = Hub::builder().backplane(backplane.clone()).build();
        let sender = Sender::detached(1 << 20);
        let me = hub.register(&sender);
        for i in 0..MAX_PENDING_SKIPS + 10 {
            hub.publish_except("t", format!("{i}"), me.id());
        }
        assert_eq!(backplane.0.lock().unwrap().len(), MAX_PENDING_SKIPS + 10);
        assert_eq!(hub.inner.skips.lock().len(), MAX_PENDING_SKIPS);
        // The oldest went first: the newest still wait.
        let newest = Envelope {
            target: Target::Topic("t".into()),
            message: format!("{}", MAX_PENDING_SKIPS + 9).into(),
        };
        assert_eq!(hub.inner.skips.take(&newest), Some(me.id()));
        let oldest = Envelope {
            target: Target::Topic("t".into()),
            message: "0".into(),
        };
        assert_eq!(hub.inner.skips.take(&oldest), None);
        drop(me);
        assert!(hub.inner.skips.lock().is_empty());
        assert_eq!(hub.inner.skips.pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn an_exclusion_applies_to_its_own_envelope_only() {
        let backplane = Arc::new(BlackHole::default());
        let hub = Hub::builder().backplane(backplane.clone()).build();
        let (a, b) = (Sender::detached(1 << 20), Sender::detached(1 << 20));
        let (ma, mb) = (hub.register(&a), hub.register(&b));
        ma.join("t");
        mb.join("t");
        hub.publish_except("t", "psst", ma.id());
        hub.publish("t", "loud");
        let sink = BackplaneSink {
            hub: Arc::downgrade(&hub.inner),
        };
        // The backplane brings both back, the plain one first.
        let published = std::mem::take(&mut *backplane.0.lock().unwrap());
        sink.deliver(published[1].clone());
        sink.deliver(published[0].clone());
        assert_eq!(texts(&a), ["loud"]);
        assert_eq!(texts(&b), ["loud", "psst"]);
    }

    #[cfg(feature = "deflate")]
    #[test]
    fn shared_deflate_encoding_compresses_once_per_key() {
        let negotiated = duplex_proto::ExtensionFactory::negotiate(
            &duplex_proto::Deflate::default().server_no_context_takeover(true),
            &[&duplex_proto::ExtensionOffer::new("permessage-deflate")],
        )
        .unwrap();
        let shared = negotiated
            .extension
            .shared_encoding()
            .expect("stateless deflate is shareable");
        let message = Message::text("compress me once, send me to many ".repeat(20));
        let mut frames = EncodedOnce::new(&message);
        let encoding = Encoding::Shared(shared);
        let a = frames.get(&encoding).unwrap().clone();
        let b = frames.get(&encoding).unwrap().clone();
        assert_eq!(a.as_ptr(), b.as_ptr());
        assert_eq!(a[0], 0x80 | 0x40 | 0x1, "FIN, RSV1, text");
        assert!(a.len() < message.len());
    }
}
