//! The chat on several nodes: names, rooms, presence, direct messages and
//! history shared through Redis.
//!
//! What lives where (keys under the prefix `P`, `duplex-chat` by default):
//!
//! - `P:name:<key>`: who holds a name (by [`protocol::name_key`]),
//!   `node \n identity \n Name`, expiring [`TTL`] after its node last
//!   refreshed it: a name is unique across every node, and a dead node's
//!   names free themselves. The identity is [`protocol::identity`] of the
//!   holder's token, never the token.
//! - `P:s:<room>`: the room's stream, one entry per message (`t`: the line
//!   as sent after its id, `p`: the id of the entry before it), trimmed to
//!   `--history` entries; `P:meta:<room>` holds its `last` id and its
//!   `epoch`. A lost stream (Redis restarted without persistence) gets a
//!   new epoch with its next write.
//! - `P:m:<room>`, `P:online`, `P:rooms`: sorted sets of `node \n Name` (of
//!   rooms, for `P:rooms`) scored by when the entry expires; every node
//!   refreshes its own every [`BEAT`], so the users of a node that died
//!   drop out of every list within [`TTL`] plus a beat.
//! - `P:ds:<a>|<b>`, `P:dmeta:<a>|<b>`: a pair's direct messages, as rooms,
//!   by the two identities (sorted). A pair that never wrote has neither:
//!   `P:depoch` is the epoch the next pair to write will take (one key for
//!   every pair, replaced each time a pair takes it). `P:dc` maps `identity \n name key` to the identity its
//!   last conversation with that name was with, for `dm_history` with a
//!   name nobody holds; `P:dcu` orders its fields by use, and the two are
//!   capped at twice `--max-total-rooms` fields.
//! - `P:kept`, `P:dkept`: the rooms and pairs with a stream, by when last
//!   used; beyond `--max-total-rooms` of either, the least recently used
//!   one nobody is in (a room whose `P:m:` set has a live entry is in use;
//!   a pair never is) is forgotten with its epoch. Only a join of a new
//!   room or a pair's first message makes a stream, within the
//!   connection's and its address's allowance of new streams.
//!
//! Every write that others must see is one Lua script that changes the
//! data and publishes the change (`P:r:<room>` for a room, `P:d` for direct
//! messages, `P:c` for take-overs): Redis runs it at once, so the order of
//! the publications is the order of the stream. Each node subscribes to
//! all of them on one connection and hands each room's lines to its local
//! members through the room's outbox, in stream order, once each: a line
//! whose `p` is not the last one delivered means the subscription missed
//! some (it was reconnecting), and the node reads them from the stream
//! before going on; only what the stream no longer holds is reported, as a
//! `gap` event.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError, Weak,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use duplex::{CloseReason, Hub, Membership, Message, SessionId};
use futures_util::StreamExt;
use redis::{
    AsyncCommands, Client, RedisError, RedisResult, Script, Value,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{
    Connection, DIRECTORY_MAX, Line, Outbox, Outgoing, REPLACED, SNAPSHOT_MAX, TokenBucket, gauges,
    not_identified, not_in_room, now_ms, random_hex,
};
use crate::ChatOptions;
use crate::protocol::{self, ErrorCode, Event, Problem, RoomInfo, StreamId};

/// How long a name, a membership or a presence entry lives after its node
/// last refreshed it.
pub const TTL: Duration = Duration::from_secs(8);

/// How often a node refreshes its entries and looks for members that
/// expired elsewhere.
pub const BEAT: Duration = Duration::from_secs(2);

/// How often Redis is PINGed; two unanswered in a row mark it down.
pub const HEALTH_PERIOD: Duration = Duration::from_secs(1);

/// How long a request waits for Redis before it gets `unavailable`.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the subscription may go without hearing its own probe before
/// it is replaced (a subscription can die silently, for example after a
/// failover).
const PROBE_DEADLINE: Duration = Duration::from_secs(5);

/// How often the directory is read from Redis.
const DIRECTORY_PERIOD: Duration = Duration::from_secs(1);

/// Lines of a room kept by a node for joiners racing the subscription.
const RECENT_LINES: usize = 16;

/// How a node reaches Redis.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://HOST:PORT/` (or `rediss://`, `redis+unix://`).
    pub url: String,
    /// The prefix of every key and channel: nodes with the same prefix on
    /// the same Redis are one chat.
    pub prefix: String,
    /// This node's id in presence entries; random when `None`.
    pub node_id: Option<String>,
    /// Keep trying to reach Redis at start rather than failing.
    pub retry: bool,
    /// Streams one connection may start a second on average (a join of a
    /// room Redis has no stream of and nobody is in, a first direct
    /// message to someone); 0 turns the limit off. Default 0.5.
    pub new_streams_rate: f64,
    /// Streams one connection may start at once. Default 20, as many
    /// rooms as a connection may be in.
    pub new_streams_burst: u32,
    /// Streams the connections of one address (of an IPv6 /64) may start a
    /// second on average; 0 turns the limit off. Default 2.
    pub new_streams_rate_per_address: f64,
    /// Streams the connections of one address may start at once. Default
    /// 100.
    pub new_streams_burst_per_address: u32,
}

impl RedisOptions {
    /// The default [`RedisOptions::new_streams_rate`].
    pub const NEW_STREAMS_RATE: f64 = 0.5;
    /// The default [`RedisOptions::new_streams_burst`].
    pub const NEW_STREAMS_BURST: u32 = 20;
    /// The default [`RedisOptions::new_streams_rate_per_address`].
    pub const NEW_STREAMS_RATE_PER_ADDRESS: f64 = 2.0;
    /// The default [`RedisOptions::new_streams_burst_per_address`].
    pub const NEW_STREAMS_BURST_PER_ADDRESS: u32 = 100;

    /// Options for the Redis at `url`, with the default prefix, a random
    /// node id and the default allowances of new streams.
    pub fn new(url: String) -> RedisOptions {
        RedisOptions {
            url,
            prefix: "duplex-chat".to_owned(),
            node_id: None,
            retry: false,
            new_streams_rate: Self::NEW_STREAMS_RATE,
            new_streams_burst: Self::NEW_STREAMS_BURST,
            new_streams_rate_per_address: Self::NEW_STREAMS_RATE_PER_ADDRESS,
            new_streams_burst_per_address: Self::NEW_STREAMS_BURST_PER_ADDRESS,
        }
    }
}

/// Addresses whose allowance of new streams is remembered; beyond, those
/// whose allowance is whole again are forgotten, and while none is, a
/// new address starts no stream.
const NEW_STREAM_ADDRESSES: usize = 65_536;

/// How many streams a connection, and an address, may start.
#[derive(Debug, Clone, Copy)]
struct NewStreams {
    rate: f64,
    burst: u32,
    rate_per_address: f64,
    burst_per_address: u32,
}

/// The Redis side of a chat: one per node.
pub(super) struct Cluster {
    node: Arc<str>,
    keys: Keys,
    hub: Hub,
    options: ChatOptions,
    client: Client,
    commands: ConnectionManager,
    state: Mutex<ClusterState>,
    up: AtomicBool,
    directory: Mutex<Message>,
    directory_dirty: AtomicBool,
    probes_seen: AtomicU64,
    scripts: Scripts,
    says: mpsc::Sender<Say>,
    new_streams: NewStreams,
}

/// A room message on its way to Redis.
struct Say {
    room: String,
    tail: String,
    from: SessionId,
    /// When it was queued: past [`REQUEST_TIMEOUT`] it is refused rather
    /// than written late.
    queued: Instant,
    _permit: OwnedSemaphorePermit,
}

/// Room messages one connection may have on their way to Redis; more wait.
pub(super) const SAYS_IN_FLIGHT: usize = 32;

/// Room messages queued for Redis on a node; more wait.
const SAYS_QUEUED: usize = 4096;

/// Room messages sent to Redis in one round trip at most.
const SAYS_BATCH: usize = 256;

#[derive(Default)]
struct ClusterState {
    /// Names held by connections of this node, by [`protocol::name_key`].
    users: HashMap<String, LocalUser>,
    /// Connections of this node that have a name.
    sessions: HashMap<SessionId, Named>,
    /// Rooms with members on this node.
    rooms: HashMap<Arc<str>, ClusterRoom>,
    retired: HashMap<Arc<str>, Weak<Outbox>>,
    /// Each address's allowance of new streams ([`NEW_STREAM_ADDRESSES`]
    /// at most).
    new_streams: HashMap<std::net::IpAddr, TokenBucket>,
}

struct LocalUser {
    id: SessionId,
    /// What `P:name:<key>` holds while this connection has the name.
    value: String,
    sender: duplex::Sender,
}

struct Named {
    key: String,
    name: Arc<str>,
    /// The rooms it is in, and whether it has had their history.
    rooms: BTreeMap<Arc<str>, bool>,
    /// Its allowance of new streams, and the address that shares one.
    new_streams: TokenBucket,
    addr: Option<std::net::IpAddr>,
}

struct ClusterRoom {
    /// Everyone in the room on any node, as this node knows it: by
    /// lowercased name, the name and the nodes it is in the room from.
    members: BTreeMap<String, (Arc<str>, BTreeSet<Arc<str>>)>,
    /// Members on this node.
    local: usize,
    /// The id of the last line handed to the outbox.
    delivered: StreamId,
    epoch: Arc<str>,
    /// The last lines handed to the outbox, for joiners whose snapshot
    /// came before them.
    recent: VecDeque<Line>,
    /// When presence last changed by a published event: a presence read
    /// older than that is stale.
    changed: Instant,
    /// Joins under way on this node.
    joining: usize,
    /// Until the first join's answer: the lines published meanwhile, with
    /// the id before each.
    pending: Option<Vec<(StreamId, Line)>>,
    /// Members of other nodes missing from the last read of the room's
    /// set: missing from two reads in a row, they are gone (one miss may
    /// be a Redis that lost its data and is being refilled).
    missing: HashSet<String>,
    outbox: Arc<Outbox>,
}

impl ClusterRoom {
    /// A room kept here while its first join is answered.
    fn waiting(outbox: Arc<Outbox>) -> ClusterRoom {
        ClusterRoom {
            members: BTreeMap::new(),
            local: 0,
            delivered: StreamId::default(),
            epoch: Arc::from(""),
            recent: VecDeque::new(),
            changed: Instant::now(),
            joining: 0,
            pending: Some(Vec::new()),
            missing: HashSet::new(),
            outbox,
        }
    }

