//! Names and identities (PROTOCOL.md, "Names and identities"), over real
//! loopback sockets at the shipped defaults: a name is what others see and
//! address; the identity is what the `welcome` token proves. Direct
//! messages belong to the two identities, so whoever takes a freed name
//! gets none of an earlier holder's conversations; look-alike names (a
//! Cyrillic `А` for a Latin `A`) are one name.
//!
//! Every wait is bounded by [`WAIT`]; all traffic goes to 127.0.0.1.

mod common;

use std::time::Duration;

use common::*;
use duplex_chat::ChatOptions;
use serde_json::{Value, json};

async fn next_of(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let event = next(ws).await;
        if event["type"] == kind {
            return event;
        }
    }
}

/// `hello` with an optional token, answered by `welcome` or an error.
async fn hello_with(ws: &mut Ws, name: &str, token: Option<&str>) -> Value {
    let mut request = json!({"type": "hello", "name": name});
    if let Some(token) = token {
        request["token"] = json!(token);
    }
    send(ws, request).await;
    loop {
        let event = next(ws).await;
        if event["type"] == "welcome" || event["type"] == "error" {
            return event;
        }
    }
}

/// A new connection that takes `name` once the server has seen its last
/// holder go (a disconnect is noticed a moment later).
async fn take_freed_name(server: &Server, name: &str, token: Option<&str>) -> (Ws, Value) {
    let mut ws = connect(server).await;
    for _ in 0..30 {
        let answer = hello_with(&mut ws, name, token).await;
        if answer["type"] == "welcome" {
            return (ws, answer);
        }
        assert_eq!(answer["code"], "name_taken", "{answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name} was never freed");
}

async fn dm(from: &mut Ws, to_name: &str, to: &mut Ws, text: &str) -> Value {
    send(from, json!({"type": "dm", "to": to_name, "text": text})).await;
    let got = next_of(to, "dm").await;
    assert_eq!(got["text"], text, "{got}");
    assert_eq!(next_of(from, "dm").await, got);
    got
}

async fn dm_history(ws: &mut Ws, request: Value) -> Value {
    send(ws, request).await;
    next_of(ws, "dm_history").await
}

fn texts(answer: &Value) -> Vec<String> {
    answer["history"]
        .as_array()
        .expect("a history")
        .iter()
        .map(|l| l["text"].as_str().expect("text").to_owned())
        .collect()
}

#[tokio::test]
async fn a_freed_name_gives_its_new_holder_none_of_the_earlier_holder_s_direct_messages() {
    let server = start(ChatOptions::default()).await;
    let mut alice = connect(&server).await;
    let token = hello(&mut alice, "Alice").await["token"]
        .as_str()
        .expect("a token")
        .to_owned();
    let mut bob = connect(&server).await;
    hello(&mut bob, "Bob").await;
    let first = dm(&mut alice, "bob", &mut bob, "secret one").await;
    dm(&mut bob, "alice", &mut alice, "secret two").await;
    let mine = dm_history(&mut alice, json!({"type": "dm_history", "with": "Bob"})).await;
    assert_eq!(texts(&mine), ["secret one", "secret two"]);
    let epoch = mine["epoch"].as_str().expect("an epoch").to_owned();

    within("Alice's close", alice.close(None))
        .await
        .expect("close");
    drop(alice);

    // A stranger takes the freed name, without Alice's token.
    let (mut stranger, welcome) = take_freed_name(&server, "alice", None).await;
    assert_ne!(welcome["token"], token.as_str());
    for request in [
        json!({"type": "dm_history", "with": "Bob"}),
        json!({"type": "dm_history", "with": "bob", "since": "0-0", "epoch": epoch}),
        json!({"type": "dm_history", "with": "BOB", "since": first["id"], "epoch": epoch}),
        json!({"type": "dm_history", "with": "Bob", "since": first["id"]}),
    ] {
        let answer = dm_history(&mut stranger, request.clone()).await;
        assert_eq!(
            texts(&answer),
            Vec::<String>::new(),
            "{request} gave {answer}"
        );
        assert_ne!(answer["recovered"], true, "{request} gave {answer}");
    }
    // "alice" now means the stranger: Bob's next message is theirs, in a
    // conversation of their own, and nothing of the old one comes along.
    dm(&mut bob, "alice", &mut stranger, "who is this?").await;
    let theirs = dm_history(&mut stranger, json!({"type": "dm_history", "with": "Bob"})).await;
    assert_eq!(texts(&theirs), ["who is this?"]);
    quiet(&mut stranger, "the stranger").await;

    // The real Alice, back with her token under another name while the
    // stranger holds hers, has her conversation and not the stranger's.
    let mut back = connect(&server).await;
    let refused = hello_with(&mut back, "Alice", Some(&token)).await;
    assert_eq!(refused["code"], "name_taken", "{refused}");
    let welcome = hello_with(&mut back, "Alice again", Some(&token)).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(
        welcome["token"],
        token.as_str(),
        "the token is the identity's"
    );
    let again = dm_history(&mut back, json!({"type": "dm_history", "with": "Bob"})).await;
    assert_eq!(texts(&again), ["secret one", "secret two"]);
    let since = dm_history(
        &mut back,
        json!({"type": "dm_history", "with": "Bob", "since": first["id"], "epoch": epoch}),
    )
    .await;
    assert_eq!(since["recovered"], true, "{since}");
    assert_eq!(texts(&since), ["secret two"]);
    // Bob's view: "alice" is the stranger's conversation now.
    let bobs = dm_history(&mut bob, json!({"type": "dm_history", "with": "alice"})).await;
    assert_eq!(texts(&bobs), ["who is this?"]);

    // Once the stranger is gone, Alice takes her name back with her token,
    // and her conversation with Bob is hers wherever Bob is.
    drop(back);
    within("the stranger's close", stranger.close(None))
        .await
        .expect("close");
    drop(stranger);
    let (mut alice, _) = take_freed_name(&server, "Alice", Some(&token)).await;
    within("Bob's close", bob.close(None)).await.expect("close");
    drop(bob);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let offline = dm_history(&mut alice, json!({"type": "dm_history", "with": "Bob"})).await;
    assert_eq!(
        texts(&offline),
        ["secret one", "secret two"],
        "Bob is offline: the conversation is the last one with a Bob"
    );
}

#[tokio::test]
async fn a_look_alike_name_is_the_name_it_looks_like() {
    let server = start(ChatOptions::default()).await;
    let mut alice = connect(&server).await;
    hello(&mut alice, "Alice").await;
    let mut other = connect(&server).await;
    for look_alike in ["\u{410}lice", "ALICE", "\u{391}LICE", "\u{410}l\u{456}ce"] {
        let answer = hello_with(&mut other, look_alike, None).await;
        assert_eq!(answer["code"], "name_taken", "{look_alike:?}: {answer}");
    }
    // A direct message to a look-alike of a name goes to its holder.
    let welcome = hello_with(&mut other, "Bob", None).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let got = dm(&mut other, "\u{410}lice", &mut alice, "hi").await;
    assert_eq!(got["to"], "Alice", "shown as its holder typed it");
    send(
        &mut other,
        json!({"type": "dm", "to": "\u{412}ob", "text": "me"}),
    )
    .await;
    expect_error(&mut other, "invalid_recipient").await;
}
