//! Two duplex servers joined by one Redis channel, as two processes would
//! be, with tokio-tungstenite clients on each. The test starts its own
//! `redis-server` (on a free port, nothing saved) and fails, saying why,
//! when there is none.

use std::{
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Duration,
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

impl RedisServer {
    fn start() -> RedisServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
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
