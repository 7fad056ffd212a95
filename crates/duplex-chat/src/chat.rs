//! The chat of the browser page: the JSON protocol of `/chat` over the
//! [`Hub`] (rooms are hub topics, direct messages go by session id).
//!
//! Names, rooms, presence and history are kept here, in one [`ChatState`]
//! behind a mutex. Every change and the messages it causes happen under that
//! lock; since the hub never waits, the lock is short, and everybody sees
//! the events of a room in the same order as its history.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, Once, PoisonError, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use duplex::{CloseReason, Hub, Membership, Message, Session, SessionId, SlowConsumer};
use tokio::sync::Notify;

use crate::protocol::{
    self, ChatLine, DirectLine, ErrorCode, Event, Limits, MAX_NAME_CHARS, Problem, Request,
    RoomInfo,
};

/// The chat's limits; see `duplex-chat --help`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatOptions {
    /// Messages of a room kept and sent on joining it. Default 50.
    pub history: usize,
    /// Longest message text, in characters. Default 2000.
    pub max_text_chars: usize,
    /// Requests per second a connection may send on average; 0 turns the
    /// limit off. Default 5.
    pub rate: f64,
    /// Requests a connection may send at once. Default 10.
    pub burst: u32,
    /// Rooms one connection may be in. Default 20.
    pub max_rooms_per_user: usize,
    /// Empty rooms whose history is kept; beyond that the least recently
    /// used is forgotten. Default 256.
    pub max_idle_rooms: usize,
}

impl Default for ChatOptions {
    fn default() -> Self {
        ChatOptions {
            history: 50,
            max_text_chars: 2000,
            rate: 5.0,
            burst: 10,
            max_rooms_per_user: 20,
            max_idle_rooms: 256,
        }
    }
}

impl ChatOptions {
    /// The largest request read: room for the longest text with every
    /// character escaped, and the other fields.
    pub fn max_request_bytes(&self) -> usize {
        self.max_text_chars.saturating_mul(6).saturating_add(1024)
    }

    fn limits(&self) -> Limits {
        Limits {
            name_chars: MAX_NAME_CHARS,
            text_chars: self.max_text_chars,
            rate: self.rate,
            burst: self.burst,
            rooms: self.max_rooms_per_user,
            history: self.history,
        }
    }
}

/// The most rooms and names a `directory` lists.
pub const DIRECTORY_MAX: usize = 500;

/// How long directory changes are gathered before one `directory` goes out:
/// a crowd arriving at once costs a few broadcasts, not one per arrival.
const DIRECTORY_DELAY: Duration = Duration::from_millis(200);

/// The close code sent to a connection whose name was taken over by a newer
/// connection of the same client (one that sent the `welcome` token).
pub const REPLACED: u16 = 4001;

/// The chat: cheap to clone, one per server.
#[derive(Clone)]
pub struct Chat {
    inner: Arc<ChatInner>,
}

struct ChatInner {
    hub: Hub,
    options: ChatOptions,
    instance: String,
    state: Mutex<ChatState>,
    directory_dirty: AtomicBool,
    directory_wake: Arc<Notify>,
    directory_task: Once,
}

#[derive(Default)]
struct ChatState {
    /// Names in use, by lowercased name.
    users: HashMap<String, User>,
    /// Connections that have a name.
    sessions: HashMap<SessionId, Named>,
    rooms: HashMap<String, Room>,
    /// The id of the last message, and the clock of room activity.
    last_id: u64,
}

struct User {
    id: SessionId,
    name: String,
    token: String,
    sender: duplex::Sender,
}

struct Named {
    name: String,
    rooms: BTreeSet<String>,
}

#[derive(Default)]
struct Room {
    members: BTreeMap<SessionId, String>,
    history: VecDeque<ChatLine>,
    last_active: u64,
}

impl Room {
    fn member_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.members.values().map(String::as_str).collect();
        names.sort_by_cached_key(|n| (n.to_lowercase(), n.to_string()));
        names
    }
}

