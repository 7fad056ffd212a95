//! RFC 6455 opening handshake (§4.2, §10.2) over real loopback sockets:
//! requests written by hand, responses parsed by hand, plus what a session
//! learns of its upgrade request.

mod common;

use common::*;
use duplex::{App, Session};
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// `/echo`: returns every message.
fn echo_app() -> App {
    App::new().web_socket("/echo", |mut session: Session| async move {
        while let Some(message) = session.recv().await? {
            session.send(message).await?;
        }
        Ok::<_, duplex::Error>(())
    })
}

/// Checks that `path` upgrades with the RFC's key and echoes a message.
async fn assert_upgrade_works(server: &Server, path: &str) {
    let mut client = RawClient::connect(server.addr, path).await;
    client.send_final(TEXT, b"works").await;
    let echo = client.read_frame().await;
    assert_eq!(
        (echo.opcode, echo.payload.as_slice()),
        (TEXT, &b"works"[..])
    );
}

mod rfc6455_4_2_2_server_response {
    use super::*;

    #[tokio::test]
    async fn valid_upgrade_gets_101_with_the_accept_key_of_section_1_3() {
        let server = Server::start(echo_app()).await;
        let (response, _client) =
            RawClient::request(server.addr, &upgrade_request("/echo", "")).await;
        assert_eq!(response.status, 101, "{response:?}");
        assert_eq!(response.header("Sec-WebSocket-Accept"), Some(ACCEPT));
        assert!(
            response
                .header("Upgrade")
                .is_some_and(|v| v.eq_ignore_ascii_case("websocket")),
            "{response:?}"
        );
        assert!(
            response
                .header("Connection")
                .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")),
            "{response:?}"
        );
        assert_eq!(response.header("Sec-WebSocket-Protocol"), None);
    }

    #[tokio::test]
    async fn header_tokens_are_matched_without_case_and_inside_lists() {
        let server = Server::start(echo_app()).await;
        let request = format!(
            "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: WebSocket\r\n\
             Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        );
        let (response, mut client) = RawClient::request(server.addr, &request).await;
        assert_eq!(response.status, 101, "{response:?}");
        client.send_final(BINARY, &[1, 2, 3]).await;
        assert_eq!(client.read_frame().await.payload, vec![1, 2, 3]);
    }
}

mod rfc6455_4_2_1_client_handshake_requirements {
    use super::*;

    fn request(method: &str, version: &str, headers: &[(&str, &str)]) -> String {
        let mut out = format!("{method} /echo {version}\r\nHost: 127.0.0.1\r\n");
        for (name, value) in headers {
            out.push_str(&format!("{name}: {value}\r\n"));
        }
        if method == "POST" {
            out.push_str("Content-Length: 0\r\n");
        }
        out.push_str("\r\n");
        out
    }

    const UPGRADE: (&str, &str) = ("Upgrade", "websocket");
    const CONNECTION: (&str, &str) = ("Connection", "Upgrade");
    const VERSION: (&str, &str) = ("Sec-WebSocket-Version", "13");
    const GOOD_KEY: (&str, &str) = ("Sec-WebSocket-Key", KEY);

