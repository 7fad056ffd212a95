//! The chat on several nodes (`duplex-chat --redis-url`): three
//! `duplex-chat` processes on a `redis-server` of the test's own (a free
//! port, nothing saved), with tokio-tungstenite clients on each. What
//! PROTOCOL.md ("Several nodes") promises: names unique across nodes,
//! presence that lists everyone and forgets a killed node's users within
//! `TTL + BEAT`, every message to every member once in the order of its
//! room's stream, recovery after a cut connection, and the faults: Redis
//! restarted, frozen, or not there at start.
//!
//! Every wait is bounded; all traffic goes to 127.0.0.1. Without
//! `redis-server` on the PATH, every test fails and says so.

use std::{
    collections::HashSet,
    io::Read,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{WebSocketStream, tungstenite::Message};

type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(5);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A `redis-server` of the test's own, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

fn spawn_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| {
            panic!("cannot start redis-server ({err}): install it (apt-get install redis-server); .ci/run does")
        })
}

fn wait_listening(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("{what} did not listen on port {port} within 10 s");
}

impl Redis {
    fn start() -> Redis {
        Redis::start_on(free_port())
    }

    fn start_on(port: u16) -> Redis {
        let redis = Redis {
            child: spawn_redis(port),
            port,
        };
        wait_listening(port, "redis-server");
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills it (its data goes: nothing is saved) and starts another on
    /// the same port.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_redis(self.port);
        wait_listening(self.port, "redis-server");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal}");
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal_quietly("-CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Redis {
    fn signal_quietly(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }
}

/// A `duplex-chat` process, killed on drop.
struct Node {
    child: Child,
    port: u16,
}

fn node_command(redis_url: &str, prefix: &str, port: u16) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_duplex-chat"));
    command
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(["--redis-url", redis_url, "--redis-prefix", prefix])
        .args(["--rate", "0", "--handshake-rate", "0"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}

impl Node {
    fn start(redis: &Redis, prefix: &str) -> Node {
        let port = free_port();
        let child = node_command(&redis.url(), prefix, port)
            .spawn()
            .expect("start duplex-chat");
        wait_listening(port, "duplex-chat");
        Node { child, port }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/chat", self.port)
    }

    async fn metrics(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        tcp.read_to_string(&mut body).await.expect("read");
        body
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn prefix(test: &str) -> String {
    format!("duplex-test-{test}-{}", std::process::id())
}

/// A chat client that keeps every event it read.
struct Client {
    ws: Ws,
    name: String,
    events: Vec<Value>,
    seen: usize,
}

impl Client {
    async fn open(node: &Node, name: &str) -> Client {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(node.url()))
            .await
            .expect("handshake in time")
            .expect("handshake");
        Client {
            ws,
            name: name.to_owned(),
            events: Vec::new(),
            seen: 0,
        }
    }

    /// A connection whose packets come from `source`, one of the many
    /// addresses of 127.0.0.0/8: the server counts it as that address's.
    async fn open_from(node: &Node, name: &str, source: std::net::Ipv4Addr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
        socket.bind((source, 0).into()).expect("bind to the source");
        let tcp = tokio::time::timeout(WAIT, socket.connect(([127, 0, 0, 1], node.port).into()))
            .await
            .expect("connect in time")
            .expect("connect");
        let (ws, _) = tokio::time::timeout(
            WAIT,
            tokio_tungstenite::client_async(
                node.url(),
                tokio_tungstenite::MaybeTlsStream::Plain(tcp),
            ),
        )
        .await
        .expect("handshake in time")
        .expect("handshake");
        Client {
            ws,
            name: name.to_owned(),
            events: Vec::new(),
            seen: 0,
        }
    }

    async fn hello(node: &Node, name: &str) -> Client {
        let client = Client::open(node, name).await;
        client.say_hello().await
    }

    async fn hello_from(node: &Node, name: &str, source: std::net::Ipv4Addr) -> Client {
        let client = Client::open_from(node, name, source).await;
        client.say_hello().await
    }

    async fn say_hello(mut self) -> Client {
        let name = self.name.clone();
        self.send(json!({"type": "hello", "name": name})).await;
        let welcome = self
            .until("welcome", |e| {
                e["type"] == "welcome" || e["type"] == "error"
            })
            .await;
        assert_eq!(welcome["type"], "welcome", "{name}: {welcome}");
        self
    }

    async fn send(&mut self, value: Value) {
        tokio::time::timeout(WAIT, self.ws.send(Message::text(value.to_string())))
            .await
            .expect("send in time")
            .expect("send");
    }

    async fn read(&mut self, deadline: tokio::time::Instant) -> Option<Value> {
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let event: Value = serde_json::from_str(text.as_str()).expect("JSON");
                    self.events.push(event.clone());
                    return Some(event);
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    panic!("{}: closed by the server: {frame:?}", self.name)
                }
                Ok(Some(Ok(_))) => {}
                Ok(other) => panic!("{}: connection ended: {other:?}", self.name),
            }
        }
    }