    fn member_names(&self) -> Vec<Arc<str>> {
        self.members.values().map(|(n, _)| Arc::clone(n)).collect()
    }

    /// `node` is in the room as `name`; true if the name was not.
    fn add(&mut self, node: &str, name: &str) -> bool {
        let key = name.to_lowercase();
        let entry = self
            .members
            .entry(key)
            .or_insert_with(|| (Arc::from(name), BTreeSet::new()));
        let new = entry.1.is_empty();
        entry.1.insert(Arc::from(node));
        new
    }

    /// `node` no longer has `name` in the room; true if nobody has.
    fn remove(&mut self, node: &str, name: &str) -> Option<Arc<str>> {
        let key = name.to_lowercase();
        let entry = self.members.get_mut(&key)?;
        entry.1.remove(node);
        if entry.1.is_empty() {
            return self.members.remove(&key).map(|(n, _)| n);
        }
        None
    }

    fn hand(&mut self, line: Line) {
        self.delivered = line.id;
        self.outbox.push(Outgoing::Line(line.clone()));
        if self.recent.len() == RECENT_LINES {
            self.recent.pop_front();
        }
        self.recent.push_back(line);
    }
}

struct Keys {
    prefix: String,
}

impl Keys {
    fn name(&self, key: &str) -> String {
        format!("{}:name:{key}", self.prefix)
    }
    fn online(&self) -> String {
        format!("{}:online", self.prefix)
    }
    fn rooms(&self) -> String {
        format!("{}:rooms", self.prefix)
    }
    fn members(&self, room: &str) -> String {
        format!("{}:m:{room}", self.prefix)
    }
    fn stream(&self, room: &str) -> String {
        format!("{}:s:{room}", self.prefix)
    }
    fn meta(&self, room: &str) -> String {
        format!("{}:meta:{room}", self.prefix)
    }
    fn room_channel(&self, room: &str) -> String {
        format!("{}:r:{room}", self.prefix)
    }
    fn room_pattern(&self) -> String {
        format!("{}:r:*", self.prefix)
    }
    fn dm_stream(&self, pair: &str) -> String {
        format!("{}:ds:{pair}", self.prefix)
    }
    fn dm_meta(&self, pair: &str) -> String {
        format!("{}:dmeta:{pair}", self.prefix)
    }
    /// The prefixes of the streams of rooms (or, with `pair`, of pairs),
    /// of their metas and of their member sets (none for pairs): the
    /// scripts' `keep` deletes a forgotten one by them, and skips one in
    /// use.
    fn stream_prefixes(&self, pair: bool) -> (String, String, String) {
        let p = &self.prefix;
        if pair {
            (format!("{p}:ds:"), format!("{p}:dmeta:"), String::new())
        } else {
            (format!("{p}:s:"), format!("{p}:meta:"), format!("{p}:m:"))
        }
    }
    /// The epoch a pair's stream gets with its first message, and that a
    /// pair that never wrote is said to have.
    fn dm_first_epoch(&self) -> String {
        format!("{}:depoch", self.prefix)
    }
    /// The rooms with a stream, by when last used.
    fn kept(&self) -> String {
        format!("{}:kept", self.prefix)
    }
    /// The pairs with a stream, by when last used.
    fn dm_kept(&self) -> String {
        format!("{}:dkept", self.prefix)
    }
    /// Whom each identity last wrote with under each name.
    fn dm_contacts(&self) -> String {
        format!("{}:dc", self.prefix)
    }
    /// The fields of [`Keys::dm_contacts`], by when last used.
    fn dm_contacts_used(&self) -> String {
        format!("{}:dcu", self.prefix)
    }
    fn dm_channel(&self) -> String {
        format!("{}:d", self.prefix)
    }
    fn control_channel(&self) -> String {
        format!("{}:c", self.prefix)
    }
}

struct Scripts {
    hello: Script,
    join: Script,
    leave: Script,
    say: Script,
    range: Script,
    dm: Script,
    beat: Script,
    presence: Script,
    directory: Script,
    release: Script,
}

/// Takes a name unless another identity holds it (the same identity takes
/// it over); says who held it before.
const HELLO: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then
  local holder = string.match(cur, '^[^\n]*\n([^\n]*)\n')
  if holder ~= ARGV[2] then return {0, cur} end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
if cur then redis.call('PUBLISH', ARGV[6], 'kick\n' .. ARGV[1] .. '\n' .. cur) end
return {1, cur or ''}
";

/// Joins a room: the membership, the room's epoch, last id, history
/// (everything after `since`, or the last few) and members, and the
/// presence event, at once; and whether it made the room's stream. A new
/// room (no stream, nobody in it) is refused with `rate` without the
/// connection's allowance (`ARGV[16]`), with `full` when every stream
/// kept is of a room in use.
const JOIN: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local created = 0
if redis.call('EXISTS', KEYS[3]) == 1 then
  keep(KEYS[5], ARGV[9], ARGV[3], ARGV[11], ARGV[12], ARGV[13], ARGV[15], true)
else
  if redis.call('ZCARD', KEYS[1]) == 0 then
    if ARGV[16] ~= '1' then return 'rate' end
    if not keep(KEYS[5], ARGV[9], ARGV[3], ARGV[11], ARGV[12], ARGV[13], ARGV[15], false) then
      return 'full'
    end
    created = 1
  else
    -- In use, and its stream lost (Redis restarted without its data):
    -- it begins again, whatever the cap.
    keep(KEYS[5], ARGV[9], ARGV[3], ARGV[11], ARGV[12], ARGV[13], ARGV[15], true)
  end
  redis.call('HSET', KEYS[3], 'epoch', ARGV[8])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
-- As the beat does: a set whose nodes all died goes.
redis.call('PEXPIRE', KEYS[1], ARGV[14])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[9])
local epoch = redis.call('HGET', KEYS[3], 'epoch')
local last = redis.call('HGET', KEYS[3], 'last') or '0-0'
local held = 0
local entries = {}
if ARGV[4] ~= '' and ARGV[10] == epoch then
  if #redis.call('XRANGE', KEYS[2], ARGV[4], ARGV[4]) == 1 then
    held = 1
    entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[4], '+')
  end
end
if held == 0 then entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[7]) end
local members = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {epoch, last, held, entries, members, created}
";

/// Leaves a room and says so.
const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
";

