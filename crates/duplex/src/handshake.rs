//! The server side of the opening handshake (RFC 6455 §4.2) as values:
//! a request is accepted with a 101 response, or rejected with a status.

use axum::{
    body::Body,
    response::{IntoResponse, Response},
};
use duplex_proto::{
    ExtensionFactory, Negotiated, accept_key, header_has_token, header_tokens, is_valid_key,
    negotiate, parse_extensions,
};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version, header};

/// Why an upgrade request was refused, each with its HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Not a GET (405).
    #[error("WebSocket upgrades must use GET")]
    MethodNotGet,
    /// Older than HTTP/1.1 (400).
    #[error("WebSocket upgrades need HTTP/1.1")]
    HttpVersion,
    /// No `Upgrade: websocket` or no `Connection: upgrade` (over HTTP/2: not
    /// an extended CONNECT): a plain request to a WebSocket route (400, as
    /// Ktor).
    #[error(
        "expected a WebSocket upgrade request (Upgrade: websocket, Connection: Upgrade; over HTTP/2 a CONNECT with :protocol websocket)"
    )]
    NotUpgrade,
    /// An HTTP/2 extended CONNECT (RFC 8441 §4) for a `:protocol` other
    /// than `websocket` (501: the server does not implement it).
    #[error("extended CONNECT for a protocol other than websocket")]
    UnsupportedProtocol,
    /// `Sec-WebSocket-Version` is not 13 (426 with `Sec-WebSocket-Version: 13`).
    #[error("unsupported Sec-WebSocket-Version; this server speaks 13")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing or not base64 of 16 bytes (400).
    #[error("missing or invalid Sec-WebSocket-Key")]
    InvalidKey,
    /// The `Origin` is neither this server's own (same scheme-less host
    /// and port as `Host`) nor on the allow-list (403).
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// The route needs a subprotocol the client does not offer (400, as Ktor).
    #[error("no offered subprotocol is supported here")]
    NoSubprotocol,
    /// `Sec-WebSocket-Extensions` does not follow the grammar of RFC 6455
    /// §9.1 (400).
    #[error("invalid Sec-WebSocket-Extensions header")]
    InvalidExtensions,
    /// The server is shutting down (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// As many sessions as `max_sessions` are open (503 with
    /// `Retry-After`).
    #[error("the server has too many sessions open")]
    ServerFull,
    /// The sessions hold more memory than the configuration's
    /// [`memory_budget`](crate::WebSockets::memory_budget) allows, in all
    /// or from the client's address (503 with `Retry-After`).
    #[error("the server's sessions hold as much memory as it allows")]
    MemoryFull,
    /// The client's address has `max_sessions_per_ip` sessions open (429
    /// with `Retry-After`).
    #[error("too many sessions open from this address")]
    TooManySessions,
    /// The client's address opened sessions faster than the handshake rate
    /// allows (429 with `Retry-After`).
    #[error("too many handshakes from this address")]
    HandshakeRate {
        /// Seconds until a handshake from this address would be accepted.
        retry_after: u64,
    },
}

impl Rejection {
    /// The HTTP status that answers the request.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::MethodNotGet => StatusCode::METHOD_NOT_ALLOWED,
            Rejection::UnsupportedVersion => StatusCode::UPGRADE_REQUIRED,
            Rejection::OriginNotAllowed => StatusCode::FORBIDDEN,
            Rejection::UnsupportedProtocol => StatusCode::NOT_IMPLEMENTED,
            Rejection::ShuttingDown | Rejection::ServerFull | Rejection::MemoryFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Rejection::TooManySessions | Rejection::HandshakeRate { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Rejection::HttpVersion
            | Rejection::NotUpgrade
            | Rejection::InvalidKey
            | Rejection::NoSubprotocol
            | Rejection::InvalidExtensions => StatusCode::BAD_REQUEST,
        }
    }
}

impl Rejection {
    /// A short name for metrics labels and log lines.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Rejection::MethodNotGet => "method",
            Rejection::HttpVersion => "http_version",
            Rejection::NotUpgrade => "not_upgrade",
            Rejection::UnsupportedProtocol => "protocol",
            Rejection::UnsupportedVersion => "version",
            Rejection::InvalidKey => "bad_handshake",
            Rejection::OriginNotAllowed => "origin",
            Rejection::NoSubprotocol => "subprotocol",
            Rejection::InvalidExtensions => "extensions",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::ServerFull => "server_full",
            Rejection::MemoryFull => "memory_full",
            Rejection::TooManySessions => "too_many_sessions",
            Rejection::HandshakeRate { .. } => "handshake_rate",
        }
    }

    /// Every label, for the metric's description.
    #[cfg(feature = "metrics")]
    pub(crate) const LABELS: [&'static str; 14] = [
        "method",
        "http_version",
        "not_upgrade",
        "protocol",
        "version",
        "bad_handshake",
        "origin",
        "subprotocol",
        "extensions",
        "shutting_down",
        "server_full",
        "memory_full",
        "too_many_sessions",
        "handshake_rate",
    ];
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let mut response = (self.status(), format!("{self}\n")).into_response();
        match self {
            Rejection::UnsupportedVersion => {
                response.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            Rejection::MethodNotGet => {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET"));
            }
            Rejection::ServerFull | Rejection::ShuttingDown | Rejection::MemoryFull => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            Rejection::TooManySessions => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            Rejection::HandshakeRate { retry_after } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ => {}
        }
        response
    }
}

