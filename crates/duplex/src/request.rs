//! The HTTP request behind a session (Ktor's `call`).

use std::net::SocketAddr;

use http::{HeaderMap, Method, Uri, Version};

/// What the upgrade request said: address, path, query, headers, path
/// parameters. Kept for the whole session.
#[derive(Debug, Clone)]
pub struct Request {
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    pub(crate) remote_addr: Option<SocketAddr>,
    pub(crate) path_params: Vec<(String, String)>,
    pub(crate) extensions: http::Extensions,
}

impl Request {
    /// The peer's address, when the server knows it (always under
    /// [`App`](crate::App); with a plain axum `Router`, when it is served with
    /// `into_make_service_with_connect_info::<SocketAddr>()`).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// The request method (always GET for an accepted upgrade).
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request URI.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The HTTP version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The path, without the query.
    pub fn path(&self) -> &str {
        self.uri.path()
    }

    /// The raw query string, if any.
    pub fn query(&self) -> Option<&str> {
        self.uri.query()
    }

    /// The first value of a query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.uri.query()?;
        form_pairs(query).find(|(k, _)| k == name).map(|(_, v)| v)
    }

    /// The request headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// A header value as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.to_str().ok()
    }

    /// A value that a layer in front of the route put in the request's
    /// extensions: the identity an authentication middleware found, for
    /// example (see the crate docs, "Authentication").
    pub fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.extensions.get::<T>()
    }

    /// Every extension of the upgrade request, as the layers in front of the
    /// route left them.
    pub fn extensions(&self) -> &http::Extensions {
        &self.extensions
    }

    /// A path parameter of the route (`/rooms/{room}` gives `room`).
    pub fn path_param(&self, name: &str) -> Option<&str> {
        self.path_params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every path parameter, in route order.
    pub fn path_params(&self) -> impl Iterator<Item = (&str, &str)> {
        self.path_params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k), percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str) -> Request {
        Request {
            method: Method::GET,
            uri: uri.parse().unwrap(),
            version: Version::HTTP_11,
            headers: HeaderMap::new(),
            remote_addr: None,
            path_params: vec![("room".into(), "lobby".into())],
            extensions: http::Extensions::new(),
        }
    }

    #[test]
    fn query_params_are_decoded() {
        let r = request("/chat?name=J%C3%BCrgen+M&empty=&x=%zz&y=%4");
        assert_eq!(r.query_param("name").as_deref(), Some("Jürgen M"));
        assert_eq!(r.query_param("empty").as_deref(), Some(""));
        assert_eq!(r.query_param("x").as_deref(), Some("%zz"));
        assert_eq!(r.query_param("y").as_deref(), Some("%4"));
        assert_eq!(r.query_param("missing"), None);
        assert_eq!(r.path(), "/chat");
        assert_eq!(r.path_param("room"), Some("lobby"));
    }
}