/// Adds a line to a room's stream and publishes it with the id before it.
const SAY: &str = r"
-- The sender is in the room: it is in use.
keep(KEYS[3], ARGV[8], ARGV[6], ARGV[7], ARGV[9], ARGV[10], ARGV[11], true)
redis.call('HSETNX', KEYS[2], 'epoch', ARGV[3])
local prev = redis.call('HGET', KEYS[2], 'last') or '0-0'
local id = redis.call('XADD', KEYS[1], '*', 't', ARGV[1], 'p', prev)
redis.call('HSET', KEYS[2], 'last', id)
trim(KEYS[1], KEYS[2], #ARGV[1], ARGV[2], ARGV[5])
redis.call('PUBLISH', ARGV[4], 'L\n' .. prev .. '\n' .. id .. '\n' .. ARGV[1])
return id
";

/// Streams `keep` looks at, at most, for one to forget.
const KEEP_LOOKS: usize = 64;

/// A script that uses [`STREAM_FUNCTIONS`].
fn stream_script(body: &str) -> Script {
    Script::new(&format!(
        "local KEEP_LOOKS = {KEEP_LOOKS}\n{STREAM_FUNCTIONS}{body}"
    ))
}

/// What the scripts that write streams share: `keep` marks a stream used;
/// a stream new to the index takes the place of the least recently used
/// one not in use (a room whose member set has a live entry is; with no
/// `members_prefix`, as for pairs, none is), forgotten with its epoch. It
/// looks at the [`KEEP_LOOKS`] least recently used at most, so that a
/// refusal costs Redis little: a room in use among them counts as used
/// now, so the next look starts with others. When none of them can go,
/// the new stream is not kept (false) unless `force`: a room in use whose
/// stream was lost comes back whatever the cap. `unwritten` is the epoch
/// of pairs that never wrote. `trim` drops a stream's oldest entries until
/// it is within its budgets of entries and bytes.
const STREAM_FUNCTIONS: &str = r"
local function keep(index, name, now, cap, stream_prefix, meta_prefix, members_prefix, force)
  if redis.call('ZSCORE', index, name) then
    redis.call('ZADD', index, now, name)
    return true
  end
  local over = redis.call('ZCARD', index) - tonumber(cap) + 1
  if over > 0 then
    for _, oldest in ipairs(redis.call('ZRANGE', index, 0, KEEP_LOOKS - 1)) do
      if members_prefix ~= '' and redis.call('ZCOUNT', members_prefix .. oldest, now, '+inf') > 0 then
        redis.call('ZADD', index, now, oldest)
      else
        redis.call('ZREM', index, oldest)
        redis.call('DEL', stream_prefix .. oldest, meta_prefix .. oldest)
        over = over - 1
        if over == 0 then break end
      end
    end
    if over > 0 and not force then return false end
  end
  redis.call('ZADD', index, now, name)
  return true
end
local function unwritten(key, fresh)
  local epoch = redis.call('GET', key)
  if not epoch then
    redis.call('SET', key, fresh)
    epoch = fresh
  end
  return epoch
end
local function trim(stream, meta, added, max_lines, max_bytes)
  local bytes = redis.call('HINCRBY', meta, 'bytes', added)
  while redis.call('XLEN', stream) > tonumber(max_lines) or bytes > tonumber(max_bytes) do
    local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    if not oldest then
      bytes = 0
      break
    end
    local fields = oldest[2]
    for i = 1, #fields, 2 do
      if fields[i] == 't' then bytes = bytes - #fields[i + 1] end
    end
    redis.call('XDEL', stream, oldest[1])
  end
  redis.call('HSET', meta, 'bytes', bytes)
end
";

/// A stream's epoch, its last id, whether it still holds an id (the start
/// counts), and the entries after it. A pair's makes nothing: a pair
/// without a stream has the epoch its first message will give it
/// (`KEYS[4]`). A room's is read only by a node with members in it, so a
/// room in use: if Redis lost its stream, it begins again (with the same
/// epoch for every node that reads it, and every later writer).
const RANGE: &str = r"
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  if ARGV[9] == '' then
    epoch = unwritten(KEYS[4], ARGV[3])
  else
    epoch = ARGV[3]
    redis.call('HSET', KEYS[2], 'epoch', epoch)
    keep(KEYS[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], true)
  end
end
local last = redis.call('HGET', KEYS[2], 'last') or '0-0'
local held = 0
if ARGV[1] == '0-0' or #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1]) == 1 then held = 1 end
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
return {epoch, held, entries, last}
";

/// Adds a direct message to its pair's stream if the recipient still
/// holds the name, and publishes it; says its id and whether it made the
/// pair's stream. The pair's first message (since it was forgotten) is
/// refused with `rate` without the connection's allowance (`ARGV[18]`).
const DM: &str = r"
if not redis.call('GET', KEYS[1]) then return false end
local created = 0
if redis.call('EXISTS', KEYS[3]) == 0 then
  if ARGV[18] ~= '1' then return 'rate' end
  redis.call('HSET', KEYS[3], 'epoch', unwritten(KEYS[5], ARGV[3]))
  -- The next pair to write gets another epoch: a pair forgotten and
  -- written again must not come back with the one its readers knew.
  redis.call('SET', KEYS[5], ARGV[19])
  created = 1
end
keep(KEYS[4], ARGV[9], ARGV[7], ARGV[8], ARGV[10], ARGV[11], '', true)
local id = redis.call('XADD', KEYS[2], '*', 't', ARGV[1])
redis.call('HSET', KEYS[3], 'last', id)
-- Whom each of the two wrote with under the other's name, capped.
local mine, theirs = ARGV[12] .. '\n' .. ARGV[15], ARGV[14] .. '\n' .. ARGV[13]
redis.call('HSET', ARGV[16], mine, ARGV[14], theirs, ARGV[12])
redis.call('ZADD', ARGV[17], ARGV[7], mine, ARGV[7], theirs)
while redis.call('ZCARD', ARGV[17]) > 2 * tonumber(ARGV[8]) do
  redis.call('HDEL', ARGV[16], redis.call('ZPOPMIN', ARGV[17])[1])
end
trim(KEYS[2], KEYS[3], #ARGV[1], ARGV[2], ARGV[6])
redis.call('PUBLISH', ARGV[4], ARGV[5] .. '\n' .. id .. '\n' .. ARGV[1])
return {id, created}
";

/// Refreshes this node's names (taking back those Redis lost; those
/// another connection took come back), presence and memberships.
const BEAT_SCRIPT: &str = r"
local lost = {}
local n = tonumber(ARGV[1])
for i = 1, n do
  local cur = redis.call('GET', KEYS[i])
  if cur == ARGV[1 + i] then
    redis.call('PEXPIRE', KEYS[i], ARGV[n + 2])
  elseif not cur then
    redis.call('SET', KEYS[i], ARGV[1 + i], 'PX', ARGV[n + 2])
  else
    lost[#lost + 1] = i
  end
end
local expiry = ARGV[n + 3]
local at = n + 4
while at <= #ARGV do
  redis.call('ZADD', ARGV[at], expiry, ARGV[at + 1])
  -- A set no node refreshes any more (its members' nodes died) goes.
  redis.call('PEXPIRE', ARGV[at], ARGV[n + 2] * 2)
  at = at + 2
end
return lost
";

/// The members of rooms, as the sorted sets hold them now.
const PRESENCE: &str = r"
local out = {}
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', ARGV[1])
  out[i] = redis.call('ZRANGEBYSCORE', KEYS[i], ARGV[1], '+inf')
end
return out
";

/// Who is online and the rooms in use, with their member counts.
const DIRECTORY: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
local users = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[1], '+inf', 'LIMIT', 0, ARGV[2])
local online = redis.call('ZCOUNT', KEYS[1], ARGV[1], '+inf')
local rooms = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf', 'LIMIT', 0, ARGV[3])
local counts = {}
for i = 1, #rooms do
  counts[i] = redis.call('ZCOUNT', ARGV[4] .. rooms[i], ARGV[1], '+inf')
end
return {users, online, rooms, counts}
";

/// Gives up a name if this node still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
redis.call('ZREM', KEYS[2], ARGV[2])
return 1
";

/// Why a node could not start.
#[derive(Debug)]
pub struct RedisStartError {
    /// The URL tried.
    pub url: String,
    /// What Redis (or the network) said.
    pub error: RedisError,
}

impl std::fmt::Display for RedisStartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "cannot reach Redis at {}: {}", self.url, self.error)
    }
}

impl std::error::Error for RedisStartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

fn unavailable() -> Problem {
    Problem::new(
        ErrorCode::Unavailable,
        "The chat's message store does not answer; try again in a moment",
    )
}

/// `future` within [`REQUEST_TIMEOUT`], else `unavailable`.
async fn within<T>(future: impl Future<Output = RedisResult<T>>) -> Result<T, Problem> {
    match tokio::time::timeout(REQUEST_TIMEOUT, future).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(err)) => {
            tracing::debug!("Redis request failed: {err}");
            Err(unavailable())
        }
        Err(_) => Err(unavailable()),
    }
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

fn int(value: &Value) -> i64 {
    match value {
        Value::Int(n) => *n,
        other => text(other).and_then(|t| t.parse().ok()).unwrap_or(0),
    }
}

fn array(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) => items,
        _ => &[],
    }
}

fn strings(value: &Value) -> Vec<String> {
    array(value).iter().filter_map(text).collect()
}

/// Keys (or sets) and what goes with each.
type Pairs = Vec<(String, String)>;

/// What a stream holds after an id ([`RANGE`]).
struct Range {
    epoch: String,
    /// The stream still holds the id (or it is `0-0`, the start).
    held: bool,
    entries: Vec<Entry>,
}

/// A stream entry: its id, its `t` and (rooms) its `p`.
struct Entry {
    id: StreamId,
    tail: Arc<str>,
    prev: Option<StreamId>,
}

fn entries(value: &Value) -> Vec<Entry> {
    array(value)
        .iter()
        .filter_map(|entry| {
            let parts = array(entry);
            let id = StreamId::parse(&text(parts.first()?)?)?;
            let fields = strings(parts.get(1)?);
            let mut tail = None;
            let mut prev = None;
            for pair in fields.chunks(2) {
                match (pair[0].as_str(), pair.get(1)) {
                    ("t", Some(v)) => tail = Some(Arc::from(v.as_str())),
                    ("p", Some(v)) => prev = StreamId::parse(v),
                    _ => {}
                }
            }
            Some(Entry {
                id,
                tail: tail?,
                prev,
            })
        })
        .collect()
}

fn ms_after(d: Duration) -> u64 {
    now_ms() + d.as_millis() as u64
}

fn presence_member(node: &str, name: &str) -> String {
    format!("{node}\n{name}")
}

fn split_member(member: &str) -> Option<(&str, &str)> {
    member.split_once('\n')
}

/// Whose allowance of new streams an address uses: its own, or its /64's
/// for IPv6 (one host commonly has the whole /64).
fn address_key(addr: std::net::IpAddr) -> std::net::IpAddr {
    match addr.to_canonical() {
        std::net::IpAddr::V6(v6) => std::net::IpAddr::V6(std::net::Ipv6Addr::from(
            u128::from(v6) & !u128::from(u64::MAX),
        )),
        v4 => v4,
    }
}

/// The key of a pair's streams: the two identities, sorted.
fn pair(a: &str, b: &str) -> String {
    let (a, b) = super::pair_key(a, b);
    format!("{a}|{b}")
}