impl ChatState {
    /// The `directory` event: rooms and names, at most [`DIRECTORY_MAX`]
    /// of each (the fullest rooms, the first names in order).
    fn directory(&self) -> Message {
        let mut rooms: Vec<RoomInfo> = self
            .rooms
            .iter()
            .map(|(name, room)| RoomInfo {
                name: name.clone(),
                members: room.members.len(),
            })
            .collect();
        if rooms.len() > DIRECTORY_MAX {
            rooms.sort_by(|a, b| b.members.cmp(&a.members).then_with(|| a.name.cmp(&b.name)));
            rooms.truncate(DIRECTORY_MAX);
        }
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        let mut users: Vec<&str> = self.users.values().map(|u| u.name.as_str()).collect();
        users.sort_by_cached_key(|n| (n.to_lowercase(), n.to_string()));
        users.truncate(DIRECTORY_MAX);
        Event::Directory {
            rooms,
            users,
            online: self.users.len(),
        }
        .to_message()
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
            self.rooms.remove(room);
            return;
        }
        let idle: Vec<(&String, u64)> = self
            .rooms
            .iter()
            .filter(|(_, r)| r.members.is_empty())
            .map(|(name, r)| (name, r.last_active))
            .collect();
        if idle.len() <= max_idle {
            return;
        }
        if let Some(oldest) = idle
            .into_iter()
            .min_by_key(|&(_, active)| active)
            .map(|(name, _)| name.clone())
        {
            self.rooms.remove(&oldest);
        }
    }

    fn gauges(&self) {
        metrics::gauge!("duplex_chat_users").set(self.users.len() as f64);
        metrics::gauge!("duplex_chat_rooms").set(self.rooms.len() as f64);
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
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
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
}

/// One connection: its hub membership, its rate limit. Dropping it (the
/// handler ends, even by panic) leaves every room and frees the name.
struct Connection {
    chat: Chat,
    me: Membership,
    sender: duplex::Sender,
    bucket: TokenBucket,
    quiet_until: Option<Instant>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.chat.disconnect(&self.me);
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
        let hub = Hub::builder()
            .slow_consumer(SlowConsumer::Close(duplex::CloseCode::TRY_AGAIN_LATER))
            .build();
        Chat {
            inner: Arc::new(ChatInner {
                hub,
                options,
                instance: random_hex(6),
                state: Mutex::new(ChatState::default()),
                directory_dirty: AtomicBool::new(false),
                directory_wake: Arc::new(Notify::new()),
                directory_task: Once::new(),
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

    /// Marks the directory as changed; it goes out to everyone shortly.
    fn directory_changed(&self) {
        self.inner.directory_dirty.store(true, Ordering::Release);
        self.inner.directory_wake.notify_one();
    }

    /// Broadcasts the directory after changes, at most once per
    /// [`DIRECTORY_DELAY`]. Ends once the chat is gone.
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
                let directory = chat.lock().directory();
                chat.inner.hub.broadcast(directory);
            }
        }
    }

    /// Serves one `/chat` connection until it ends.
    pub async fn serve(self, mut session: Session) {
        self.inner.directory_task.call_once(|| {
            tokio::spawn(Chat::publish_directory(
                Arc::downgrade(&self.inner),
                Arc::clone(&self.inner.directory_wake),
            ));
        });
        let options = &self.inner.options;
        let mut conn = Connection {
            me: self.inner.hub.register(&session.sender()),
            sender: session.sender(),
            bucket: TokenBucket::new(options.rate, options.burst),
            quiet_until: None,
            chat: self.clone(),
        };
        {
            let state = self.lock();
            self.inner.hub.send_to(conn.me.id(), state.directory());
        }
        loop {
            match session.recv().await {
                Ok(Some(message)) => self.receive(&mut conn, message),
                Ok(None) => break,
                Err(err) => {
                    tracing::debug!("chat session {} ended: {err}", conn.me.id());
                    break;
                }
            }
        }
    }

    fn reply(&self, me: &Membership, event: &Event<'_>) {
        self.inner.hub.send_to(me.id(), event.to_message());
    }

    fn refuse(&self, me: &Membership, problem: &Problem) {
        metrics::counter!("duplex_chat_errors_total", "code" => problem.code.as_str()).increment(1);
        self.reply(me, &Event::Error(problem));
    }

