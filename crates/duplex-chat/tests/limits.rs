//! The chat's caps and rate limits over real loopback sockets, with
//! tokio-tungstenite as the client: each cap answers with its documented
//! error (PROTOCOL.md) on a connection that stays open, or closes with its
//! documented code; history stays within its byte budget; a re-join is
//! cheap; room events keep one order while they are delivered outside the
//! state lock; `/chat/plain` is rate-limited and capped like `/chat`.
//!
//! Tests that need only a few requests run at the shipped defaults; the
//! caps in the thousands are tested at small values of the same option.
//! Every wait is bounded by [`WAIT`]; all traffic goes to 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use duplex_chat::ChatOptions;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let event = next(ws).await;
        if event["type"] == kind {
            return event;
        }
    }
}

async fn join(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "join", "room": room})).await;
    let joined = next(ws).await;
    assert_eq!(joined["type"], "joined", "{joined}");
    let presence = next(ws).await;
    assert_eq!(presence["type"], "presence", "{presence}");
    joined
}

fn say(room: &str, text: &str) -> Value {
    json!({"type": "message", "room": room, "text": text})
}

#[tokio::test]
async fn a_name_beyond_the_user_cap_gets_server_full_then_close_1013() {
    let server = start(ChatOptions {
        max_users: 2,
        ..ChatOptions::default()
    })
    .await;
    let mut ada = connect(&server).await;
    let token = hello(&mut ada, "Ada").await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;

    let mut cyd = connect(&server).await;
    send(&mut cyd, json!({"type": "hello", "name": "Cyd"})).await;
    let error = expect_error(&mut cyd, "server_full").await;
    assert_eq!(error["request"], "hello");
    assert_eq!(close_code(&mut cyd).await, 1013);

    // Taking a name over is no new user: it is let in when full.
    let mut again = connect(&server).await;
    send(
        &mut again,
        json!({"type": "hello", "name": "Ada", "token": token}),
    )
    .await;
    assert_eq!(next(&mut again).await["type"], "welcome");
    still_open(&mut bob).await;
}

#[tokio::test]
async fn a_full_room_gets_room_full_and_the_connection_stays_open() {
    let server = start(ChatOptions {
        max_members_per_room: 2,
        ..ChatOptions::default()
    })
    .await;
    let (mut ada, mut bob, mut cyd) = (
        connect(&server).await,
        connect(&server).await,
        connect(&server).await,
    );
    hello(&mut ada, "Ada").await;
    hello(&mut bob, "Bob").await;
    hello(&mut cyd, "Cyd").await;
    join(&mut ada, "general").await;
    join(&mut bob, "general").await;
    send(&mut cyd, json!({"type": "join", "room": "general"})).await;
    let error = expect_error(&mut cyd, "room_full").await;
    assert_eq!(
        (error["request"].as_str(), error["room"].as_str()),
        (Some("join"), Some("general"))
    );
    still_open(&mut cyd).await;
    // Another room is fine, and a seat that frees up can be taken.
    join(&mut cyd, "random").await;
    send(&mut bob, json!({"type": "leave", "room": "general"})).await;
    assert_eq!(next(&mut bob).await["type"], "left");
    join(&mut cyd, "general").await;
}