/// An accepted upgrade: what the 101 response carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Accepted {
    /// `Sec-WebSocket-Accept`; none over HTTP/2 (RFC 8441 §5).
    pub(crate) accept: Option<HeaderValue>,
    /// The subprotocol chosen, if the route names any.
    pub(crate) protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` answer, if any extension was accepted.
    pub(crate) extensions: Option<String>,
}

impl Accepted {
    /// The `101 Switching Protocols` response, or over HTTP/2 the `200` to
    /// the extended CONNECT (RFC 8441 §5).
    pub(crate) fn response(&self) -> Response {
        let mut response = Response::new(Body::empty());
        if self.accept.is_some() {
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        }
        let headers = response.headers_mut();
        if let Some(accept) = &self.accept {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept.clone());
        }
        if let Some(protocol) = self
            .protocol
            .as_deref()
            .and_then(|p| HeaderValue::from_str(p).ok())
        {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, protocol);
        }
        if let Some(extensions) = self
            .extensions
            .as_deref()
            .and_then(|e| HeaderValue::from_str(e).ok())
        {
            headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, extensions);
        }
        response
    }
}

/// Checks an upgrade request (§4.2.1) and picks the subprotocol: the first
/// of the client's offers, in the client's order, that `protocols` holds.
pub(crate) fn accept(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    protocols: &[String],
    origins: &Origins,
) -> Result<Accepted, Rejection> {
    if method != Method::GET {
        return Err(Rejection::MethodNotGet);
    }
    if version < Version::HTTP_11 {
        return Err(Rejection::HttpVersion);
    }
    let has = |name, token| {
        headers
            .get_all(name)
            .iter()
            .any(|v| header_has_token(v.as_bytes(), token))
    };
    if !has(header::UPGRADE, "websocket") || !has(header::CONNECTION, "upgrade") {
        return Err(Rejection::NotUpgrade);
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes().trim_ascii() != b"13")
    {
        return Err(Rejection::UnsupportedVersion);
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().trim_ascii())
        .filter(|k| is_valid_key(k))
        .ok_or(Rejection::InvalidKey)?;
    if let Some(origin) = headers.get(header::ORIGIN)
        && !origins.allows(origin.as_bytes(), headers.get(header::HOST))
    {
        return Err(Rejection::OriginNotAllowed);
    }
    Ok(Accepted {
        // Base64 is always a valid header value; the String is not copied.
        accept: Some(HeaderValue::try_from(accept_key(key)).map_err(|_| Rejection::InvalidKey)?),
        protocol: choose_protocol(headers, protocols)?,
        extensions: None,
    })
}

/// The subprotocol: the first of the client's offers, in the client's
/// order, that `protocols` holds; none when the route names none.
pub(crate) fn choose_protocol(
    headers: &HeaderMap,
    protocols: &[String],
) -> Result<Option<String>, Rejection> {
    Ok(if protocols.is_empty() {
        None
    } else {
        let offered = headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|v| header_tokens(v.as_bytes()));
        let chosen = offered
            .filter_map(|p| std::str::from_utf8(p).ok())
            .find(|p| protocols.iter().any(|ours| ours == p))
            .ok_or(Rejection::NoSubprotocol)?;
        Some(chosen.to_owned())
    })
}

/// Which `Origin`s may open a session. Browsers send `Origin` with every
/// WebSocket handshake and cannot be stopped from connecting anywhere, so
/// without this check any page a user visits could open a session with the
/// user's cookies (cross-site WebSocket hijacking). Clients that send no
/// `Origin` (non-browser ones) are not concerned.
#[derive(Debug, Clone, Default)]
pub(crate) struct Origins {
    /// Every origin is accepted.
    pub(crate) any: bool,
    /// Accepted besides the server's own (exact, ASCII case-insensitive).
    pub(crate) allowed: std::sync::Arc<[String]>,
}

impl Origins {
    pub(crate) fn allows(&self, origin: &[u8], host: Option<&HeaderValue>) -> bool {
        self.any
            || self
                .allowed
                .iter()
                .any(|a| a.as_bytes().eq_ignore_ascii_case(origin))
            || host.is_some_and(|host| same_origin(origin, host.as_bytes()))
    }
}

/// Whether `origin` (`scheme://host[:port]`, RFC 6454) names the same host
/// and port as the request's `Host` (`host[:port]`). A `Host` without a port
/// matches the origin's scheme's default port: behind a TLS terminator the
/// server cannot tell which scheme the browser used, so `https://example.com`
/// and `http://example.com` both match `Host: example.com`.
fn same_origin(origin: &[u8], host: &[u8]) -> bool {
    let Some((scheme, authority)) = std::str::from_utf8(origin)
        .ok()
        .and_then(|o| o.split_once("://"))
    else {
        // "null" (sandboxed pages, file: URLs) and anything malformed.
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "80",
        "https" | "wss" => "443",
        _ => return false,
    };
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let (origin_host, origin_port) = split_port(authority);
    let (host_host, host_port) = split_port(host.trim());
    origin_host.eq_ignore_ascii_case(host_host)
        && origin_port.unwrap_or(default_port) == host_port.unwrap_or(default_port)
}

