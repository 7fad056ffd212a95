//! The JSON chat protocol of `/chat` (PROTOCOL.md) over real loopback
//! sockets, with tokio-tungstenite as the client: names, rooms, presence,
//! history, direct messages, and that bad input gets an `error` message on
//! an open connection.
//!
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
        let event = next_raw(ws).await;
        if event["type"] == kind {
            return event;
        }
    }
}

async fn send_raw(ws: &mut Ws, message: Message) {
    within("a send", ws.send(message)).await.expect("send");
}

async fn join(ws: &mut Ws, room: &str) -> Value {
    send(ws, json!({"type": "join", "room": room})).await;
    let joined = next(ws).await;
    assert_eq!(joined["type"], "joined", "{joined}");
    joined
}

#[tokio::test]
async fn hello_gets_a_welcome_and_everyone_sees_the_name_in_the_directory() {
    let server = start(ChatOptions::default()).await;
    let mut watcher = connect(&server).await;
    let mut ada = connect(&server).await;
    let welcome = hello(&mut ada, "  Ada ").await;
    assert_eq!(welcome["name"], "Ada");
    assert!(welcome["token"].as_str().is_some_and(|t| t.len() == 32));
    assert!(welcome["instance"].as_str().is_some_and(|t| !t.is_empty()));
    assert_eq!(welcome["rooms"], json!([]));
    assert_eq!(
        welcome["limits"],
        json!({
            "name_chars": 32, "text_chars": 2000, "text_bytes": 4096, "rate": 5.0, "burst": 10,
            "rooms": 20, "history": 200, "history_bytes": 131072, "room_members": 1000
        })
    );
    let directory = next_of(&mut watcher, "directory").await;
    assert_eq!(directory["users"], json!(["Ada"]));
    assert_eq!(directory["online"], 1);
}

#[tokio::test]
async fn a_room_message_reaches_its_members_and_no_one_else() {
    let server = start(ChatOptions::default()).await;
    let (mut ada, mut bob, mut cyd) = (
        connect(&server).await,
        connect(&server).await,
        connect(&server).await,
    );
    hello(&mut ada, "Ada").await;
    hello(&mut bob, "Bob").await;
    hello(&mut cyd, "Cyd").await;

    let joined = join(&mut ada, "General").await;
    assert_eq!(joined["room"], "general", "room names are lowercased");
    assert_eq!(joined["members"], json!(["Ada"]));
    assert_eq!(joined["history"], json!([]));
    assert_eq!(
        next(&mut ada).await,
        json!({"type": "presence", "room": "general", "event": "join", "name": "Ada", "count": 1})
    );
    let joined = join(&mut bob, "general").await;
    assert_eq!(joined["members"], json!(["Ada", "Bob"]));
    let presence =
        json!({"type": "presence", "room": "general", "event": "join", "name": "Bob", "count": 2});
    assert_eq!(next(&mut ada).await, presence);
    assert_eq!(next(&mut bob).await, presence);
    join(&mut cyd, "random").await;
    next(&mut cyd).await; // her own presence

    send(
        &mut bob,
        json!({"type": "message", "room": "general", "text": "hi Ada\r\n"}),
    )
    .await;
    let at_ada = next(&mut ada).await;
    let at_bob = next(&mut bob).await;
    assert_eq!(at_ada, at_bob);
    assert_eq!(at_ada["type"], "message");
    assert_eq!(at_ada["room"], "general");
    assert_eq!(at_ada["from"], "Bob");
    assert_eq!(at_ada["text"], "hi Ada");
    assert!(at_ada["id"].as_str().is_some() && at_ada["ts"].as_u64().is_some());
    quiet(&mut cyd, "Cyd in another room").await;

    // Leaving: the leaver gets `left`, the others a presence update.
    send(&mut bob, json!({"type": "leave", "room": "general"})).await;
    assert_eq!(
        next(&mut bob).await,
        json!({"type": "left", "room": "general"})
    );
    assert_eq!(
        next(&mut ada).await,
        json!({"type": "presence", "room": "general", "event": "leave", "name": "Bob", "count": 1})
    );
    // And can no longer talk there.
    send(
        &mut bob,
        json!({"type": "message", "room": "general", "text": "still here?"}),
    )
    .await;
    let error = expect_error(&mut bob, "not_in_room").await;
    assert_eq!(error["request"], "message");
    assert_eq!(error["room"], "general");
    quiet(&mut ada, "Ada after Bob left").await;
}