#[tokio::test]
async fn new_rooms_beyond_the_server_cap_forget_an_idle_room_or_are_refused() {
    let server = start(ChatOptions {
        max_total_rooms: 2,
        ..ChatOptions::default()
    })
    .await;
    let mut ada = connect(&server).await;
    hello(&mut ada, "Ada").await;
    join(&mut ada, "one").await;
    join(&mut ada, "two").await;
    send(&mut ada, json!({"type": "join", "room": "three"})).await;
    let error = expect_error(&mut ada, "server_rooms_full").await;
    assert_eq!(error["room"], "three");
    still_open(&mut ada).await;

    // An idle room with history is kept until a new room needs its place.
    send(&mut ada, say("one", "kept for a while")).await;
    assert_eq!(next(&mut ada).await["type"], "message");
    send(&mut ada, json!({"type": "leave", "room": "one"})).await;
    assert_eq!(next(&mut ada).await["type"], "left");
    join(&mut ada, "three").await;
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    send(&mut bob, json!({"type": "join", "room": "four"})).await;
    expect_error(&mut bob, "server_rooms_full").await;
    // "one" was forgotten to make room for "three": it would be new too.
    send(&mut bob, json!({"type": "join", "room": "one"})).await;
    expect_error(&mut bob, "server_rooms_full").await;
    let joined = join(&mut bob, "two").await;
    assert_eq!(joined["members"], json!(["Ada", "Bob"]));
    // Once a room without history empties, it is gone and its place free.
    send(&mut ada, json!({"type": "leave", "room": "three"})).await;
    // (After Bob's arrival in #two.)
    assert_eq!(next_of(&mut ada, "left").await["room"], "three");
    let joined = join(&mut bob, "one").await;
    assert_eq!(
        joined["history"],
        json!([]),
        "the history of one went with it"
    );
}

#[tokio::test]
async fn text_is_limited_in_bytes_as_well_as_characters() {
    let server = start(ChatOptions::default()).await;
    let mut ada = connect(&server).await;
    let welcome = hello(&mut ada, "Ada").await;
    let max_bytes = welcome["limits"]["text_bytes"]
        .as_u64()
        .expect("text_bytes") as usize;
    assert_eq!(max_bytes, ChatOptions::default().max_text_bytes);
    join(&mut ada, "general").await;
    // 2000 characters, within the character limit, but 8000 bytes.
    send(&mut ada, say("general", &"𝄞".repeat(2000))).await;
    let error = expect_error(&mut ada, "text_too_long").await;
    assert_eq!(error["room"], "general");
    still_open(&mut ada).await;
    let longest = "𝄞".repeat(max_bytes / 4);
    send(&mut ada, say("general", &longest)).await;
    assert_eq!(next(&mut ada).await["text"], longest.as_str());
}