    #[tokio::test]
    async fn malformed_upgrade_requests_are_refused_and_the_server_keeps_serving() {
        let server = Server::start(echo_app()).await;
        let cases: Vec<(&str, String, u16)> = vec![
            (
                "missing Sec-WebSocket-Key",
                request("GET", "HTTP/1.1", &[UPGRADE, CONNECTION, VERSION]),
                400,
            ),
            (
                "Sec-WebSocket-Key of 5 bytes",
                request(
                    "GET",
                    "HTTP/1.1",
                    &[
                        UPGRADE,
                        CONNECTION,
                        VERSION,
                        ("Sec-WebSocket-Key", "c2hvcnQ="),
                    ],
                ),
                400,
            ),
            (
                "Sec-WebSocket-Key not base64",
                request(
                    "GET",
                    "HTTP/1.1",
                    &[
                        UPGRADE,
                        CONNECTION,
                        VERSION,
                        ("Sec-WebSocket-Key", "not base64 at all!!!!!!!"),
                    ],
                ),
                400,
            ),
            (
                "Sec-WebSocket-Version: 8",
                request(
                    "GET",
                    "HTTP/1.1",
                    &[
                        UPGRADE,
                        CONNECTION,
                        ("Sec-WebSocket-Version", "8"),
                        GOOD_KEY,
                    ],
                ),
                426,
            ),
            (
                "no Upgrade header",
                request("GET", "HTTP/1.1", &[CONNECTION, VERSION, GOOD_KEY]),
                400,
            ),
            (
                "Upgrade: h2c",
                request(
                    "GET",
                    "HTTP/1.1",
                    &[("Upgrade", "h2c"), CONNECTION, VERSION, GOOD_KEY],
                ),
                400,
            ),
            (
                "Connection: keep-alive",
                request(
                    "GET",
                    "HTTP/1.1",
                    &[UPGRADE, ("Connection", "keep-alive"), VERSION, GOOD_KEY],
                ),
                400,
            ),
            (
                "POST",
                request(
                    "POST",
                    "HTTP/1.1",
                    &[UPGRADE, CONNECTION, VERSION, GOOD_KEY],
                ),
                405,
            ),
            ("plain GET", request("GET", "HTTP/1.1", &[]), 400),
            (
                "HTTP/1.0",
                request("GET", "HTTP/1.0", &[UPGRADE, CONNECTION, VERSION, GOOD_KEY]),
                400,
            ),
        ];
        for (what, text, status) in cases {
            let (response, _client) = RawClient::request(server.addr, &text).await;
            assert_eq!(response.status, status, "{what}: {response:?}");
            assert_eq!(
                response.header("Sec-WebSocket-Accept"),
                None,
                "{what}: {response:?}"
            );
        }
        assert_upgrade_works(&server, "/echo").await;
    }

    #[tokio::test]
    async fn upgrade_after_a_refusal_on_the_same_keep_alive_connection_works() {
        let server = Server::start(echo_app()).await;
        let (response, mut client) =
            RawClient::request(server.addr, request("GET", "HTTP/1.1", &[])).await;
        assert_eq!(response.status, 400, "{response:?}");
        let len = response
            .header("Content-Length")
            .and_then(|v| v.parse().ok())
            .expect("a Content-Length");
        client.skip(len).await;
        let response = client.send_request(upgrade_request("/echo", "")).await;
        assert_eq!(response.status, 101, "{response:?}");
        client.send_final(TEXT, b"same connection").await;
        assert_eq!(client.read_frame().await.payload, b"same connection");
    }

    #[tokio::test]
    async fn frame_sent_right_behind_the_request_is_not_lost() {
        // §4.1 has the client wait for the 101, but some send at once.
        let server = Server::start(echo_app()).await;
        let mut bytes = upgrade_request("/echo", "").into_bytes();
        bytes.extend(encode_frame(true, 0, TEXT, b"early", Some(MASK)));
        let (response, mut client) = RawClient::request(server.addr, bytes).await;
        assert_eq!(response.status, 101, "{response:?}");
        assert_eq!(client.read_frame().await.payload, b"early");
    }

    #[tokio::test]
    async fn wrong_version_gets_426_naming_13() {
        let server = Server::start(echo_app()).await;
        let text = request(
            "GET",
            "HTTP/1.1",
            &[
                UPGRADE,
                CONNECTION,
                ("Sec-WebSocket-Version", "8"),
                GOOD_KEY,
            ],
        );
        let (response, _client) = RawClient::request(server.addr, &text).await;
        assert_eq!(response.status, 426, "{response:?}");
        assert_eq!(response.header("Sec-WebSocket-Version"), Some("13"));
    }

    #[tokio::test]
    async fn post_gets_405_allowing_get() {
        let server = Server::start(echo_app()).await;
        let text = request(
            "POST",
            "HTTP/1.1",
            &[UPGRADE, CONNECTION, VERSION, GOOD_KEY],
        );
        let (response, _client) = RawClient::request(server.addr, &text).await;
        assert_eq!(response.status, 405, "{response:?}");
        assert_eq!(response.header("Allow"), Some("GET"));
    }
}

mod rfc6455_4_2_2_subprotocols {
    use super::*;

    fn protocols_app() -> App {
        App::new()
            .web_socket_with_protocols("/p", ["v1", "v2"], |session: Session| async move {
                let protocol = session.protocol().unwrap_or("none").to_owned();
                session.send_text(format!("protocol={protocol}")).await
            })
            .merge(echo_app().into_router())
    }

