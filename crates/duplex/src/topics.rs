//! Durable topics: a topic keeps a bounded history in which every message
//! has a [`Position`] (an offset and the topic's epoch), and a subscriber
//! that comes back with the position of the last message it saw gets
//! exactly what it missed and then the live stream — no gap, no repeat —
//! or an explicit [`Unrecoverable`] when the history no longer reaches
//! back or the topic is not the one it knew (another epoch).
//!
//! This is the in-memory store: one process. Where the hub's topics are
//! at-most-once fan-out into sessions' queues, these are for what must
//! not be lost: a feed a client follows across reconnects.
//!
//! ```
//! use duplex::topics::{History, Since, Topics};
//!
//! # tokio_test_block_on(async {
//! let topics = Topics::new(History::default());
//! let first = topics.publish("news", "one").unwrap();
//! topics.publish("news", "two").unwrap();
//! // A client that saw "one" comes back with its position:
//! let mut missed = topics.subscribe("news", Since::Position(first)).unwrap();
//! let next = missed.next().await.unwrap();
//! assert_eq!(next.message.as_text(), Some("two"));
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
//! # }
//! ```
//!
//! Publishing appends to the history and hands the message to the live
//! subscribers under one lock per topic, and a subscription takes its
//! catch-up and its place among the live subscribers under the same lock:
//! nothing published in between can be missed or seen twice. Live
//! messages wait in one bounded ring per topic; a subscriber that falls
//! more than [`History::live_capacity`] messages behind catches up from the
//! history, as a reconnecting one does, and only a subscriber behind the
//! history's oldest message gets [`Unrecoverable`].

use std::{
    collections::{HashMap, VecDeque},
    fmt,
    hash::{BuildHasher, Hasher},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use duplex_proto::Message;
use tokio::{sync::broadcast, time::Instant};

/// Where a message stands in its topic.
///
/// Offsets count the topic's messages from 1; the epoch names one life of
/// the topic (a topic evicted and published to again starts a new epoch
/// at offset 1), so that an offset of another life is never taken for one
/// of this one. It serializes as `{"offset":7,"epoch":"…"}` for clients.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The message's place in its topic, from 1.
    pub offset: u64,
    /// The topic's life.
    #[serde(
        serialize_with = "serialize_epoch",
        deserialize_with = "deserialize_epoch"
    )]
    pub epoch: Arc<str>,
}

fn serialize_epoch<S: serde::Serializer>(epoch: &Arc<str>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(epoch)
}

fn deserialize_epoch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Arc<str>, D::Error> {
    <String as serde::Deserialize>::deserialize(d).map(Arc::from)
}

/// A message with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The message's offset in its topic.
    pub offset: u64,
    /// The topic's epoch.
    pub epoch: Arc<str>,
    /// The message as published.
    pub message: Message,
}

impl Publication {
    /// Its position, to give the client for a later [`Since::Position`].
    pub fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: Arc::clone(&self.epoch),
        }
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Since {
    /// With the next message published.
    Now,
    /// With the oldest message the history still holds.
    Oldest,
    /// With the message after this one: what a client that saw it missed.
    Position(Position),
}

/// A subscriber's missed messages cannot be given: a topic says so
/// instead of leaving a silent hole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unrecoverable {
    /// The position is of another life of the topic (it was evicted, or
    /// the process restarted): the client must start again, from
    /// [`current`](Unrecoverable::EpochChanged::current).
    #[error("the topic's epoch changed: {current:?}")]
    EpochChanged {
        /// The topic's position now.
        current: Position,
    },
    /// The history no longer holds the message after the position (or,
    /// for a subscriber that fell behind, after its last message).
    #[error("the history starts at offset {oldest}; offset {wanted} is gone")]
    TooFarBehind {
        /// The first offset that was wanted.
        wanted: u64,
        /// The oldest offset the history holds (the next one to be
        /// published when it is empty).
        oldest: u64,
    },
    /// The position is ahead of the topic: a client's made-up or
    /// corrupted position, never one this topic gave.
    #[error("offset {offset} was never published here")]
    Ahead {
        /// The position's offset.
        offset: u64,
    },
}