impl Cluster {
    /// Connects to Redis (retrying if `redis.retry`), subscribes and starts
    /// the node's tasks.
    pub(super) async fn start(
        hub: Hub,
        options: ChatOptions,
        redis: RedisOptions,
    ) -> Result<Arc<Cluster>, RedisStartError> {
        let fail = |error| RedisStartError {
            url: redis.url.clone(),
            error,
        };
        let client = Client::open(redis.url.as_str()).map_err(fail)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(REQUEST_TIMEOUT)
            .set_response_timeout(REQUEST_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        let mut wait = Duration::from_millis(250);
        let commands = loop {
            let attempt = tokio::time::timeout(
                REQUEST_TIMEOUT * 2,
                ConnectionManager::new_with_config(client.clone(), config.clone()),
            )
            .await
            .unwrap_or_else(|_| {
                Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no answer",
                )))
            });
            match attempt {
                Ok(conn) => break conn,
                Err(error) if redis.retry => {
                    tracing::warn!(
                        "cannot reach Redis at {}: {error}; trying again in {wait:?}",
                        redis.url
                    );
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                Err(error) => return Err(fail(error)),
            }
        };
        let node: Arc<str> = Arc::from(redis.node_id.unwrap_or_else(|| random_hex(6)));
        let (says, queued) = mpsc::channel(SAYS_QUEUED);
        let cluster = Arc::new(Cluster {
            node,
            keys: Keys {
                prefix: redis.prefix,
            },
            hub,
            options,
            client,
            commands,
            state: Mutex::new(ClusterState::default()),
            up: AtomicBool::new(true),
            directory: Mutex::new(
                Event::Directory {
                    rooms: Vec::new(),
                    users: Vec::new(),
                    online: 0,
                }
                .to_message(),
            ),
            directory_dirty: AtomicBool::new(true),
            probes_seen: AtomicU64::new(0),
            says,
            new_streams: NewStreams {
                rate: redis.new_streams_rate,
                burst: redis.new_streams_burst,
                rate_per_address: redis.new_streams_rate_per_address,
                burst_per_address: redis.new_streams_burst_per_address,
            },
            scripts: Scripts {
                hello: Script::new(HELLO),
                join: stream_script(JOIN),
                leave: Script::new(LEAVE),
                say: stream_script(SAY),
                range: stream_script(RANGE),
                dm: stream_script(DM),
                beat: Script::new(BEAT_SCRIPT),
                presence: Script::new(PRESENCE),
                directory: Script::new(DIRECTORY),
                release: Script::new(RELEASE),
            },
        });
        metrics::gauge!("duplex_chat_redis_up").set(1.0);
        tracing::info!(node = %cluster.node, "connected to Redis at {}", redis.url);
        let weak = Arc::downgrade(&cluster);
        tokio::spawn(subscribe_loop(weak.clone()));
        tokio::spawn(beat_loop(weak.clone()));
        tokio::spawn(health_loop(weak.clone()));
        tokio::spawn(directory_loop(weak.clone()));
        tokio::spawn(say_loop(weak, queued));
        Ok(cluster)
    }

    fn lock(&self) -> MutexGuard<'_, ClusterState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn conn(&self) -> ConnectionManager {
        self.commands.clone()
    }

    pub(super) fn cached_directory(&self) -> Message {
        self.directory
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// What a new connection is told besides the directory.
    pub(super) fn greeting(&self) -> Option<Message> {
        (!self.up.load(Ordering::Acquire)).then(|| Event::Status { redis: "down" }.to_message())
    }

    fn counts(state: &ClusterState) -> (usize, usize) {
        (state.users.len(), state.rooms.len())
    }

    fn changed(&self) {
        self.directory_dirty.store(true, Ordering::Release);
    }

    pub(super) async fn hello(
        &self,
        conn: &mut Connection,
        name: &str,
        token: Option<&str>,
    ) -> Result<(), Problem> {
        let me = Arc::clone(&conn.me);
        if let Some(name) = &conn.name {
            return Err(Problem::new(
                ErrorCode::AlreadyIdentified,
                format!("This connection is already {name}"),
            ));
        }
        let checked = protocol::check_name(name)?;
        let key = protocol::name_key(&checked);
        let full = {
            let state = self.lock();
            !state.users.contains_key(&key) && state.users.len() >= self.options.max_users
        };
        if full {
            return Err(Problem::new(
                ErrorCode::ServerFull,
                format!(
                    "This server has {} people in already; try again later",
                    self.options.max_users
                ),
            ));
        }
        let (token, identity) = super::identify(token);
        let value = format!("{}\n{identity}\n{checked}", self.node);
        let (taken, before): (i64, String) = {
            let reply: Value = within(
                self.scripts
                    .hello
                    .key(self.keys.name(&key))
                    .key(self.keys.online())
                    .arg(&value)
                    .arg(&*identity)
                    .arg(TTL.as_millis() as u64)
                    .arg(ms_after(TTL))
                    .arg(presence_member(&self.node, &checked))
                    .arg(self.keys.control_channel())
                    .invoke_async(&mut self.conn()),
            )
            .await?;
            let parts = array(&reply);
            (
                parts.first().map_or(0, int),
                parts.get(1).and_then(text).unwrap_or_default(),
            )
        };
        if taken == 0 {
            let shown = before.splitn(3, '\n').nth(2).unwrap_or(&checked).to_owned();
            return Err(Problem::new(
                ErrorCode::NameTaken,
                format!("{shown} is already in use; pick another name"),
            ));
        }
        // Others know the name as it was: keep it so.
        let name: Arc<str> = Arc::from(before.splitn(3, '\n').nth(2).unwrap_or(&checked));
        let mut replaced = None;
        let mut outboxes = Vec::new();
        let (rooms, counts) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let mut rooms = BTreeMap::new();
            if let Some(old) = state.users.remove(&key) {
                // A take-over on this node: the rooms come along, without
                // leave and join notices.
                replaced = Some(old.sender);
                if let Some(named) = state.sessions.remove(&old.id) {
                    for room in named.rooms.keys() {
                        if let Some(r) = state.rooms.get(room) {
                            r.outbox.push(Outgoing::Subscribe(Arc::clone(&me)));
                            outboxes.push(Arc::clone(&r.outbox));
                        }
                    }
                    rooms = named.rooms.into_keys().map(|r| (r, false)).collect();
                }
            }
            state.users.insert(
                key.clone(),
                LocalUser {
                    id: me.id(),
                    value,
                    sender: conn.sender.clone(),
                },
            );
            let room_names: Vec<Arc<str>> = rooms.keys().cloned().collect();
            state.sessions.insert(
                me.id(),
                Named {
                    key,
                    name: Arc::clone(&name),
                    rooms,
                    new_streams: TokenBucket::new(self.new_streams.rate, self.new_streams.burst),
                    addr: conn.addr,
                },
            );
            (room_names, Self::counts(state))
        };
        if let Some(old) = replaced {
            old.close_now(CloseReason::new(
                REPLACED,
                "Signed in again from another connection",
            ));
        }
        for outbox in outboxes {
            outbox.drain(&self.hub);
        }
        self.hub.send_to(
            me.id(),
            Event::Welcome {
                name: &name,
                id: me.id().0,
                token: &token,
                instance: &self.node,
                rooms: rooms.iter().map(|r| &**r).collect(),
                limits: self.options.limits(),
            }
            .to_message(),
        );
        conn.name = Some(name);
        conn.identity = Some(identity);
        self.changed();
        gauges(counts);
        Ok(())
    }

    pub(super) async fn join(
        &self,
        conn: &Connection,
        room: &str,
        since: Option<&str>,
        epoch: Option<&str>,
    ) -> Result<(), Problem> {
        let me = &conn.me;
        let room: Arc<str> = Arc::from(protocol::check_room(room)?);
        let name = conn.name.clone().ok_or_else(not_identified)?;
        {
            let state = self.lock();
            let named = state.sessions.get(&me.id()).ok_or_else(not_identified)?;
            if !named.rooms.contains_key(&room) {
                if named.rooms.len() >= self.options.max_rooms_per_user {
                    return Err(Problem::new(
                        ErrorCode::TooManyRooms,
                        format!(
                            "You can be in at most {} rooms; leave one first",
                            self.options.max_rooms_per_user
                        ),
                    )
                    .room(&room));
                }
                if !state.rooms.contains_key(&room)
                    && state.rooms.len() >= self.options.max_total_rooms
                {
                    return Err(Problem::new(
                        ErrorCode::ServerRoomsFull,
                        format!(
                            "This server has {} rooms in use, as many as it keeps; join one of them",
                            state.rooms.len()
                        ),
                    )
                    .room(&room));
                }
                if let Some(r) = state.rooms.get(&room)
                    && r.members.len() >= self.options.max_members_per_room
                {
                    return Err(Problem::new(
                        ErrorCode::RoomFull,
                        format!(
                            "#{room} has {} members already, as many as a room may have",
                            r.members.len()
                        ),
                    )
                    .room(&room));
                }
            }
        }
        // The room is kept here from now on, waiting for the answer: lines
        // published between the script and its answer are held for it,
        // not dropped as lines of a room nobody here is in.
        {
            let mut guard = self.lock();
            let state = &mut *guard;
            if !state.rooms.contains_key(&room) {
                let outbox = state
                    .retired
                    .remove(&room)
                    .and_then(|w| w.upgrade())
                    .unwrap_or_else(|| Outbox::new(Arc::clone(&room)));
                state
                    .rooms
                    .insert(Arc::clone(&room), ClusterRoom::waiting(outbox));
            }
            state.rooms.get_mut(&room).expect("made above").joining += 1;
        }
        let member = presence_member(&self.node, &name);
        let (stream_prefix, meta_prefix, members_prefix) = self.keys.stream_prefixes(false);
        let allowance = self.take_new_stream(me.id());
        let answer: Result<Value, Problem> = within(
            self.scripts
                .join
                .key(self.keys.members(&room))
                .key(self.keys.stream(&room))
                .key(self.keys.meta(&room))
                .key(self.keys.rooms())
                .key(self.keys.kept())
                .arg(&member)
                .arg(ms_after(TTL))
                .arg(now_ms())
                // Normalised: XRANGE would fail on a malformed id.
                .arg(
                    since
                        .and_then(StreamId::parse)
                        .map(|s| s.to_string())
                        .unwrap_or_default(),
                )
                .arg(self.keys.room_channel(&room))
                .arg(format!("P\njoin\n{member}"))
                .arg(SNAPSHOT_MAX)
                .arg(random_hex(6))
                .arg(&*room)
                .arg(epoch.unwrap_or(""))
                .arg(self.options.max_total_rooms)
                .arg(stream_prefix)
                .arg(meta_prefix)
                .arg((TTL * 2).as_millis() as u64)
                .arg(members_prefix)
                .arg(if allowance.is_ok() { "1" } else { "0" })
                .arg(random_hex(6))
                .invoke_async(&mut self.conn()),
        )
        .await;
        // A refusal is a word instead of the answer. A join that made no
        // stream gives its allowance back, but not one refused for want
        // of room: looking for a place among the streams kept is what the
        // allowance pays for.
        let answer = answer.and_then(|reply| {
            let refusal = text(&reply);
            let created = array(&reply).get(5).is_some_and(|c| int(c) == 1);
            if allowance.is_ok() && refusal.is_none() && !created {
                self.give_back_new_stream(me.id());
            }
            match (refusal.as_deref(), allowance) {
                (None, _) => Ok(reply),
                (Some("full"), _) => Err(Problem::new(
                    ErrorCode::ServerRoomsFull,
                    format!(
                        "The chat keeps {} rooms, all in use; join one of them",
                        self.options.max_total_rooms
                    ),
                )),
                (Some(_), allowance) => {
                    Err(self.too_many_new_streams(allowance.err().unwrap_or_default()))
                }
            }
        });
        let reply = match answer {
            Ok(reply) => reply,
            Err(problem) => {
                let mut guard = self.lock();
                if let Some(r) = guard.rooms.get_mut(&room) {
                    r.joining -= 1;
                }
                self.forget_if_unused(&mut guard, &room);
                return Err(problem.room(&room));
            }
        };
        let parts = array(&reply);
        let room_epoch: Arc<str> = Arc::from(parts.first().and_then(text).unwrap_or_default());
        let last = parts
            .get(1)
            .and_then(text)
            .and_then(|t| StreamId::parse(&t))
            .unwrap_or_default();
        let held = parts.get(2).map_or(0, int) == 1;
        let mut snapshot = parts.get(3).map(entries).unwrap_or_default();
        if !held {
            snapshot.reverse();
        }
        let members = parts.get(4).map(strings).unwrap_or_default();
        let mut history: Vec<Line> = snapshot
            .into_iter()
            .map(|e| Line {
                id: e.id,
                tail: e.tail,
            })
            .collect();
        let mut need_more = None;
        let mut broken = None;
        let (outbox, counts) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let again = match state.sessions.get_mut(&me.id()) {
                Some(named) => named.rooms.insert(Arc::clone(&room), true),
                None => {
                    if let Some(r) = state.rooms.get_mut(&room) {
                        r.joining -= 1;
                    }
                    self.forget_if_unused(state, &room);
                    return Err(not_identified());
                }
            };
            let r = state.rooms.get_mut(&room).expect("kept while joining");
            r.joining -= 1;
            if again.is_none() {
                r.local += 1;
            }
            let waited = r.pending.take();
            if waited.is_some() {
                // The first answer for this room here: it says where the
                // stream was, and who was in.
                r.delivered = last;
                r.epoch = Arc::clone(&room_epoch);
                for m in &members {
                    // This node's own members are added by their own join
                    // answers, which announce them.
                    if let Some((node, who)) = split_member(m)
                        && node != &*self.node
                    {
                        r.add(node, who);
                    }
                }
            } else if *r.epoch != *room_epoch {
                // Redis holds another stream of the room than the one
                // this node follows (it lost that one and began again):
                // the members here are told, and the node follows Redis's.
                metrics::counter!("duplex_chat_redis_gaps_total").increment(1);
                tracing::warn!(%room, "messages of #{room} were lost by Redis; members are told");
                r.epoch = Arc::clone(&room_epoch);
                r.delivered = last;
                r.recent.clear();
                r.outbox.push(Outgoing::Gap {
                    epoch: Arc::clone(&r.epoch),
                });
            } else if again != Some(true) {
                if r.delivered < last {
                    // Lines up to `last` are still on their way here: the
                    // joiner gets them live, not in its history.
                    history.retain(|l| l.id <= r.delivered);
                } else if r.delivered > last {
                    // Lines handed on before this joiner is subscribed:
                    // they belong in its history.
                    let have: Vec<Line> =
                        r.recent.iter().filter(|l| l.id > last).cloned().collect();
                    let covered = have.first().is_some_and(|first| {
                        r.recent
                            .iter()
                            .position(|x| x.id == first.id)
                            .is_some_and(|at| at > 0 && r.recent[at - 1].id <= last)
                    });
                    if covered {
                        history.extend(have);
                    } else {
                        need_more = Some((last, r.delivered, true, false));
                    }
                }
            }
            let announce = r.add(&self.node, &name);
            let recovered = match again {
                // This connection has had every line since.
                Some(true) => {
                    history.clear();
                    since.map(|_| true)
                }
                _ => since.map(|_| held),
            };
            match need_more {
                None => {
                    r.outbox.push(Outgoing::Joined {
                        to: Arc::clone(me),
                        epoch: Arc::clone(&r.epoch),
                        recovered,
                        members: r.member_names(),
                        history: std::mem::take(&mut history),
                        subscribe: again.is_none(),
                    });
                    if announce {
                        r.outbox.push(Outgoing::Presence {
                            event: "join",
                            name: Arc::clone(&name),
                            count: r.members.len(),
                        });
                    }
                }
                Some((after, upto, _, _)) => {
                    need_more = Some((after, upto, again.is_none(), announce));
                }
            }
            // Lines that came while the first join was answered are handed
            // on as long as each follows the one before; at the first that
            // does not, the rest is read from the stream in order.
            for (prev, line) in waited.unwrap_or_default() {
                if line.id <= r.delivered {
                    continue;
                }
                if prev != r.delivered {
                    broken = Some(r.delivered);
                    break;
                }
                r.hand(line);
            }
            (Arc::clone(&r.outbox), Self::counts(state))
        };
        if let Some((after, upto, subscribe, announce)) = need_more {
            // Rare: more lines came through the subscription between the
            // snapshot and now than the node keeps. Read them and answer.
            let limit = RECENT_LINES * 8;
            let more = self.range(&room, after, limit).await;
            let mut guard = self.lock();
            let r = guard
                .rooms
                .get_mut(&room)
                .ok_or_else(|| not_in_room(&room))?;
            // Covered: the stream still holds where the read starts, and the
            // read reached `upto` or the stream's end.
            let covered = more.as_ref().is_ok_and(|more| {
                more.held
                    && (more.entries.len() < limit
                        || more.entries.last().is_some_and(|e| e.id >= upto))
            });
            let recovered = match more {
                Ok(more) if covered => {
                    history.extend(more.entries.into_iter().filter(|e| e.id <= upto).map(|e| {
                        Line {
                            id: e.id,
                            tail: e.tail,
                        }
                    }));
                    since.map(|_| held)
                }
                // The lines between the snapshot and the recent ones could
                // not be read: the history is the recent ones alone, never
                // one with a hole, and a recovery is reported as failed.
                _ => {
                    history.clear();
                    since.map(|_| false)
                }
            };
            history.extend(r.recent.iter().filter(|l| l.id > upto).cloned());
            r.outbox.push(Outgoing::Joined {
                to: Arc::clone(me),
                epoch: Arc::clone(&r.epoch),
                recovered,
                members: r.member_names(),
                history,
                subscribe,
            });
            if announce {
                r.outbox.push(Outgoing::Presence {
                    event: "join",
                    name: Arc::clone(&name),
                    count: r.members.len(),
                });
            }
        }
        outbox.drain(&self.hub);
        if let Some(after) = broken {
            // Lines came while waiting, but not from where the stream was:
            // read them in order from the stream.
            self.catch_up(&room, after).await;
        }
        self.changed();
        gauges(counts);
        Ok(())
    }

    /// Forgets a room kept here that has neither local members nor joins
    /// under way.
    fn forget_if_unused(&self, state: &mut ClusterState, room: &str) {
        if state
            .rooms
            .get(room)
            .is_some_and(|r| r.local == 0 && r.joining == 0)
            && let Some((room, r)) = state.rooms.remove_entry(room)
            && Arc::strong_count(&r.outbox) > 1
        {
            state.retired.insert(room, Arc::downgrade(&r.outbox));
            if state.retired.len() > 64 && state.retired.len() > state.rooms.len() {
                state.retired.retain(|_, w| w.strong_count() > 0);
            }
        }
    }

    /// Takes one of the connection's, and its address's, allowance of new
    /// streams for a request that may start one; else says when one is
    /// there. A request that started none gives it back.
    fn take_new_stream(&self, id: SessionId) -> Result<(), Duration> {
        let now = Instant::now();
        let mut guard = self.lock();
        let state = &mut *guard;
        let named = state.sessions.get_mut(&id).ok_or(Duration::from_secs(1))?;
        named.new_streams.take(now)?;
        let Some(addr) = named.addr.map(address_key) else {
            return Ok(());
        };
        let addresses = &mut state.new_streams;
        if !addresses.contains_key(&addr) && addresses.len() >= NEW_STREAM_ADDRESSES {
            addresses.retain(|_, bucket| !bucket.is_full(now));
        }
        let taken = if addresses.contains_key(&addr) || addresses.len() < NEW_STREAM_ADDRESSES {
            let limits = self.new_streams;
            addresses
                .entry(addr)
                .or_insert_with(|| {
                    TokenBucket::new(limits.rate_per_address, limits.burst_per_address)
                })
                .take(now)
        } else {
            Err(Duration::from_secs(1))
        };
        if taken.is_err() {
            named.new_streams.give_back();
        }
        taken
    }

    /// Gives back what [`Cluster::take_new_stream`] took.
    fn give_back_new_stream(&self, id: SessionId) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let Some(named) = state.sessions.get_mut(&id) else {
            return;
        };
        named.new_streams.give_back();
        if let Some(bucket) = named
            .addr
            .map(address_key)
            .and_then(|addr| state.new_streams.get_mut(&addr))
        {
            bucket.give_back();
        }
    }

    /// The answer to a request that would have started a stream past the
    /// allowance.
    fn too_many_new_streams(&self, wait: Duration) -> Problem {
        let limits = self.new_streams;
        let mut problem = Problem::new(
            ErrorCode::RateLimited,
            format!(
                "Slow down: a connection may start {} new rooms or conversations a second \
                 (bursts of {}), an address {} (bursts of {})",
                limits.rate, limits.burst, limits.rate_per_address, limits.burst_per_address
            ),
        );
        problem.retry_after_ms = Some(wait.as_millis() as u64 + 1);
        problem
    }

    /// What a room's stream holds after `after`.
    async fn range(&self, room: &str, after: StreamId, count: usize) -> Result<Range, Problem> {
        self.range_of(false, room, after, count).await
    }

    /// What the stream of a room (or, with `pair`, of a pair's direct
    /// messages) holds after `after`.
    async fn range_of(
        &self,
        pair: bool,
        name: &str,
        after: StreamId,
        count: usize,
    ) -> Result<Range, Problem> {
        let k = &self.keys;
        let (stream, meta, index) = if pair {
            (k.dm_stream(name), k.dm_meta(name), k.dm_kept())
        } else {
            (k.stream(name), k.meta(name), k.kept())
        };
        let (stream_prefix, meta_prefix, members_prefix) = k.stream_prefixes(pair);
        let reply: Value = within(
            self.scripts
                .range
                .key(stream)
                .key(meta)
                .key(index)
                .key(k.dm_first_epoch())
                .arg(after.to_string())
                .arg(count)
                .arg(random_hex(6))
                .arg(name)
                .arg(now_ms())
                .arg(self.options.max_total_rooms)
                .arg(stream_prefix)
                .arg(meta_prefix)
                .arg(members_prefix)
                .invoke_async(&mut self.conn()),
        )
        .await?;
        let parts = array(&reply);
        Ok(Range {
            epoch: parts.first().and_then(text).unwrap_or_default(),
            held: parts.get(1).map_or(0, int) == 1,
            entries: parts.get(2).map(entries).unwrap_or_default(),
        })
    }

    pub(super) async fn leave(&self, conn: &Connection, room: &str) -> Result<(), Problem> {
        let me = &conn.me;
        let room = protocol::check_room(room)?;
        let name = conn.name.clone().ok_or_else(not_identified)?;
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
            let outbox = state.rooms.get(room.as_str()).map(|r| {
                r.outbox.push(Outgoing::Left(Arc::clone(me)));
                Arc::clone(&r.outbox)
            });
            self.left_here(state, &name, &room);
            (outbox, Self::counts(state))
        };
        if let Some(outbox) = outbox {
            outbox.drain(&self.hub);
        }
        self.publish_leave(&name, &room).await;
        self.changed();
        gauges(counts);
        Ok(())
    }

    /// A local member is gone from `room`: forgets the room here once no
    /// local member is left. The presence event comes back through Redis.
    fn left_here(&self, state: &mut ClusterState, name: &str, room: &str) {
        let Some(r) = state.rooms.get_mut(room) else {
            return;
        };
        r.local = r.local.saturating_sub(1);
        if r.local == 0 && r.joining == 0 {
            self.forget_if_unused(state, room);
        } else if let Some(r) = state.rooms.get_mut(room)
            && let Some(gone) = r.remove(&self.node, name)
        {
            // Local members see the leave now; the published one finds
            // it gone already.
            let count = r.members.len();
            r.changed = Instant::now();
            r.outbox.push(Outgoing::Presence {
                event: "leave",
                name: gone,
                count,
            });
        }
    }

    async fn publish_leave(&self, name: &str, room: &str) {
        let member = presence_member(&self.node, name);
        let result: Result<i64, Problem> = within(
            self.scripts
                .leave
                .key(self.keys.members(room))
                .arg(&member)
                .arg(self.keys.room_channel(room))
                .arg(format!("P\nleave\n{member}"))
                .invoke_async(&mut self.conn()),
        )
        .await;
        if result.is_err() {
            tracing::debug!("leaving #{room} not published; the entry expires within {TTL:?}");
        }
    }

    pub(super) async fn say(
        &self,
        conn: &Connection,
        room: &str,
        text: &str,
    ) -> Result<(), Problem> {
        let me = &conn.me;
        let name = conn.name.clone().ok_or_else(not_identified)?;
        let room = protocol::check_room(room)?;
        let text = protocol::check_text(
            text,
            self.options.max_text_chars,
            self.options.max_text_bytes,
        )
        .map_err(|p| p.room(&room))?;
        {
            let state = self.lock();
            let named = state.sessions.get(&me.id()).ok_or_else(not_identified)?;
            if !named.rooms.contains_key(room.as_str()) {
                return Err(not_in_room(&room));
            }
        }
        if !self.up.load(Ordering::Acquire) {
            // Told at once rather than queued behind a Redis that does not
            // answer.
            return Err(unavailable().room(&room));
        }
        let tail = protocol::line_tail(&room, &name, &text, now_ms());
        // Not waited for: the node's writer sends every connection's
        // messages to Redis in order, many to a round trip, and a refusal
        // comes back as an error event naming the room.
        let permit = Arc::clone(&conn.in_flight)
            .acquire_owned()
            .await
            .map_err(|_| unavailable())?;
        self.says
            .send(Say {
                room,
                tail,
                from: me.id(),
                queued: Instant::now(),
                _permit: permit,
            })
            .await
            .map_err(|_| unavailable())?;
        Ok(())
    }

    pub(super) async fn direct(
        &self,
        conn: &Connection,
        to: &str,
        text: &str,
    ) -> Result<(), Problem> {
        let from = conn.name.clone().ok_or_else(not_identified)?;
        let identity = conn.identity.clone().ok_or_else(not_identified)?;
        let text = protocol::check_text(
            text,
            self.options.max_text_chars,
            self.options.max_text_bytes,
        )?;
        let unknown = || {
            Problem::new(
                ErrorCode::UnknownUser,
                format!("Nobody called {} is here", to.trim()),
            )
        };
        let to_key = protocol::check_name(to)
            .map(|to| protocol::name_key(&to))
            .map_err(|_| unknown())?;
        let from_key = protocol::name_key(&from);
        let oneself = || {
            Problem::new(
                ErrorCode::InvalidRecipient,
                "A direct message goes to someone else",
            )
        };
        if to_key == from_key {
            return Err(oneself());
        }
        let holder: Option<String> = within(self.conn().get(self.keys.name(&to_key))).await?;
        let Some(holder) = holder else {
            return Err(unknown());
        };
        // `node \n identity \n Name`: the message is the pair's of the two
        // identities, whoever holds the names later.
        let mut fields = holder.splitn(3, '\n').skip(1);
        let to_identity = fields.next().unwrap_or_default().to_owned();
        let to_name = fields.next().unwrap_or(to.trim()).to_owned();
        if to_identity == *identity {
            return Err(oneself());
        }
        let pair = pair(&identity, &to_identity);
        let tail = protocol::dm_tail(&from, &to_name, &text, now_ms());
        let (stream_prefix, meta_prefix, _) = self.keys.stream_prefixes(true);
        let allowance = self.take_new_stream(conn.me.id());
        let reply: Result<Value, Problem> = within(
            self.scripts
                .dm
                .key(self.keys.name(&to_key))
                .key(self.keys.dm_stream(&pair))
                .key(self.keys.dm_meta(&pair))
                .key(self.keys.dm_kept())
                .key(self.keys.dm_first_epoch())
                .arg(&tail)
                .arg(self.options.history.max(1))
                .arg(random_hex(6))
                .arg(self.keys.dm_channel())
                .arg(format!("{from_key}\n{identity}\n{to_key}\n{to_identity}"))
                .arg(self.options.history_bytes)
                .arg(now_ms())
                .arg(self.options.max_total_rooms)
                .arg(&pair)
                .arg(stream_prefix)
                .arg(meta_prefix)
                .arg(&*identity)
                .arg(&from_key)
                .arg(&to_identity)
                .arg(&to_key)
                .arg(self.keys.dm_contacts())
                .arg(self.keys.dm_contacts_used())
                .arg(if allowance.is_ok() { "1" } else { "0" })
                .arg(random_hex(6))
                .invoke_async(&mut self.conn()),
        )
        .await;
        let created = reply
            .as_ref()
            .is_ok_and(|reply| array(reply).get(1).is_some_and(|c| int(c) == 1));
        if allowance.is_ok() && !created && reply.is_ok() {
            self.give_back_new_stream(conn.me.id());
        }
        match reply? {
            // The script's `false`: the recipient no longer holds the name.
            Value::Nil | Value::Boolean(false) => return Err(unknown()),
            Value::Array(_) => {}
            _ => return Err(self.too_many_new_streams(allowance.err().unwrap_or_default())),
        }
        metrics::counter!("duplex_chat_messages_total", "kind" => "direct").increment(1);
        Ok(())
    }

    pub(super) async fn dm_history(
        &self,
        conn: &Connection,
        with: &str,
        since: Option<&str>,
        epoch: Option<&str>,
    ) -> Result<(), Problem> {
        let identity = conn.identity.clone().ok_or_else(not_identified)?;
        let with = protocol::check_name(with)?;
        let with_key = protocol::name_key(&with);
        // The name's holder, or if nobody holds it, whoever last had it in
        // a conversation of the caller's: only the caller's own
        // conversations are ever read.
        let holder: Option<String> = within(self.conn().get(self.keys.name(&with_key))).await?;
        let peer = match holder {
            Some(holder) => holder.split('\n').nth(1).map(str::to_owned),
            None => {
                within(
                    self.conn()
                        .hget(self.keys.dm_contacts(), format!("{identity}\n{with_key}")),
                )
                .await?
            }
        };
        let Some(peer) = peer.filter(|peer| *peer != *identity) else {
            // No conversation: nothing kept, and nothing to recover.
            let answer = protocol::dm_history(&with, &self.node, since.map(|_| false), []);
            self.hub.send_to(conn.me.id(), answer);
            return Ok(());
        };
        let pair = pair(&identity, &peer);
        let stream = self.keys.dm_stream(&pair);
        let range = self
            .range_of(
                true,
                &pair,
                since.and_then(StreamId::parse).unwrap_or_default(),
                self.options.history.max(1),
            )
            .await?;
        let own_epoch = range.epoch;
        let held = since.is_some_and(|s| StreamId::parse(s).is_some())
            && epoch == Some(own_epoch.as_str())
            && range.held;
        let lines = if held {
            range.entries
        } else {
            let reply: Value = within(
                redis::cmd("XREVRANGE")
                    .arg(&stream)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(SNAPSHOT_MAX)
                    .query_async(&mut self.conn()),
            )
            .await?;
            let mut lines = entries(&reply);
            lines.reverse();
            lines
        };
        let json: Vec<String> = lines
            .iter()
            .map(|e| protocol::dm_line(&e.id.to_string(), &e.tail))
            .collect();
        let recovered = since.map(|_| held);
        let answer = protocol::dm_history(
            &with,
            &own_epoch,
            recovered,
            json.iter().map(String::as_str),
        );
        self.hub.send_to(conn.me.id(), answer);
        Ok(())
    }

    /// The end of a connection: it leaves its rooms here at once, and in
    /// Redis as soon as Redis answers (else its entries expire).
    pub(super) fn disconnect(self: &Arc<Self>, me: &Membership) {
        let mut outboxes = Vec::new();
        let (gone, counts) = {
            let mut guard = self.lock();
            let state = &mut *guard;
            let Some(named) = state.sessions.remove(&me.id()) else {
                return;
            };
            let value = match state.users.get(&named.key) {
                Some(u) if u.id == me.id() => state.users.remove(&named.key).map(|u| u.value),
                _ => None,
            };
            let rooms: Vec<Arc<str>> = named.rooms.keys().cloned().collect();
            for room in &rooms {
                if let Some(r) = state.rooms.get(room) {
                    outboxes.push(Arc::clone(&r.outbox));
                }
                self.left_here(state, &named.name, room);
            }
            ((named, value, rooms), Self::counts(state))
        };
        for outbox in outboxes {
            outbox.drain(&self.hub);
        }
        self.changed();
        gauges(counts);
        let (named, value, rooms) = gone;
        let cluster = Arc::clone(self);
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime (it is shutting down): the entries expire.
            return;
        };
        runtime.spawn(async move {
            for room in &rooms {
                cluster.publish_leave(&named.name, room).await;
            }
            if let Some(value) = value {
                let _: Result<i64, Problem> = within(
                    cluster
                        .scripts
                        .release
                        .key(cluster.keys.name(&named.key))
                        .key(cluster.keys.online())
                        .arg(value)
                        .arg(presence_member(&cluster.node, &named.name))
                        .invoke_async(&mut cluster.conn()),
                )
                .await;
            }
        });
    }

    /// One message of the subscription.
    async fn on_message(&self, channel: &str, payload: &str) {
        if let Some(room) = channel
            .strip_prefix(&self.keys.prefix)
            .and_then(|c| c.strip_prefix(":r:"))
        {
            let mut parts = payload.splitn(4, '\n');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some("L"), Some(prev), Some(id), Some(tail)) => {
                    if let (Some(prev), Some(id)) = (StreamId::parse(prev), StreamId::parse(id)) {
                        self.on_line(room, prev, id, Arc::from(tail)).await;
                    }
                }
                (Some("P"), Some(event), Some(node), Some(name)) => {
                    self.on_presence(room, event, node, name);
                }
                _ => tracing::debug!(%channel, "unknown message on a room channel"),
            }
        } else if channel == self.keys.dm_channel() {
            // `from key \n identity \n to key \n identity \n id \n tail`.
            let parts: Vec<&str> = payload.splitn(6, '\n').collect();
            if let [from, from_identity, to, to_identity, id, tail] = parts[..] {
                let message = protocol::dm_event(&protocol::dm_line(id, tail));
                let state = self.lock();
                // To the name's holder only while it is the identity the
                // message was for: not to whoever took the name since.
                for (key, identity) in [(from, from_identity), (to, to_identity)] {
                    if let Some(user) = state.users.get(key)
                        && user.value.split('\n').nth(1) == Some(identity)
                    {
                        self.hub.send_to(user.id, message.clone());
                    }
                }
            }
        } else if channel == self.keys.control_channel() {
            let mut parts = payload.splitn(2, '\n');
            match (parts.next(), parts.next()) {
                (Some("probe"), Some(node)) if node == &*self.node => {
                    self.probes_seen.fetch_add(1, Ordering::Relaxed);
                }
                (Some("kick"), Some(rest)) => self.on_kick(rest),
                _ => {}
            }
        }
    }

    /// Another connection took a name over with its token: if this node's
    /// connection held it (as `old`), it is closed with 4001.
    fn on_kick(&self, rest: &str) {
        // `new value \n old value`, each `node \n identity \n Name`.
        let fields: Vec<&str> = rest.splitn(6, '\n').collect();
        if fields.len() < 6 || fields[3] != &*self.node || fields[0] == &*self.node {
            return;
        }
        let old = fields[3..].join("\n");
        let key = protocol::name_key(fields[5]);
        let sender = {
            let state = self.lock();
            state
                .users
                .get(&key)
                .filter(|u| u.value == old)
                .map(|u| u.sender.clone())
        };
        if let Some(sender) = sender {
            sender.close_now(CloseReason::new(
                REPLACED,
                "Signed in again from another connection",
            ));
        }
    }

    fn on_presence(&self, room: &str, event: &str, node: &str, name: &str) {
        let outbox = {
            let mut state = self.lock();
            let Some(r) = state.rooms.get_mut(room) else {
                return;
            };
            if r.pending.is_some() || node == &*self.node {
                // The join's answer lists the members; this node's own
                // joins and leaves are announced here when they happen,
                // and a late publication of one must not undo a newer one.
                return;
            }
            r.changed = Instant::now();
            let change = match event {
                "join" => r
                    .add(node, name)
                    .then(|| Arc::from(name))
                    .map(|n| ("join", n)),
                "leave" => r.remove(node, name).map(|n| ("leave", n)),
                _ => None,
            };
            let Some((event, name)) = change else {
                return;
            };
            let count = r.members.len();
            r.outbox.push(Outgoing::Presence { event, name, count });
            Arc::clone(&r.outbox)
        };
        outbox.drain(&self.hub);
    }

    /// A line of a room: handed on if it follows the last one delivered;
    /// read from the stream with what was missed if it does not.
    async fn on_line(&self, room: &str, prev: StreamId, id: StreamId, tail: Arc<str>) {
        let delivered = {
            let mut state = self.lock();
            let Some(r) = state.rooms.get_mut(room) else {
                return;
            };
            if let Some(waiting) = &mut r.pending {
                // Kept for the join's answer; past this many, the answer
                // finds the chain broken and reads the stream instead.
                if waiting.len() < RECENT_LINES * 16 {
                    waiting.push((prev, Line { id, tail }));
                }
                return;
            }
            if id <= r.delivered {
                return;
            }
            if prev == r.delivered {
                r.hand(Line { id, tail });
                let outbox = Arc::clone(&r.outbox);
                drop(state);
                outbox.drain(&self.hub);
                return;
            }
            r.delivered
        };
        self.catch_up(room, delivered).await;
    }

    /// Reads what a room's stream holds after `after` and hands it on; what
    /// it no longer holds is reported to the room's members as a `gap`.
    async fn catch_up(&self, room: &str, after: StreamId) {
        // Without an answer, the next line (or subscription) tries again.
        let Ok(range) = self
            .range(room, after, self.options.history.max(1) + 1)
            .await
        else {
            return;
        };
        let range = Some(range);
        let outbox = {
            let mut state = self.lock();
            let Some(r) = state.rooms.get_mut(room).filter(|r| r.pending.is_none()) else {
                return;
            };
            let chained = range.as_ref().is_some_and(|range| {
                range.held
                    && *r.epoch == *range.epoch
                    && range.entries.first().is_none_or(|e| e.prev == Some(after))
            });
            if !chained && r.delivered == after {
                metrics::counter!("duplex_chat_redis_gaps_total").increment(1);
                tracing::warn!(%room, "messages of #{room} were lost by Redis; members are told");
                if let Some(range) = &range {
                    r.epoch = Arc::from(range.epoch.as_str());
                    // A stream lost and begun again starts from nothing.
                    r.delivered = StreamId::default();
                }
                r.outbox.push(Outgoing::Gap {
                    epoch: Arc::clone(&r.epoch),
                });
            }
            for e in range.map(|r| r.entries).unwrap_or_default() {
                if e.id > r.delivered {
                    r.hand(Line {
                        id: e.id,
                        tail: e.tail,
                    });
                }
            }
            Arc::clone(&r.outbox)
        };
        outbox.drain(&self.hub);
    }

    /// After the subscription came back: every room with members here
    /// gets what was said meanwhile.
    async fn resubscribed(&self) {
        let rooms: Vec<(Arc<str>, StreamId)> = {
            let state = self.lock();
            state
                .rooms
                .iter()
                .filter(|(_, r)| r.pending.is_none())
                .map(|(room, r)| (Arc::clone(room), r.delivered))
                .collect()
        };
        for (room, after) in rooms {
            self.catch_up(&room, after).await;
        }
    }

    /// Refreshes this node's entries in Redis; closes connections whose
    /// name another node took.
    async fn beat(&self) -> RedisResult<()> {
        let (names, entries): (Pairs, Pairs) = {
            let state = self.lock();
            let names = state
                .users
                .iter()
                .map(|(key, u)| (self.keys.name(key), u.value.clone()))
                .collect();
            let mut entries = Vec::new();
            for named in state.sessions.values() {
                entries.push((self.keys.online(), presence_member(&self.node, &named.name)));
                for room in named.rooms.keys() {
                    entries.push((
                        self.keys.members(room),
                        presence_member(&self.node, &named.name),
                    ));
                }
            }
            for room in state.rooms.keys() {
                entries.push((self.keys.rooms(), room.to_string()));
            }
            (names, entries)
        };
        let mut invocation = self.scripts.beat.prepare_invoke();
        invocation.arg(names.len());
        for (key, value) in &names {
            invocation.key(key).arg(value);
        }
        invocation.arg(TTL.as_millis() as u64).arg(ms_after(TTL));
        for (key, member) in &entries {
            invocation.arg(key).arg(member);
        }
        let lost: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        for i in lost {
            let Some((key, value)) = names.get(i as usize - 1) else {
                continue;
            };
            let sender = {
                let state = self.lock();
                let key = key.rsplit(':').next().unwrap_or_default();
                state
                    .users
                    .get(key)
                    .filter(|u| &u.value == value)
                    .map(|u| u.sender.clone())
            };
            if let Some(sender) = sender {
                sender.close_now(CloseReason::new(
                    REPLACED,
                    "Signed in again from another connection",
                ));
            }
        }
        self.expire_members().await
    }

    /// Brings each local room's member list in line with Redis: members of
    /// other nodes whose entries expired (a node that died) leave it.
    async fn expire_members(&self) -> RedisResult<()> {
        let rooms: Vec<Arc<str>> = self.lock().rooms.keys().cloned().collect();
        if rooms.is_empty() {
            return Ok(());
        }
        let asked = Instant::now();
        let mut invocation = self.scripts.presence.prepare_invoke();
        for room in &rooms {
            invocation.key(self.keys.members(room));
        }
        invocation.arg(now_ms());
        let reply: Value = invocation.invoke_async(&mut self.conn()).await?;
        let mut outboxes = Vec::new();
        {
            let mut state = self.lock();
            for (room, listed) in rooms.iter().zip(array(&reply)) {
                let Some(r) = state.rooms.get_mut(room) else {
                    continue;
                };
                if r.changed > asked || r.pending.is_some() {
                    continue;
                }
                let listed: HashSet<String> = strings(listed).into_iter().collect();
                let mut gone = Vec::new();
                let mut missing = HashSet::new();
                for (name, nodes) in r.members.values() {
                    for node in nodes {
                        let member = presence_member(node, name);
                        if **node != *self.node && !listed.contains(&member) {
                            if r.missing.contains(&member) {
                                gone.push((Arc::clone(node), Arc::clone(name)));
                            } else {
                                missing.insert(member);
                            }
                        }
                    }
                }
                r.missing = missing;
                let mut came = Vec::new();
                for member in &listed {
                    if let Some((node, name)) = split_member(member)
                        && node != &*self.node
                        && !r
                            .members
                            .get(&name.to_lowercase())
                            .is_some_and(|(_, nodes)| nodes.contains(node))
                    {
                        came.push((node.to_owned(), name.to_owned()));
                    }
                }
                for (node, name) in gone {
                    if let Some(name) = r.remove(&node, &name) {
                        let count = r.members.len();
                        r.outbox.push(Outgoing::Presence {
                            event: "leave",
                            name,
                            count,
                        });
                    }
                }
                for (node, name) in came {
                    if r.add(&node, &name) {
                        let count = r.members.len();
                        r.outbox.push(Outgoing::Presence {
                            event: "join",
                            name: Arc::from(name.as_str()),
                            count,
                        });
                    }
                }
                outboxes.push(Arc::clone(&r.outbox));
            }
        }
        for outbox in outboxes {
            outbox.drain(&self.hub);
        }
        Ok(())
    }

    /// Reads the directory from Redis; broadcasts it when it changed.
    async fn refresh_directory(&self) -> RedisResult<()> {
        let reply: Value = self
            .scripts
            .directory
            .key(self.keys.online())
            .key(self.keys.rooms())
            .arg(now_ms())
            .arg(DIRECTORY_MAX * 4)
            .arg(DIRECTORY_MAX * 4)
            .arg(format!("{}:m:", self.keys.prefix))
            .invoke_async(&mut self.conn())
            .await?;
        let parts = array(&reply);
        let mut users: BTreeMap<String, String> = BTreeMap::new();
        for member in parts.first().map(strings).unwrap_or_default() {
            if let Some((_, name)) = split_member(&member) {
                users
                    .entry(name.to_lowercase())
                    .or_insert_with(|| name.to_owned());
            }
        }
        let entries = parts.get(1).map_or(0, int) as usize;
        // Entries count a name twice for a moment while it moves between
        // nodes; the names read are exact when they are all read.
        let online = if entries <= DIRECTORY_MAX * 4 {
            users.len()
        } else {
            entries
        };
        let room_names = parts.get(2).map(strings).unwrap_or_default();
        let counts: Vec<i64> = parts
            .get(3)
            .map(|v| array(v).iter().map(int).collect())
            .unwrap_or_default();
        let mut rooms: Vec<RoomInfo> = room_names
            .into_iter()
            .zip(counts)
            .map(|(name, members)| RoomInfo {
                name,
                members: members.max(0) as usize,
            })
            .collect();
        if rooms.len() > DIRECTORY_MAX {
            rooms.sort_by(|a, b| b.members.cmp(&a.members).then_with(|| a.name.cmp(&b.name)));
            rooms.truncate(DIRECTORY_MAX);
        }
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        let message = Event::Directory {
            rooms,
            users: users
                .values()
                .take(DIRECTORY_MAX)
                .map(String::as_str)
                .collect(),
            online,
        }
        .to_message();
        let changed = {
            let mut cached = self
                .directory
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let changed = cached.as_text() != message.as_text();
            if changed {
                *cached = message.clone();
            }
            changed
        };
        if changed {
            self.hub.broadcast(message);
        }
        Ok(())
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) == up {
            return;
        }
        metrics::gauge!("duplex_chat_redis_up").set(if up { 1.0 } else { 0.0 });
        if up {
            metrics::counter!("duplex_chat_redis_reconnects_total").increment(1);
            tracing::info!("Redis answers again");
        } else {
            metrics::counter!("duplex_chat_redis_stalls_total").increment(1);
            tracing::warn!(
                "Redis does not answer: requests get `unavailable` until it does; clients are told"
            );
        }
        self.hub.broadcast(
            Event::Status {
                redis: if up { "up" } else { "down" },
            }
            .to_message(),
        );
    }
}