    #[tokio::test]
    async fn the_first_offer_we_speak_is_chosen() {
        let server = Server::start(protocols_app()).await;
        let mut request = ws_request(server.addr, "/p");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("v3, v2"));
        let (mut ws, response) = ws_connect_request(server.addr, request).await;
        assert_eq!(
            response
                .headers()
                .get("Sec-WebSocket-Protocol")
                .map(|v| v.to_str().unwrap()),
            Some("v2")
        );
        assert_eq!(ws_next(&mut ws).await, ws_text("protocol=v2"));
    }

    #[tokio::test]
    async fn offers_in_several_headers_are_all_considered() {
        let server = Server::start(protocols_app()).await;
        let text = upgrade_request(
            "/p",
            "Sec-WebSocket-Protocol: x1\r\nSec-WebSocket-Protocol: x2, v1\r\n",
        );
        let (response, mut client) = RawClient::request(server.addr, &text).await;
        assert_eq!(response.status, 101, "{response:?}");
        assert_eq!(response.header("Sec-WebSocket-Protocol"), Some("v1"));
        let frame = client.read_frame().await;
        assert_eq!(frame.payload, b"protocol=v1");
    }

    #[tokio::test]
    async fn no_offer_we_speak_gets_400() {
        let server = Server::start(protocols_app()).await;
        for extra in ["Sec-WebSocket-Protocol: v9\r\n", ""] {
            let (response, _client) =
                RawClient::request(server.addr, &upgrade_request("/p", extra)).await;
            assert_eq!(response.status, 400, "offer {extra:?}: {response:?}");
        }
        assert_upgrade_works(&server, "/echo").await;
    }

    #[tokio::test]
    async fn route_without_subprotocols_answers_none() {
        let server = Server::start(protocols_app()).await;
        let text = upgrade_request("/echo", "Sec-WebSocket-Protocol: v1\r\n");
        let (response, _client) = RawClient::request(server.addr, &text).await;
        assert_eq!(response.status, 101, "{response:?}");
        assert_eq!(response.header("Sec-WebSocket-Protocol"), None);
    }
}

mod rfc6455_10_2_origin {
    use super::*;

    #[tokio::test]
    async fn origin_outside_the_allow_list_gets_403() {
        let app = echo_app()
            .install(duplex::WebSockets::default().allowed_origins(["https://good.example"]));
        let server = Server::start(app).await;
        let text = upgrade_request("/echo", "Origin: https://evil.example\r\n");
        let (response, _client) = RawClient::request(server.addr, &text).await;
        assert_eq!(response.status, 403, "{response:?}");
        let text = upgrade_request("/echo", "Origin: https://good.example\r\n");
        let (response, _client) = RawClient::request(server.addr, &text).await;
        assert_eq!(response.status, 101, "{response:?}");
        // Non-browser clients send no Origin.
        assert_upgrade_works(&server, "/echo").await;
    }
}

mod rfc6455_4_2_1_request_info {
    use super::*;

    #[tokio::test]
    async fn path_params_query_headers_and_remote_addr_are_visible() {
        let app = App::new().web_socket("/rooms/{room}", |session: Session| async move {
            let r = session.request();
            let info = serde_json::json!({
                "method": r.method().as_str(),
                "path": r.path(),
                "room": r.path_param("room"),
                "params": r.path_params().count(),
                "query": r.query(),
                "name": r.query_param("name"),
                "missing": r.query_param("missing"),
                "header": r.header("x-test"),
                "remote": r.remote_addr().map(|a| a.to_string()),
            });
            session.send_text(info.to_string()).await
        });
        let server = Server::start(app).await;
        let mut request = ws_request(server.addr, "/rooms/lobby%201?name=J%C3%BCrgen+M&x=1");
        request
            .headers_mut()
            .insert("X-Test", HeaderValue::from_static("yes"));
        let (mut ws, _) = ws_connect_request(server.addr, request).await;
        let local = ws.get_ref().local_addr().expect("local_addr");
        let reply = ws_next(&mut ws).await;
        let info: serde_json::Value =
            serde_json::from_str(reply.to_text().expect("a text reply")).expect("JSON");
        assert_eq!(
            info,
            serde_json::json!({
                "method": "GET",
                "path": "/rooms/lobby%201",
                "room": "lobby 1",
                "params": 1,
                "query": "name=J%C3%BCrgen+M&x=1",
                "name": "Jürgen M",
                "missing": null,
                "header": "yes",
                "remote": local.to_string(),
            })
        );
    }
}
