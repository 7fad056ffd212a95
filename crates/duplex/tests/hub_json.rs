//! The hub as users write it, over real sockets: typed values published
//! through the content converter (encoded once for all), "everyone but
//! me" on one node and across a backplane, and `SessionId` in JSON.

mod common;

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use common::{Server, Ws, within, ws_connect, ws_next, ws_send, ws_text};
use duplex::{
    App, Backplane, BackplaneSink, ContentConverter, ConvertError, Envelope, ErasedDeserializer,
    Hub, JsonConverter, Message, Session, SessionId, WebSockets, erased_serde,
};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Welcome {
    id: SessionId,
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Line {
    from: SessionId,
    text: String,
}

/// JSON, counting how many values it encoded.
#[derive(Clone, Default)]
struct CountingJson(Arc<AtomicUsize>);

impl ContentConverter for CountingJson {
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Message, ConvertError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        JsonConverter.encode(value)
    }

    fn decode(
        &self,
        message: &Message,
        visit: &mut dyn for<'a, 'de> FnMut(
            ErasedDeserializer<'a, 'de>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), ConvertError> {
        JsonConverter.decode(message, visit)
    }
}

/// `/room`: registers, joins "room", sends its id, then runs commands
/// `VERB:text` as the session itself; `/lurker` registers and joins nothing.
fn room_app(hub: &Hub, websockets: WebSockets) -> App {
    let room_hub = hub.clone();
    let lurker_hub = hub.clone();
    App::new()
        .install(websockets)
        .web_socket("/room", move |mut session: Session| {
            let hub = room_hub.clone();
            async move {
                let me = hub.register(&session.sender());
                me.join("room");
                session.send_json(&Welcome { id: me.id() }).await?;
                while let Some(message) = session.recv().await? {
                    let Some((verb, text)) = message.as_text().and_then(|t| t.split_once(':'))
                    else {
                        continue;
                    };
                    let line = Line {
                        from: me.id(),
                        text: text.to_owned(),
                    };
                    match verb {
                        "all" => hub.publish_json("room", &line)?,
                        "others" => hub.publish_json_except("room", &line, me.id())?,
                        "everyone" => hub.broadcast_json(&line)?,
                        "everyone-else" => hub.broadcast_except(hub.encode(&line)?, me.id()),
                        "text-others" => hub.publish_except("room", text.to_owned(), me.id()),
                        _ => session.send_text(format!("unknown verb {verb}")).await?,
                    }
                }
                Ok::<_, duplex::BoxError>(())
            }
        })
        .web_socket("/lurker", move |mut session: Session| {
            let hub = lurker_hub.clone();
            async move {
                let me = hub.register(&session.sender());
                let _ = session.send_json(&Welcome { id: me.id() }).await;
                while let Ok(Some(_)) = session.recv().await {}
            }
        })
}

/// A client on `path` and the id its session got (read from the welcome:
/// `SessionId` serialized by the session's converter).
async fn join(server: &Server, path: &str) -> (Ws, SessionId) {
    let mut ws = ws_connect(server.addr, path).await;
    let welcome: Welcome = json(&mut ws).await;
    (ws, welcome.id)
}

async fn json<T: serde::de::DeserializeOwned>(ws: &mut Ws) -> T {
    match ws_next(ws).await {
        WsMessage::Text(text) => serde_json::from_str(text.as_str())
            .unwrap_or_else(|e| panic!("not the expected JSON ({e}): {}", text.as_str())),
        other => panic!("expected a text message, got {other:?}"),
    }
}

async fn expect_line(ws: &mut Ws, from: SessionId, text: &str) {
    let line: Line = json(ws).await;
    assert_eq!(
        line,
        Line {
            from,
            text: text.to_owned()
        }
    );
}

#[tokio::test]
async fn session_ids_are_numbers_in_json_and_in_text() {
    assert_eq!(serde_json::to_string(&SessionId(7)).unwrap(), "7");
    assert_eq!(
        serde_json::from_str::<SessionId>("7").unwrap(),
        SessionId(7)
    );
    assert_eq!(SessionId(7).to_string(), "7");
    assert_eq!(format!("session {}", SessionId(42)), "session 42");
}

#[tokio::test]
async fn publish_json_is_encoded_once_and_reaches_every_member_the_publisher_included() {
    let encodes = CountingJson::default();
    let hub = Hub::builder().content_converter(encodes.clone()).build();
    let server = Server::start(room_app(&hub, WebSockets::default())).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(join(&server, "/room").await);
    }
    let ids: Vec<SessionId> = clients.iter().map(|(_, id)| *id).collect();
    assert_eq!(hub.members("room").len(), 3);
    assert!(ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2]);

    ws_send(&mut clients[0].0, ws_text("all:hello room")).await;
    for (ws, _) in &mut clients {
        expect_line(ws, ids[0], "hello room").await;
    }
    assert_eq!(encodes.0.load(Ordering::SeqCst), 1, "one encode for three");
}

#[tokio::test]
async fn publish_except_leaves_the_publisher_out_and_no_one_else() {
    let hub = Hub::new();
    let server = Server::start(room_app(&hub, WebSockets::default())).await;
    let (mut a, id_a) = join(&server, "/room").await;
    let (mut b, _) = join(&server, "/room").await;
    let (mut c, _) = join(&server, "/room").await;

    ws_send(&mut a, ws_text("others:only for you two")).await;
    ws_send(&mut a, ws_text("text-others:plain text too")).await;
    ws_send(&mut a, ws_text("all:now everyone")).await;
    for ws in [&mut b, &mut c] {
        expect_line(ws, id_a, "only for you two").await;
        assert_eq!(ws_next(ws).await, ws_text("plain text too"));
        expect_line(ws, id_a, "now everyone").await;
    }
    // The publisher's next message is the one published to all: the two
    // before it never reached it.
    expect_line(&mut a, id_a, "now everyone").await;
}