/// Sends the queued room messages to Redis in order, up to
/// [`SAYS_BATCH`] in one pipeline, one pipeline at a time (so that a
/// connection's messages keep their order); refusals go back to their
/// senders as `unavailable`.
async fn say_loop(cluster: Weak<Cluster>, mut queued: mpsc::Receiver<Say>) {
    let mut batch = Vec::with_capacity(SAYS_BATCH);
    while queued.recv_many(&mut batch, SAYS_BATCH).await > 0 {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        // What waited longer than a request may is refused, not written:
        // its sender has been told nothing yet, and a message written many
        // seconds late (after a freeze) would surprise everyone.
        let stale = batch
            .iter()
            .take_while(|say| say.queued.elapsed() > REQUEST_TIMEOUT)
            .count();
        if stale > 0 || !cluster.up.load(Ordering::Acquire) {
            let refused = if cluster.up.load(Ordering::Acquire) {
                stale
            } else {
                batch.len()
            };
            for say in batch.drain(..refused) {
                refuse(&cluster, &say, unavailable());
            }
            if batch.is_empty() {
                continue;
            }
        }
        let mut pipe = redis::pipe();
        // Loaded with every batch: a Redis restarted since has forgotten it.
        pipe.load_script(&cluster.scripts.say).ignore();
        let (stream_prefix, meta_prefix, members_prefix) = cluster.keys.stream_prefixes(false);
        for say in &batch {
            let room = &say.room;
            pipe.invoke_script(
                cluster
                    .scripts
                    .say
                    .key(cluster.keys.stream(room))
                    .key(cluster.keys.meta(room))
                    .key(cluster.keys.kept())
                    .arg(&say.tail)
                    .arg(cluster.options.history.max(1))
                    .arg(random_hex(6))
                    .arg(cluster.keys.room_channel(room))
                    .arg(cluster.options.history_bytes)
                    .arg(now_ms())
                    .arg(cluster.options.max_total_rooms)
                    .arg(room)
                    .arg(&stream_prefix)
                    .arg(&meta_prefix)
                    .arg(&members_prefix),
            )
            .ignore();
        }
        let sent: Result<(), Problem> = within(pipe.query_async(&mut cluster.conn())).await;
        match sent {
            Ok(()) => {
                metrics::counter!("duplex_chat_messages_total", "kind" => "room")
                    .increment(batch.len() as u64);
            }
            Err(problem) => {
                for say in &batch {
                    refuse(&cluster, say, problem.clone());
                }
            }
        }
        batch.clear();
    }
}