    fn receive(&self, conn: &mut Connection, message: Message) {
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
        if let Err(mut problem) = self.handle(conn, request) {
            if problem.request.is_none() {
                problem.request = Some(kind.to_owned());
            }
            self.refuse(&conn.me, &problem);
        }
    }

    fn handle(&self, conn: &Connection, request: Request) -> Result<(), Problem> {
        let me = &conn.me;
        match request {
            Request::Hello { name, token } => self.hello(conn, &name, token.as_deref()),
            Request::Ping { id } => {
                self.reply(me, &Event::Pong { id });
                Ok(())
            }
            Request::Join { room } => self.join(me, &room),
            Request::Leave { room } => self.leave(me, &room),
            Request::Message { room, text } => self.say(me, &room, &text),
            Request::Dm { to, text } => self.direct(me, &to, &text),
        }
    }

    fn hello(&self, conn: &Connection, name: &str, token: Option<&str>) -> Result<(), Problem> {
        let me = &conn.me;
        let mut state = self.lock();
        let state = &mut *state;
        if let Some(named) = state.sessions.get(&me.id()) {
            return Err(Problem::new(
                ErrorCode::AlreadyIdentified,
                format!("This connection is already {}", named.name),
            ));
        }
        let mut name = protocol::check_name(name)?;
        let key = name.to_lowercase();
        let mut rooms = BTreeSet::new();
        if let Some(user) = state.users.get(&key) {
            let reclaim = token.is_some_and(|t| !t.is_empty() && t == user.token);
            if !reclaim {
                return Err(Problem::new(
                    ErrorCode::NameTaken,
                    format!("{} is already in use; pick another name", user.name),
                ));
            }
            // The same client again (a reconnect that came before the old
            // connection was seen gone): the new connection takes over its
            // name and rooms, without leave and join notices.
            let old = state.users.remove(&key).expect("present");
            // Others know the name as it was: keep it so.
            name.clone_from(&old.name);
            old.sender.close_now(CloseReason::new(
                REPLACED,
                "Signed in again from another connection",
            ));
            if let Some(named) = state.sessions.remove(&old.id) {
                for room in &named.rooms {
                    if let Some(r) = state.rooms.get_mut(room) {
                        r.members.remove(&old.id);
                        r.members.insert(me.id(), name.clone());
                    }
                    me.join(room);
                }
                rooms = named.rooms;
            }
        }
        let token = random_hex(16);
        state.users.insert(
            key,
            User {
                id: me.id(),
                name: name.clone(),
                token: token.clone(),
                sender: conn.sender.clone(),
            },
        );
        state.sessions.insert(
            me.id(),
            Named {
                name: name.clone(),
                rooms: rooms.clone(),
            },
        );
        self.reply(
            me,
            &Event::Welcome {
                name: &name,
                id: me.id().0,
                token: &token,
                instance: &self.inner.instance,
                rooms: rooms.iter().map(String::as_str).collect(),
                limits: self.inner.options.limits(),
            },
        );
        self.directory_changed();
        state.gauges();
        Ok(())
    }

    fn join(&self, me: &Membership, room: &str) -> Result<(), Problem> {
        let room = protocol::check_room(room)?;
        let mut guard = self.lock();
        let state = &mut *guard;
        let named = state
            .sessions
            .get_mut(&me.id())
            .ok_or_else(not_identified)?;
        let already = named.rooms.contains(&room);
        if !already && named.rooms.len() >= self.inner.options.max_rooms_per_user {
            return Err(Problem::new(
                ErrorCode::TooManyRooms,
                format!(
                    "You can be in at most {} rooms; leave one first",
                    self.inner.options.max_rooms_per_user
                ),
            )
            .room(&room));
        }
        named.rooms.insert(room.clone());
        let name = named.name.clone();
        let r = state.rooms.entry(room.clone()).or_default();
        r.members.insert(me.id(), name.clone());
        me.join(&room);
        self.reply(
            me,
            &Event::Joined {
                room: &room,
                members: r.member_names(),
                history: &r.history,
            },
        );
        if !already {
            let presence = Event::Presence {
                room: &room,
                event: "join",
                name: &name,
                count: r.members.len(),
            };
            self.inner.hub.publish(&room, presence.to_message());
            self.directory_changed();
            state.gauges();
        }
        Ok(())
    }

