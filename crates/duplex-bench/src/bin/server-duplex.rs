//! The duplex peer: `/mirror` returns every message, `/broadcast` sends every
//! message to every connection of `/broadcast` through a registry of
//! `Sender`s and `try_send` (with `--hub`: through `duplex::Hub`, which
//! encodes once and shares the bytes). `--http1` serves the same app with
//! hyper's HTTP/1 connection instead of `App::serve`, for profiling.
//! `--deflate` offers permessage-deflate with the shipped policy;
//! `--deflate-context` with context takeover allowed both ways (the opt-in).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
};

use duplex::{App, Error, Hub, Sender, Session, WebSockets};
use duplex_bench::server::{self, MAX_FRAME_SIZE, MAX_MESSAGE_SIZE, ServerArgs};

fn main() -> std::io::Result<()> {
    let args = ServerArgs::parse();
    let use_hub = args.has("--hub");
    let http1 = args.has("--http1");
    let deflate = args.has("--deflate");
    // Context takeover both ways (the opt-in), for measuring what it costs.
    let context = args.has("--deflate-context");
    server::run(args.addr, move |listener| async move {
        // All the load comes from one address, in the thousands of
        // sessions: the per-address limits would refuse it.
        let websockets = WebSockets::default()
            .ping_period(None)
            .max_message_size(MAX_MESSAGE_SIZE as u64)
            .max_frame_size(MAX_FRAME_SIZE as u64)
            .max_sessions(1 << 20)
            .max_sessions_per_ip(None)
            .handshake_rate(None);
        let websockets = if deflate || context {
            let policy = duplex::Deflate::default()
                .server_no_context_takeover(!context)
                .client_no_context_takeover(!context);
            websockets
                .extension(policy)
                .map_err(std::io::Error::other)?
        } else {
            websockets
        };
        let app = App::new()
            .max_connections(1 << 20)
            .install(websockets)
            .web_socket("/mirror", mirror);
        let app = if use_hub {
            let hub = Hub::new();
            app.web_socket("/broadcast", move |session| {
                hub_member(hub.clone(), session)
            })
        } else {
            let registry = Registry::default();
            app.web_socket("/broadcast", move |session| {
                registry.clone().member(session)
            })
        };
        if http1 {
            serve_http1(app, listener).await
        } else {
            app.serve(listener).await
        }
    })
}

/// An experiment, not in the table: the same app served by hyper's HTTP/1
/// connection directly instead of `App::serve` (axum's `serve`, whose
/// HTTP version detection wraps the socket).
async fn serve_http1(app: App, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let router = app.into_router();
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(
            hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .with_upgrades(),
        );
    }
}

/// Every text and binary message back, unchanged.
async fn mirror(mut session: Session) -> Result<(), Error> {
    while let Some(message) = session.recv().await? {
        session.send(message).await?;
    }
    Ok(())
}

/// The members of `/broadcast`, the way a user writes it with today's API.
#[derive(Clone, Default)]
struct Registry {
    members: Arc<Mutex<HashMap<u64, Sender>>>,
    next_id: Arc<AtomicU64>,
}

impl Registry {
    async fn member(self, mut session: Session) -> Result<(), Error> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, session.sender());
        let result = async {
            while let Some(message) = session.recv().await? {
                let members: Vec<Sender> = self.lock().values().cloned().collect();
                for member in members {
                    // A member whose buffer is full misses this one.
                    let _ = member.try_send(message.clone());
                }
            }
            Ok(())
        }
        .await;
        self.lock().remove(&id);
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Sender>> {
        self.members.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `/broadcast` through the hub: encode once, share the bytes.
async fn hub_member(hub: Hub, mut session: Session) -> Result<(), Error> {
    let _membership = hub.register(&session.sender());
    while let Some(message) = session.recv().await? {
        hub.broadcast(message);
    }
    Ok(())
}
