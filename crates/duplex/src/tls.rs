//! Serving over TLS (`wss://`) with rustls.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::address_limit::AddressLimit;

pub use tokio_rustls::rustls;

/// How long a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes that may wait for the server to take them.
const BACKLOG: usize = 128;

/// TLS handshakes in progress at once. Past it a new connection is closed
/// at once: a flood of connections that never finish their handshake holds
/// at most this many handshake states (and each for at most
/// [`HANDSHAKE_TIMEOUT`]).
const MAX_HANDSHAKES: usize = 1024;

/// TLS handshakes in progress at once from one client address (an IPv6
/// /64 by default, as for the session limits): one address takes at most
/// this share of [`MAX_HANDSHAKES`], so silent sockets from one address
/// cannot shut every other TLS client out.
const MAX_HANDSHAKES_PER_ADDRESS: usize = 64;

/// A listener that hands over connections once their TLS handshake is done.
///
/// Each handshake runs in a task of its own, so a slow or silent client
/// cannot hold up the others.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local_addr: SocketAddr,
}

impl TlsListener {
    /// Accepts on `listener` with the rustls `config` (certificate chain,
    /// key, ALPN). ALPN `http/1.1` is set when the config names none.
    ///
    /// At most 1,024 handshakes run at once, 64 of them from one address
    /// (an IPv6 /64), each for at most 10 s; a connection past either is
    /// closed at once.
    ///
    /// # Errors
    /// The listener's local address cannot be read.
    pub fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        Self::bind(listener, config, crate::admission::DEFAULT_IPV6_PREFIX)
    }

    /// [`new`](Self::new), with IPv6 addresses grouped by `ipv6_prefix`.
    pub(crate) fn bind(
        listener: TcpListener,
        config: Arc<rustls::ServerConfig>,
        ipv6_prefix: u8,
    ) -> io::Result<Self> {
        let local_addr = listener.local_addr()?;
        let config = if config.alpn_protocols.is_empty() {
            let mut with_alpn = (*config).clone();
            with_alpn.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(with_alpn)
        } else {
            config
        };
        let acceptor = TlsAcceptor::from(config);
        let (tx, accepted) = mpsc::channel(BACKLOG);
        let in_progress = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let per_address = AddressLimit::new(MAX_HANDSHAKES_PER_ADDRESS, ipv6_prefix);
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of file descriptors, mostly: wait rather than spin.
                        tracing::warn!("accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Some(place) = per_address.enter(addr.ip()) else {
                    tracing::debug!(%addr, "too many TLS handshakes in progress from one address; closing a new connection");
                    counter!("duplex_connections_refused_total").increment(1);
                    continue;
                };
                let Ok(permit) = Arc::clone(&in_progress).try_acquire_owned() else {
                    tracing::debug!(%addr, "too many TLS handshakes in progress; closing a new connection");
                    counter!("duplex_connections_refused_total").increment(1);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let ready = tx.clone();
                tokio::spawn(async move {
                    let _permit = (permit, place);
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = ready.send((tls, addr)).await;
                        }
                        Ok(Err(err)) => tracing::debug!(%addr, "TLS handshake failed: {err}"),
                        Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(TlsListener {
            accepted,
            local_addr,
        })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept task ends only with the listener; never resolve.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local_addr)
    }
}