    fn leave(&self, me: &Membership, room: &str) -> Result<(), Problem> {
        let room = protocol::check_room(room)?;
        let mut guard = self.lock();
        let state = &mut *guard;
        let named = state
            .sessions
            .get_mut(&me.id())
            .ok_or_else(not_identified)?;
        if !named.rooms.remove(&room) {
            return Err(not_in_room(&room));
        }
        let name = named.name.clone();
        me.leave(&room);
        self.reply(me, &Event::Left { room: &room });
        self.left(state, me.id(), &room, &name);
        self.directory_changed();
        state.gauges();
        Ok(())
    }

    /// Takes `id` out of `room` and tells the others.
    fn left(&self, state: &mut ChatState, id: SessionId, room: &str, name: &str) {
        if let Some(r) = state.rooms.get_mut(room) {
            r.members.remove(&id);
            let presence = Event::Presence {
                room,
                event: "leave",
                name,
                count: r.members.len(),
            };
            self.inner.hub.publish(room, presence.to_message());
        }
        state.tidy(room, self.inner.options.max_idle_rooms);
    }

    fn say(&self, me: &Membership, room: &str, text: &str) -> Result<(), Problem> {
        let room = protocol::check_room(room)?;
        let text = protocol::check_text(text, self.inner.options.max_text_chars)
            .map_err(|p| p.room(&room))?;
        let mut guard = self.lock();
        let state = &mut *guard;
        let named = state.sessions.get(&me.id()).ok_or_else(not_identified)?;
        if !named.rooms.contains(&room) {
            return Err(not_in_room(&room));
        }
        state.last_id += 1;
        let line = ChatLine {
            id: state.last_id,
            room: room.clone(),
            from: named.name.clone(),
            text,
            ts: now_ms(),
        };
        let r = state.rooms.entry(room.clone()).or_default();
        r.last_active = line.id;
        self.inner
            .hub
            .publish(&room, Event::Message(&line).to_message());
        let keep = self.inner.options.history;
        if keep > 0 {
            if r.history.len() >= keep {
                r.history.pop_front();
            }
            r.history.push_back(line);
        }
        metrics::counter!("duplex_chat_messages_total", "kind" => "room").increment(1);
        Ok(())
    }

    fn direct(&self, me: &Membership, to: &str, text: &str) -> Result<(), Problem> {
        let text = protocol::check_text(text, self.inner.options.max_text_chars)?;
        let mut guard = self.lock();
        let state = &mut *guard;
        let named = state.sessions.get(&me.id()).ok_or_else(not_identified)?;
        let Some(user) = state.users.get(&to.trim().to_lowercase()) else {
            return Err(Problem::new(
                ErrorCode::UnknownUser,
                format!("Nobody called {} is here", to.trim()),
            ));
        };
        if user.id == me.id() {
            return Err(Problem::new(
                ErrorCode::InvalidRecipient,
                "A direct message goes to someone else",
            ));
        }
        state.last_id += 1;
        let line = DirectLine {
            id: state.last_id,
            from: named.name.clone(),
            to: user.name.clone(),
            text,
            ts: now_ms(),
        };
        let message = Event::Dm(&line).to_message();
        self.inner.hub.send_to(user.id, message.clone());
        self.inner.hub.send_to(me.id(), message);
        metrics::counter!("duplex_chat_messages_total", "kind" => "direct").increment(1);
        Ok(())
    }

    /// The end of a connection: it leaves its rooms and frees its name.
    fn disconnect(&self, me: &Membership) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(named) = state.sessions.remove(&me.id()) else {
            return;
        };
        let key = named.name.to_lowercase();
        if state.users.get(&key).is_some_and(|u| u.id == me.id()) {
            state.users.remove(&key);
        }
        for room in &named.rooms {
            me.leave(room);
            self.left(state, me.id(), room, &named.name);
        }
        self.directory_changed();
        state.gauges();
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