/// Why [`Topics::subscribe`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// What the position asked for cannot be given.
    #[error(transparent)]
    Unrecoverable(#[from] Unrecoverable),
    /// The topic is new and cannot be made.
    #[error(transparent)]
    TopicsFull(#[from] TopicsFull),
}

/// Making a topic would pass [`History::max_topics`] while every topic
/// has subscribers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("too many topics with subscribers")]
pub struct TopicsFull;

/// How much each topic keeps, and how many topics there may be.
///
/// Every bound is on by default: a history keeps the last 100 messages, at
/// most 1 MiB of them, none older than 5 minutes; live subscribers that
/// fall 128 messages behind catch up from it; 1,000 topics at most. So
/// the topics hold at most about 1 GiB of messages (topics times bytes),
/// plus about 16 KiB per topic (its ring of live messages).
#[derive(Debug, Clone)]
pub struct History {
    max_messages: usize,
    max_bytes: usize,
    max_age: Option<Duration>,
    live_capacity: usize,
    max_topics: usize,
}

impl Default for History {
    fn default() -> Self {
        History {
            max_messages: 100,
            max_bytes: 1 << 20,
            max_age: Some(Duration::from_secs(300)),
            live_capacity: 128,
            max_topics: 1_000,
        }
    }
}

impl History {
    /// The most messages a topic keeps (at least 1). Default 100.
    #[must_use]
    pub fn max_messages(mut self, messages: usize) -> Self {
        self.max_messages = messages.max(1);
        self
    }

    /// The most payload bytes a topic keeps; the newest message is kept
    /// whatever its size. Default 1 MiB.
    #[must_use]
    pub fn max_bytes(mut self, bytes: usize) -> Self {
        self.max_bytes = bytes;
        self
    }

    /// How long a message stays in the history; `None` keeps messages
    /// until the other bounds push them out. Default 5 minutes.
    #[must_use]
    pub fn max_age(mut self, age: Option<Duration>) -> Self {
        self.max_age = age;
        self
    }

    /// How many live messages a subscriber may fall behind before it
    /// catches up from the history instead (at least 1): the size of each
    /// topic's ring of live messages, allocated with the topic. Default 128.
    #[must_use]
    pub fn live_capacity(mut self, messages: usize) -> Self {
        self.live_capacity = messages.max(1);
        self
    }

    /// The most topics kept. Past it, publishing to a new topic evicts the
    /// topic without subscribers published to least recently (whose
    /// clients then get [`Unrecoverable::EpochChanged`]), or fails with
    /// [`TopicsFull`] when every topic has subscribers. Default 1,000.
    #[must_use]
    pub fn max_topics(mut self, topics: usize) -> Self {
        self.max_topics = topics.max(1);
        self
    }
}

struct Entry {
    offset: u64,
    at: Instant,
    message: Message,
}

struct TopicState {
    epoch: Arc<str>,
    /// The offset of the last message published (0: none yet).
    last: u64,
    history: VecDeque<Entry>,
    bytes: usize,
    live: broadcast::Sender<Publication>,
    /// Who is subscribed, for presence.
    members: HashMap<u64, Arc<str>>,
    /// When the topic was last published to, for eviction.
    touched: Instant,
}

impl TopicState {
    fn new(history: &History, now: Instant) -> TopicState {
        TopicState {
            epoch: new_epoch(),
            last: 0,
            history: VecDeque::new(),
            bytes: 0,
            live: broadcast::channel(history.live_capacity).0,
            members: HashMap::new(),
            touched: now,
        }
    }

    /// Drops what the bounds no longer allow; the newest message stays.
    fn trim(&mut self, history: &History, now: Instant) {
        while self.history.len() > 1
            && (self.history.len() > history.max_messages
                || self.bytes > history.max_bytes
                || history
                    .max_age
                    .is_some_and(|age| now.duration_since(self.history[0].at) > age))
        {
            self.pop_oldest();
        }
        if let (Some(age), Some(only)) = (history.max_age, self.history.front())
            && now.duration_since(only.at) > age
        {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some(entry) = self.history.pop_front() {
            self.bytes -= entry.message.len();
        }
    }

    /// The first offset the history can give.
    fn oldest(&self) -> u64 {
        self.history.front().map_or(self.last + 1, |e| e.offset)
    }

    fn publication(&self, entry: &Entry) -> Publication {
        Publication {
            offset: entry.offset,
            epoch: Arc::clone(&self.epoch),
            message: entry.message.clone(),
        }
    }

    /// The history after `after`, or why it cannot be given.
    fn since(&self, after: u64) -> Result<VecDeque<Publication>, Unrecoverable> {
        if after > self.last {
            return Err(Unrecoverable::Ahead { offset: after });
        }
        let oldest = self.oldest();
        if after + 1 < oldest {
            return Err(Unrecoverable::TooFarBehind {
                wanted: after + 1,
                oldest,
            });
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Ok(self
            .history
            .iter()
            .skip(skip)
            .map(|entry| self.publication(entry))
            .collect())
    }
}

/// A random epoch: 64 bits from the standard library's randomly keyed
/// hasher, so that a restarted process never reuses one.
fn new_epoch() -> Arc<str> {
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    format!("{:016x}", hasher.finish()).into()
}

type Topic = Arc<Mutex<TopicState>>;

struct Inner {
    history: History,
    topics: Mutex<HashMap<Arc<str>, Topic>>,
    next_member: std::sync::atomic::AtomicU64,
}

/// Durable topics, kept in this process. Cheap to clone: clones share the
/// topics.
#[derive(Clone)]
pub struct Topics {
    inner: Arc<Inner>,
}

impl fmt::Debug for Topics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topics")
            .field("history", &self.inner.history)
            .field("topics", &lock(&self.inner.topics).len())
            .finish()
    }
}

impl Default for Topics {
    fn default() -> Self {
        Topics::new(History::default())
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Topics {
    /// Topics that keep `history` each.
    pub fn new(history: History) -> Topics {
        Topics {
            inner: Arc::new(Inner {
                history,
                topics: Mutex::new(HashMap::new()),
                next_member: std::sync::atomic::AtomicU64::new(1),
            }),
        }
    }

    /// The topic named `name`, made if it does not exist (evicting an idle
    /// one when the table is full). Called with the table locked, and the
    /// topic's own lock taken before the table's is let go, so that an
    /// eviction never takes a topic between its lookup and its use.
    fn topic(
        &self,
        topics: &mut HashMap<Arc<str>, Topic>,
        name: &str,
        now: Instant,
    ) -> Result<Topic, TopicsFull> {
        if let Some(topic) = topics.get(name) {
            return Ok(Arc::clone(topic));
        }
        if topics.len() >= self.inner.history.max_topics {
            let idle = topics
                .iter()
                .filter_map(|(name, topic)| {
                    let state = lock(topic);
                    state
                        .members
                        .is_empty()
                        .then(|| (state.touched, Arc::clone(name)))
                })
                .min();
            let Some((_, evicted)) = idle else {
                return Err(TopicsFull);
            };
            topics.remove(&evicted);
        }
        let topic = Arc::new(Mutex::new(TopicState::new(&self.inner.history, now)));
        topics.insert(name.into(), Arc::clone(&topic));
        Ok(topic)
    }

    fn existing(&self, name: &str) -> Option<Topic> {
        lock(&self.inner.topics).get(name).cloned()
    }

    /// Appends `message` to `topic`'s history, hands it to the live
    /// subscribers, and returns its position.
    ///
    /// # Errors
    /// [`TopicsFull`] when the topic is new and [`History::max_topics`]
    /// topics with subscribers exist.
    pub fn publish(
        &self,
        topic: &str,
        message: impl Into<Message>,
    ) -> Result<Position, TopicsFull> {
        let now = Instant::now();
        let mut topics = lock(&self.inner.topics);
        let topic = self.topic(&mut topics, topic, now)?;
        let mut state = lock(&topic);
        drop(topics);
        let message = message.into();
        state.last += 1;
        state.touched = now;
        let offset = state.last;
        state.bytes += message.len();
        state.history.push_back(Entry {
            offset,
            at: now,
            message: message.clone(),
        });
        state.trim(&self.inner.history, now);
        let epoch = Arc::clone(&state.epoch);
        // No receiver is not an error: the history keeps it.
        let _ = state.live.send(Publication {
            offset,
            epoch: Arc::clone(&epoch),
            message,
        });
        Ok(Position { offset, epoch })
    }

    /// Subscribes to `topic` from `since`; `member` names the subscriber
    /// in [`presence`](Self::presence) while the subscription lives.
    ///
    /// # Errors
    /// [`SubscribeError::Unrecoverable`] when `since` is a position whose
    /// following messages cannot be given (another epoch, gone from the
    /// history, or never published); [`SubscribeError::TopicsFull`] when
    /// the topic is new and cannot be made.
    pub fn subscribe_as(
        &self,
        topic: &str,
        since: Since,
        member: &str,
    ) -> Result<Subscription, SubscribeError> {
        let now = Instant::now();
        let mut topics = lock(&self.inner.topics);
        let topic = self.topic(&mut topics, topic, now)?;
        let mut state = lock(&topic);
        drop(topics);
        state.trim(&self.inner.history, now);
        let (after, catch_up) = match since {
            Since::Now => (state.last, VecDeque::new()),
            Since::Oldest => {
                let after = state.oldest() - 1;
                (after, state.since(after)?)
            }
            Since::Position(position) => {
                if position.epoch != state.epoch {
                    return Err(Unrecoverable::EpochChanged {
                        current: Position {
                            offset: state.last,
                            epoch: Arc::clone(&state.epoch),
                        },
                    }
                    .into());
                }
                (position.offset, state.since(position.offset)?)
            }
        };
        let member_id = self
            .inner
            .next_member
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        state.members.insert(member_id, member.into());
        let live = state.live.subscribe();
        let epoch = Arc::clone(&state.epoch);
        drop(state);
        Ok(Subscription {
            topic,
            history: self.inner.history.clone(),
            epoch,
            delivered: after,
            catch_up,
            live,
            member_id,
            ended: None,
        })
    }

    /// [`subscribe_as`](Self::subscribe_as) with no name in presence.
    ///
    /// # Errors
    /// As [`subscribe_as`](Self::subscribe_as).
    pub fn subscribe(&self, topic: &str, since: Since) -> Result<Subscription, SubscribeError> {
        self.subscribe_as(topic, since, "")
    }

    /// The position of `topic`'s last message (offset 0 before any), or
    /// `None` if the topic does not exist.
    pub fn position(&self, topic: &str) -> Option<Position> {
        let topic = self.existing(topic)?;
        let state = lock(&topic);
        Some(Position {
            offset: state.last,
            epoch: Arc::clone(&state.epoch),
        })
    }

    /// The last `limit` messages of `topic`'s history, oldest first.
    pub fn history(&self, topic: &str, limit: usize) -> Vec<Publication> {
        let Some(topic) = self.existing(topic) else {
            return Vec::new();
        };
        let mut state = lock(&topic);
        state.trim(&self.inner.history, Instant::now());
        let skip = state.history.len().saturating_sub(limit);
        state
            .history
            .iter()
            .skip(skip)
            .map(|entry| state.publication(entry))
            .collect()
    }

    /// Who is subscribed to `topic`: the `member` names of its live
    /// subscriptions, sorted, repeated for each subscription.
    pub fn presence(&self, topic: &str) -> Vec<Arc<str>> {
        let Some(topic) = self.existing(topic) else {
            return Vec::new();
        };
        let mut members: Vec<_> = lock(&topic).members.values().cloned().collect();
        members.sort();
        members
    }

    /// How many topics exist.
    pub fn topic_count(&self) -> usize {
        lock(&self.inner.topics).len()
    }
}

/// A subscription: the messages missed since its starting point, then the
/// live ones, each once and in order. Dropping it leaves the topic's
/// presence.
pub struct Subscription {
    topic: Topic,
    history: History,
    epoch: Arc<str>,
    /// The offset of the last message handed out.
    delivered: u64,
    catch_up: VecDeque<Publication>,
    live: broadcast::Receiver<Publication>,
    member_id: u64,
    /// Why the subscription ended, once it has: every later call says it
    /// again rather than hand out what follows a hole.
    ended: Option<Unrecoverable>,
}

impl fmt::Debug for Subscription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("epoch", &self.epoch)
            .field("delivered", &self.delivered)
            .field("catching_up", &self.catch_up.len())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The next message: from the catch-up first, then live.
    ///
    /// # Errors
    /// [`Unrecoverable::TooFarBehind`] when this subscriber fell behind
    /// the live ring and the history no longer holds what it missed; the
    /// subscription is then over (subscribe again, from
    /// [`Since::Now`] or [`Since::Oldest`]).
    ///
    /// # Cancel safety
    /// Cancel safe: a message is taken only when it is returned.
    pub async fn next(&mut self) -> Result<Publication, Unrecoverable> {
        if let Some(ended) = &self.ended {
            return Err(ended.clone());
        }
        loop {
            if let Some(publication) = self.catch_up.pop_front() {
                self.delivered = publication.offset;
                return Ok(publication);
            }
            match self.live.recv().await {
                // Already handed out from the catch-up.
                Ok(publication) if publication.offset <= self.delivered => {}
                Ok(publication) => {
                    self.delivered = publication.offset;
                    return Ok(publication);
                }
                // Closed cannot happen (the sender lives in the topic,
                // which this holds): recovering is right for both.
                Err(
                    broadcast::error::RecvError::Lagged(_) | broadcast::error::RecvError::Closed,
                ) => self.recover()?,
            }
        }
    }

    /// After falling behind the live ring: what was missed from the
    /// history, and a new place in the ring, under the topic's lock.
    fn recover(&mut self) -> Result<(), Unrecoverable> {
        let mut state = lock(&self.topic);
        state.trim(&self.history, Instant::now());
        match state.since(self.delivered) {
            Ok(catch_up) => {
                self.catch_up = catch_up;
                self.live = state.live.subscribe();
                Ok(())
            }
            Err(gone) => {
                self.ended = Some(gone.clone());
                Err(gone)
            }
        }
    }

    /// The position of the last message handed out (offset 0 with the
    /// topic's epoch before any).
    pub fn position(&self) -> Position {
        Position {
            offset: self.delivered,
            epoch: Arc::clone(&self.epoch),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        lock(&self.topic).members.remove(&self.member_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(publications: &[Publication]) -> Vec<String> {
        publications
            .iter()
            .map(|p| p.message.as_text().unwrap_or_default().to_owned())
            .collect()
    }

    async fn take(subscription: &mut Subscription, n: usize) -> Vec<Publication> {
        let mut got = Vec::with_capacity(n);
        for _ in 0..n {
            let next = tokio::time::timeout(Duration::from_secs(5), subscription.next())
                .await
                .expect("a message in time")
                .expect("no gap");
            got.push(next);
        }
        got
    }

    fn publish_all(topics: &Topics, topic: &str, range: std::ops::Range<u32>) -> Vec<Position> {
        range
            .map(|n| topics.publish(topic, n.to_string()).unwrap())
            .collect()
    }

    fn numbers(range: std::ops::Range<u32>) -> Vec<String> {
        range.map(|n| n.to_string()).collect()
    }

    #[tokio::test]
    async fn a_position_gives_exactly_what_followed_it_then_the_live_stream() {
        let topics = Topics::default();
        let positions = publish_all(&topics, "t", 1..6);
        assert_eq!(positions[4].offset, 5);
        let mut subscription = topics
            .subscribe("t", Since::Position(positions[1].clone()))
            .unwrap();
        publish_all(&topics, "t", 6..8);
        let got = take(&mut subscription, 5).await;
        assert_eq!(texts(&got), numbers(3..8));
        assert_eq!(
            got.iter().map(|p| p.offset).collect::<Vec<_>>(),
            [3, 4, 5, 6, 7]
        );
        assert_eq!(subscription.position().offset, 7);
    }

    #[tokio::test]
    async fn now_and_oldest() {
        let topics = Topics::default();
        publish_all(&topics, "t", 1..4);
        let mut now = topics.subscribe("t", Since::Now).unwrap();
        let mut oldest = topics.subscribe("t", Since::Oldest).unwrap();
        publish_all(&topics, "t", 4..5);
        assert_eq!(texts(&take(&mut now, 1).await), ["4"]);
        assert_eq!(texts(&take(&mut oldest, 4).await), numbers(1..5));
    }

    #[tokio::test]
    async fn another_epoch_a_trimmed_history_or_a_made_up_offset_are_refused() {
        let topics = Topics::new(History::default().max_messages(3));
        let positions = publish_all(&topics, "t", 1..7);
        let other_epoch = Position {
            offset: 2,
            epoch: "elsewhere".into(),
        };
        assert!(matches!(
            topics.subscribe("t", Since::Position(other_epoch)),
            Err(SubscribeError::Unrecoverable(Unrecoverable::EpochChanged { current }))
                if current == positions[5]
        ));
        // Offsets 4, 5 and 6 are kept: after 2, offset 3 is gone.
        assert_eq!(
            topics
                .subscribe("t", Since::Position(positions[1].clone()))
                .unwrap_err(),
            SubscribeError::Unrecoverable(Unrecoverable::TooFarBehind {
                wanted: 3,
                oldest: 4
            })
        );
        // After 3 is exactly what is kept.
        let mut subscription = topics
            .subscribe("t", Since::Position(positions[2].clone()))
            .unwrap();
        assert_eq!(texts(&take(&mut subscription, 3).await), numbers(4..7));
        let ahead = Position {
            offset: 99,
            epoch: positions[0].epoch.clone(),
        };
        assert_eq!(
            topics.subscribe("t", Since::Position(ahead)).unwrap_err(),
            SubscribeError::Unrecoverable(Unrecoverable::Ahead { offset: 99 })
        );
    }

    #[tokio::test]
    async fn the_history_is_bounded_by_bytes_and_keeps_the_newest_message() {
        let topics = Topics::new(History::default().max_bytes(10));
        topics.publish("t", "12345").unwrap();
        topics.publish("t", "67890").unwrap();
        topics.publish("t", "abc").unwrap();
        assert_eq!(texts(&topics.history("t", 10)), ["67890", "abc"]);
        topics.publish("t", "x".repeat(50)).unwrap();
        assert_eq!(texts(&topics.history("t", 10)), ["x".repeat(50)]);
    }

    #[tokio::test(start_paused = true)]
    async fn messages_older_than_max_age_leave_the_history() {
        let topics = Topics::new(History::default().max_age(Some(Duration::from_secs(60))));
        let first = topics.publish("t", "old").unwrap();
        tokio::time::advance(Duration::from_secs(40)).await;
        topics.publish("t", "newer").unwrap();
        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(texts(&topics.history("t", 10)), ["newer"]);
        assert!(
            topics
                .subscribe("t", Since::Position(first.clone()))
                .is_ok(),
            "what followed the first message is kept"
        );
        let before_first = Position { offset: 0, ..first };
        assert!(matches!(
            topics.subscribe("t", Since::Position(before_first)),
            Err(SubscribeError::Unrecoverable(Unrecoverable::TooFarBehind {
                wanted: 1,
                oldest: 2
            }))
        ));
    }

    /// A subscriber that falls behind the live ring catches up from the
    /// history: every message once, in order.
    #[tokio::test]
    async fn a_subscriber_behind_the_live_ring_catches_up_from_the_history() {
        let topics = Topics::new(History::default().live_capacity(4).max_messages(100));
        let mut subscription = topics.subscribe("t", Since::Now).unwrap();
        publish_all(&topics, "t", 1..41);
        assert_eq!(texts(&take(&mut subscription, 40).await), numbers(1..41));
    }

    /// ... and one behind the history too is told so.
    #[tokio::test]
    async fn a_subscriber_behind_the_history_is_told_it_cannot_recover() {
        let topics = Topics::new(History::default().live_capacity(4).max_messages(10));
        let mut subscription = topics.subscribe("t", Since::Now).unwrap();
        publish_all(&topics, "t", 1..41);
        let gone = Err(Unrecoverable::TooFarBehind {
            wanted: 1,
            oldest: 31,
        });
        assert_eq!(subscription.next().await, gone);
        // And it stays over: what follows the hole is never handed out.
        publish_all(&topics, "t", 41..42);
        assert_eq!(subscription.next().await, gone);
    }

    /// Subscribing with a position while another task publishes: the
    /// catch-up and the live stream meet with no gap and no repeat.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscription_made_while_publishing_has_no_gap_and_no_repeat() {
        for _ in 0..50 {
            let topics = Topics::new(History::default().max_messages(10_000));
            let start = topics.publish("t", "0").unwrap();
            let publisher = {
                let topics = topics.clone();
                tokio::spawn(async move {
                    for n in 1..2_000u32 {
                        topics.publish("t", n.to_string()).unwrap();
                        if n % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            };
            tokio::task::yield_now().await;
            let mut subscription = topics.subscribe("t", Since::Position(start)).unwrap();
            publisher.await.unwrap();
            assert_eq!(
                texts(&take(&mut subscription, 1_999).await),
                numbers(1..2_000)
            );
        }
    }

    #[tokio::test]
    async fn presence_lists_live_subscriptions() {
        let topics = Topics::default();
        let alice = topics.subscribe_as("t", Since::Now, "alice").unwrap();
        let bob = topics.subscribe_as("t", Since::Now, "bob").unwrap();
        assert_eq!(topics.presence("t"), [Arc::from("alice"), Arc::from("bob")]);
        drop(alice);
        assert_eq!(topics.presence("t"), [Arc::from("bob")]);
        drop(bob);
        assert!(topics.presence("t").is_empty());
    }

    /// Past `max_topics`, the idle topic published to least recently goes
    /// (its position's epoch is then unknown), a topic with subscribers
    /// never does, and when all have subscribers a new one is refused.
    #[tokio::test(start_paused = true)]
    async fn topics_are_bounded_and_only_idle_ones_are_evicted() {
        let topics = Topics::new(History::default().max_topics(2));
        let a = topics.publish("a", "1").unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        let _b = topics.subscribe("b", Since::Now).unwrap();
        topics.publish("c", "1").unwrap();
        assert_eq!(topics.topic_count(), 2);
        assert!(topics.position("a").is_none(), "the idle topic went");
        assert!(topics.position("b").is_some(), "the subscribed one stays");
        let _c = topics.subscribe("c", Since::Now).unwrap();
        assert_eq!(topics.publish("d", "1"), Err(TopicsFull));
        // "a" again: a new life, and the old position is refused.
        drop(_c);
        topics.publish("a", "again").unwrap();
        assert!(matches!(
            topics.subscribe("a", Since::Position(a)),
            Err(SubscribeError::Unrecoverable(
                Unrecoverable::EpochChanged { .. }
            ))
        ));
    }
}