#[tokio::test]
async fn broadcast_json_reaches_sessions_in_no_topic_and_broadcast_except_not_the_sender() {
    let hub = Hub::new();
    let server = Server::start(room_app(&hub, WebSockets::default())).await;
    let (mut a, id_a) = join(&server, "/room").await;
    let (mut lurker, _) = join(&server, "/lurker").await;

    ws_send(&mut a, ws_text("all:room only")).await;
    ws_send(&mut a, ws_text("everyone-else:not to a")).await;
    ws_send(&mut a, ws_text("everyone:to all")).await;
    expect_line(&mut a, id_a, "room only").await;
    expect_line(&mut a, id_a, "to all").await;
    // The room's message did not reach the lurker: its first is the
    // broadcast.
    expect_line(&mut lurker, id_a, "not to a").await;
    expect_line(&mut lurker, id_a, "to all").await;
}

/// Converts like the sessions of `websockets`: the hub takes its converter.
#[derive(Clone, Copy)]
struct Tagged;

impl ContentConverter for Tagged {
    fn encode(&self, value: &dyn erased_serde::Serialize) -> Result<Message, ConvertError> {
        let json = JsonConverter.encode(value)?;
        Ok(Message::text(format!(
            "v2 {}",
            json.as_text().unwrap_or_default()
        )))
    }

    fn decode(
        &self,
        _message: &Message,
        _visit: &mut dyn for<'a, 'de> FnMut(
            ErasedDeserializer<'a, 'de>,
        ) -> Result<(), erased_serde::Error>,
    ) -> Result<(), ConvertError> {
        Err(ConvertError::UnsupportedMessage("any"))
    }
}

#[tokio::test]
async fn the_hub_can_share_the_converter_of_a_configuration() {
    let websockets = WebSockets::default().content_converter(Tagged);
    let hub = Hub::builder().content_converter_of(&websockets).build();
    let server = Server::start(room_app(&hub, websockets)).await;
    let mut ws = ws_connect(server.addr, "/room").await;
    // The welcome, from the session's `send_json`.
    let welcome = ws_next(&mut ws).await;
    let id = hub.members("room")[0];
    assert_eq!(welcome, ws_text(&format!(r#"v2 {{"id":{id}}}"#)));
    ws_send(&mut ws, ws_text("all:same format")).await;
    assert_eq!(
        ws_next(&mut ws).await,
        ws_text(&format!(r#"v2 {{"from":{id},"text":"same format"}}"#))
    );
    assert!(matches!(
        hub.encode(&1).unwrap(),
        Message::Text(t) if t == "v2 1"
    ));
}

/// A backplane for two nodes in one process that delivers as Redis does:
/// later, from another task, to every node (the publisher's included).
struct Bus {
    sinks: Mutex<Vec<BackplaneSink>>,
    tx: mpsc::UnboundedSender<Envelope>,
}

impl Bus {
    fn new() -> Arc<Bus> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Envelope>();
        let bus = Arc::new(Bus {
            sinks: Mutex::new(Vec::new()),
            tx,
        });
        let weak = Arc::downgrade(&bus);
        tokio::spawn(async move {
            while let Some(envelope) = rx.recv().await {
                let Some(bus) = weak.upgrade() else { return };
                let sinks = bus.sinks.lock().unwrap().clone();
                for sink in sinks {
                    sink.deliver(envelope.clone());
                }
            }
        });
        bus
    }
}

/// One node's end of the [`Bus`].
struct Node(Arc<Bus>);

impl Backplane for Node {
    fn start(&self, sink: BackplaneSink) {
        self.0.sinks.lock().unwrap().push(sink);
    }

    fn publish(&self, envelope: Envelope) {
        let _ = self.0.tx.send(envelope);
    }
}

#[tokio::test]
async fn publish_except_across_a_backplane_leaves_out_one_session_of_one_node() {
    let bus = Bus::new();
    let hub_a = Hub::builder()
        .backplane(Arc::new(Node(bus.clone())))
        .build();
    let hub_b = Hub::builder()
        .backplane(Arc::new(Node(bus.clone())))
        .build();
    let server_a = Server::start(room_app(&hub_a, WebSockets::default())).await;
    let server_b = Server::start(room_app(&hub_b, WebSockets::default())).await;
    let (mut a1, id_a1) = join(&server_a, "/room").await;
    let (mut a2, _) = join(&server_a, "/room").await;
    let (mut b1, id_b1) = join(&server_b, "/room").await;
    // Each hub counts from 1: the same number names a session on each node,
    // and only node A's must be left out.
    assert_eq!(id_a1, id_b1);

    for round in 0..3 {
        let text = format!("not for a1, round {round}");
        ws_send(&mut a1, ws_text(&format!("others:{text}"))).await;
        ws_send(&mut a1, ws_text(&format!("all:{round}"))).await;
        for ws in [&mut a2, &mut b1] {
            expect_line(ws, id_a1, &text).await;
            expect_line(ws, id_a1, &round.to_string()).await;
        }
        expect_line(&mut a1, id_a1, &round.to_string()).await;
    }

    // A session of node B leaves out only itself, on both nodes.
    ws_send(&mut b1, ws_text("others:from b")).await;
    ws_send(&mut b1, ws_text("all:b to all")).await;
    for ws in [&mut a1, &mut a2] {
        expect_line(ws, id_b1, "from b").await;
        expect_line(ws, id_b1, "b to all").await;
    }
    expect_line(&mut b1, id_b1, "b to all").await;
    within("hub_a to see its two", async {
        assert_eq!(hub_a.members("room").len(), 2)
    })
    .await;
}