/// `host[:port]` into its parts; an IPv6 literal keeps its brackets.
fn split_port(authority: &str) -> (&str, Option<&str>) {
    match authority.rfind(':') {
        Some(i) if !authority[i..].contains(']') => (&authority[..i], Some(&authority[i + 1..])),
        _ => (authority, None),
    }
}

/// Negotiates the installed extensions against the client's offers, from
/// every `Sec-WebSocket-Extensions` header, and records the answer in
/// `accepted`.
pub(crate) fn negotiate_extensions(
    headers: &HeaderMap,
    factories: &[std::sync::Arc<dyn ExtensionFactory>],
    accepted: &mut Accepted,
) -> Result<Vec<Negotiated>, Rejection> {
    if factories.is_empty() {
        return Ok(Vec::new());
    }
    let mut offers = Vec::new();
    for value in headers.get_all(header::SEC_WEBSOCKET_EXTENSIONS) {
        let value = value.to_str().map_err(|_| Rejection::InvalidExtensions)?;
        offers.extend(parse_extensions(value).map_err(|_| Rejection::InvalidExtensions)?);
    }
    let negotiated = negotiate(factories, &offers);
    if !negotiated.is_empty() {
        let answer: Vec<String> = negotiated.iter().map(|n| n.response.to_string()).collect();
        accepted.extensions = Some(answer.join(", "));
    }
    Ok(negotiated)
}

#[cfg(test)]
mod rfc6455_4_2_1_server_requirements {
    use super::*;