/// Tells the sender of `say` that it was not written.
fn refuse(cluster: &Cluster, say: &Say, problem: Problem) {
    let problem = problem.room(&say.room).request("message");
    metrics::counter!("duplex_chat_errors_total", "code" => problem.code.as_str()).increment(1);
    cluster
        .hub
        .send_to(say.from, Event::Error(&problem).to_message());
}

/// PINGs Redis every [`HEALTH_PERIOD`]; two failures in a row mark it down,
/// one answer up again.
async fn health_loop(cluster: Weak<Cluster>) {
    let mut failures = 0u32;
    let mut interval = tokio::time::interval(HEALTH_PERIOD);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let mut conn = cluster.conn();
        let ping = tokio::time::timeout(
            HEALTH_PERIOD * 9 / 10,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match ping {
            Ok(Ok(_)) => {
                failures = 0;
                cluster.set_up(true);
            }
            _ => {
                failures += 1;
                if failures >= 2 {
                    cluster.set_up(false);
                }
            }
        }
    }
}

async fn beat_loop(cluster: Weak<Cluster>) {
    let mut interval = tokio::time::interval(BEAT);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if let Ok(Err(err)) = tokio::time::timeout(BEAT, cluster.beat()).await {
            tracing::debug!("presence refresh failed: {err}");
        }
    }
}