#[tokio::test]
async fn a_history_of_the_largest_messages_stays_within_the_byte_budget() {
    let defaults = ChatOptions::default();
    let server = start(defaults.clone()).await;
    // The largest text there is: 4-byte characters up to the byte limit.
    let text = "𝄞".repeat(defaults.max_text_bytes / 4);
    // Each sender stays within its burst: hello, join and 8 messages.
    let mut senders = Vec::new();
    for i in 0..7 {
        let mut ws = connect(&server).await;
        hello(&mut ws, &format!("sender{i}")).await;
        send(&mut ws, json!({"type": "join", "room": "big"})).await;
        senders.push(ws);
    }
    let mut sent = 0;
    for ws in &mut senders {
        for _ in 0..8 {
            send(ws, say("big", &text)).await;
            sent += 1;
        }
    }
    assert!(
        sent * text.len() > defaults.history_bytes,
        "more bytes than the history keeps"
    );
    // Wait until the first sender has seen every message: all are kept.
    let mut last_id = String::new();
    let mut seen = 0;
    while seen < sent {
        let event = next(&mut senders[0]).await;
        if event["type"] == "message" {
            seen += 1;
            last_id = event["id"].as_str().expect("id").to_owned();
        }
    }

    let mut joiner = connect(&server).await;
    hello(&mut joiner, "Joiner").await;
    send(&mut joiner, json!({"type": "join", "room": "big"})).await;
    let (joined, wire) = next_with_text(&mut joiner).await;
    assert_eq!(joined["type"], "joined", "{joined}");
    let history = joined["history"].as_array().expect("history");
    let history_wire = &wire[wire.find(r#""history":"#).expect("a history field")..];
    assert!(
        history_wire.len() <= defaults.history_bytes,
        "the history sent takes {} bytes, over the budget of {}",
        history_wire.len(),
        defaults.history_bytes
    );
    // The whole answer: the history and a small envelope.
    assert!(
        wire.len() <= defaults.history_bytes + 1024,
        "{} bytes",
        wire.len()
    );
    // The budget keeps the newest messages, as many as fit.
    assert!(!history.is_empty() && history.len() < defaults.history);
    assert_eq!(history.last().expect("a line")["id"], last_id);
    let fits = defaults.history_bytes / (text.len() + 100);
    assert!(
        history.len() >= fits,
        "{} lines kept, {fits} fit",
        history.len()
    );
}

#[tokio::test]
async fn joining_a_room_again_does_not_resend_its_history() {
    let server = start(ChatOptions::default()).await;
    let mut ada = connect(&server).await;
    hello(&mut ada, "Ada").await;
    join(&mut ada, "general").await;
    for i in 0..3 {
        send(&mut ada, say("general", &format!("line {i}"))).await;
        assert_eq!(next(&mut ada).await["type"], "message");
    }
    send(&mut ada, json!({"type": "join", "room": "general"})).await;
    let mut again = next(&mut ada).await;
    assert!(
        again["epoch"].as_str().is_some_and(|e| !e.is_empty()),
        "{again}"
    );
    again.as_object_mut().expect("an object").remove("epoch");
    assert_eq!(
        again,
        json!({"type": "joined", "room": "general", "members": ["Ada"], "history": []})
    );
    quiet(&mut ada, "Ada after joining again").await;

    // A connection that took the name over has not had the history: its
    // first join of the room it took over gets it, the next does not.
    let mut old = connect(&server).await;
    let token = hello(&mut old, "Bob").await["token"].clone();
    join(&mut old, "general").await;
    let mut new = connect(&server).await;
    send(
        &mut new,
        json!({"type": "hello", "name": "Bob", "token": token}),
    )
    .await;
    let welcome = next(&mut new).await;
    assert_eq!(welcome["rooms"], json!(["general"]), "{welcome}");
    send(&mut new, json!({"type": "join", "room": "general"})).await;
    let joined = next(&mut new).await;
    assert_eq!(joined["members"], json!(["Ada", "Bob"]));
    assert_eq!(
        joined["history"].as_array().map(Vec::len),
        Some(3),
        "{joined}"
    );
    send(&mut new, json!({"type": "join", "room": "general"})).await;
    assert_eq!(next(&mut new).await["history"], json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_get_every_message_once_in_order_from_their_snapshot_on() {
    // Many messages while people join: no rate limit here.
    let server = start(ChatOptions {
        rate: 0.0,
        ..ChatOptions::default()
    })
    .await;
    let mut watcher = connect(&server).await;
    hello(&mut watcher, "Watcher").await;
    join(&mut watcher, "busy").await;
    let (senders, per_sender) = (4, 100);
    let total = senders * per_sender;
    let mut talk = Vec::new();
    for i in 0..senders {
        let mut ws = connect(&server).await;
        hello(&mut ws, &format!("sender{i}")).await;
        join(&mut ws, "busy").await;
        // Each talks on a task of its own; the server reads them at once.
        talk.push(tokio::spawn(async move {
            for n in 0..per_sender {
                send(&mut ws, say("busy", &format!("{i}-{n}"))).await;
            }
            ws
        }));
    }
    let mut joiners = Vec::new();
    for i in 0..3 {
        let mut ws = connect(&server).await;
        hello(&mut ws, &format!("joiner{i}")).await;
        joiners.push(ws);
    }
    // What the watcher sees is the room's order; the joiners join while
    // the messages flow.
    let mut order = Vec::new();
    let mut next_joiner = 0;
    while order.len() < total {
        let event = next(&mut watcher).await;
        if event["type"] == "message" {
            order.push(event["id"].as_str().expect("id").to_owned());
        }
        if next_joiner < joiners.len() && order.len() == 40 + 100 * next_joiner {
            send(
                &mut joiners[next_joiner],
                json!({"type": "join", "room": "busy"}),
            )
            .await;
            next_joiner += 1;
        }
    }
    assert_eq!(next_joiner, joiners.len());
    for (i, joiner) in joiners.iter_mut().enumerate() {
        let joined = next(joiner).await;
        assert_eq!(
            joined["type"], "joined",
            "joiner{i}: nothing of the room comes first: {joined}"
        );
        let mut got: Vec<String> = joined["history"]
            .as_array()
            .expect("history")
            .iter()
            .map(|m| m["id"].as_str().expect("id").to_owned())
            .collect();
        assert!(!got.is_empty(), "joiner{i} joined after some messages");
        let start = order
            .iter()
            .position(|id| *id == got[0])
            .expect("the history's first message was sent");
        while got.len() < total - start {
            let event = next(joiner).await;
            if event["type"] == "message" {
                got.push(event["id"].as_str().expect("id").to_owned());
            }
        }
        assert_eq!(
            got,
            order[start..],
            "joiner{i}: history then live messages, none twice, none lost"
        );
    }
    for task in talk {
        within("a sender", task).await.expect("sender task");
    }
}

mod plain {
    use super::*;

    /// The next plain text line.
    async fn line(ws: &mut Ws) -> String {
        next_text(ws).await
    }

    #[tokio::test]
    async fn a_flood_is_dropped_with_one_notice_and_others_are_not_affected() {
        let server = start(ChatOptions::default()).await;
        let mut flood = open(&server, "/chat/plain").await;
        assert!(line(&mut flood).await.starts_with("You are connected!"));
        let mut calm = open(&server, "/chat/plain").await;
        assert!(line(&mut calm).await.starts_with("You are connected!"));
        for i in 0..30 {
            within("a send", flood.send(Message::text(format!("line {i}"))))
                .await
                .expect("send");
        }
        let mut heard = Vec::new();
        let mut notices = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
        while let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout_at(deadline, flood.next()).await
        {
            if text.as_str().starts_with("[user0]: ") {
                heard.push(text.as_str().to_owned());
            } else {
                notices.push(text.as_str().to_owned());
            }
        }
        let burst = ChatOptions::default().burst as usize;
        // The burst, and at most one more refilled meanwhile.
        assert!(
            (burst..=burst + 1).contains(&heard.len()),
            "{} lines passed: {heard:?}",
            heard.len()
        );
        assert_eq!(heard[0], "[user0]: line 0");
        assert_eq!(notices.len(), 1, "one notice for the flood: {notices:?}");
        assert!(notices[0].starts_with("Slow down"), "{notices:?}");
        // The other member heard the same lines, and may talk.
        for expected in &heard {
            assert_eq!(&line(&mut calm).await, expected);
        }
        within("a send", calm.send(Message::text("hi")))
            .await
            .expect("send");
        assert_eq!(line(&mut calm).await, "[user1]: hi");
    }

    #[tokio::test]
    async fn lines_over_the_byte_limit_are_dropped_with_a_notice() {
        let server = start(ChatOptions::default()).await;
        let mut ws = open(&server, "/chat/plain").await;
        line(&mut ws).await;
        let max = ChatOptions::default().max_text_bytes;
        within("a send", ws.send(Message::text("x".repeat(max + 1))))
            .await
            .expect("send");
        assert!(line(&mut ws).await.starts_with("A line has at most"));
        within("a send", ws.send(Message::text("x".repeat(max))))
            .await
            .expect("send");
        assert_eq!(line(&mut ws).await.len(), "[user0]: ".len() + max);
    }

    #[tokio::test]
    async fn one_more_than_the_member_cap_is_told_and_closed_with_1013() {
        let server = start(ChatOptions {
            max_members_per_room: 2,
            ..ChatOptions::default()
        })
        .await;
        let mut first = open(&server, "/chat/plain").await;
        line(&mut first).await;
        let mut second = open(&server, "/chat/plain").await;
        assert_eq!(
            line(&mut second).await,
            "You are connected! There are 2 users here."
        );
        let mut third = open(&server, "/chat/plain").await;
        assert!(line(&mut third).await.starts_with("The chat is full"));
        assert_eq!(close_code(&mut third).await, 1013);
        drop(third);
        // A seat that frees up can be taken.
        drop(second);
        let mut attempts = 0;
        loop {
            let mut ws = open(&server, "/chat/plain").await;
            if line(&mut ws).await.starts_with("You are connected!") {
                break;
            }
            attempts += 1;
            assert!(attempts < 10, "the seat was never freed");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
