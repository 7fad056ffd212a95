//! The chat of the browser page: the JSON protocol of `/chat` over the
//! [`Hub`] (rooms are hub topics, direct messages go by session id).
//!
//! Names, rooms, presence and history are kept in one [`ChatState`] behind
//! a mutex, and every count in it is capped (see [`ChatOptions`]). That lock
//! is held for map updates and cheap clones only: nothing is serialised or
//! sent under it.
//!
//! What a room sends goes through the room's [`Outbox`]: the event is queued
//! under the state lock, in the order of the change it reports, and
//! delivered after the lock is released by whichever task finds the outbox
//! idle. So every member still sees a room's events in one order, the order
//! of its history, and a joiner gets its `joined` answer before anything
//! that happened after its snapshot and nothing of what is in it, while the
//! fan-out and the JSON run outside every lock.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, Once, PoisonError, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use duplex::{CloseCode, CloseReason, Hub, Membership, Message, Session, SessionId, SlowConsumer};
use tokio::sync::Notify;

mod cluster;

pub use cluster::{BEAT, HEALTH_PERIOD, RedisOptions, RedisStartError, TTL};

use crate::protocol::{
    self, DirectLine, ErrorCode, Event, Limits, MAX_NAME_CHARS, Problem, Request, RoomInfo,
    StreamId,
};

/// The chat's limits; see `duplex-chat --help`. Every default is safe to
/// face the Internet with: with all of them reached, the history kept is
/// at most `max_total_rooms × history_bytes` (125 MiB by default).
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// Messages of a room (and of a pair's direct messages) kept for
    /// recovery; `joined` without `since` sends the last
    /// `min(history, 50)`. Default 200.
    pub history: usize,
    /// Bytes of a room's history, as sent in `joined`: the oldest messages
    /// go first when it is over. Default 128 KiB.
    pub history_bytes: usize,
    /// Longest message text, in characters. Default 2000.
    pub max_text_chars: usize,
    /// Longest message text, in bytes of UTF-8. Default 4096.
    pub max_text_bytes: usize,
    /// Requests per second a connection may send on average; 0 turns the
    /// limit off. Default 5. `/chat/plain` lines count the same way.
    pub rate: f64,
    /// Requests a connection may send at once. Default 10.
    pub burst: u32,
    /// Names in use (connections that said `hello`) at once; one more gets
    /// `server_full` and is closed with 1013. Default 10,000.
    pub max_users: usize,
    /// Rooms the server keeps, in use or idle with history; a new room
    /// beyond that forgets the least recently used idle one, or gets
    /// `server_rooms_full`. Default 1000.
    pub max_total_rooms: usize,
    /// Members one room may have (`/chat/plain` is one room too); one more
    /// gets `room_full`. Default 1000.
    pub max_members_per_room: usize,
    /// Rooms one connection may be in. Default 20.
    pub max_rooms_per_user: usize,
    /// Empty rooms whose history is kept; beyond that the least recently
    /// used is forgotten. Default 256.
    pub max_idle_rooms: usize,
    /// Largest message (and frame) `/echo` and `/mirror` read, in bytes,
    /// inflated bytes included; larger: Close 1009. Default 64 KiB, the
    /// chat's own: an echo holds what it read and what it sends back, so
    /// a larger limit lets one address make the server hold that much per
    /// connection (conformance suites that send 16 MiB raise it).
    pub echo_max_message: u64,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            history: 200,
            history_bytes: 128 << 10,
            max_text_chars: 2000,
            max_text_bytes: 4096,
            rate: 5.0,
            burst: 10,
            max_users: 10_000,
            max_total_rooms: 1000,
            max_members_per_room: 1000,
            max_rooms_per_user: 20,
            max_idle_rooms: 256,
            echo_max_message: 64 << 10,
        }
    }
}

impl ChatOptions {
    /// The largest request read: room for the longest text with every
    /// character escaped (`\uXXXX`), and the other fields.
    pub fn max_request_bytes(&self) -> usize {
        self.max_text_chars
            .min(self.max_text_bytes)
            .saturating_mul(6)
            .saturating_add(1024)
    }

    fn limits(&self) -> Limits {
        Limits {
            name_chars: MAX_NAME_CHARS,
            text_chars: self.max_text_chars,
            text_bytes: self.max_text_bytes,
            rate: self.rate,
            burst: self.burst,
            rooms: self.max_rooms_per_user,
            history: self.history,
            history_bytes: self.history_bytes,
            room_members: self.max_members_per_room,
        }
    }
}

/// The most messages a `joined` without `since` carries.
pub const SNAPSHOT_MAX: usize = 50;

/// The most rooms and names a `directory` lists.
pub const DIRECTORY_MAX: usize = 500;

/// How long directory changes are gathered before one `directory` goes out:
/// a crowd arriving at once costs a few broadcasts, not one per arrival.
const DIRECTORY_DELAY: Duration = Duration::from_millis(200);

/// The close code sent to a connection whose name was taken over by a newer
/// connection of the same identity (one that sent the `welcome` token).
pub const REPLACED: u16 = 4001;

/// Events one task delivers from an outbox before it hands the rest to a
/// task of its own: a busy room cannot keep one connection's handler away
/// from its own socket.
const DRAIN_BATCH: usize = 32;

/// The chat: cheap to clone, one per server.
#[derive(Clone)]
pub struct Chat {
    inner: Arc<ChatInner>,
}

struct ChatInner {
    hub: Hub,
    options: ChatOptions,
    instance: Arc<str>,
    state: Mutex<ChatState>,
    /// The last `directory` built, for new connections: built outside the
    /// state lock, at most once per [`DIRECTORY_DELAY`] of changes.
    directory: Mutex<Message>,
    directory_dirty: AtomicBool,
    directory_wake: Arc<Notify>,
    directory_task: Once,
    /// With Redis: what is shared between nodes.
    cluster: Option<Arc<cluster::Cluster>>,
}

