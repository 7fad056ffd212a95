//! The server's upgrade request checks (RFC 6455 §4.2.1), through the public
//! `App` router in process: arbitrary methods, versions and header sets sent
//! to a subprotocol route, a plain route and a raw route of an `App` with
//! permessage-deflate and an origin allow-list.
//!
//! A request built by hand has no connection to upgrade, so one that passes
//! every check gets 400 "this connection cannot be upgraded". Checks: each
//! answer is one of the rejections with its status and headers, and a
//! request gets past the checks only if it meets every requirement.
#![no_main]

use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use duplex::{App, Deflate, RawSession, Session, WebSockets, axum::Router, proto};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Version, header};
use tower::ServiceExt;

const PROTOCOLS: [&str; 2] = ["chat.v2", "chat"];
const ORIGIN: &str = "https://good.example";

const NAMES: [HeaderName; 9] = [
    header::UPGRADE,
    header::CONNECTION,
    header::SEC_WEBSOCKET_VERSION,
    header::SEC_WEBSOCKET_KEY,
    header::SEC_WEBSOCKET_PROTOCOL,
    header::SEC_WEBSOCKET_EXTENSIONS,
    header::ORIGIN,
    header::HOST,
    header::CONTENT_LENGTH,
];

/// Values the checks look for, so the fuzzer need not find them byte by byte.
const VALUES: [&str; 12] = [
    "websocket",
    "Upgrade",
    "keep-alive, Upgrade",
    "13",
    " 13 ",
    "dGhlIHNhbXBsZSBub25jZQ==",
    "chat",
    "chat.v2, x",
    "permessage-deflate; client_max_window_bits",
    "permessage-deflate; server_max_window_bits=8",
    ORIGIN,
    "https://evil.example",
];

#[derive(Debug, Arbitrary)]
struct Input {
    method: u8,
    version: u8,
    route: u8,
    headers: Vec<(u8, Value)>,
}

#[derive(Debug, Arbitrary)]
enum Value {
    Known(u8),
    Bytes(Vec<u8>),
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(|| {
        let websockets = WebSockets::default()
            .allowed_origins([ORIGIN])
            .extension(Deflate::default())
            .expect("one extension");
        App::new()
            .install(websockets)
            .web_socket_with_protocols("/proto", PROTOCOLS, |_: Session| async {})
            .web_socket("/plain", |_: Session| async {})
            .web_socket_raw("/raw", |_: RawSession| async {})
            .into_router()
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
    })
}

fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .any(|v| proto::header_has_token(v.as_bytes(), token))
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let method = match input.method % 4 {
        0 | 1 => Method::GET,
        2 => Method::POST,
        _ => Method::from_bytes(b"BREW").expect("a token"),
    };
    let version = [
        Version::HTTP_09,
        Version::HTTP_10,
        Version::HTTP_11,
        Version::HTTP_11,
        Version::HTTP_2,
    ][usize::from(input.version % 5)];
    let route = ["/proto", "/plain", "/raw"][usize::from(input.route % 3)];
    let mut headers = HeaderMap::new();
    for (name, value) in input.headers.iter().take(24) {
        let name = NAMES[usize::from(name % NAMES.len() as u8)].clone();
        let value = match value {
            Value::Known(i) => HeaderValue::from_static(VALUES[usize::from(*i) % VALUES.len()]),
            Value::Bytes(bytes) => match HeaderValue::from_bytes(bytes) {
                Ok(value) => value,
                Err(_) => continue,
            },
        };
        headers.append(name, value);
    }
    let mut request = Request::builder()
        .method(method.clone())
        .version(version)
        .uri(route)
        .body(duplex::axum::body::Body::empty())
        .expect("a request");
    *request.headers_mut() = headers.clone();
    let response = runtime()
        .block_on(router().clone().oneshot(request))
        .expect("the router is infallible");
    let status = response.status();
    let answer = response.headers().clone();
    let body = runtime()
        .block_on(duplex::axum::body::to_bytes(response.into_body(), 1 << 16))
        .expect("a small body");

    if method != Method::GET {
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(
            answer.get(header::ALLOW).map(|v| v.as_bytes()),
            Some(&b"GET"[..])
        );
        return;
    }
    match status {
        StatusCode::UPGRADE_REQUIRED => {
            assert_eq!(
                answer
                    .get(header::SEC_WEBSOCKET_VERSION)
                    .map(|v| v.as_bytes()),
                Some(&b"13"[..])
            );
            let version = headers.get(header::SEC_WEBSOCKET_VERSION);
            assert!(version.is_none_or(|v| v.as_bytes().trim_ascii() != b"13"));
        }
        StatusCode::FORBIDDEN => {
            let origin = headers.get(header::ORIGIN).expect("403 needs an Origin");
            assert_ne!(origin.as_bytes(), ORIGIN.as_bytes());
        }
        StatusCode::BAD_REQUEST => {}
        other => panic!("status {other} for a GET upgrade"),
    }
    let accepted = status == StatusCode::BAD_REQUEST
        && body.starts_with(b"this connection cannot be upgraded");
    assert_eq!(
        accepted,
        meets_requirements(version, route, &headers),
        "{status} {body:?} for {version:?} {route} {headers:?}"
    );
});

/// Whether a GET meets every requirement of §4.2.1 that the route checks.
fn meets_requirements(version: Version, route: &str, headers: &HeaderMap) -> bool {
    let first = |name| {
        headers
            .get(name)
            .map(|v: &HeaderValue| v.as_bytes().trim_ascii())
    };
    let subprotocol = route != "/proto"
        || headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|v| proto::header_tokens(v.as_bytes()))
            .any(|p| PROTOCOLS.iter().any(|ours| ours.as_bytes() == p));
    // Raw routes take no extensions, so their header is not read.
    let extensions = route == "/raw"
        || headers
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .all(|v| v.to_str().is_ok_and(|t| proto::parse_extensions(t).is_ok()));
    // HTTP/2 has no Upgrade (RFC 9113 §8.2.2): its WebSockets come by
    // extended CONNECT (RFC 8441 §4), so a GET upgrade over it is refused.
    version == Version::HTTP_11
        && has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade")
        && first(header::SEC_WEBSOCKET_VERSION) == Some(&b"13"[..])
        && first(header::SEC_WEBSOCKET_KEY).is_some_and(proto::is_valid_key)
        && headers
            .get(header::ORIGIN)
            .is_none_or(|o| o.as_bytes() == ORIGIN.as_bytes())
        && subprotocol
        && extensions
}
