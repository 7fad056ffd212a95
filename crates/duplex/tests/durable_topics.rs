//! Durable topics over real sockets, through the `feed` example: a
//! tokio-tungstenite client that drops its connection and comes back with
//! the position of the last message it saw gets exactly what it missed,
//! then the live stream; one with a position the topic cannot honour is
//! told so.

mod common;

#[path = "../examples/feed.rs"]
mod feed;

use common::{Server, WsMessage, ws_connect, ws_next};
use duplex::topics::{History, Topics};
use serde_json::Value;

async fn next_json(ws: &mut common::Ws) -> Value {
    match ws_next(ws).await {
        WsMessage::Text(text) => serde_json::from_str(&text).expect("JSON"),
        other => panic!("expected a text message, got {other:?}"),
    }
}

fn publish(topics: &Topics, range: std::ops::RangeInclusive<u32>) {
    for n in range {
        topics
            .publish("ticks", format!("tick {n}"))
            .expect("published");
    }
}

/// Waits until the feed's handler has subscribed (presence counts it).
async fn subscribed(topics: &Topics, count: usize) {
    common::within("the subscription", async {
        while topics.presence("ticks").len() < count {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn a_client_that_comes_back_with_its_position_gets_exactly_what_it_missed() {
    let topics = Topics::new(History::default());
    let server = Server::start(feed::app(topics.clone())).await;
    let mut first = ws_connect(server.addr, "/feed").await;
    subscribed(&topics, 1).await;
    publish(&topics, 1..=5);
    let mut seen = Vec::new();
    for _ in 0..3 {
        seen.push(next_json(&mut first).await);
    }
    // The connection is lost with ticks 4 and 5 unread; 6 to 8 come while
    // the client is away.
    drop(first);
    publish(&topics, 6..=8);
    let last = &seen[2];
    let path = format!(
        "/feed?offset={}&epoch={}",
        last["offset"],
        last["epoch"].as_str().expect("an epoch")
    );
    let mut again = ws_connect(server.addr, &path).await;
    subscribed(&topics, 1).await;
    publish(&topics, 9..=9);
    let mut texts: Vec<_> = seen.iter().map(|v| v["text"].clone()).collect();
    for _ in 4..=9 {
        texts.push(next_json(&mut again).await["text"].clone());
    }
    let expected: Vec<Value> = (1..=9).map(|n| format!("tick {n}").into()).collect();
    assert_eq!(texts, expected, "every tick once, in order");
}

#[tokio::test]
async fn a_position_the_topic_cannot_honour_is_told_and_the_feed_goes_on_from_now() {
    let topics = Topics::new(History::default().max_messages(2));
    let server = Server::start(feed::app(topics.clone())).await;
    publish(&topics, 1..=5);
    let epoch = topics.position("ticks").expect("the topic").epoch;
    for path in [
        format!("/feed?offset=1&epoch={epoch}"),
        "/feed?offset=1&epoch=another-life".to_owned(),
    ] {
        let mut ws = ws_connect(server.addr, &path).await;
        assert_eq!(
            next_json(&mut ws).await,
            serde_json::json!({ "recovered": false }),
            "{path}"
        );
        subscribed(&topics, 1).await;
        publish(&topics, 6..=6);
        assert_eq!(next_json(&mut ws).await["text"], "tick 6");
        drop(ws);
        common::within("the subscription's end", async {
            while !topics.presence("ticks").is_empty() {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}