async fn directory_loop(cluster: Weak<Cluster>) {
    let mut last = Instant::now();
    loop {
        tokio::time::sleep(super::DIRECTORY_DELAY).await;
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        let due = last.elapsed() >= DIRECTORY_PERIOD
            || cluster.directory_dirty.swap(false, Ordering::AcqRel);
        if !due {
            continue;
        }
        last = Instant::now();
        if let Ok(Err(err)) =
            tokio::time::timeout(REQUEST_TIMEOUT, cluster.refresh_directory()).await
        {
            tracing::debug!("directory refresh failed: {err}");
        }
    }
}

/// Why a subscription stopped.
enum Ended {
    Gone,
    Lost(String),
}

/// Keeps the node subscribed to every room, the direct messages and the
/// control channel; after every new subscription, catches the rooms up.
async fn subscribe_loop(cluster: Weak<Cluster>) {
    let mut wait = Duration::from_millis(100);
    let mut first = true;
    loop {
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        let client = strong.client.clone();
        let (pattern, channels) = (
            strong.keys.room_pattern(),
            [strong.keys.dm_channel(), strong.keys.control_channel()],
        );
        drop(strong);
        let subscribed = tokio::time::timeout(REQUEST_TIMEOUT * 2, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.psubscribe(&pattern).await?;
            pubsub.subscribe(&channels[..]).await?;
            RedisResult::Ok(pubsub)
        })
        .await;
        let pubsub = match subscribed {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(err)) => {
                tracing::warn!("cannot subscribe to Redis: {err}; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(_) => {
                tracing::warn!("Redis did not answer SUBSCRIBE; trying again in {wait:?}");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        wait = Duration::from_millis(100);
        let Some(strong) = cluster.upgrade() else {
            return;
        };
        if !first {
            tracing::info!("Redis subscription back; catching the rooms up");
            // Entries Redis lost (a restart without persistence) come back
            // before other nodes take their absence for a departure.
            if let Err(err) = strong.beat().await {
                tracing::debug!("presence refresh failed: {err}");
            }
            strong.resubscribed().await;
        }
        first = false;
        drop(strong);
        match serve_subscription(&cluster, pubsub).await {
            Ended::Gone => return,
            Ended::Lost(why) => {
                tracing::warn!("Redis subscription lost ({why}); subscribing again");
            }
        }
    }
}

async fn serve_subscription(cluster: &Weak<Cluster>, pubsub: redis::aio::PubSub) -> Ended {
    let (_sink, mut messages) = pubsub.split();
    let mut probe = tokio::time::interval(HEALTH_PERIOD);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut seen = 0;
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else { return Ended::Lost("closed".into()) };
                let Some(cluster) = cluster.upgrade() else { return Ended::Gone };
                let channel = message.get_channel_name().to_owned();
                let payload: String = message.get_payload().unwrap_or_default();
                cluster.on_message(&channel, &payload).await;
            }
            _ = probe.tick() => {
                let Some(cluster) = cluster.upgrade() else { return Ended::Gone };
                let now_seen = cluster.probes_seen.load(Ordering::Relaxed);
                if now_seen != seen {
                    seen = now_seen;
                    heard = Instant::now();
                } else if heard.elapsed() > PROBE_DEADLINE && cluster.up.load(Ordering::Acquire) {
                    // Redis answers PINGs but this subscription hears
                    // nothing: it died without closing.
                    metrics::counter!("duplex_chat_redis_stalls_total").increment(1);
                    return Ended::Lost("its own probes stopped arriving".into());
                }
                let mut conn = cluster.conn();
                let channel = cluster.keys.control_channel();
                let payload = format!("probe\n{}", cluster.node);
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(HEALTH_PERIOD, conn.publish::<_, _, i64>(channel, payload)).await;
                });
            }
        }
    }
}