    /// The first event from the unread ones on that matches, within `limit`.
    async fn until_within(
        &mut self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        while self.seen < self.events.len() {
            let event = self.events[self.seen].clone();
            self.seen += 1;
            if pred(&event) {
                return event;
            }
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match self.read(deadline).await {
                Some(event) => {
                    self.seen = self.events.len();
                    if pred(&event) {
                        return event;
                    }
                }
                None => panic!(
                    "{}: no {what} within {limit:?}; got {:?}",
                    self.name, self.events
                ),
            }
        }
    }

    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.until_within(what, WAIT, pred).await
    }

    async fn join(&mut self, room: &str) -> Value {
        self.send(json!({"type": "join", "room": room})).await;
        self.until("joined", |e| e["type"] == "joined" && e["room"] == room)
            .await
    }

    /// Says `text` in `room`, again while Redis answers `unavailable`.
    async fn say(&mut self, room: &str, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.send(json!({"type": "message", "room": room, "text": text}))
                .await;
            let answer = self
                .until("its message or an error", |e| {
                    (e["type"] == "message" && e["text"] == text) || e["type"] == "error"
                })
                .await;
            if answer["type"] == "message" {
                return;
            }
            assert_eq!(answer["code"], "unavailable", "{answer}");
            assert!(
                Instant::now() < deadline,
                "{}: Redis never came back",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The messages of `room` received so far (reading for `quiet` more),
    /// as `from: text`.
    async fn messages(&mut self, room: &str, quiet: Duration) -> Vec<(String, String)> {
        let deadline = tokio::time::Instant::now() + quiet;
        while self.read(deadline).await.is_some() {}
        self.seen = self.events.len();
        self.events
            .iter()
            .filter(|e| e["type"] == "message" && e["room"] == room)
            .map(|e| {
                (
                    e["id"].as_str().unwrap_or_default().to_owned(),
                    e["text"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

fn id_key(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').expect("an id is <ms>-<seq>");
    (ms.parse().expect("ms"), seq.parse().expect("seq"))
}

/// Ids strictly increasing: in stream order, none twice.
fn assert_in_order(who: &str, lines: &[(String, String)]) {
    for pair in lines.windows(2) {
        assert!(
            id_key(&pair[0].0) < id_key(&pair[1].0),
            "{who}: {} then {}",
            pair[0].0,
            pair[1].0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_chat_in_rooms_and_by_direct_message_with_unique_names_and_presence() {
    let redis = Redis::start();
    let prefix = prefix("three");
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis, &prefix)).collect();
    let mut ada = Client::hello(&nodes[0], "Ada").await;
    let mut bob = Client::hello(&nodes[1], "Bob").await;
    let mut cyd = Client::hello(&nodes[2], "Cyd").await;

    // Names are unique across nodes, whatever the case.
    let mut again = Client::open(&nodes[2], "ada again").await;
    again.send(json!({"type": "hello", "name": "ADA"})).await;
    let refused = again.until("the refusal", |e| e["type"] == "error").await;
    assert_eq!(refused["code"], "name_taken", "{refused}");
    assert_eq!(refused["request"], "hello", "{refused}");

    // Presence: the last to join sees everyone; the others see it come,
    // the joiner included (PROTOCOL.md, `presence`).
    ada.join("general").await;
    bob.join("general").await;
    let joined = cyd.join("general").await;
    let members: HashSet<&str> = joined["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(members, HashSet::from(["Ada", "Bob", "Cyd"]), "{joined}");
    for client in [&mut ada, &mut bob, &mut cyd] {
        client
            .until("Cyd's arrival", |e| {
                e["type"] == "presence" && e["name"] == "Cyd" && e["event"] == "join"
            })
            .await;
    }
    // The directory of every node lists all three.
    for client in [&mut ada, &mut bob, &mut cyd] {
        client
            .until("a directory with everyone", |e| {
                e["type"] == "directory"
                    && e["online"] == 3
                    && e["users"] == json!(["Ada", "Bob", "Cyd"])
            })
            .await;
    }

    // Everyone writes at once; every member gets every message once, all
    // in one order: the room stream's.
    let per_client = 20;
    for i in 0..per_client {
        for client in [&mut ada, &mut bob, &mut cyd] {
            let text = format!("{} {i}", client.name);
            client
                .send(json!({"type": "message", "room": "general", "text": text}))
                .await;
        }
    }
    let mut seen = Vec::new();
    for client in [&mut ada, &mut bob, &mut cyd] {
        client
            .until_within("the last messages", Duration::from_secs(10), |e| {
                e["type"] == "message" && e["text"] == format!("Cyd {}", per_client - 1)
            })
            .await;
        let lines = client.messages("general", Duration::from_millis(300)).await;
        assert_eq!(lines.len(), 3 * per_client, "{}: {lines:?}", client.name);
        assert_in_order(&client.name, &lines);
        seen.push(lines);
    }
    assert_eq!(seen[0], seen[1], "Ada and Bob saw different orders");
    assert_eq!(seen[0], seen[2], "Ada and Cyd saw different orders");
    for who in ["Ada", "Bob", "Cyd"] {
        let own: Vec<&String> = seen[0]
            .iter()
            .map(|(_, t)| t)
            .filter(|t| t.starts_with(who))
            .collect();
        let sent: Vec<String> = (0..per_client).map(|i| format!("{who} {i}")).collect();
        assert_eq!(
            own,
            sent.iter().collect::<Vec<_>>(),
            "{who}'s messages out of their order"
        );
    }

    // A direct message from node 1 to node 3: to Cyd, back to Ada, once.
    ada.send(json!({"type": "dm", "to": "cyd", "text": "psst"}))
        .await;
    let got = cyd.until("the DM", |e| e["type"] == "dm").await;
    assert_eq!(
        (
            got["from"].as_str(),
            got["to"].as_str(),
            got["text"].as_str()
        ),
        (Some("Ada"), Some("Cyd"), Some("psst")),
        "{got}"
    );
    let echo = ada.until("the DM's echo", |e| e["type"] == "dm").await;
    assert_eq!(echo["id"], got["id"]);
    bob.messages("general", Duration::from_millis(300)).await;
    assert!(
        bob.events.iter().all(|e| e["type"] != "dm"),
        "Bob got someone else's DM"
    );
    // And the pair's history, asked on node 2 by Cyd reconnected there
    // with its token (the pair's messages are the two identities').
    let token = cyd.token();
    drop(cyd);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut cyd, welcome) = Client::try_hello(&nodes[1], "Cyd", Some(&token)).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    cyd.send(json!({"type": "dm_history", "with": "Ada"})).await;
    let history = cyd.until("dm_history", |e| e["type"] == "dm_history").await;
    assert_eq!(history["history"][0]["text"], "psst", "{history}");
    assert_eq!(history["history"][0]["id"], got["id"], "{history}");

    // A DM to a name nobody holds.
    ada.send(json!({"type": "dm", "to": "Nobody", "text": "hi"}))
        .await;
    let refused = ada.until("unknown_user", |e| e["type"] == "error").await;
    assert_eq!(refused["code"], "unknown_user", "{refused}");

    // A member on the same node as the joiner sees it come too, and its
    // leave; members on other nodes see both through Redis. (Cyd left
    // the room when its first connection ended: Ada, Bob and Dee remain.)
    let mut dee = Client::hello(&nodes[0], "Dee").await;
    dee.join("general").await;
    for (who, client) in [("Ada", &mut ada), ("Bob", &mut bob), ("Dee", &mut dee)] {
        let seen = client
            .until(&format!("Dee's arrival, seen by {who}"), |e| {
                e["type"] == "presence" && e["name"] == "Dee" && e["event"] == "join"
            })
            .await;
        assert_eq!(seen["count"], 3, "{who}: {seen}");
    }
    dee.send(json!({"type": "leave", "room": "general"})).await;
    for (who, client) in [("Ada", &mut ada), ("Bob", &mut bob)] {
        client
            .until(&format!("Dee's leave, seen by {who}"), |e| {
                e["type"] == "presence" && e["name"] == "Dee" && e["event"] == "leave"
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_connection_recovers_exactly_what_was_said_meanwhile_on_another_node() {
    let redis = Redis::start();
    let prefix = prefix("cut");
    let nodes: Vec<Node> = (0..3).map(|_| Node::start(&redis, &prefix)).collect();
    let mut ada = Client::hello(&nodes[0], "Ada").await;
    let mut bob = Client::hello(&nodes[1], "Bob").await;
    ada.join("general").await;
    let joined = bob.join("general").await;
    let epoch = joined["epoch"].as_str().unwrap().to_owned();
    ada.say("general", "before").await;
    let last = bob
        .until("before", |e| {
            e["type"] == "message" && e["text"] == "before"
        })
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Bob's connection is cut; Ada goes on.
    drop(bob);
    for i in 0..10 {
        ada.say("general", &format!("meanwhile {i}")).await;
    }
    // Bob is back, on the third node, with his last id.
    let mut bob = Client::hello(&nodes[2], "Bob").await;
    bob.send(json!({"type": "join", "room": "general", "since": last, "epoch": epoch}))
        .await;
    let joined = bob.until("joined", |e| e["type"] == "joined").await;
    assert_eq!(joined["recovered"], true, "{joined}");
    let texts: Vec<&str> = joined["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l["text"].as_str())
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("meanwhile {i}")).collect();
    assert_eq!(
        texts,
        expected.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // And live from there, nothing twice.
    ada.say("general", "after").await;
    bob.until("after", |e| e["type"] == "message" && e["text"] == "after")
        .await;
    let live = bob.messages("general", Duration::from_millis(300)).await;
    assert_eq!(
        live.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        ["after"]
    );

    // A `since` the stream no longer holds (another epoch): not recovered,
    // and said so.
    let mut cyd = Client::hello(&nodes[1], "Cyd").await;
    cyd.send(json!({"type": "join", "room": "general", "since": last, "epoch": "another"}))
        .await;
    let joined = cyd.until("joined", |e| e["type"] == "joined").await;
    assert_eq!(joined["recovered"], false, "{joined}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_mid_stream_nodes_reconnect_and_the_loss_is_reported() {
    let mut redis = Redis::start();
    let prefix = prefix("restart");
    let a = Node::start(&redis, &prefix);
    let b = Node::start(&redis, &prefix);
    let mut ada = Client::hello(&a, "Ada").await;
    let mut bob = Client::hello(&b, "Bob").await;
    ada.join("general").await;
    let first = bob.join("general").await;
    ada.say("general", "one").await;
    bob.until("one", |e| e["type"] == "message" && e["text"] == "one")
        .await;

    // Redis loses everything (nothing is saved) and comes back.
    redis.restart();
    // Delivery resumes by itself: the nodes reconnect and subscribe again.
    ada.say("general", "two").await;
    let two = bob
        .until_within("two", Duration::from_secs(15), |e| {
            e["type"] == "message" && e["text"] == "two"
        })
        .await;
    // What Redis lost is never a silent gap: Bob is told, with the
    // stream's new epoch.
    let gap = bob
        .events
        .iter()
        .find(|e| e["type"] == "gap" && e["room"] == "general")
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no gap before the message after the restart: {:?}",
                bob.events
            )
        });
    assert_ne!(gap["epoch"], first["epoch"], "{gap}");
    let lines = bob.messages("general", Duration::from_millis(300)).await;
    assert_eq!(
        lines.iter().map(|(_, t)| t.as_str()).collect::<Vec<_>>(),
        ["one", "two"]
    );
    assert!(two["id"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_users_leave_presence_everywhere_within_ttl_and_a_beat() {
    let redis = Redis::start();
    let prefix = prefix("kill");
    let a = Node::start(&redis, &prefix);
    let mut b = Node::start(&redis, &prefix);
    let mut ada = Client::hello(&a, "Ada").await;
    let mut bob = Client::hello(&b, "Bob").await;
    ada.join("general").await;
    bob.join("general").await;
    ada.until("Bob's arrival", |e| {
        e["type"] == "presence" && e["name"] == "Bob"
    })
    .await;
    ada.until("a directory with Bob", |e| {
        e["type"] == "directory" && e["online"] == 2
    })
    .await;

    let killed = Instant::now();
    let from = ada.events.len();
    b.child.kill().expect("SIGKILL");
    let _ = b.child.wait();
    // PROTOCOL.md: within TTL + 2 BEATs (12 s) of the kill; 15 s documented.
    let limit = Duration::from_secs(15);
    let left = ada
        .until_within("Bob's leave", limit, |e| {
            e["type"] == "presence" && e["name"] == "Bob" && e["event"] == "leave"
        })
        .await;
    assert_eq!(left["count"], 1, "{left}");
    // The directory (read from the online set) may have said so first.
    let without_bob = |e: &Value| e["type"] == "directory" && e["users"] == json!(["Ada"]);
    if !ada.events[from..].iter().any(without_bob) {
        ada.until_within(
            "a directory without Bob",
            Duration::from_secs(3),
            without_bob,
        )
        .await;
    }
    assert!(
        killed.elapsed() < Duration::from_secs(15),
        "{:?}",
        killed.elapsed()
    );
    // And the name is free again.
    Client::hello(&a, "Bob").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_redis_is_detected_counted_and_told_and_its_return_too() {
    let redis = Redis::start();
    let prefix = prefix("freeze");
    let node = Node::start(&redis, &prefix);
    let mut ada = Client::hello(&node, "Ada").await;
    ada.join("general").await;
    redis.signal("-STOP");
    let frozen = Instant::now();
    let down = ada
        .until_within("status down", Duration::from_secs(5), |e| {
            e["type"] == "status"
        })
        .await;
    assert_eq!(down["redis"], "down", "{down}");
    // Documented: detected within 3 s (two PINGs a second apart).
    assert!(
        frozen.elapsed() < Duration::from_millis(3500),
        "{:?}",
        frozen.elapsed()
    );
    let metrics = node.metrics().await;
    assert!(metrics.contains("duplex_chat_redis_up 0"), "{metrics}");
    assert!(
        metrics.contains("duplex_chat_redis_stalls_total 1"),
        "{metrics}"
    );
    // Requests that need Redis get `unavailable`, in time.
    ada.send(json!({"type": "message", "room": "general", "text": "lost?"}))
        .await;
    let refused = ada.until("unavailable", |e| e["type"] == "error").await;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    redis.signal("-CONT");
    let up = ada
        .until_within("status up", Duration::from_secs(5), |e| {
            e["type"] == "status"
        })
        .await;
    assert_eq!(up["redis"], "up", "{up}");
    ada.say("general", "back").await;
    let metrics = node.metrics().await;
    assert!(metrics.contains("duplex_chat_redis_up 1"), "{metrics}");
    assert!(
        metrics.contains("duplex_chat_redis_reconnects_total 1"),
        "{metrics}"
    );
}

#[test]
fn redis_unreachable_at_start_is_a_clear_error_or_with_retry_a_wait() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let started = Instant::now();
    let mut child = node_command(&url, "unreachable", free_port())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start duplex-chat");
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "duplex-chat kept running without Redis"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains(&format!("cannot reach Redis at {url}")),
        "{stderr}"
    );

    // With --redis-retry it waits, then serves once Redis is there.
    let node_port = free_port();
    let mut waiting = Node {
        child: node_command(&url, "unreachable", node_port)
            .arg("--redis-retry")
            .spawn()
            .expect("start duplex-chat"),
        port: node_port,
    };
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        waiting.child.try_wait().unwrap().is_none(),
        "gave up without Redis despite --redis-retry"
    );
    let _redis = Redis::start_on(port);
    wait_listening(node_port, "duplex-chat after Redis came");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        Client::hello(&waiting, "Ada").await;
    });
    let _ = waiting.child.kill();
}

/// A connection to the test's Redis, to look at what the nodes left there.
async fn inspect(redis: &Redis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

/// The keys matching `pattern`.
async fn keys(conn: &mut redis::aio::MultiplexedConnection, pattern: String) -> Vec<String> {
    redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .expect("KEYS")
}

/// What Redis holds for a prefix: `(streams of rooms, the largest room
/// stream's entries, its bytes of lines)`.
async fn redis_holdings(redis: &Redis, prefix: &str) -> (usize, usize, usize) {
    let mut conn = inspect(redis).await;
    let keys = keys(&mut conn, format!("{prefix}:s:*")).await;
    let (mut most, mut bytes) = (0, 0);
    for key in &keys {
        let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
            .arg(key)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .expect("XRANGE");
        if entries.len() >= most {
            most = entries.len();
            bytes = entries
                .iter()
                .flat_map(|(_, fields)| {
                    fields
                        .iter()
                        .filter(|(f, _)| f == "t")
                        .map(|(_, v)| v.len())
                })
                .sum();
        }
    }
    (keys.len(), most, bytes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_a_client_can_make_redis_hold_is_bounded_at_the_shipped_defaults() {
    let redis = Redis::start();
    let prefix = prefix("bounds");
    let node = Node::start(&redis, &prefix);
    let defaults = duplex_chat::ChatOptions::default();
    let mut ada = Client::hello(&node, "Ada").await;
    // Big lines in one room: the stream keeps --history-bytes of them.
    ada.join("big").await;
    // Two bytes a character: as many bytes as a line may have.
    let text = "é".repeat(defaults.max_text_chars - 10);
    let lines = defaults.history_bytes / text.len() + 8;
    for i in 0..lines {
        ada.send(json!({"type": "message", "room": "big", "text": format!("{i:>6} {text}")}))
            .await;
    }
    ada.until_within("the last big line", Duration::from_secs(20), |e| {
        e["type"] == "message"
            && e["text"]
                .as_str()
                .is_some_and(|t| t.starts_with(&format!("{:>6}", lines - 1)))
    })
    .await;
    // Many rooms, each with a line, made by connections from many
    // addresses, each within its allowance of new streams: at most
    // --max-total-rooms streams are kept.
    let rooms = defaults.max_total_rooms + 50;
    let allowance = duplex_chat::RedisOptions::NEW_STREAMS_BURST as usize;
    let writers = rooms.div_ceil(allowance);
    let writing = (0..writers).map(|w| {
        let node = &node;
        async move {
            let source = std::net::Ipv4Addr::new(127, 0, 2, 1 + w as u8);
            let mut writer = Client::hello_from(node, &format!("w{w}"), source).await;
            let mine = (w * allowance..rooms.min((w + 1) * allowance)).map(|i| format!("r{i}"));
            let mut last = String::new();
            for room in mine {
                writer.send(json!({"type": "join", "room": room})).await;
                writer
                    .send(json!({"type": "message", "room": room, "text": "hi"}))
                    .await;
                writer.send(json!({"type": "leave", "room": room})).await;
                last = room;
            }
            writer
                .until_within("its last room's answer", Duration::from_secs(30), |e| {
                    e["type"] == "left" && e["room"] == last
                })
                .await;
            writer
        }
    });
    let writers = futures_util::future::join_all(writing).await;
    for writer in &writers {
        assert!(
            writer.events.iter().all(|e| e["type"] != "error"),
            "{}: {:?}",
            writer.name,
            writer.events.iter().find(|e| e["type"] == "error")
        );
    }
    // Direct-message histories asked of many pairs that never wrote: a
    // read creates nothing.
    let pairs = defaults.max_total_rooms + 50;
    for i in 0..pairs {
        ada.send(json!({"type": "dm_history", "with": format!("u{i}")}))
            .await;
        if i % 100 == 99 || i == pairs - 1 {
            ada.until_within("the histories", Duration::from_secs(20), |e| {
                e["type"] == "dm_history" && e["with"] == format!("u{i}")
            })
            .await;
        }
    }
    let (streams, most, bytes) = redis_holdings(&redis, &prefix).await;
    assert!(
        streams <= defaults.max_total_rooms,
        "{streams} room streams kept"
    );
    let mut conn = inspect(&redis).await;
    let pair_metas = keys(&mut conn, format!("{prefix}:dmeta:*")).await;
    assert!(pair_metas.is_empty(), "pairs' epochs kept: {pair_metas:?}");
    // Every member set expires unless a live node refreshes it.
    for key in &keys(&mut conn, format!("{prefix}:m:*")).await {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(key)
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!(ttl > 0, "{key} never expires ({ttl})");
    }
    assert!(most <= defaults.history, "{most} entries in one stream");
    assert!(
        bytes <= defaults.history_bytes,
        "{bytes} bytes of lines in one stream"
    );
    assert!(
        ada.events.iter().all(|e| e["type"] != "error"),
        "{:?}",
        ada.events.iter().find(|e| e["type"] == "error")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joiner_s_history_and_live_messages_meet_exactly_while_another_node_writes() {
    let redis = Redis::start();
    let prefix = prefix("race");
    let a = Node::start(&redis, &prefix);
    let b = Node::start(&redis, &prefix);
    let mut ada = Client::hello(&a, "Ada").await;
    ada.join("general").await;
    let total = 600u64;
    let writer = tokio::spawn(async move {
        for n in 0..total {
            ada.send(json!({"type": "message", "room": "general", "text": n.to_string()}))
                .await;
            if n % 8 == 0 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        ada
    });
    // Bob on the other node, and Cyd on the writer's own, join and leave
    // over and over while Ada writes: each time, the history of `joined`
    // and the messages after it are consecutive, none missing, none twice.
    let mut rounds = 0;
    for (node, name) in [(&b, "Bob"), (&a, "Cyd")] {
        let mut client = Client::hello(node, name).await;
        for _ in 0..6 {
            let joined = client.join("general").await;
            let mut numbers: Vec<u64> = joined["history"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l["text"].as_str().unwrap().parse().unwrap())
                .collect();
            let mut live = 0;
            while live < 20 {
                let event = client.until("a message", |e| e["type"] == "message").await;
                numbers.push(event["text"].as_str().unwrap().parse().unwrap());
                live += 1;
                if numbers.last() == Some(&(total - 1)) {
                    break;
                }
            }
            for pair in numbers.windows(2) {
                assert_eq!(pair[0] + 1, pair[1], "{name}: {numbers:?}");
            }
            client
                .send(json!({"type": "leave", "room": "general"}))
                .await;
            client.until("left", |e| e["type"] == "left").await;
            rounds += 1;
            if numbers.last() == Some(&(total - 1)) {
                break;
            }
        }
    }
    assert!(rounds >= 4, "only {rounds} rounds while Ada wrote");
    let mut ada = tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("Ada's writing in time")
        .expect("Ada's task");
    ada.until_within("her last message", Duration::from_secs(10), |e| {
        e["type"] == "message" && e["text"] == (total - 1).to_string().as_str()
    })
    .await;
}

/// The texts of a `joined` or `dm_history` answer's history.
fn history_texts(answer: &Value) -> Vec<String> {
    answer["history"]
        .as_array()
        .unwrap_or_else(|| panic!("no history: {answer}"))
        .iter()
        .map(|l| l["text"].as_str().expect("text").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_making_up_rooms_and_pairs_erase_no_room_in_use_nor_a_pair_s_messages() {
    let redis = Redis::start();
    let prefix = prefix("evict");
    let home = Node::start(&redis, &prefix);
    let other = Node::start(&redis, &prefix);
    let defaults = duplex_chat::ChatOptions::default();
    let mut alice = Client::hello(&home, "Alice").await;
    let mut bob = Client::hello(&home, "Bob").await;
    alice.join("general").await;
    bob.join("general").await;
    alice.say("general", "before").await;
    bob.until("before", |e| {
        e["type"] == "message" && e["text"] == "before"
    })
    .await;
    alice
        .send(json!({"type": "dm", "to": "Bob", "text": "psst"}))
        .await;
    bob.until("the DM", |e| e["type"] == "dm" && e["text"] == "psst")
        .await;

    // 60 strangers on another node, each from an address of its own (so
    // that only a connection's allowance of new streams holds them back),
    // each making up as many rooms as it may be in and asking the history
    // of as many made-up pairs: more rooms, and more pairs, than Redis
    // keeps streams of.
    let strangers = 60;
    let each = defaults.max_rooms_per_user;
    let attack = (0..strangers).map(|i| {
        let other = &other;
        async move {
            let source = std::net::Ipv4Addr::new(127, 0, 1, 1 + i as u8);
            let mut stranger = Client::hello_from(other, &format!("s{i}"), source).await;
            for j in 0..each {
                stranger
                    .send(json!({"type": "join", "room": format!("s{i}r{j}")}))
                    .await;
                stranger
                    .send(json!({"type": "dm_history", "with": format!("s{i}u{j}")}))
                    .await;
            }
            let mut refusals = Vec::new();
            let mut joined = 0;
            for _ in 0..2 * each {
                let answer = stranger
                    .until_within("an answer", Duration::from_secs(30), |e| {
                        ["joined", "dm_history", "error"]
                            .contains(&e["type"].as_str().unwrap_or(""))
                    })
                    .await;
                if answer["type"] == "error" {
                    refusals.push(answer["code"].as_str().unwrap_or_default().to_owned());
                }
                joined += usize::from(answer["type"] == "joined");
            }
            (stranger, refusals, joined)
        }
    });
    // Kept open: their rooms stay in use while Alice and Bob are checked.
    let strangers: Vec<(Client, Vec<String>, usize)> = futures_util::future::join_all(attack).await;
    // Redis keeps as many streams as it may, every one of a room in use:
    // #general and 999 of theirs (their node alone would take 1,000).
    let joined: usize = strangers.iter().map(|(_, _, joined)| joined).sum();
    assert_eq!(joined, defaults.max_total_rooms - 1);
    for (stranger, refusals, _) in &strangers {
        assert!(
            refusals
                .iter()
                .all(|code| code == "server_rooms_full" || code == "rate_limited"),
            "{}: {refusals:?}",
            stranger.name
        );
    }

    // #general lost nothing: Bob gets the next message with no gap, and a
    // newcomer the whole history.
    alice.say("general", "after").await;
    bob.until("after", |e| e["type"] == "message" && e["text"] == "after")
        .await;
    bob.messages("general", Duration::from_millis(300)).await;
    assert!(
        bob.events.iter().all(|e| e["type"] != "gap"),
        "Bob was told of a gap: {:?}",
        bob.events.iter().find(|e| e["type"] == "gap")
    );
    let mut cyd = Client::hello(&home, "Cyd").await;
    let joined = cyd.join("general").await;
    assert_eq!(history_texts(&joined), ["before", "after"], "{joined}");
    // Nor did Alice and Bob's direct messages go.
    alice
        .send(json!({"type": "dm_history", "with": "Bob"}))
        .await;
    let history = alice
        .until("dm_history", |e| e["type"] == "dm_history")
        .await;
    assert_eq!(history_texts(&history), ["psst"], "{history}");

    // And Redis holds no more than its caps.
    let mut conn = inspect(&redis).await;
    for index in ["kept", "dkept"] {
        let held: usize = redis::cmd("ZCARD")
            .arg(format!("{prefix}:{index}"))
            .query_async(&mut conn)
            .await
            .expect("ZCARD");
        assert!(held <= defaults.max_total_rooms, "{held} in {index}");
    }
    let pair_metas = keys(&mut conn, format!("{prefix}:dmeta:*")).await;
    assert_eq!(pair_metas.len(), 1, "{pair_metas:?}");
    drop(strangers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_of_a_pair_that_never_wrote_leaves_nothing_in_redis_and_its_epoch_holds() {
    let redis = Redis::start();
    let prefix = prefix("unwritten");
    let node = Node::start(&redis, &prefix);
    let mut ada = Client::hello(&node, "Ada").await;
    let mut bob = Client::hello(&node, "Bob").await;
    let mut conn = inspect(&redis).await;
    let before: HashSet<String> = keys(&mut conn, format!("{prefix}:*"))
        .await
        .into_iter()
        .collect();
    ada.send(json!({"type": "dm_history", "with": "Nobody"}))
        .await;
    ada.until("dm_history", |e| e["type"] == "dm_history").await;
    ada.send(json!({"type": "dm_history", "with": "Bob", "since": "1-0", "epoch": "x"}))
        .await;
    ada.until("dm_history", |e| e["type"] == "dm_history").await;
    ada.send(json!({"type": "dm_history", "with": "Bob"})).await;
    let empty = ada.until("dm_history", |e| e["type"] == "dm_history").await;
    assert_eq!(history_texts(&empty), Vec::<String>::new(), "{empty}");
    let after: HashSet<String> = keys(&mut conn, format!("{prefix}:*"))
        .await
        .into_iter()
        .collect();
    let pair_keys: Vec<&String> = after
        .difference(&before)
        .filter(|k| {
            [":ds:", ":dmeta:", ":dkept"]
                .iter()
                .any(|part| k.contains(part))
        })
        .collect();
    assert!(pair_keys.is_empty(), "reads left {pair_keys:?}");
    // The epoch given before the pair's first message is the pair's after
    // it: a client that asked early recovers from it.
    ada.send(json!({"type": "dm", "to": "Bob", "text": "hi"}))
        .await;
    let first = bob.until("the DM", |e| e["type"] == "dm").await;
    ada.send(json!({"type": "dm", "to": "Bob", "text": "again"}))
        .await;
    bob.until("the second DM", |e| {
        e["type"] == "dm" && e["text"] == "again"
    })
    .await;
    ada.send(
        json!({"type": "dm_history", "with": "Bob", "since": first["id"], "epoch": empty["epoch"]}),
    )
    .await;
    let recovered = ada.until("dm_history", |e| e["type"] == "dm_history").await;
    assert_eq!(recovered["recovered"], true, "{recovered}");
    assert_eq!(history_texts(&recovered), ["again"], "{recovered}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_answers_the_epoch_redis_holds_and_members_told_of_the_change() {
    let redis = Redis::start();
    let prefix = prefix("epoch");
    let node = Node::start(&redis, &prefix);
    let mut ada = Client::hello(&node, "Ada").await;
    let first = ada.join("general").await;
    ada.say("general", "one").await;
    // The room's stream goes behind the node's back (as when Redis
    // restarts without its data while the node's subscription holds).
    let mut conn = inspect(&redis).await;
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{prefix}:s:general"))
        .arg(format!("{prefix}:meta:general"))
        .query_async(&mut conn)
        .await
        .expect("DEL");
    let mut bob = Client::hello(&node, "Bob").await;
    let joined = bob.join("general").await;
    let held: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}:meta:general"))
        .arg("epoch")
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert_eq!(joined["epoch"].as_str(), held.as_deref(), "{joined}");
    assert_ne!(joined["epoch"], first["epoch"], "{joined}");
    assert_eq!(history_texts(&joined), Vec::<String>::new(), "{joined}");
    // Ada, who was in the room, is told it lost messages, with the epoch.
    let gap = ada.until("the gap", |e| e["type"] == "gap").await;
    assert_eq!(gap["epoch"], joined["epoch"], "{gap}");
    // Messages go on in the new stream, and a later joiner's epoch is it.
    ada.say("general", "two").await;
    bob.until("two", |e| e["type"] == "message" && e["text"] == "two")
        .await;
    let mut cyd = Client::hello(&node, "Cyd").await;
    let later = cyd.join("general").await;
    assert_eq!(later["epoch"], joined["epoch"], "{later}");
    assert_eq!(history_texts(&later), ["two"], "{later}");
}

/// Joins and leaves `rooms` without waiting, then says which joins were
/// refused with `rate_limited`.
async fn make_rooms(client: &mut Client, rooms: &[String]) -> Vec<String> {
    for room in rooms {
        client.send(json!({"type": "join", "room": room})).await;
        client.send(json!({"type": "leave", "room": room})).await;
    }
    let mut limited = Vec::new();
    for room in rooms {
        let answer = client
            .until_within("the join's answer", Duration::from_secs(20), |e| {
                e["room"] == room.as_str() && (e["type"] == "joined" || e["type"] == "error")
            })
            .await;
        if answer["type"] == "error" {
            assert_eq!(answer["code"], "rate_limited", "{answer}");
            assert!(
                answer["retry_after_ms"].as_u64().unwrap_or(0) > 0,
                "{answer}"
            );
            limited.push(room.clone());
        }
    }
    limited
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rooms_and_conversations_past_a_connection_s_or_an_address_s_allowance_are_rate_limited()
 {
    let redis = Redis::start();
    let prefix = prefix("allowance");
    let node = Node::start(&redis, &prefix);
    let allowance = duplex_chat::RedisOptions::new(String::new());
    let burst = allowance.new_streams_burst as usize;
    let home = std::net::Ipv4Addr::new(127, 0, 3, 1);
    let mut bob = Client::hello_from(&node, "Bob", std::net::Ipv4Addr::new(127, 0, 3, 2)).await;
    bob.join("lobby").await;
    let mut ada = Client::hello_from(&node, "Ada", home).await;
    // Ada's first message to Bob starts their pair: one of her allowance.
    ada.send(json!({"type": "dm", "to": "Bob", "text": "hi"}))
        .await;
    ada.until("the DM", |e| e["type"] == "dm").await;
    // The rest of her burst makes rooms; the next new room is refused.
    let rooms: Vec<String> = (0..burst + 5).map(|i| format!("a{i}")).collect();
    let limited = make_rooms(&mut ada, &rooms).await;
    assert!(
        !limited.is_empty() && limited.iter().all(|r| !rooms[..burst - 1].contains(r)),
        "refused: {limited:?}"
    );
    // What exists takes nothing: a room in use, a pair that wrote.
    ada.join("lobby").await;
    ada.send(json!({"type": "dm", "to": "Bob", "text": "again"}))
        .await;
    ada.until("the second DM", |e| {
        e["type"] == "dm" && e["text"] == "again"
    })
    .await;
    // A new conversation does.
    let _cyd = Client::hello_from(&node, "Cyd", std::net::Ipv4Addr::new(127, 0, 3, 3)).await;
    ada.send(json!({"type": "dm", "to": "Cyd", "text": "hello"}))
        .await;
    let refused = ada
        .until("the refusal", |e| e["type"] == "error" || e["type"] == "dm")
        .await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    assert_eq!(refused["request"], "dm", "{refused}");

    // Other connections from Ada's address share the address's allowance:
    // together they start no more than it, however many they are.
    let per_address = allowance.new_streams_burst_per_address as usize;
    let connections = per_address.div_ceil(burst) + 1;
    let mut started = burst;
    for c in 0..connections {
        let mut more = Client::hello_from(&node, &format!("m{c}"), home).await;
        let rooms: Vec<String> = (0..burst).map(|i| format!("m{c}r{i}")).collect();
        started += burst - make_rooms(&mut more, &rooms).await.len();
    }
    // A few tokens come back while the test runs (2 a second).
    assert!(
        started <= per_address + 10,
        "{started} streams started from one address"
    );
    // Another address has its own.
    let mut elsewhere =
        Client::hello_from(&node, "Dee", std::net::Ipv4Addr::new(127, 0, 3, 4)).await;
    let joined = elsewhere.join("elsewhere").await;
    assert_eq!(joined["type"], "joined", "{joined}");
}

impl Client {
    /// A connection that says `hello` (with `token` if given) and gets
    /// `welcome` or an error.
    async fn try_hello(node: &Node, name: &str, token: Option<&str>) -> (Client, Value) {
        let mut client = Client::open(node, name).await;
        let mut request = json!({"type": "hello", "name": name});
        if let Some(token) = token {
            request["token"] = json!(token);
        }
        client.send(request).await;
        let answer = client
            .until("welcome", |e| {
                e["type"] == "welcome" || e["type"] == "error"
            })
            .await;
        (client, answer)
    }

    /// A connection that takes `name` once its last holder's hold is gone
    /// (a disconnect is released at once, a dead node's names expire).
    async fn take_freed_name(
        node: &Node,
        name: &str,
        token: Option<&str>,
        limit: Duration,
    ) -> (Client, Value) {
        let deadline = Instant::now() + limit;
        loop {
            let (client, answer) = Client::try_hello(node, name, token).await;
            if answer["type"] == "welcome" {
                return (client, answer);
            }
            assert_eq!(answer["code"], "name_taken", "{answer}");
            assert!(
                Instant::now() < deadline,
                "{name} not freed within {limit:?}"
            );
            drop(client);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Sends a direct message and waits for its echo.
    async fn dm(&mut self, to: &str, text: &str) -> Value {
        self.send(json!({"type": "dm", "to": to, "text": text}))
            .await;
        self.until("the dm's echo", |e| {
            (e["type"] == "dm" && e["text"] == text) || e["type"] == "error"
        })
        .await
    }

    async fn dm_history(&mut self, request: Value) -> Value {
        self.send(request).await;
        self.until("dm_history", |e| e["type"] == "dm_history")
            .await
    }

    /// The token of this connection's `welcome`.
    fn token(&self) -> String {
        self.events
            .iter()
            .find(|e| e["type"] == "welcome")
            .and_then(|e| e["token"].as_str())
            .expect("a welcome with a token")
            .to_owned()
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(WAIT, self.ws.close(None)).await;
    }
}

/// Every way of asking a stranger can try: none gets an earlier holder's
/// messages.
async fn assert_none_of_it(stranger: &mut Client, with: &str, since: &Value, epoch: &Value) {
    for request in [
        json!({"type": "dm_history", "with": with}),
        json!({"type": "dm_history", "with": with.to_lowercase(), "since": "0-0", "epoch": epoch}),
        json!({"type": "dm_history", "with": with.to_uppercase(), "since": since, "epoch": epoch}),
        json!({"type": "dm_history", "with": with, "since": since}),
    ] {
        let answer = stranger.dm_history(request.clone()).await;
        assert_eq!(
            history_texts(&answer),
            Vec::<String>::new(),
            "{request} gave {answer}"
        );
        assert_ne!(answer["recovered"], true, "{request} gave {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freed_name_gives_its_new_holder_none_of_the_earlier_holder_s_direct_messages() {
    let redis = Redis::start();
    let prefix = prefix("identity");
    let a = Node::start(&redis, &prefix);
    let b = Node::start(&redis, &prefix);
    let mut c = Node::start(&redis, &prefix);
    let (mut alice, welcome) = Client::try_hello(&a, "Alice", None).await;
    let alice_token = welcome["token"].as_str().expect("a token").to_owned();
    let mut bob = Client::hello(&b, "Bob").await;
    let first = alice.dm("bob", "secret one").await;
    bob.until("Alice's message", |e| {
        e["type"] == "dm" && e["text"] == "secret one"
    })
    .await;
    bob.dm("alice", "secret two").await;
    alice
        .until("Bob's message", |e| {
            e["type"] == "dm" && e["text"] == "secret two"
        })
        .await;
    let mine = alice
        .dm_history(json!({"type": "dm_history", "with": "Bob"}))
        .await;
    assert_eq!(history_texts(&mine), ["secret one", "secret two"]);
    let epoch = mine["epoch"].clone();
    let (mut carol, welcome) = Client::try_hello(&c, "Carol", None).await;
    let carol_token = welcome["token"].as_str().expect("a token").to_owned();
    carol.dm("Bob", "carol's secret").await;
    bob.until("Carol's message", |e| e["text"] == "carol's secret")
        .await;

    // Freed by a disconnect: a stranger on another node takes the name.
    alice.close().await;
    let (mut stranger, welcome) =
        Client::take_freed_name(&b, "alice", None, Duration::from_secs(5)).await;
    assert_ne!(welcome["token"], alice_token.as_str());
    assert_none_of_it(&mut stranger, "Bob", &first["id"], &epoch).await;
    // A live message published for the old Alice (as one on its way when
    // she left would be) reaches only her identity's connections: not the
    // stranger now called alice; Bob, its other end, gets it.
    let old_alice = sha_identity(&alice_token);
    let bob_identity = sha_identity(&bob.token());
    let late = r#""from":"Bob","to":"Alice","text":"late secret","ts":1}"#;
    let mut conn = inspect(&redis).await;
    let _: i64 = redis::cmd("PUBLISH")
        .arg(format!("{prefix}:d"))
        .arg(format!(
            "bob\n{bob_identity}\nalice\n{old_alice}\n9-0\n{late}"
        ))
        .query_async(&mut conn)
        .await
        .expect("PUBLISH");
    bob.until("the late message", |e| e["text"] == "late secret")
        .await;
    let quiet_until = tokio::time::Instant::now() + Duration::from_millis(500);
    while stranger.read(quiet_until).await.is_some() {}
    // Freed by its node's death: the name expires, and another takes it.
    c.child.kill().expect("SIGKILL");
    let _ = c.child.wait();
    drop(carol);
    let (mut other, _) = Client::take_freed_name(&a, "carol", None, Duration::from_secs(20)).await;
    assert_none_of_it(&mut other, "Bob", &first["id"], &epoch).await;

    // "alice" is the stranger now: Bob's next message is theirs, in a
    // conversation of their own.
    bob.dm("Alice", "who is this?").await;
    stranger
        .until("Bob's message", |e| {
            e["type"] == "dm" && e["text"] == "who is this?"
        })
        .await;
    let theirs = stranger
        .dm_history(json!({"type": "dm_history", "with": "Bob"}))
        .await;
    assert_eq!(history_texts(&theirs), ["who is this?"]);

    // The real Alice and Carol, back with their tokens under other names
    // (theirs are held), have their conversations and nothing else.
    let (_, refused) = Client::try_hello(&a, "Alice", Some(&alice_token)).await;
    assert_eq!(refused["code"], "name_taken", "{refused}");
    let (mut alice, welcome) = Client::try_hello(&a, "Alice again", Some(&alice_token)).await;
    assert_eq!(welcome["token"], alice_token.as_str(), "{welcome}");
    let again = alice
        .dm_history(json!({"type": "dm_history", "with": "Bob"}))
        .await;
    assert_eq!(history_texts(&again), ["secret one", "secret two"]);
    let since = alice
        .dm_history(
            json!({"type": "dm_history", "with": "Bob", "since": first["id"], "epoch": epoch}),
        )
        .await;
    assert_eq!(since["recovered"], true, "{since}");
    assert_eq!(history_texts(&since), ["secret two"]);
    let (mut carol, _) = Client::try_hello(&b, "Carol again", Some(&carol_token)).await;
    let hers = carol
        .dm_history(json!({"type": "dm_history", "with": "Bob"}))
        .await;
    assert_eq!(history_texts(&hers), ["carol's secret"]);
    // With Bob gone, Alice's conversation is still hers.
    bob.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let offline = alice
        .dm_history(json!({"type": "dm_history", "with": "Bob"}))
        .await;
    assert_eq!(history_texts(&offline), ["secret one", "secret two"]);
    // Nothing of the others' conversations ever reached the strangers.
    for (who, events) in [
        ("the stranger", &stranger.events),
        ("the other", &other.events),
    ] {
        assert!(
            !events.iter().any(|e| e.to_string().contains("secret")),
            "{who} got {events:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_look_alike_name_is_the_name_it_looks_like_across_nodes() {
    let redis = Redis::start();
    let prefix = prefix("lookalike");
    let a = Node::start(&redis, &prefix);
    let b = Node::start(&redis, &prefix);
    let mut alice = Client::hello(&a, "Alice").await;
    for look_alike in ["\u{410}lice", "ALICE", "\u{391}LICE"] {
        let (_, answer) = Client::try_hello(&b, look_alike, None).await;
        assert_eq!(answer["code"], "name_taken", "{look_alike:?}: {answer}");
    }
    // A direct message to a look-alike goes to the name's holder.
    let mut bob = Client::hello(&b, "Bob").await;
    let sent = bob.dm("\u{410}lice", "hi").await;
    assert_eq!(sent["to"], "Alice", "{sent}");
    alice
        .until("Bob's message", |e| e["type"] == "dm" && e["text"] == "hi")
        .await;
    let oneself = bob.dm("\u{412}ob", "me").await;
    assert_eq!(oneself["code"], "invalid_recipient", "{oneself}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whom_identities_wrote_with_is_capped_with_the_pairs() {
    let redis = Redis::start();
    let prefix = prefix("contacts");
    let port = free_port();
    let node = Node {
        child: node_command(&redis.url(), &prefix, port)
            .args(["--max-total-rooms", "2"])
            .spawn()
            .expect("start duplex-chat"),
        port,
    };
    wait_listening(port, "duplex-chat");
    let mut bob = Client::hello(&node, "Bob").await;
    let mut writers = Vec::new();
    for i in 0..4 {
        let mut writer = Client::hello(&node, &format!("W{i}")).await;
        let sent = writer.dm("Bob", &format!("from W{i}")).await;
        assert_eq!(sent["type"], "dm", "{sent}");
        writers.push(writer);
    }
    bob.until("the last message", |e| e["text"] == "from W3")
        .await;
    let mut conn = inspect(&redis).await;
    let (fields, used): (usize, usize) = redis::pipe()
        .cmd("HLEN")
        .arg(format!("{prefix}:dc"))
        .cmd("ZCARD")
        .arg(format!("{prefix}:dcu"))
        .query_async(&mut conn)
        .await
        .expect("HLEN, ZCARD");
    assert_eq!((fields, used), (4, 4), "two a pair, for the two pairs kept");
    // The newest are kept: Bob's conversation with W3, W3's with Bob.
    let kept: Option<String> = redis::cmd("HGET")
        .arg(format!("{prefix}:dc"))
        .arg(format!("{}\nw3", sha_identity(&bob.token())))
        .query_async(&mut conn)
        .await
        .expect("HGET");
    assert!(kept.is_some(), "Bob's last conversation is kept");
}

/// The identity of a token, as the server computes it.
fn sha_identity(token: &str) -> String {
    duplex_chat::protocol::identity(token)
}