#[derive(Default)]
struct ChatState {
    /// Names in use, by [`protocol::name_key`].
    users: BTreeMap<String, User>,
    /// Connections that have a name.
    sessions: HashMap<SessionId, Named>,
    rooms: HashMap<Arc<str>, Room>,
    /// The outboxes of rooms forgotten while their last events may still
    /// be on their way: a room made again under the same name reuses its
    /// outbox, so that a leave and the next join of one connection are
    /// delivered in order.
    retired: HashMap<Arc<str>, Weak<Outbox>>,
    /// The clock of room and pair activity.
    clock: u64,
    /// Direct messages kept, by pair of identities ([`pair_key`]): never
    /// by names, which others may hold later.
    pairs: HashMap<(String, String), Pair>,
    /// Whom each identity's conversations are with, by the name the other
    /// had at the pair's last message: `(identity, name key)` to the other
    /// identity. Two entries per pair at most (each pair's current ones),
    /// so it is capped with `pairs`.
    contacts: HashMap<(String, String), String>,
}

/// The direct messages of two people, kept as sent (the `dm` event's JSON
/// without its `type`).
#[derive(Default)]
struct Pair {
    last: StreamId,
    lines: VecDeque<(StreamId, Arc<str>)>,
    bytes: usize,
    last_active: u64,
    /// The name keys the two identities of the pair's key had at its last
    /// message, in the key's order: what `dm_history` with a name nobody
    /// holds now finds the caller's conversation by.
    names: [String; 2],
}

struct User {
    id: SessionId,
    name: Arc<str>,
    /// Who holds the name ([`protocol::identity`] of its token).
    identity: Arc<str>,
    sender: duplex::Sender,
}

struct Named {
    /// The [`protocol::name_key`]: the key in `users` and in rooms' members.
    key: String,
    /// The rooms it is in, and whether this connection got their history
    /// (false for rooms taken over from an older connection).
    rooms: BTreeMap<Arc<str>, bool>,
}

/// A message of a room as kept: its id and the rest serialised once
/// ([`protocol::line_tail`]).
#[derive(Clone)]
struct Line {
    id: StreamId,
    tail: Arc<str>,
}

struct Room {
    /// By [`protocol::name_key`], so in the order `joined` lists them.
    members: BTreeMap<String, (SessionId, Arc<str>)>,
    history: VecDeque<Line>,
    /// What `history` takes in a `joined` ([`protocol::history_entry_len`]).
    history_bytes: usize,
    /// The id of the last message (kept or not).
    last: StreamId,
    last_active: u64,
    outbox: Arc<Outbox>,
}

impl Room {
    fn new(outbox: Arc<Outbox>) -> Self {
        Room {
            members: BTreeMap::new(),
            history: VecDeque::new(),
            history_bytes: 0,
            last: StreamId::default(),
            last_active: 0,
            outbox,
        }
    }

    /// What a `joined` carries: without `since`, the last
    /// [`SNAPSHOT_MAX`] lines; with it, every line after it if it is still
    /// kept and `epoch` is this room's, else the snapshot and `false`.
    fn history_for(
        &self,
        since: Option<&str>,
        epoch: Option<&str>,
        own_epoch: &str,
    ) -> (Vec<Line>, Option<bool>) {
        let snapshot = || {
            let skip = self.history.len().saturating_sub(SNAPSHOT_MAX);
            self.history.iter().skip(skip).cloned().collect()
        };
        let Some(since) = since else {
            return (snapshot(), None);
        };
        let found = StreamId::parse(since)
            .filter(|_| epoch == Some(own_epoch))
            .and_then(|id| self.history.iter().position(|l| l.id == id));
        match found {
            Some(at) => (
                self.history.iter().skip(at + 1).cloned().collect(),
                Some(true),
            ),
            None => (snapshot(), Some(false)),
        }
    }

    fn member_names(&self) -> Vec<Arc<str>> {
        self.members
            .values()
            .map(|(_, name)| Arc::clone(name))
            .collect()
    }

    /// Keeps `line`, then drops the oldest lines until the history is
    /// within both budgets. A line over the byte budget on its own is sent
    /// but not kept.
    fn remember(&mut self, line: Line, max_lines: usize, max_bytes: usize) {
        let cost = protocol::history_entry_len(&line.tail);
        if max_lines == 0 || cost > max_bytes {
            return;
        }
        self.history_bytes += cost;
        self.history.push_back(line);
        while self.history.len() > max_lines || self.history_bytes > max_bytes {
            let Some(old) = self.history.pop_front() else {
                break;
            };
            self.history_bytes -= protocol::history_entry_len(&old.tail);
        }
    }
}

/// Something a room sends, queued in the order of the changes.
enum Outgoing {
    /// A message to the room.
    Line(Line),
    /// Someone came or went.
    Presence {
        event: &'static str,
        name: Arc<str>,
        count: usize,
    },
    /// The answer to `join`; a first join also subscribes the joiner, right
    /// after the answer, so it gets what follows its snapshot.
    Joined {
        to: Arc<Membership>,
        epoch: Arc<str>,
        recovered: Option<bool>,
        members: Vec<Arc<str>>,
        history: Vec<Line>,
        subscribe: bool,
    },
    /// A take-over: the new connection gets the room's events from here on.
    Subscribe(Arc<Membership>),
    /// The answer to `leave`, after the leaver stops getting the room.
    Left(Arc<Membership>),
    /// Lines were lost before the next one (Redis mode).
    Gap { epoch: Arc<str> },
}

/// A room's queue of [`Outgoing`] events and who delivers them.
struct Outbox {
    room: Arc<str>,
    queue: Mutex<OutboxQueue>,
}