    fn good() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        h
    }

    fn check(h: &HeaderMap) -> Result<Accepted, Rejection> {
        accept(&Method::GET, Version::HTTP_11, h, &[], &Origins::default())
    }

    #[test]
    fn valid_request_is_accepted_with_the_right_key() {
        let accepted = check(&good()).unwrap();
        let response = accepted.response();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn each_missing_piece_has_its_status() {
        assert_eq!(
            accept(
                &Method::POST,
                Version::HTTP_11,
                &good(),
                &[],
                &Origins::default()
            )
            .unwrap_err()
            .status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            accept(
                &Method::GET,
                Version::HTTP_10,
                &good(),
                &[],
                &Origins::default()
            )
            .unwrap_err(),
            Rejection::HttpVersion
        );
        for (name, status) in [
            (header::UPGRADE, StatusCode::BAD_REQUEST),
            (header::CONNECTION, StatusCode::BAD_REQUEST),
            (header::SEC_WEBSOCKET_VERSION, StatusCode::UPGRADE_REQUIRED),
            (header::SEC_WEBSOCKET_KEY, StatusCode::BAD_REQUEST),
        ] {
            let mut h = good();
            h.remove(&name);
            assert_eq!(check(&h).unwrap_err().status(), status, "without {name}");
        }
    }

    #[test]
    fn wrong_version_gets_426_naming_13() {
        let mut h = good();
        h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
        let response = check(&h).unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(response.headers()[header::SEC_WEBSOCKET_VERSION], "13");
    }

    #[test]
    fn key_of_wrong_length_is_rejected() {
        let mut h = good();
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("c2hvcnQ="),
        );
        assert_eq!(check(&h).unwrap_err(), Rejection::InvalidKey);
    }

    #[test]
    fn subprotocol_is_the_first_of_the_clients_that_we_speak() {
        let mut h = good();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v3, v2"),
        );
        h.append(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static("v1"),
        );
        let ours = ["v1".to_owned(), "v2".to_owned()];
        let accepted = accept(
            &Method::GET,
            Version::HTTP_11,
            &h,
            &ours,
            &Origins::default(),
        )
        .unwrap();
        assert_eq!(accepted.protocol.as_deref(), Some("v2"));
        let none = ["v9".to_owned()];
        assert_eq!(
            accept(
                &Method::GET,
                Version::HTTP_11,
                &h,
                &none,
                &Origins::default()
            )
            .unwrap_err(),
            Rejection::NoSubprotocol
        );
    }

    #[cfg(feature = "deflate")]
    #[test]
    fn extensions_are_negotiated_from_every_header_line() {
        let factories: Vec<std::sync::Arc<dyn ExtensionFactory>> =
            vec![std::sync::Arc::new(duplex_proto::Deflate::default())];
        let mut h = good();
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("x-unknown"),
        );
        h.append(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate; client_max_window_bits"),
        );
        let mut accepted = check(&h).unwrap();
        let negotiated = negotiate_extensions(&h, &factories, &mut accepted).unwrap();
        assert_eq!(negotiated.len(), 1);
        let response = accepted.response();
        assert_eq!(
            response.headers()[header::SEC_WEBSOCKET_EXTENSIONS],
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
    }

    #[cfg(feature = "deflate")]
    #[test]
    fn malformed_extensions_header_is_400() {
        let factories: Vec<std::sync::Arc<dyn ExtensionFactory>> =
            vec![std::sync::Arc::new(duplex_proto::Deflate::default())];
        let mut h = good();
        h.insert(
            header::SEC_WEBSOCKET_EXTENSIONS,
            HeaderValue::from_static("permessage-deflate; ="),
        );
        let mut accepted = check(&h).unwrap();
        let err = negotiate_extensions(&h, &factories, &mut accepted).unwrap_err();
        assert_eq!(err.status(), StatusCode::BAD_REQUEST);
    }

    fn origins(allowed: &[&str]) -> Origins {
        Origins {
            any: false,
            allowed: allowed.iter().map(|a| (*a).to_owned()).collect(),
        }
    }

    fn with_origin(origin: &'static str, host: &'static str) -> HeaderMap {
        let mut h = good();
        h.insert(header::ORIGIN, HeaderValue::from_static(origin));
        h.insert(header::HOST, HeaderValue::from_static(host));
        h
    }

    fn status(h: &HeaderMap, origins: &Origins) -> StatusCode {
        match accept(&Method::GET, Version::HTTP_11, h, &[], origins) {
            Ok(_) => StatusCode::SWITCHING_PROTOCOLS,
            Err(rejection) => rejection.status(),
        }
    }

    #[test]
    fn origin_allow_list_gives_403() {
        let allowed = origins(&["https://good.example"]);
        let evil = with_origin("https://evil.example", "app.example");
        assert_eq!(status(&evil, &allowed), StatusCode::FORBIDDEN);
        let good = with_origin("https://good.example", "app.example");
        assert_eq!(status(&good, &allowed), StatusCode::SWITCHING_PROTOCOLS);
        let any = Origins {
            any: true,
            ..Origins::default()
        };
        assert_eq!(status(&evil, &any), StatusCode::SWITCHING_PROTOCOLS);
    }

    #[test]
    fn a_page_of_the_server_itself_may_connect_by_default() {
        let none = Origins::default();
        for (origin, host) in [
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("HTTP://Chat.Example", "chat.example"),
            ("https://chat.example", "chat.example"),
            ("https://chat.example", "chat.example:443"),
            ("http://chat.example:80", "chat.example"),
            ("http://[::1]:8080", "[::1]:8080"),
        ] {
            let h = with_origin(origin, host);
            assert_eq!(
                status(&h, &none),
                StatusCode::SWITCHING_PROTOCOLS,
                "{origin} on {host}"
            );
        }
    }

    #[test]
    fn a_foreign_page_gets_403_by_default() {
        let none = Origins::default();
        for (origin, host) in [
            ("http://evil.example:8080", "127.0.0.1:8080"),
            ("http://127.0.0.1:8081", "127.0.0.1:8080"),
            ("https://chat.example", "chat.example:8443"),
            ("http://chat.example.evil.example", "chat.example"),
            ("null", "chat.example"),
            ("file://", "chat.example"),
            ("chat.example", "chat.example"),
        ] {
            let h = with_origin(origin, host);
            assert_eq!(
                status(&h, &none),
                StatusCode::FORBIDDEN,
                "{origin} on {host}"
            );
        }
        // No Origin: not a browser, nothing to protect.
        assert_eq!(status(&good(), &none), StatusCode::SWITCHING_PROTOCOLS);
    }
}
