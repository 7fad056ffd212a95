//! Two duplex servers joined by one Redis channel, as two processes would
//! be, with tokio-tungstenite clients on each. The test starts its own
//! `redis-server` (on a free port, nothing saved) and fails, saying why,
//! when there is none.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use duplex::{App, Hub, Session, WebSockets};
use duplex_redis::RedisBackplane;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async, tungstenite};

type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A `redis-server` of the test's own, killed on drop.
struct RedisServer {
    child: Child,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer::start_on(free_port())
    }

    fn start_on(port: u16) -> RedisServer {
        let server = RedisServer {
            child: spawn_redis(port),
            port,
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return server;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("redis-server did not listen on port {port} within 5 s");
    }

    /// Kills the server and starts another on the same port.
    fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn_redis(self.port);
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server with SIGSTOP: its sockets stay open, it answers
    /// nothing, as a frozen or cut-off Redis does, until the guard is
    /// dropped (SIGCONT), test failure included.
    fn freeze(&self) -> Frozen {
        signal(self.child.id(), "-STOP");
        Frozen {
            pid: self.child.id(),
        }
    }
}

struct Frozen {
    pid: u32,
}

impl Drop for Frozen {
    fn drop(&mut self) {
        signal(self.pid, "-CONT");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status();
    // A panic here while unwinding would abort the test run and hide the
    // first failure; a failed SIGCONT only leaves a server that the
    // RedisServer guard kills anyway.
    if !matches!(status, Ok(s) if s.success()) && !std::thread::panicking() {
        panic!("kill {signal} {pid} failed: {status:?}");
    }
}

fn spawn_redis(port: u16) -> Child {
    Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| {
            panic!(
                "cannot start redis-server ({err}); install it \
                 (apt-get install redis-server, as .ci/run does)"
            )
        })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One node: `/room` joins topic "room" and publishes every message to it.
async fn node(url: &str, channel: &str) -> (SocketAddr, Hub) {
    let backplane = RedisBackplane::connect(url, channel)
        .await
        .expect("Redis reachable");
    serve(backplane).await
}

/// A node on a backplane of the test's own.
async fn serve(backplane: Arc<RedisBackplane>) -> (SocketAddr, Hub) {
    let hub = Hub::builder().backplane(backplane).build();
    let room_hub = hub.clone();
    let app = App::new().install(WebSockets::default()).web_socket(
        "/room",
        move |mut session: Session| {
            let hub = room_hub.clone();
            async move {
                let membership = hub.register(&session.sender());
                membership.join("room");
                while let Some(message) = session.recv().await? {
                    hub.publish("room", message);
                }
                Ok::<_, duplex::Error>(())
            }
        },
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(app.serve_with_shutdown(listener, std::future::pending()));
    (addr, hub)
}

async fn join(addr: SocketAddr, hub: &Hub, members_before: usize) -> Client {
    let (client, _) = connect_async(format!("ws://{addr}/room"))
        .await
        .expect("upgrade");
    // The handler joins the topic right after the upgrade.
    for _ in 0..200 {
        if hub.members("room").len() > members_before {
            return client;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the session did not join the room");
}

/// A Redis server and a client on each of two nodes, the nodes on the
/// given channels.
async fn two_nodes(channel_a: &str, channel_b: &str) -> (RedisServer, Client, Client) {
    let redis = RedisServer::start();
    let (a, hub_a) = node(&redis.url(), channel_a).await;
    let (b, hub_b) = node(&redis.url(), channel_b).await;
    let on_a = join(a, &hub_a, 0).await;
    let on_b = join(b, &hub_b, 0).await;
    (redis, on_a, on_b)
}

async fn next_frame(client: &mut Client) -> tungstenite::Message {
    tokio::time::timeout(Duration::from_secs(5), client.next())
        .await
        .expect("a message within 5 s")
        .expect("connection open")
        .expect("valid frame")
}

async fn next_text(client: &mut Client) -> String {
    match next_frame(client).await {
        tungstenite::Message::Text(text) => text.as_str().to_owned(),
        other => panic!("expected text, got {other:?}"),
    }
}

#[tokio::test]
async fn a_message_published_on_one_node_reaches_the_subscribers_of_both_once() {
    let (_redis, mut on_a, mut on_b) = two_nodes("duplex-test-1", "duplex-test-1").await;

    on_a.send(tungstenite::Message::text("hello from a"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut on_a).await, "hello from a");
    assert_eq!(next_text(&mut on_b).await, "hello from a");

    on_b.send(tungstenite::Message::binary(vec![1u8, 2, 3]))
        .await
        .expect("send");
    for client in [&mut on_a, &mut on_b] {
        assert_eq!(
            next_frame(client).await,
            tungstenite::Message::binary(vec![1u8, 2, 3])
        );
    }
    // Exactly once: nothing else is waiting on either side.
    for client in [&mut on_a, &mut on_b] {
        let extra = tokio::time::timeout(Duration::from_millis(300), client.next()).await;
        assert!(extra.is_err(), "a message arrived twice: {extra:?}");
    }
}

#[tokio::test]
async fn messages_from_one_publisher_arrive_in_order_on_the_other_node() {
    let (_redis, mut on_a, mut on_b) = two_nodes("duplex-test-2", "duplex-test-2").await;

    for i in 0..500 {
        on_a.feed(tungstenite::Message::text(format!("{i}")))
            .await
            .expect("send");
    }
    on_a.flush().await.expect("flush");
    for i in 0..500 {
        assert_eq!(next_text(&mut on_b).await, i.to_string());
    }
}

#[tokio::test]
async fn a_node_on_another_channel_hears_nothing() {
    let (_redis, mut on_a, mut on_b) = two_nodes("duplex-test-3a", "duplex-test-3b").await;
    on_a.send(tungstenite::Message::text("only a"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut on_a).await, "only a");
    let heard = tokio::time::timeout(Duration::from_millis(300), on_b.next()).await;
    assert!(
        heard.is_err(),
        "another channel's message arrived: {heard:?}"
    );
}

#[tokio::test]
async fn a_node_resubscribes_after_redis_restarts() {
    let (mut redis, mut on_a, mut on_b) = two_nodes("duplex-test-4", "duplex-test-4").await;

    // Redis goes away and comes back on the same port.
    redis.restart();

    // Publish until the other node hears again: the gap is lost (pub/sub
    // keeps nothing), what follows the reconnection arrives.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut heard = false;
    while tokio::time::Instant::now() < deadline && !heard {
        on_a.send(tungstenite::Message::text("again"))
            .await
            .expect("send");
        if let Ok(Some(Ok(tungstenite::Message::Text(text)))) =
            tokio::time::timeout(Duration::from_millis(250), on_b.next()).await
        {
            heard = text.as_str() == "again";
        }
    }
    assert!(heard, "node b never heard node a after Redis came back");
}

#[tokio::test]
async fn dropping_the_hub_ends_its_subscription() {
    let redis = RedisServer::start();
    let backplane = RedisBackplane::connect(&redis.url(), "duplex-test-5")
        .await
        .expect("Redis reachable");
    let hub = Hub::builder().backplane(backplane).build();
    let client = redis::Client::open(redis.url()).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let subscribers = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let counts: Vec<(String, u64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg("duplex-test-5")
                .query_async(&mut conn)
                .await
                .expect("PUBSUB NUMSUB");
            counts[0].1
        }
    };
    assert_eq!(subscribers(&mut conn).await, 1);
    drop(hub);
    // The channel stays silent: the delivery task notices on its own.
    for _ in 0..50 {
        if subscribers(&mut conn).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the subscription outlived its hub by 5 s");
}

/// How long after `start` `done` held, polled every 20 ms, or `None` once
/// `limit` has passed since `start`.
async fn time_until(
    start: Instant,
    limit: Duration,
    mut done: impl FnMut() -> bool,
) -> Option<Duration> {
    while start.elapsed() < limit {
        if done() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// Sends `text` from `from` until `to` hears it (what else arrives
/// meanwhile is skipped), for at most `limit`.
async fn until_heard(from: &mut Client, to: &mut Client, text: &str, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        from.send(tungstenite::Message::text(text))
            .await
            .expect("send");
        let round = Instant::now() + Duration::from_millis(250);
        while let Ok(Some(Ok(frame))) = tokio::time::timeout_at(round.into(), to.next()).await {
            if matches!(&frame, tungstenite::Message::Text(t) if t.as_str() == text) {
                return true;
            }
        }
    }
    false
}

/// The documented detection time with the default settings: a PING 1 s
/// after the last PONG, 2 s for its PONG.
const DETECTION: Duration = Duration::from_secs(3);
/// What a shared, loaded test machine adds to a timer.
const SLACK: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_frozen_redis_is_noticed_in_time_and_delivery_resumes_when_it_thaws() {
    let redis = RedisServer::start();
    let channel = "duplex-test-6";
    let backplane_a = RedisBackplane::connect(&redis.url(), channel)
        .await
        .expect("Redis reachable");
    let backplane_b = RedisBackplane::connect(&redis.url(), channel)
        .await
        .expect("Redis reachable");
    let (a, hub_a) = serve(backplane_a.clone()).await;
    let (b, hub_b) = serve(backplane_b.clone()).await;
    let mut on_a = join(a, &hub_a, 0).await;
    let mut on_b = join(b, &hub_b, 0).await;
    assert!(until_heard(&mut on_a, &mut on_b, "before", Duration::from_secs(5)).await);
    assert!(backplane_a.is_connected() && backplane_b.is_connected());
    assert_eq!((backplane_a.stalls(), backplane_b.stalls()), (0, 0));

    let frozen = redis.freeze();
    let frozen_at = Instant::now();
    // Publishing goes on meanwhile, and never waits for Redis.
    let publishing = Instant::now();
    for i in 0..10_000 {
        hub_a.publish("room", format!("during {i}"));
    }
    let publishing = publishing.elapsed();
    assert!(
        publishing < Duration::from_millis(500),
        "10,000 publishes to a frozen Redis took {publishing:?}"
    );

    // Both subscriptions miss a PONG; node a's burst goes unanswered too.
    println!("10,000 publishes to a frozen Redis took {publishing:?}");
    let noticed = time_until(frozen_at, DETECTION + SLACK, || {
        !backplane_a.is_connected()
            && !backplane_b.is_connected()
            && backplane_a.stalls() >= 2
            && backplane_b.stalls() >= 1
    })
    .await;
    let Some(noticed) = noticed else {
        panic!(
            "after {:?} of frozen Redis: a connected {}, {} stalls; b connected {}, {} stalls",
            DETECTION + SLACK,
            backplane_a.is_connected(),
            backplane_a.stalls(),
            backplane_b.is_connected(),
            backplane_b.stalls()
        );
    };
    println!("frozen Redis noticed by both nodes after {noticed:?}");

    drop(frozen);
    let back = time_until(Instant::now(), Duration::from_secs(20), || {
        backplane_a.is_connected() && backplane_b.is_connected()
    })
    .await
    .expect("both nodes reconnected within 20 s of SIGCONT");
    println!("both nodes reconnected {back:?} after SIGCONT");
    assert!(
        until_heard(&mut on_a, &mut on_b, "after", Duration::from_secs(10)).await,
        "node b never heard node a after Redis thawed"
    );
    assert!(until_heard(&mut on_b, &mut on_a, "back", Duration::from_secs(10)).await);
}

#[tokio::test]
async fn retrying_at_start_waits_for_a_redis_that_comes_up_later() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/");
    let channel = "duplex-test-7";
    let connect = || {
        RedisBackplane::builder(&url, channel)
            .retry_at_start(true)
            .connect()
    };
    let connecting_a = tokio::spawn(connect());
    let connecting_b = tokio::spawn(connect());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !connecting_a.is_finished() && !connecting_b.is_finished(),
        "connect returned with no Redis on port {port}"
    );

    let _redis = RedisServer::start_on(port);
    // The backoff is at 800 ms by now, 1.6 s next: well within 10 s.
    let backplane_a = tokio::time::timeout(Duration::from_secs(10), connecting_a)
        .await
        .expect("connected within 10 s of Redis starting")
        .expect("task")
        .expect("Redis reachable");
    let backplane_b = tokio::time::timeout(Duration::from_secs(10), connecting_b)
        .await
        .expect("connected within 10 s of Redis starting")
        .expect("task")
        .expect("Redis reachable");
    assert!(backplane_a.is_connected() && backplane_b.is_connected());
    let (a, hub_a) = serve(backplane_a).await;
    let (b, hub_b) = serve(backplane_b).await;
    let mut on_a = join(a, &hub_a, 0).await;
    let mut on_b = join(b, &hub_b, 0).await;
    on_a.send(tungstenite::Message::text("late start"))
        .await
        .expect("send");
    assert_eq!(next_text(&mut on_a).await, "late start");
    assert_eq!(next_text(&mut on_b).await, "late start");
}

#[tokio::test]
async fn without_retry_connect_fails_promptly_on_a_missing_redis() {
    let url = format!("redis://127.0.0.1:{}/", free_port());
    let started = Instant::now();
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        RedisBackplane::connect(&url, "duplex-test-8"),
    )
    .await
    .expect("connect returned within 5 s");
    assert!(connected.is_err(), "connected to nothing");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn without_retry_connect_fails_within_its_timeouts_on_a_frozen_redis() {
    let redis = RedisServer::start();
    let _frozen = redis.freeze();
    let (connection, response) = (Duration::from_millis(500), Duration::from_millis(300));
    let started = Instant::now();
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        RedisBackplane::builder(&redis.url(), "duplex-test-9")
            .connection_timeout(connection)
            .response_timeout(response)
            .connect(),
    )
    .await
    .expect("connect returned within 10 s");
    let took = started.elapsed();
    let err = connected.expect_err("connected to a frozen Redis");
    assert!(err.is_timeout(), "{err}");
    // The documented bound: two connections, one SUBSCRIBE.
    assert!(took < connection * 2 + response + SLACK, "{took:?}");
}

#[tokio::test]
async fn zero_timings_are_refused() {
    for builder in [
        RedisBackplane::builder("redis://127.0.0.1:1/", "c").ping_interval(Duration::ZERO),
        RedisBackplane::builder("redis://127.0.0.1:1/", "c").response_timeout(Duration::ZERO),
        RedisBackplane::builder("redis://127.0.0.1:1/", "c").connection_timeout(Duration::ZERO),
    ] {
        let err = builder.connect().await.expect_err("a zero timing");
        assert_eq!(err.kind(), redis::ErrorKind::InvalidClientConfig, "{err}");
    }
}