#[derive(Default)]
struct OutboxQueue {
    items: VecDeque<Outgoing>,
    /// A task is delivering: events queued meanwhile are its to deliver.
    draining: bool,
}

impl Outbox {
    fn new(room: Arc<str>) -> Arc<Outbox> {
        Arc::new(Outbox {
            room,
            queue: Mutex::new(OutboxQueue::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, OutboxQueue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an event; called under the state lock, so that the queue's
    /// order is the order of the changes.
    fn push(&self, item: Outgoing) {
        self.lock().items.push_back(item);
    }

    /// Delivers what is queued unless another task is at it. After
    /// [`DRAIN_BATCH`] events, a task of its own goes on.
    fn drain(self: Arc<Self>, hub: &Hub) {
        {
            let mut queue = self.lock();
            if queue.draining || queue.items.is_empty() {
                return;
            }
            queue.draining = true;
        }
        if self.deliver_some(hub) {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let hub = hub.clone();
                runtime.spawn(async move {
                    while !self.deliver_some(&hub) {
                        tokio::task::yield_now().await;
                    }
                });
            }
            Err(_) => while !self.deliver_some(hub) {},
        }
    }

    /// Delivers up to [`DRAIN_BATCH`] events; true once the queue is empty
    /// (and no longer being drained).
    fn deliver_some(&self, hub: &Hub) -> bool {
        for _ in 0..DRAIN_BATCH {
            let item = {
                let mut queue = self.lock();
                match queue.items.pop_front() {
                    Some(item) => item,
                    None => {
                        queue.draining = false;
                        return true;
                    }
                }
            };
            self.deliver(hub, item);
        }
        false
    }

    fn deliver(&self, hub: &Hub, item: Outgoing) {
        let room = &*self.room;
        match item {
            Outgoing::Line(line) => {
                hub.publish(room, protocol::message(&line.id.to_string(), &line.tail));
            }
            Outgoing::Presence { event, name, count } => {
                let presence = Event::Presence {
                    room,
                    event,
                    name: &name,
                    count,
                };
                hub.publish(room, presence.to_message());
            }
            Outgoing::Joined {
                to,
                epoch,
                recovered,
                members,
                history,
                subscribe,
            } => {
                let ids: Vec<String> = history.iter().map(|l| l.id.to_string()).collect();
                let joined = protocol::joined(
                    room,
                    &epoch,
                    recovered,
                    members.iter().map(|m| &**m),
                    ids.iter()
                        .map(String::as_str)
                        .zip(history.iter().map(|l| &*l.tail)),
                );
                hub.send_to(to.id(), joined);
                if subscribe {
                    to.join(room);
                }
            }
            Outgoing::Subscribe(to) => to.join(room),
            Outgoing::Gap { epoch } => {
                hub.publish(
                    room,
                    Event::Gap {
                        room,
                        epoch: &epoch,
                    }
                    .to_message(),
                );
            }
            Outgoing::Left(to) => {
                to.leave(room);
                hub.send_to(to.id(), Event::Left { room }.to_message());
            }
        }
    }
}

impl ChatState {
    /// What the `directory` event is built from, taken under the lock:
    /// clones of names and counts, nothing sorted or serialised.
    fn directory_snapshot(&self) -> DirectorySnapshot {
        DirectorySnapshot {
            rooms: self
                .rooms
                .iter()
                .map(|(name, room)| (Arc::clone(name), room.members.len()))
                .collect(),
            users: self
                .users
                .values()
                .take(DIRECTORY_MAX)
                .map(|u| Arc::clone(&u.name))
                .collect(),
            online: self.users.len(),
        }
    }

    /// A new room's outbox: the one of a forgotten room of that name if its
    /// last events may still be on their way.
    fn outbox_for(&mut self, room: &Arc<str>) -> Arc<Outbox> {
        self.retired
            .remove(room)
            .and_then(|weak| weak.upgrade())
            .unwrap_or_else(|| Outbox::new(Arc::clone(room)))
    }

    fn forget(&mut self, room: &str) {
        if let Some((name, r)) = self.rooms.remove_entry(room)
            && Arc::strong_count(&r.outbox) > 1
        {
            self.retired.insert(name, Arc::downgrade(&r.outbox));
        }
        // Outboxes delivered and dropped leave dead entries: sweep them
        // now and then, so `retired` stays about as small as the number of
        // outboxes being drained.
        if self.retired.len() > 64 && self.retired.len() > self.rooms.len() {
            self.retired.retain(|_, weak| weak.strong_count() > 0);
        }
    }

    /// The least recently used room nobody is in.
    fn oldest_idle(&self) -> Option<Arc<str>> {
        self.rooms
            .iter()
            .filter(|(_, r)| r.members.is_empty())
            .min_by_key(|(_, r)| r.last_active)
            .map(|(name, _)| Arc::clone(name))
    }

    /// Forgets a room nobody is in once it has no history, or when more
    /// than `max_idle` empty rooms are kept.
    fn tidy(&mut self, room: &str, max_idle: usize) {
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        if !r.members.is_empty() {
            return;
        }
        if r.history.is_empty() {
            self.forget(room);
            return;
        }
        let idle = self.rooms.values().filter(|r| r.members.is_empty()).count();
        if idle > max_idle
            && let Some(oldest) = self.oldest_idle()
        {
            self.forget(&oldest);
        }
    }

    fn counts(&self) -> (usize, usize) {
        (self.users.len(), self.rooms.len())
    }

    /// The identity `me` last exchanged direct messages with while it was
    /// called `name_key`.
    fn last_peer_named(&self, me: &str, name_key: &str) -> Option<Arc<str>> {
        self.contacts
            .get(&(me.to_owned(), name_key.to_owned()))
            .map(|peer| Arc::from(peer.as_str()))
    }

    /// Forgets the contacts a pair (its key and its names) made, unless a
    /// later pair has made them its own.
    fn forget_contacts(&mut self, (a, b): &(String, String), names: &[String; 2]) {
        for (who, peer, peer_name) in [(a, b, &names[1]), (b, a, &names[0])] {
            let entry = (who.clone(), peer_name.clone());
            if self.contacts.get(&entry) == Some(peer) {
                self.contacts.remove(&entry);
            }
        }
    }
}

fn gauges((users, rooms): (usize, usize)) {
    metrics::gauge!("duplex_chat_users").set(users as f64);
    metrics::gauge!("duplex_chat_rooms").set(rooms as f64);
}

struct DirectorySnapshot {
    rooms: Vec<(Arc<str>, usize)>,
    users: Vec<Arc<str>>,
    online: usize,
}

impl DirectorySnapshot {
    /// The `directory` event: rooms and names, at most [`DIRECTORY_MAX`]
    /// of each (the fullest rooms, the first names in order).
    fn to_message(&self) -> Message {
        let mut rooms: Vec<RoomInfo> = self
            .rooms
            .iter()
            .map(|(name, members)| RoomInfo {
                name: name.to_string(),
                members: *members,
            })
            .collect();
        if rooms.len() > DIRECTORY_MAX {
            rooms.sort_by(|a, b| b.members.cmp(&a.members).then_with(|| a.name.cmp(&b.name)));
            rooms.truncate(DIRECTORY_MAX);
        }
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        // Kept in the order of their keys, listed ignoring case only.
        let mut users: Vec<&str> = self.users.iter().map(|u| &**u).collect();
        users.sort_by_cached_key(|u| u.to_lowercase());
        Event::Directory {
            rooms,
            users,
            online: self.online,
        }
        .to_message()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}

/// A token bucket: `rate` tokens a second, at most `burst` saved.
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate <= 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Puts back a token taken for something that did not happen.
    pub(crate) fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(self.burst);
    }

    /// Whether the bucket is as full as a new one: then forgetting it
    /// changes nothing.
    pub(crate) fn is_full(&self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.rate <= 0.0 || self.tokens + elapsed * self.rate >= self.burst
    }
}

/// One connection: its hub membership, its name, its rate limit. Dropping
/// it (the handler ends, even by panic) leaves every room and frees the
/// name.
struct Connection {
    chat: Chat,
    me: Arc<Membership>,
    sender: duplex::Sender,
    /// Set by `hello`; a connection's name never changes after.
    name: Option<Arc<str>>,
    /// Set by `hello`: the identity its token proves
    /// ([`protocol::identity`]), which its direct messages are kept under.
    identity: Option<Arc<str>>,
    bucket: TokenBucket,
    quiet_until: Option<Instant>,
    /// With Redis: room messages of this connection on their way to Redis
    /// ([`cluster::SAYS_IN_FLIGHT`] at most).
    in_flight: Arc<tokio::sync::Semaphore>,
    /// The peer's address, when known: with Redis, new streams are
    /// rate-limited per address too.
    addr: Option<std::net::IpAddr>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        match &self.chat.inner.cluster {
            Some(cluster) => cluster.disconnect(&self.me),
            None => self.chat.disconnect(&self.me),
        }
    }
}

impl Default for Chat {
    fn default() -> Self {
        Chat::new(ChatOptions::default())
    }
}

impl Chat {
    /// A chat with its own hub. A subscriber that cannot keep up is closed
    /// with 1013 (its page reconnects and gets the history again) rather
    /// than silently missing messages.
    pub fn new(options: ChatOptions) -> Chat {
        Chat::with_cluster(Chat::hub_for_chat(), options, None)
    }

