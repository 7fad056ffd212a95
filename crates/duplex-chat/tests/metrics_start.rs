//! `/metrics` of a fresh server, before any connection: every metric that
//! duplex and the chat emit is there with `# HELP`, `# TYPE` and a value.
//!
//! A test binary of its own: the Prometheus recorder is per process, and no
//! other test may have made traffic first.

use std::{collections::BTreeSet, path::Path, time::Duration};

use duplex::{WebSockets, metrics::Kind};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const WAIT: Duration = Duration::from_secs(3);

async fn scrape(addr: std::net::SocketAddr) -> String {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        tcp.read_to_string(&mut response).await.expect("read");
        response
    };
    tokio::time::timeout(WAIT, exchange)
        .await
        .expect("the /metrics response within 3 s")
}

/// The names in `counter!("…"` / `gauge!("…"` of a crate's sources (the
/// `metrics` facade's macros, or duplex's own that forward to them).
fn emitted(crate_dir: &Path) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut dirs = vec![crate_dir.join("src")];
    let mut files = Vec::new();
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in ["counter!(\"", "gauge!(\""] {
            for (at, _) in text.match_indices(needle) {
                let rest = &text[at + needle.len()..];
                names.insert(rest[..rest.find('"').unwrap()].to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn a_fresh_server_lists_every_metric_with_help_and_type() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local_addr");
    let serve = tokio::spawn(duplex_chat::app(WebSockets::default()).serve(listener));

    let response = scrape(addr).await;
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    let body = response.split_once("\r\n\r\n").expect("a body").1;

    let chat_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut expected: BTreeSet<String> = emitted(chat_dir);
    expected.extend(emitted(&chat_dir.join("../duplex")));
    assert!(expected.len() >= 15, "the source scan found {expected:?}");
    let listed = duplex::metrics::METRICS.iter().chain(duplex_chat::METRICS);
    for metric in listed.clone() {
        assert!(
            expected.contains(metric.name),
            "{} is not emitted",
            metric.name
        );
    }
    for name in &expected {
        let metric = listed
            .clone()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("{name} is emitted but described nowhere"));
        let kind = match metric.kind {
            Kind::Counter => "counter",
            _ => "gauge",
        };
        assert!(
            body.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no HELP for {name} in\n{body}"
        );
        assert!(
            body.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no TYPE {kind} for {name} in\n{body}"
        );
        let sample = |l: &&str| {
            l.strip_prefix(name.as_str())
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        };
        let samples: Vec<&str> = body.lines().filter(sample).collect();
        assert!(!samples.is_empty(), "no value for {name} in\n{body}");
        assert!(
            samples.iter().all(|l| l.ends_with(" 0")),
            "{name} is not at zero before any connection: {samples:?}"
        );
    }
    serve.abort();
}

#[test]
fn every_chat_error_code_is_registered() {
    let protocol =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/protocol.rs"))
            .unwrap();
    let codes: BTreeSet<&str> = protocol
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ErrorCode::"))
        .filter_map(|l| l.split_once("=> \"")?.1.strip_suffix("\","))
        .collect();
    assert!(codes.len() >= 20, "{codes:?}");
    let errors = duplex_chat::METRICS
        .iter()
        .find(|m| m.name == "duplex_chat_errors_total")
        .unwrap();
    let registered: BTreeSet<&str> = errors.label.unwrap().1.iter().copied().collect();
    assert_eq!(registered, codes);
}