#[tokio::test]
async fn joining_sends_the_last_messages_of_the_room() {
    let server = start(ChatOptions {
        history: 3,
        ..ChatOptions::default()
    })
    .await;
    let mut ada = connect(&server).await;
    hello(&mut ada, "Ada").await;
    join(&mut ada, "general").await;
    next(&mut ada).await;
    for i in 1..=5 {
        send(
            &mut ada,
            json!({"type": "message", "room": "general", "text": format!("line {i}")}),
        )
        .await;
        assert_eq!(next(&mut ada).await["text"], format!("line {i}"));
    }
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    let joined = join(&mut bob, "general").await;
    let texts: Vec<&str> = joined["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|m| m["text"].as_str().expect("text"))
        .collect();
    assert_eq!(texts, ["line 3", "line 4", "line 5"]);
    assert!(
        joined["history"]
            .as_array()
            .expect("history")
            .iter()
            .all(|m| m["type"].is_null() && m["room"] == "general" && m["from"] == "Ada")
    );

    // Everybody leaves; the history stays for the next visitor.
    drop(ada);
    drop(bob);
    let mut cyd = connect(&server).await;
    hello(&mut cyd, "Cyd").await;
    let joined = join(&mut cyd, "general").await;
    assert_eq!(joined["history"].as_array().expect("history").len(), 3);
}

#[tokio::test]
async fn a_direct_message_goes_to_its_recipient_and_back_to_its_sender_only() {
    let server = start(ChatOptions::default()).await;
    let (mut ada, mut bob, mut cyd) = (
        connect(&server).await,
        connect(&server).await,
        connect(&server).await,
    );
    hello(&mut ada, "Ada").await;
    hello(&mut bob, "Bob").await;
    hello(&mut cyd, "Cyd").await;
    for ws in [&mut ada, &mut bob, &mut cyd] {
        join(ws, "general").await;
    }
    send(&mut ada, json!({"type": "dm", "to": "bob", "text": "psst"})).await;
    let at_bob = next_of(&mut bob, "dm").await;
    assert_eq!(at_bob["from"], "Ada");
    assert_eq!(at_bob["to"], "Bob");
    assert_eq!(at_bob["text"], "psst");
    assert_eq!(next_of(&mut ada, "dm").await, at_bob);
    // Cyd sees presence updates only.
    let deadline = tokio::time::Instant::now() + QUIET;
    while let Ok(Some(Ok(Message::Text(text)))) =
        tokio::time::timeout_at(deadline, cyd.next()).await
    {
        let event: Value = serde_json::from_str(text.as_str()).expect("JSON");
        assert!(
            event["type"] == "presence" || event["type"] == "directory",
            "Cyd got {event}"
        );
    }

    send(
        &mut ada,
        json!({"type": "dm", "to": "Zed", "text": "hello?"}),
    )
    .await;
    expect_error(&mut ada, "unknown_user").await;
    send(&mut ada, json!({"type": "dm", "to": "ADA", "text": "me"})).await;
    expect_error(&mut ada, "invalid_recipient").await;
}

#[tokio::test]
async fn bad_input_gets_an_error_and_the_connection_stays_open() {
    // Many requests in a row: no rate limit here.
    let server = start(ChatOptions {
        rate: 0.0,
        ..ChatOptions::default()
    })
    .await;
    let mut ws = connect(&server).await;

    send_raw(&mut ws, Message::text("not json")).await;
    expect_error(&mut ws, "bad_json").await;
    send_raw(&mut ws, Message::text("[1, 2]")).await;
    expect_error(&mut ws, "bad_json").await;
    send(&mut ws, json!({"kind": "hello"})).await;
    expect_error(&mut ws, "unknown_type").await;
    send(&mut ws, json!({"type": "shout"})).await;
    expect_error(&mut ws, "unknown_type").await;
    send(&mut ws, json!({"type": "hello"})).await;
    let error = expect_error(&mut ws, "bad_request").await;
    assert_eq!(error["request"], "hello");
    send_raw(&mut ws, Message::binary(vec![1, 2, 3])).await;
    expect_error(&mut ws, "binary_not_supported").await;
    send(&mut ws, json!({"type": "join", "room": "general"})).await;
    expect_error(&mut ws, "not_identified").await;
    still_open(&mut ws).await;

    for bad in [
        "",
        "   ",
        "<script>",
        "a\nb",
        &"x".repeat(33),
        "two  spaces",
    ] {
        send(&mut ws, json!({"type": "hello", "name": bad})).await;
        expect_error(&mut ws, "invalid_name").await;
    }
    still_open(&mut ws).await;
    hello(&mut ws, "Ada").await;
    send(&mut ws, json!({"type": "hello", "name": "Eve"})).await;
    expect_error(&mut ws, "already_identified").await;

    for bad in ["", "#general", "../etc", &"r".repeat(33)] {
        send(&mut ws, json!({"type": "join", "room": bad})).await;
        expect_error(&mut ws, "invalid_room").await;
    }
    join(&mut ws, "general").await;
    next(&mut ws).await;
    let say = |text: &str| json!({"type": "message", "room": "general", "text": text});
    send(&mut ws, say(" \n\t ")).await;
    expect_error(&mut ws, "invalid_text").await;
    send(&mut ws, say("bell \u{7}")).await;
    expect_error(&mut ws, "invalid_text").await;
    send(&mut ws, say(&"é".repeat(2001))).await;
    expect_error(&mut ws, "text_too_long").await;
    send(&mut ws, say(&"x".repeat(20_000))).await;
    expect_error(&mut ws, "too_large").await;
    send(&mut ws, say(&"é".repeat(2000))).await;
    assert_eq!(
        next(&mut ws).await["text"]
            .as_str()
            .map(|t| t.chars().count()),
        Some(2000)
    );
    still_open(&mut ws).await;
}

#[tokio::test]
async fn a_name_in_use_is_refused_whatever_its_case_and_freed_on_disconnect() {
    let server = start(ChatOptions::default()).await;
    let mut ada = connect(&server).await;
    hello(&mut ada, "Ada").await;
    let mut other = connect(&server).await;
    send(&mut other, json!({"type": "hello", "name": "aDA"})).await;
    let error = expect_error(&mut other, "name_taken").await;
    assert_eq!(error["request"], "hello");
    send(
        &mut other,
        json!({"type": "hello", "name": "Ada", "token": "wrong"}),
    )
    .await;
    expect_error(&mut other, "name_taken").await;

    within("Ada's close", ada.close(None)).await.expect("close");
    drop(ada);
    // The name is free once the server has seen Ada go.
    let mut attempts = 0;
    loop {
        send(&mut other, json!({"type": "hello", "name": "Ada"})).await;
        let event = next(&mut other).await;
        if event["type"] == "welcome" {
            break;
        }
        assert_eq!(event["code"], "name_taken");
        attempts += 1;
        assert!(attempts < 8, "the name was never freed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_welcome_token_takes_the_name_and_rooms_over_from_an_older_connection() {
    let server = start(ChatOptions::default()).await;
    let mut old = connect(&server).await;
    let token = hello(&mut old, "Ada").await["token"]
        .as_str()
        .expect("token")
        .to_owned();
    join(&mut old, "general").await;
    next(&mut old).await;
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    join(&mut bob, "general").await;
    next(&mut bob).await;

    let mut new = connect(&server).await;
    send(
        &mut new,
        json!({"type": "hello", "name": "ada", "token": token}),
    )
    .await;
    let welcome = next(&mut new).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["rooms"], json!(["general"]));
    assert_eq!(
        welcome["token"], token,
        "the token is the identity's: it stays"
    );

    // The old connection is closed with 4001.
    let close = loop {
        match within("the old connection's close", old.next()).await {
            Some(Ok(Message::Close(frame))) => break frame.expect("a close code"),
            Some(Ok(_)) => {}
            other => panic!("expected a Close, got {other:?}"),
        }
    };
    assert_eq!(u16::from(close.code), duplex_chat::REPLACED);

    // Bob saw no leave and join; messages flow to the new connection.
    send(
        &mut bob,
        json!({"type": "message", "room": "general", "text": "still there?"}),
    )
    .await;
    let message = next(&mut bob).await;
    assert_eq!(message["text"], "still there?", "{message}");
    assert_eq!(next(&mut new).await, message);
}

#[tokio::test]
async fn flooding_is_limited_per_connection_with_one_notice() {
    let server = start(ChatOptions {
        rate: 1.0,
        burst: 10,
        ..ChatOptions::default()
    })
    .await;
    let mut flood = connect(&server).await;
    let mut calm = connect(&server).await;
    for i in 0..30 {
        send(&mut flood, json!({"type": "ping", "id": i})).await;
    }
    let mut pongs = Vec::new();
    let mut errors = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, flood.next()).await {
        let Message::Text(text) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(text.as_str()).expect("JSON");
        match event["type"].as_str() {
            Some("pong") => pongs.push(event["id"].as_u64().expect("id")),
            Some("error") => errors.push(event),
            _ => {}
        }
    }
    assert_eq!(pongs, (0..10).collect::<Vec<_>>(), "the burst passes");
    assert_eq!(errors.len(), 1, "one notice for the flood: {errors:?}");
    assert_eq!(errors[0]["code"], "rate_limited");
    assert!(
        errors[0]["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms <= 1001)
    );
    // Another connection is not affected.
    still_open(&mut calm).await;
    // After a while the flooder may talk again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    still_open(&mut flood).await;
}

#[tokio::test]
async fn a_connection_may_be_in_a_bounded_number_of_rooms() {
    let server = start(ChatOptions {
        max_rooms_per_user: 2,
        ..ChatOptions::default()
    })
    .await;
    let mut ws = connect(&server).await;
    hello(&mut ws, "Ada").await;
    join(&mut ws, "one").await;
    next(&mut ws).await;
    join(&mut ws, "two").await;
    next(&mut ws).await;
    // Joining a room again answers `joined` and announces nothing.
    join(&mut ws, "two").await;
    send(&mut ws, json!({"type": "join", "room": "three"})).await;
    let error = expect_error(&mut ws, "too_many_rooms").await;
    assert_eq!(error["room"], "three");
    still_open(&mut ws).await;
}

#[tokio::test]
async fn a_disconnect_is_a_leave_for_every_room() {
    let server = start(ChatOptions::default()).await;
    let (mut ada, mut bob) = (connect(&server).await, connect(&server).await);
    hello(&mut ada, "Ada").await;
    hello(&mut bob, "Bob").await;
    for room in ["one", "two"] {
        join(&mut bob, room).await;
        next(&mut bob).await;
        join(&mut ada, room).await;
        next(&mut ada).await;
        next(&mut bob).await;
    }
    drop(ada);
    let mut rooms = Vec::new();
    for _ in 0..2 {
        let event = next(&mut bob).await;
        assert_eq!(event["event"], "leave", "{event}");
        assert_eq!(event["name"], "Ada");
        assert_eq!(event["count"], 1);
        rooms.push(event["room"].as_str().expect("room").to_owned());
    }
    rooms.sort();
    assert_eq!(rooms, ["one", "two"]);
    // Directory changes are gathered for a moment: wait for the one
    // without Ada.
    loop {
        let directory = next_of(&mut bob, "directory").await;
        if directory["users"] == json!(["Bob"]) {
            assert_eq!(directory["online"], 1);
            assert_eq!(
                directory["rooms"],
                json!([{"name": "one", "members": 1}, {"name": "two", "members": 1}])
            );
            break;
        }
    }
}

async fn join_since(ws: &mut Ws, room: &str, since: &str, epoch: &str) -> Value {
    send(
        ws,
        json!({"type": "join", "room": room, "since": since, "epoch": epoch}),
    )
    .await;
    next_of(ws, "joined").await
}

fn ids_and_texts(history: &Value) -> Vec<(String, String)> {
    history
        .as_array()
        .expect("history")
        .iter()
        .map(|m| {
            (
                m["id"].as_str().expect("id").to_owned(),
                m["text"].as_str().expect("text").to_owned(),
            )
        })
        .collect()
}

/// A client that lost its connection rejoins with the last id it saw and
/// gets exactly what it missed; an id the room no longer holds, or another
/// epoch, gets `recovered: false` and the usual snapshot, never a part.
#[tokio::test]
async fn a_rejoin_with_since_recovers_exactly_what_was_missed() {
    let server = start(ChatOptions {
        history: 6,
        ..ChatOptions::default()
    })
    .await;
    let mut ada = connect(&server).await;
    hello(&mut ada, "Ada").await;
    let joined = join(&mut ada, "general").await;
    let epoch = joined["epoch"].as_str().expect("epoch").to_owned();
    assert!(joined.get("recovered").is_none(), "{joined}");
    next(&mut ada).await;
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    join(&mut bob, "general").await;
    let mut said = Vec::new();
    for i in 0..3 {
        send(
            &mut ada,
            json!({"type": "message", "room": "general", "text": format!("a{i}")}),
        )
        .await;
        let m = next_of(&mut bob, "message").await;
        assert_eq!(next_of(&mut ada, "message").await, m);
        said.push((m["id"].as_str().expect("id").to_owned(), format!("a{i}")));
    }
    let seen = said[2].0.clone();
    // Bob's connection goes; Ada goes on talking.
    drop(bob);
    for i in 3..6 {
        send(
            &mut ada,
            json!({"type": "message", "room": "general", "text": format!("a{i}")}),
        )
        .await;
        let m = next_of(&mut ada, "message").await;
        said.push((m["id"].as_str().expect("id").to_owned(), format!("a{i}")));
    }
    let ids: Vec<&String> = said.iter().map(|(id, _)| id).collect();
    let parse = |id: &str| {
        let (ms, seq) = id.split_once('-').expect("<ms>-<seq>");
        (
            ms.parse::<u64>().expect("ms"),
            seq.parse::<u64>().expect("seq"),
        )
    };
    assert!(
        ids.windows(2).all(|w| parse(w[0]) < parse(w[1])),
        "ids grow: {ids:?}"
    );
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    let joined = join_since(&mut bob, "general", &seen, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str());
    assert_eq!(ids_and_texts(&joined["history"]), said[3..].to_vec());
    // Nothing of it comes again: the next is the next message.
    send(
        &mut ada,
        json!({"type": "message", "room": "general", "text": "a6"}),
    )
    .await;
    assert_eq!(next_of(&mut bob, "message").await["text"], "a6");

    // The room keeps 6 messages: the first is gone, so a client that saw
    // only it cannot be made whole, and is told so.
    let mut cyd = connect(&server).await;
    hello(&mut cyd, "Cyd").await;
    let joined = join_since(&mut cyd, "general", &said[0].0, &epoch).await;
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(joined["history"].as_array().map(Vec::len), Some(6));
    // Another epoch (a restarted server): not recovered either.
    let mut dan = connect(&server).await;
    hello(&mut dan, "Dan").await;
    let joined = join_since(&mut dan, "general", &said[4].0, "another").await;
    assert_eq!(joined["recovered"], false, "{joined}");
    // The newest id: recovered, nothing to send.
    let mut eve = connect(&server).await;
    hello(&mut eve, "Eve").await;
    let last = ids_and_texts(&joined["history"])
        .last()
        .expect("a line")
        .0
        .clone();
    let joined = join_since(&mut eve, "general", &last, &epoch).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["history"], json!([]));
}

/// `dm_history` returns a pair's direct messages, and with `since` exactly
/// those after it.
#[tokio::test]
async fn dm_history_returns_the_pairs_messages_after_since() {
    let server = start(ChatOptions::default()).await;
    let mut ada = connect(&server).await;
    hello(&mut ada, "Ada").await;
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    let mut ids = Vec::new();
    for i in 0..4 {
        send(
            &mut ada,
            json!({"type": "dm", "to": "bob", "text": format!("d{i}")}),
        )
        .await;
        let dm = next_of(&mut bob, "dm").await;
        assert_eq!(dm["text"], format!("d{i}"));
        ids.push(dm["id"].as_str().expect("id").to_owned());
    }
    send(&mut bob, json!({"type": "dm_history", "with": "ADA"})).await;
    let all = next_of(&mut bob, "dm_history").await;
    assert_eq!(all["with"], "ADA");
    assert!(all.get("recovered").is_none(), "{all}");
    let epoch = all["epoch"].as_str().expect("epoch").to_owned();
    let got: Vec<String> = ids_and_texts(&all["history"])
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(got, ids);
    assert!(all["history"][0]["type"].is_null() && all["history"][0]["from"] == "Ada");
    send(
        &mut bob,
        json!({"type": "dm_history", "with": "Ada", "since": ids[1], "epoch": epoch}),
    )
    .await;
    let after = next_of(&mut bob, "dm_history").await;
    assert_eq!(after["recovered"], true, "{after}");
    let texts: Vec<String> = ids_and_texts(&after["history"])
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(texts, ["d2", "d3"]);
    send(
        &mut ada,
        json!({"type": "dm_history", "with": "Bob", "since": ids[1], "epoch": "old"}),
    )
    .await;
    let other = next_of(&mut ada, "dm_history").await;
    assert_eq!(other["recovered"], false, "{other}");
    assert_eq!(other["history"].as_array().map(Vec::len), Some(4));
}