    fn hub_for_chat() -> Hub {
        Hub::builder()
            .slow_consumer(SlowConsumer::Close(CloseCode::TRY_AGAIN_LATER))
            .build()
    }

    /// A chat whose names, rooms, presence, direct messages and history
    /// are shared through Redis with every node of the same
    /// `redis.prefix` (see the crate's README, "Several nodes").
    ///
    /// # Errors
    /// Redis cannot be reached (unless `redis.retry`, which waits for it).
    pub async fn with_redis(
        options: ChatOptions,
        redis: RedisOptions,
    ) -> Result<Chat, RedisStartError> {
        let hub = Chat::hub_for_chat();
        let cluster = cluster::Cluster::start(hub.clone(), options.clone(), redis).await?;
        Ok(Chat::with_cluster(hub, options, Some(cluster)))
    }

    fn with_cluster(
        hub: Hub,
        options: ChatOptions,
        cluster: Option<Arc<cluster::Cluster>>,
    ) -> Chat {
        let directory = ChatState::default().directory_snapshot().to_message();
        Chat {
            inner: Arc::new(ChatInner {
                hub,
                options,
                instance: Arc::from(random_hex(6)),
                state: Mutex::new(ChatState::default()),
                directory: Mutex::new(directory),
                directory_dirty: AtomicBool::new(false),
                directory_wake: Arc::new(Notify::new()),
                directory_task: Once::new(),
                cluster,
            }),
        }
    }

    /// The hub underneath.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// The options in force.
    pub fn options(&self) -> &ChatOptions {
        &self.inner.options
    }

    fn lock(&self) -> MutexGuard<'_, ChatState> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn cached_directory(&self) -> Message {
        self.inner
            .directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Marks the directory as changed; it goes out to everyone shortly.
    fn directory_changed(&self) {
        self.inner.directory_dirty.store(true, Ordering::Release);
        self.inner.directory_wake.notify_one();
    }

