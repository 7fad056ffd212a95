//! The client role and TLS: duplex's client against duplex's server and
//! against tokio-tungstenite's server, and `wss://` end to end with a
//! certificate made for the test.

mod common;

use std::sync::Arc;

use common::{Server, within};
use duplex::{App, Client, ClientError, Message, Session, tls::rustls};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;

fn mirror() -> App {
    App::new().web_socket_with_protocols("/mirror", ["v1"], |mut session: Session| async move {
        while let Ok(Some(message)) = session.recv().await {
            let _ = session.send(message).await;
        }
    })
}

#[tokio::test]
async fn rfc6455_5_1_client_masks_and_round_trips_through_a_duplex_server() {
    let server = Server::start(mirror()).await;
    let url = format!("ws://{}/mirror", server.addr);
    let (protocol, replies) = within(
        "the client session",
        Client::new()
            .protocols(["v0", "v1"])
            .connect(&url, |mut session| async move {
                let protocol = session.protocol().map(str::to_owned);
                let mut replies = Vec::new();
                for message in [Message::text("héllo"), Message::binary(vec![0u8; 70_000])] {
                    session.send(message).await.unwrap();
                    replies.push(session.recv().await.unwrap().unwrap());
                }
                (protocol, replies)
            }),
    )
    .await
    .unwrap();
    // The server fails unmasked client frames with 1002: the echo proves masking.
    assert_eq!(protocol.as_deref(), Some("v1"));
    assert_eq!(replies[0], Message::text("héllo"));
    assert_eq!(replies[1].len(), 70_000);
}

#[tokio::test]
async fn client_talks_to_tokio_tungstenite_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        while let Some(Ok(message)) = ws.next().await {
            if message.is_text() || message.is_binary() {
                ws.send(message).await.unwrap();
            }
        }
    });
    let reply = within(
        "the client session",
        duplex::connect(&format!("ws://{addr}/"), |mut session| async move {
            session.send("across implementations").await.unwrap();
            let reply = session.recv().await.unwrap();
            session
                .close(duplex::CloseReason::new(duplex::CloseCode::NORMAL, "done"))
                .await
                .unwrap();
            // The closing handshake completes with tungstenite's answer.
            assert_eq!(session.recv().await.unwrap(), None);
            reply
        }),
    )
    .await
    .unwrap();
    assert_eq!(reply, Some(Message::text("across implementations")));
}

#[tokio::test]
async fn refused_upgrade_is_a_handshake_error() {
    let app = App::new().route(
        "/plain",
        duplex::axum::routing::get(|| async { "not a socket" }),
    );
    let server = Server::start(app).await;
    let err = duplex::connect(&format!("ws://{}/plain", server.addr), |_s| async {})
        .await
        .unwrap_err();
    // A plain page answers 200: the status is carried.
    assert_eq!(err.status(), Some(http::StatusCode::OK), "{err}");
    let err = duplex::connect("http://example.com/", |_s| async {})
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::InvalidUrl(_)));
}

#[tokio::test]
async fn wss_end_to_end_with_a_test_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_der = cert.cert.der().clone();
    let key_der =
        rustls::pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let server_config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert_der.clone()], key_der)
    .unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serve = tokio::spawn(mirror().serve_tls_with_shutdown(
        listener,
        Arc::new(server_config),
        async move {
            let _ = stopped.await;
        },
    ));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let client = Client::new()
        .tls_config(Arc::new(client_config))
        .protocols(["v1"]);
    let (reply, remote) = within(
        "the wss session",
        client.connect(
            &format!("wss://localhost:{port}/mirror"),
            |mut session| async move {
                session.send("over TLS").await.unwrap();
                let reply = session.recv().await.unwrap();
                (reply, session.request().remote_addr())
            },
        ),
    )
    .await
    .unwrap();
    assert_eq!(reply, Some(Message::text("over TLS")));
    assert_eq!(remote.map(|a| a.port()), Some(port));

    // A client that does not trust the certificate fails the TLS handshake.
    let untrusting = Client::new().tls_config(Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth(),
    ));
    let err = untrusting
        .connect(&format!("wss://localhost:{port}/mirror"), |_s| async {})
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Io(_)), "{err}");

    let _ = stop.send(());
    within("serve_tls to return", serve).await.unwrap().unwrap();
}