    /// Rebuilds and broadcasts the directory after changes, at most once
    /// per [`DIRECTORY_DELAY`]. Ends once the chat is gone.
    async fn publish_directory(chat: Weak<ChatInner>, wake: Arc<Notify>) {
        loop {
            // Wakes now and then to notice that the chat is gone.
            let _ = tokio::time::timeout(Duration::from_secs(10), wake.notified()).await;
            tokio::time::sleep(DIRECTORY_DELAY).await;
            let Some(inner) = chat.upgrade() else {
                return;
            };
            if inner.directory_dirty.swap(false, Ordering::AcqRel) {
                let chat = Chat { inner };
                let snapshot = chat.lock().directory_snapshot();
                let directory = snapshot.to_message();
                // Cached before it is broadcast: a connection that opens
                // meanwhile gets this one from one or the other.
                *chat
                    .inner
                    .directory
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = directory.clone();
                chat.inner.hub.broadcast(directory);
            }
        }
    }

    /// Serves one `/chat` connection until it ends.
    pub async fn serve(self, mut session: Session) {
        if self.inner.cluster.is_none() {
            self.start_directory_task();
        }
        let options = &self.inner.options;
        let mut conn = Connection {
            me: Arc::new(self.inner.hub.register(&session.sender())),
            sender: session.sender(),
            name: None,
            identity: None,
            bucket: TokenBucket::new(options.rate, options.burst),
            quiet_until: None,
            in_flight: Arc::new(tokio::sync::Semaphore::new(cluster::SAYS_IN_FLIGHT)),
            addr: session.request().remote_addr().map(|a| a.ip()),
            chat: self.clone(),
        };
        match &self.inner.cluster {
            Some(cluster) => {
                self.inner
                    .hub
                    .send_to(conn.me.id(), cluster.cached_directory());
                if let Some(status) = cluster.greeting() {
                    self.inner.hub.send_to(conn.me.id(), status);
                }
            }
            None => {
                self.inner
                    .hub
                    .send_to(conn.me.id(), self.cached_directory());
            }
        }
        loop {
            match session.recv().await {
                Ok(Some(message)) => self.receive(&mut conn, message).await,
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!("chat session {} ended: {err}", conn.me.id());
                    break;
                }
            }
        }
    }

    fn start_directory_task(&self) {
        self.inner.directory_task.call_once(|| {
            tokio::spawn(Chat::publish_directory(
                Arc::downgrade(&self.inner),
                Arc::clone(&self.inner.directory_wake),
            ));
        });
    }

    fn reply(&self, me: &Membership, event: &Event<'_>) {
        self.inner.hub.send_to(me.id(), event.to_message());
    }

    fn refuse(&self, me: &Membership, problem: &Problem) {
        metrics::counter!("duplex_chat_errors_total", "code" => problem.code.as_str()).increment(1);
        self.reply(me, &Event::Error(problem));
    }

    async fn receive(&self, conn: &mut Connection, message: Message) {
        let now = Instant::now();
        if let Err(wait) = conn.bucket.take(now) {
            metrics::counter!("duplex_chat_rate_limited_total").increment(1);
            // One notice a second at most: a flood must not become a flood
            // of errors.
            if conn.quiet_until.is_none_or(|t| now >= t) {
                conn.quiet_until = Some(now + Duration::from_secs(1));
                let options = &self.inner.options;
                let mut problem = Problem::new(
                    ErrorCode::RateLimited,
                    format!(
                        "Slow down: at most {} messages a second (bursts of {}). \
                         Messages sent meanwhile are dropped.",
                        options.rate, options.burst
                    ),
                );
                problem.retry_after_ms = Some(wait.as_millis() as u64 + 1);
                self.refuse(&conn.me, &problem);
            }
            return;
        }
        let text = match message {
            Message::Text(text) => text,
            Message::Binary(_) => {
                return self.refuse(
                    &conn.me,
                    &Problem::new(
                        ErrorCode::BinaryNotSupported,
                        "The chat protocol is JSON in text messages",
                    ),
                );
            }
        };
        let limit = self.inner.options.max_request_bytes();
        if text.len() > limit {
            return self.refuse(
                &conn.me,
                &Problem::new(
                    ErrorCode::TooLarge,
                    format!("A request has at most {limit} bytes ({} given)", text.len()),
                ),
            );
        }
        let request = match protocol::parse(text.as_str()) {
            Ok(request) => request,
            Err(problem) => return self.refuse(&conn.me, &problem),
        };
        let kind = request.kind();
        let handled = match &self.inner.cluster {
            Some(cluster) => Self::handle_shared(cluster, conn, request).await,
            None => self.handle(conn, request),
        };
        if let Err(mut problem) = handled {
            if problem.request.is_none() {
                problem.request = Some(kind.to_owned());
            }
            self.refuse(&conn.me, &problem);
            if problem.code == ErrorCode::ServerFull {
                // After the error, which is queued first.
                conn.sender.close_now(CloseReason::new(
                    CloseCode::TRY_AGAIN_LATER,
                    "Server full, try again later",
                ));
            }
        }
    }

    fn handle(&self, conn: &mut Connection, request: Request) -> Result<(), Problem> {
        match request {
            Request::Hello { name, token } => self.hello(conn, &name, token.as_deref()),
            Request::Ping { id } => {
                self.reply(&conn.me, &Event::Pong { id });
                Ok(())
            }
            Request::Join { room, since, epoch } => {
                self.join(conn, &room, since.as_deref(), epoch.as_deref())
            }
            Request::DmHistory { with, since, epoch } => {
                self.dm_history(conn, &with, since.as_deref(), epoch.as_deref())
            }
            Request::Leave { room } => self.leave(conn, &room),
            Request::Message { room, text } => self.say(conn, &room, &text),
            Request::Dm { to, text } => self.direct(conn, &to, &text),
        }
    }

    /// [`Chat::handle`] with Redis: the same requests, the state shared.
    async fn handle_shared(
        cluster: &cluster::Cluster,
        conn: &mut Connection,
        request: Request,
    ) -> Result<(), Problem> {
        match request {
            Request::Hello { name, token } => cluster.hello(conn, &name, token.as_deref()).await,
            Request::Ping { id } => {
                conn.chat.reply(&conn.me, &Event::Pong { id });
                Ok(())
            }
            Request::Join { room, since, epoch } => {
                cluster
                    .join(conn, &room, since.as_deref(), epoch.as_deref())
                    .await
            }
            Request::DmHistory { with, since, epoch } => {
                cluster
                    .dm_history(conn, &with, since.as_deref(), epoch.as_deref())
                    .await
            }
            Request::Leave { room } => cluster.leave(conn, &room).await,
            Request::Message { room, text } => cluster.say(conn, &room, &text).await,
            Request::Dm { to, text } => cluster.direct(conn, &to, &text).await,
        }
    }

    fn hello(&self, conn: &mut Connection, name: &str, token: Option<&str>) -> Result<(), Problem> {
        let me = &conn.me;
        if let Some(name) = &conn.name {
            return Err(Problem::new(
                ErrorCode::AlreadyIdentified,
                format!("This connection is already {name}"),
            ));
        }
        let checked = protocol::check_name(name)?;
        let key = protocol::name_key(&checked);
        let (token, identity) = identify(token);
        let max_users = self.inner.options.max_users;
        let mut outboxes = Vec::new();
        let mut replaced = None;
        let (name, rooms, counts) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut name: Arc<str> = Arc::from(checked);
            let mut rooms = BTreeMap::new();
            if let Some(user) = state.users.get(&key) {
                if user.identity != identity {
                    return Err(Problem::new(
                        ErrorCode::NameTaken,
                        format!("{} is already in use; pick another name", user.name),
                    ));
                }
                // The same client again (a reconnect that came before the
                // old connection was seen gone): the new connection takes
                // over its name and rooms, without leave and join notices.
                let old = state.users.remove(&key).expect("present");
                // Others know the name as it was: keep it so.
                name = old.name;
                replaced = Some(old.sender);
                if let Some(named) = state.sessions.remove(&old.id) {
                    for room in named.rooms.keys() {
                        if let Some(r) = state.rooms.get_mut(room) {
                            r.members.insert(key.clone(), (me.id(), Arc::clone(&name)));
                            r.outbox.push(Outgoing::Subscribe(Arc::clone(me)));
                            outboxes.push(Arc::clone(&r.outbox));
                        }
                    }
                    // This connection has not had their history yet.
                    rooms = named.rooms.into_keys().map(|r| (r, false)).collect();
                }
            } else if state.users.len() >= max_users {
                return Err(Problem::new(
                    ErrorCode::ServerFull,
                    format!("The server has {max_users} people in already; try again later"),
                ));
            }
            state.users.insert(
                key.clone(),
                User {
                    id: me.id(),
                    name: Arc::clone(&name),
                    identity: Arc::clone(&identity),
                    sender: conn.sender.clone(),
                },
            );
            let room_names: Vec<Arc<str>> = rooms.keys().cloned().collect();
            state.sessions.insert(me.id(), Named { key, rooms });
            (name, room_names, state.counts())
        };
        if let Some(old) = replaced {
            old.close_now(CloseReason::new(
                REPLACED,
                "Signed in again from another connection",
            ));
        }
        for outbox in outboxes {
            outbox.drain(&self.inner.hub);
        }
        self.reply(
            me,
            &Event::Welcome {
                name: &name,
                id: me.id().0,
                token: &token,
                instance: &self.inner.instance,
                rooms: rooms.iter().map(|r| &**r).collect(),
                limits: self.inner.options.limits(),
            },
        );
        conn.name = Some(name);
        conn.identity = Some(identity);
        self.directory_changed();
        gauges(counts);
        Ok(())
    }

    fn join(
        &self,
        conn: &Connection,
        room: &str,
        since: Option<&str>,
        epoch: Option<&str>,
    ) -> Result<(), Problem> {
        let own_epoch = &self.inner.instance;
        let me = &conn.me;
        let room: Arc<str> = Arc::from(protocol::check_room(room)?);
        let options = &self.inner.options;
        let (outbox, changed) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let named = state
                .sessions
                .get_mut(&me.id())
                .ok_or_else(not_identified)?;
            if let Some(synced) = named.rooms.get_mut(&room) {
                // Joining again: the member list, but the history only if
                // this connection has not had it (a take-over).
                let r = state.rooms.get(&room).expect("a member's room is kept");
                let (history, recovered) = if *synced {
                    // This connection has had every message since.
                    (Vec::new(), since.map(|_| true))
                } else {
                    r.history_for(since, epoch, own_epoch)
                };
                *synced = true;
                r.outbox.push(Outgoing::Joined {
                    to: Arc::clone(me),
                    epoch: Arc::clone(own_epoch),
                    recovered,
                    members: r.member_names(),
                    history,
                    subscribe: false,
                });
                (Arc::clone(&r.outbox), None)
            } else {
                if named.rooms.len() >= options.max_rooms_per_user {
                    return Err(Problem::new(
                        ErrorCode::TooManyRooms,
                        format!(
                            "You can be in at most {} rooms; leave one first",
                            options.max_rooms_per_user
                        ),
                    )
                    .room(&room));
                }
                let key = named.key.clone();
                let name = conn.name.clone().ok_or_else(not_identified)?;
                match state.rooms.get(&room) {
                    Some(r) if r.members.len() >= options.max_members_per_room => {
                        return Err(Problem::new(
                            ErrorCode::RoomFull,
                            format!(
                                "#{room} has {} members already, as many as a room may have",
                                r.members.len()
                            ),
                        )
                        .room(&room));
                    }
                    Some(_) => {}
                    None => {
                        if state.rooms.len() >= options.max_total_rooms {
                            let Some(oldest) = state.oldest_idle() else {
                                return Err(Problem::new(
                                    ErrorCode::ServerRoomsFull,
                                    format!(
                                        "The server has {} rooms in use, as many as it keeps; \
                                         join one of them",
                                        state.rooms.len()
                                    ),
                                )
                                .room(&room));
                            };
                            state.forget(&oldest);
                        }
                        let outbox = state.outbox_for(&room);
                        state.rooms.insert(Arc::clone(&room), Room::new(outbox));
                    }
                }
                state
                    .sessions
                    .get_mut(&me.id())
                    .expect("looked up above")
                    .rooms
                    .insert(Arc::clone(&room), true);
                let r = state.rooms.get_mut(&room).expect("made above");
                r.members.insert(key, (me.id(), Arc::clone(&name)));
                let (history, recovered) = r.history_for(since, epoch, own_epoch);
                r.outbox.push(Outgoing::Joined {
                    to: Arc::clone(me),
                    epoch: Arc::clone(own_epoch),
                    recovered,
                    members: r.member_names(),
                    history,
                    subscribe: true,
                });
                r.outbox.push(Outgoing::Presence {
                    event: "join",
                    name,
                    count: r.members.len(),
                });
                (Arc::clone(&r.outbox), Some(state.counts()))
            }
        };
        outbox.drain(&self.inner.hub);
        if let Some(counts) = changed {
            self.directory_changed();
            gauges(counts);
        }
        Ok(())
    }

    fn leave(&self, conn: &Connection, room: &str) -> Result<(), Problem> {
        let me = &conn.me;
        let room = protocol::check_room(room)?;
        let (outbox, counts) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let named = state
                .sessions
                .get_mut(&me.id())
                .ok_or_else(not_identified)?;
            if named.rooms.remove(room.as_str()).is_none() {
                return Err(not_in_room(&room));
            }
            let key = named.key.clone();
            let outbox = state.rooms.get(room.as_str()).map(|r| {
                r.outbox.push(Outgoing::Left(Arc::clone(me)));
                Arc::clone(&r.outbox)
            });
            self.left(state, &key, &room);
            (outbox, state.counts())
        };
        if let Some(outbox) = outbox {
            outbox.drain(&self.inner.hub);
        }
        self.directory_changed();
        gauges(counts);
        Ok(())
    }

    /// Takes the member `key` out of `room` and tells the others.
    fn left(&self, state: &mut ChatState, key: &str, room: &str) {
        if let Some(r) = state.rooms.get_mut(room)
            && let Some((_, name)) = r.members.remove(key)
        {
            r.outbox.push(Outgoing::Presence {
                event: "leave",
                name,
                count: r.members.len(),
            });
        }
        state.tidy(room, self.inner.options.max_idle_rooms);
    }

    fn say(&self, conn: &Connection, room: &str, text: &str) -> Result<(), Problem> {
        let me = &conn.me;
        let options = &self.inner.options;
        let name = conn.name.as_deref().ok_or_else(not_identified)?;
        let room = protocol::check_room(room)?;
        let text = protocol::check_text(text, options.max_text_chars, options.max_text_bytes)
            .map_err(|p| p.room(&room))?;
        let tail: Arc<str> = Arc::from(protocol::line_tail(&room, name, &text, now_ms()));
        let outbox = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let named = state.sessions.get(&me.id()).ok_or_else(not_identified)?;
            if !named.rooms.contains_key(room.as_str()) {
                return Err(not_in_room(&room));
            }
            state.clock += 1;
            let clock = state.clock;
            let r = state
                .rooms
                .get_mut(room.as_str())
                .expect("a member's room is kept");
            r.last = r.last.next(now_ms());
            let line = Line { id: r.last, tail };
            r.last_active = clock;
            r.outbox.push(Outgoing::Line(line.clone()));
            r.remember(line, options.history, options.history_bytes);
            Arc::clone(&r.outbox)
        };
        outbox.drain(&self.inner.hub);
        metrics::counter!("duplex_chat_messages_total", "kind" => "room").increment(1);
        Ok(())
    }

    fn direct(&self, conn: &Connection, to: &str, text: &str) -> Result<(), Problem> {
        let me = &conn.me;
        let options = &self.inner.options;
        let from = conn.name.clone().ok_or_else(not_identified)?;
        let identity = conn.identity.clone().ok_or_else(not_identified)?;
        let text = protocol::check_text(text, options.max_text_chars, options.max_text_bytes)?;
        let to_key = protocol::check_name(to).map(|to| protocol::name_key(&to));
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(user) = to_key.as_ref().ok().and_then(|k| state.users.get(k)) else {
            return Err(Problem::new(
                ErrorCode::UnknownUser,
                format!("Nobody called {} is here", to.trim()),
            ));
        };
        if user.id == me.id() || user.identity == identity {
            return Err(Problem::new(
                ErrorCode::InvalidRecipient,
                "A direct message goes to someone else",
            ));
        }
        let (recipient, recipient_name) = (user.id, Arc::clone(&user.name));
        let recipient_identity = Arc::clone(&user.identity);
        let from_key = state
            .sessions
            .get(&me.id())
            .map(|named| named.key.clone())
            .ok_or_else(not_identified)?;
        state.clock += 1;
        let clock = state.clock;
        let key = pair_key(&identity, &recipient_identity);
        let names = if key.0 == *identity {
            [from_key, to_key.unwrap_or_default()]
        } else {
            [to_key.unwrap_or_default(), from_key]
        };
        let max_pairs = options.max_total_rooms;
        if !state.pairs.contains_key(&key) && state.pairs.len() >= max_pairs {
            // The least recently used pair goes: the cap bounds memory.
            if let Some(oldest) = state
                .pairs
                .iter()
                .min_by_key(|(_, p)| p.last_active)
                .map(|(k, _)| k.clone())
                && let Some(gone) = state.pairs.remove(&oldest)
            {
                state.forget_contacts(&oldest, &gone.names);
            }
        }
        if let Some(before) = state.pairs.get(&key).map(|p| p.names.clone()) {
            state.forget_contacts(&key, &before);
        }
        state
            .contacts
            .insert((key.0.clone(), names[1].clone()), key.1.clone());
        state
            .contacts
            .insert((key.1.clone(), names[0].clone()), key.0.clone());
        let pair = state.pairs.entry(key).or_default();
        pair.last = pair.last.next(now_ms());
        pair.last_active = clock;
        pair.names = names;
        let line = DirectLine {
            id: pair.last.to_string(),
            from: from.to_string(),
            to: recipient_name.to_string(),
            text,
            ts: now_ms(),
        };
        let kept: Arc<str> = Arc::from(serde_json::to_string(&line).expect("a line serializes"));
        let message = protocol::dm_event(&kept);
        pair.remember(pair.last, kept, options.history, options.history_bytes);
        // Sent under the lock (queueing only): the two see a pair's
        // messages in the order of its ids.
        self.inner.hub.send_to(recipient, message.clone());
        self.inner.hub.send_to(me.id(), message);
        drop(guard);
        metrics::counter!("duplex_chat_messages_total", "kind" => "direct").increment(1);
        Ok(())
    }

    fn dm_history(
        &self,
        conn: &Connection,
        with: &str,
        since: Option<&str>,
        epoch: Option<&str>,
    ) -> Result<(), Problem> {
        let identity = conn.identity.clone().ok_or_else(not_identified)?;
        let with = protocol::check_name(with)?;
        let with_key = protocol::name_key(&with);
        let own_epoch = &self.inner.instance;
        let (lines, recovered) = {
            let state = self.lock();
            // The name's holder, or if nobody holds it, whoever last had
            // it in a conversation of the caller's: only the caller's own
            // conversations are ever read.
            let peer = match state.users.get(&with_key) {
                Some(user) => Some(Arc::clone(&user.identity)),
                None => state.last_peer_named(&identity, &with_key),
            };
            let pair = peer
                .filter(|peer| *peer != identity)
                .and_then(|peer| state.pairs.get(&pair_key(&identity, &peer)));
            match pair {
                Some(pair) => pair.history_for(since, epoch, own_epoch),
                None => (Vec::new(), since.map(|_| false)),
            }
        };
        let answer = protocol::dm_history(&with, own_epoch, recovered, lines.iter().map(|l| &**l));
        self.inner.hub.send_to(conn.me.id(), answer);
        Ok(())
    }

    /// The end of a connection: it leaves its rooms and frees its name.
    fn disconnect(&self, me: &Membership) {
        let mut outboxes = Vec::new();
        let counts = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(named) = state.sessions.remove(&me.id()) else {
                return;
            };
            if state.users.get(&named.key).is_some_and(|u| u.id == me.id()) {
                state.users.remove(&named.key);
            }
            for room in named.rooms.keys() {
                if let Some(r) = state.rooms.get(room) {
                    outboxes.push(Arc::clone(&r.outbox));
                }
                self.left(state, &named.key, room);
            }
            state.counts()
        };
        // The hub membership goes with the connection: no need to leave
        // the topics one by one.
        for outbox in outboxes {
            outbox.drain(&self.inner.hub);
        }
        self.directory_changed();
        gauges(counts);
    }
}

/// The key of two people's direct messages: their identities
/// ([`protocol::identity`]), sorted.
fn pair_key(a: &str, b: &str) -> (String, String) {
    let (a, b) = (a.to_owned(), b.to_owned());
    if a <= b { (a, b) } else { (b, a) }
}

/// The token a `hello` proves its identity with, and that identity: the
/// one it gave if it has a token's shape, else a new one.
fn identify(token: Option<&str>) -> (String, Arc<str>) {
    let token = token
        .filter(|t| protocol::is_token(t))
        .map_or_else(|| random_hex(protocol::TOKEN_HEX_DIGITS / 2), str::to_owned);
    let identity = Arc::from(protocol::identity(&token));
    (token, identity)
}

impl Pair {
    /// Keeps a line, then drops the oldest until within both budgets.
    fn remember(&mut self, id: StreamId, json: Arc<str>, max_lines: usize, max_bytes: usize) {
        let cost = json.len() + 1;
        if max_lines == 0 || cost > max_bytes {
            return;
        }
        self.bytes += cost;
        self.lines.push_back((id, json));
        while self.lines.len() > max_lines || self.bytes > max_bytes {
            let Some((_, old)) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.len() + 1;
        }
    }

    /// As [`Room::history_for`], for `dm_history`.
    fn history_for(
        &self,
        since: Option<&str>,
        epoch: Option<&str>,
        own_epoch: &str,
    ) -> (Vec<Arc<str>>, Option<bool>) {
        let snapshot = || {
            let skip = self.lines.len().saturating_sub(SNAPSHOT_MAX);
            self.lines
                .iter()
                .skip(skip)
                .map(|(_, j)| Arc::clone(j))
                .collect()
        };
        let Some(since) = since else {
            return (snapshot(), None);
        };
        let found = StreamId::parse(since)
            .filter(|_| epoch == Some(own_epoch))
            .and_then(|id| self.lines.iter().position(|(i, _)| *i == id));
        match found {
            Some(at) => (
                self.lines
                    .iter()
                    .skip(at + 1)
                    .map(|(_, j)| Arc::clone(j))
                    .collect(),
                Some(true),
            ),
            None => (snapshot(), Some(false)),
        }
    }
}

fn not_identified() -> Problem {
    Problem::new(
        ErrorCode::NotIdentified,
        "Say hello with a name first: {\"type\":\"hello\",\"name\":\"…\"}",
    )
}

fn not_in_room(room: &str) -> Problem {
    Problem::new(ErrorCode::NotInRoom, format!("You are not in #{room}")).room(room)
}
