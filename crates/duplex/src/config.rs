//! The WebSockets configuration installed on an [`App`](crate::App):
//! Ktor's `install(WebSockets) { … }`.

use std::{fmt, sync::Arc, time::Duration};

use duplex_proto::{Config as ProtoConfig, ExtensionFactory, Mode, Role, Rsv};

use crate::{
    admission::{Admission, Limits},
    budget::{Budget, default_budget},
    convert::{ContentConverter, default_converter},
    handshake::Origins,
    lifecycle::Lifecycle,
};

/// Options shared by every WebSocket endpoint of a server.
///
/// Built by value, each setter documents its default and how it departs
/// from Ktor's where Ktor's default is unsafe in production:
///
/// ```
/// use std::time::Duration;
/// let ws = duplex::WebSockets::default()
///     .ping_period(Some(Duration::from_secs(15)))
///     .timeout(Duration::from_secs(15))
///     .max_frame_size(1 << 20)
///     .masking(false);
/// assert_eq!(ws.get_max_frame_size(), 1 << 20);
/// ```
#[derive(Clone)]
pub struct WebSockets {
    pub(crate) ping_period: Option<Duration>,
    pub(crate) timeout: Duration,
    pub(crate) close_timeout: Duration,
    pub(crate) max_frame_size: u64,
    pub(crate) max_message_size: u64,
    pub(crate) masking: bool,
    pub(crate) incoming_buffer: usize,
    pub(crate) outgoing_buffer: usize,
    pub(crate) write_timeout: Duration,
    pub(crate) memory_budget: Option<usize>,
    pub(crate) budget: Budget,
    pub(crate) origins: Origins,
    pub(crate) limits: Limits,
    pub(crate) admission: Admission,
    pub(crate) converter: Arc<dyn ContentConverter>,
    pub(crate) extensions: Vec<Arc<dyn ExtensionFactory>>,
    pub(crate) lifecycle: Lifecycle,
}

/// Two installed extensions claim the same RSV bit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("extension {new} claims RSV bits {bits:#05b} already claimed by {installed}")]
pub struct ExtensionConflict {
    /// The extension installed first.
    pub installed: String,
    /// The extension that was refused.
    pub new: String,
    /// The bits both claim.
    pub bits: u8,
}

impl Default for WebSockets {
    fn default() -> Self {
        WebSockets {
            ping_period: Some(Duration::from_secs(30)),
            timeout: Duration::from_secs(15),
            close_timeout: Duration::from_secs(10),
            max_frame_size: 16 << 20,
            max_message_size: 64 << 20,
            masking: false,
            incoming_buffer: 1 << 20,
            outgoing_buffer: 1 << 20,
            write_timeout: Duration::from_secs(20),
            memory_budget: Some(default_budget()),
            budget: Budget::default(),
            origins: Origins::default(),
            limits: Limits::default(),
            admission: Admission::default(),
            converter: default_converter(),
            extensions: Vec::new(),
            lifecycle: Lifecycle::default(),
        }
    }
}

impl fmt::Debug for WebSockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSockets")
            .field("ping_period", &self.ping_period)
            .field("timeout", &self.timeout)
            .field("close_timeout", &self.close_timeout)
            .field("max_frame_size", &self.max_frame_size)
            .field("max_message_size", &self.max_message_size)
            .field("masking", &self.masking)
            .field("incoming_buffer", &self.incoming_buffer)
            .field("outgoing_buffer", &self.outgoing_buffer)
            .field("write_timeout", &self.write_timeout)
            .field("memory_budget", &self.memory_budget)
            .field("origins", &self.origins)
            .field("limits", &self.limits)
            .field("extensions", &self.extensions)
            .finish_non_exhaustive()
    }
}

impl WebSockets {
    /// How often a default session pings its peer; `None` or zero sends no
    /// pings. Default 30 s (Ktor: off, which leaves dead peers undetected).
    #[must_use]
    pub fn ping_period(mut self, period: Option<Duration>) -> Self {
        self.ping_period = period.filter(|p| !p.is_zero());
        self
    }

    /// How long to wait for the Pong after a Ping before closing with 1011
    /// "Ping timeout". Default 15 s, as Ktor. Has no effect without pings.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long to wait for the peer's Close after ours before dropping the
    /// connection (1006). Default 10 s (Ktor waits forever).
    #[must_use]
    pub fn close_timeout(mut self, timeout: Duration) -> Self {
        self.close_timeout = timeout;
        self
    }

    /// The largest frame accepted; a larger one closes with 1009. Default
    /// 16 MiB (Ktor: unlimited).
    #[must_use]
    pub fn max_frame_size(mut self, bytes: u64) -> Self {
        self.max_frame_size = bytes.max(1);
        self
    }

    /// The largest message accepted, fragments added up; a larger one closes
    /// with 1009. Default 64 MiB (Ktor checks reassembled messages against
    /// `maxFrameSize`).
    #[must_use]
    pub fn max_message_size(mut self, bytes: u64) -> Self {
        self.max_message_size = bytes.max(1);
        self
    }

    /// Whether the server masks its own frames. Default false, as Ktor.
    ///
    /// RFC 6455 §5.1 forbids masked server frames and browsers close the
    /// connection when they see one: this exists for Ktor parity and for
    /// peers that ask for it, not for security.
    #[must_use]
    pub fn masking(mut self, masking: bool) -> Self {
        self.masking = masking;
        self
    }

    /// How many bytes of received messages may wait for the handler before
    /// the server stops reading from the socket (TCP then slows the client).
    /// Decompressed bytes count: one read of many small compressed messages
    /// inflates to at most this much (plus one message) before the handler
    /// has taken some. Default 1 MiB (Ktor: unbounded).
    #[must_use]
    pub fn incoming_buffer(mut self, bytes: usize) -> Self {
        self.incoming_buffer = bytes.max(1);
        self
    }

    /// How many bytes may wait to be written. A message is queued only if
    /// its frame fits in what is left: otherwise `send` waits and
    /// `try_send` reports the session full (a hub applies its
    /// slow-consumer policy), so raise it above the largest message you
    /// broadcast. A message larger than the whole buffer waits until
    /// nothing is queued and is then queued alone, so any message can be
    /// sent. A compressed message is judged by its size before
    /// compression. The server stops reading from the socket while the
    /// queue is full; what the session queues by itself (Pongs, the echoed
    /// Close) counts too, so a peer that floods Pings and reads nothing
    /// holds at most this much (plus one read's worth of replies). Default
    /// 1 MiB (Ktor: unbounded).
    #[must_use]
    pub fn outgoing_buffer(mut self, bytes: usize) -> Self {
        self.outgoing_buffer = bytes.max(1);
        self
    }

    /// How long queued output may wait without the peer taking a byte of
    /// it before the connection is dropped (1006 for the handler; nothing
    /// can be sent to a peer that does not read). It frees the session, its
    /// queue and a handler waiting in `send`, whatever the peer's receive
    /// window. Default 20 s (Ktor: none).
    ///
    /// [`App`](crate::App) gives HTTP responses the same timeout: a
    /// connection whose peer takes no byte of an answer for this long
    /// (HTTP/1.1), or of a stream's response (HTTP/2), is dropped.
    #[must_use]
    pub fn write_timeout(mut self, timeout: Duration) -> Self {
        self.write_timeout = timeout;
        self
    }

    /// The most memory the sessions of this configuration and its clones
    /// may hold together: bytes read and not yet taken by handlers
    /// (messages still being received included), bytes queued and not yet
    /// written, read buffers. Past it, the connections holding 64 KiB or
    /// more stop being read (TCP then slows their clients), every
    /// connection stops once the use passes it by an eighth, and new
    /// sessions get 503 with `Retry-After`; reading resumes as handlers
    /// take input and peers take output. A connection kept from reading is
    /// not timed out for a Pong it cannot read, and one that still holds
    /// bytes after 15 s of it is closed with 1013 "Try Again Later", so
    /// that the server sheds what it holds. One client address
    /// (as the per-address session limit counts them) may hold a sixteenth
    /// of it, under the same rules; without a per-address limit
    /// ([`max_sessions_per_ip`](Self::max_sessions_per_ip) and
    /// [`handshake_rate`](Self::handshake_rate) both `None`) addresses are
    /// not counted. Each connection still holds at most its own
    /// [`incoming_buffer`](Self::incoming_buffer) and
    /// [`outgoing_buffer`](Self::outgoing_buffer) (plus one message), and
    /// connections already reading when the mark is passed may each finish
    /// one round of reads, so the use can pass the budget by a few reads'
    /// worth. `None` removes it. Default: a quarter of the memory of the
    /// machine, or of its control group (container) when that is smaller,
    /// read once at start; 1 GiB where neither can be read.
    ///
    /// Configurations built separately keep separate budgets: build one
    /// and clone it for each route that should share it.
    #[must_use]
    pub fn memory_budget(mut self, bytes: Option<usize>) -> Self {
        self.memory_budget = bytes.map(|bytes| bytes.max(1));
        self
    }

    /// How many bytes the sessions of this configuration (and its clones)
    /// hold now, as counted by the [`memory_budget`](Self::memory_budget).
    pub fn memory_used(&self) -> usize {
        self.budget.used()
    }

    /// Accepts upgrades from these `Origin`s too (exact match, ASCII case
    /// ignored, such as `https://app.example.com`), besides the server's
    /// own. Others get 403.
    ///
    /// By default only pages of the server itself may open sessions: a
    /// request whose `Origin` names another host or port than its `Host`
    /// header gets 403, so that no other site's page can open a session
    /// with its visitors' cookies (cross-site WebSocket hijacking).
    /// Requests without an `Origin` header (clients that are not browsers)
    /// are accepted. Behind a proxy that rewrites `Host`, list the public
    /// origins here.
    #[must_use]
    pub fn allowed_origins<I, S>(mut self, origins: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.origins.allowed = origins.into_iter().map(Into::into).collect();
        self
    }

    /// Accepts upgrades whatever their `Origin`, for endpoints that every
    /// site may use and that rely on no cookie or address for who the
    /// client is.
    #[must_use]
    pub fn any_origin(mut self) -> Self {
        self.origins.any = true;
        self
    }

    /// The most sessions open at once under this configuration; the next
    /// upgrade gets 503 with `Retry-After: 5`. Default 10,000.
    #[must_use]
    pub fn max_sessions(mut self, sessions: usize) -> Self {
        self.limits.max_sessions = sessions;
        self
    }

    /// The most sessions open at once from one client address; the next
    /// upgrade from it gets 429 with `Retry-After: 1`. `None` removes the
    /// limit. Default 1,000. Behind a proxy every client has the proxy's
    /// address: raise it or remove it there. Needs the peer's address,
    /// which [`App`](crate::App) always provides (an axum `Router` does when
    /// served with `into_make_service_with_connect_info::<SocketAddr>()`).
    #[must_use]
    pub fn max_sessions_per_ip(mut self, sessions: Option<usize>) -> Self {
        self.limits.max_sessions_per_ip = sessions;
        self
    }

    /// How fast one client address may open sessions: a token bucket of
    /// `burst` handshakes refilled at `per_second`; past it, 429 with
    /// `Retry-After`. `None` removes the limit. Default 50 per second with
    /// bursts of 1,000. Like the per-address session limit, it needs the
    /// peer's address.
    #[must_use]
    pub fn handshake_rate(mut self, rate: Option<(u32, u32)>) -> Self {
        self.limits.handshake_rate = rate
            .filter(|&(per_second, burst)| per_second > 0 && burst > 0)
            .map(|(per_second, burst)| (f64::from(per_second), f64::from(burst)));
        self
    }

    /// How many leading bits of an IPv6 address name one client for the
    /// per-address limits (sessions, handshake rate, and
    /// [`App`](crate::App)'s HTTP connections and TLS handshakes): every
    /// address of one prefix counts as the same client, since a host
    /// chooses the last 64 bits of its address itself and could otherwise
    /// escape the limits by changing them. Sites are often routed a /56 or
    /// a /48 (RFC 6177): a shorter prefix groups a whole site. IPv4
    /// addresses count one by one. Default 64; at most 128 (every address
    /// apart).
    #[must_use]
    pub fn ipv6_prefix(mut self, bits: u8) -> Self {
        self.limits.ipv6_prefix = bits.min(128);
        self
    }

    /// The converter for `send_json` / `recv_json`. Default: JSON
    /// (`JsonConverter`, feature `json`); without that feature none, and
    /// those calls return [`ConvertError::NoConverter`](crate::ConvertError::NoConverter).
    #[must_use]
    pub fn content_converter(mut self, converter: impl ContentConverter) -> Self {
        self.converter = Arc::new(converter);
        self
    }

    /// Installs an extension (Ktor's `extensions { install(…) }`), such as
    /// [`Deflate`](duplex_proto::Deflate). Extensions are offered to the
    /// client's offers in installation order and, once negotiated, encode
    /// outgoing messages in that order and decode incoming ones in reverse.
    ///
    /// ```
    /// # #[cfg(feature = "deflate")] {
    /// use duplex::{WebSockets, proto::Deflate};
    /// let ws = WebSockets::default().extension(Deflate::default())?;
    /// # }
    /// # Ok::<_, duplex::ExtensionConflict>(())
    /// ```
    ///
    /// # Errors
    /// [`ExtensionConflict`] when an installed extension already claims one
    /// of its RSV bits.
    pub fn extension(mut self, factory: impl ExtensionFactory) -> Result<Self, ExtensionConflict> {
        let bits = factory.rsv();
        if let Some(installed) = self.extensions.iter().find(|f| f.rsv().0 & bits.0 != 0) {
            return Err(ExtensionConflict {
                installed: installed.name().to_owned(),
                new: factory.name().to_owned(),
                bits: installed.rsv().0 & bits.0,
            });
        }
        self.extensions.push(Arc::new(factory));
        Ok(self)
    }

    /// The RSV bits that installed extensions claim.
    pub fn extension_rsv(&self) -> Rsv {
        self.extensions
            .iter()
            .fold(Rsv::NONE, |acc, f| acc.union(f.rsv()))
    }

    /// The maximum frame size in force.
    pub fn get_max_frame_size(&self) -> u64 {
        self.max_frame_size
    }

    /// The maximum message size in force.
    pub fn get_max_message_size(&self) -> u64 {
        self.max_message_size
    }

    /// Closes every live session of this configuration with 1001 "Server
    /// shutting down" and waits, up to `grace`, until they are gone; at
    /// `grace` the sessions still open are dropped, handlers included.
    /// New upgrades are refused with 503 from then on.
    ///
    /// [`App`](crate::App) calls this for every configuration its routes
    /// use. Serving a router yourself, call it for each configuration once
    /// axum's graceful shutdown has begun:
    ///
    /// ```no_run
    /// # async fn run(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    /// use std::time::Duration;
    /// let ws = duplex::WebSockets::default();
    /// let router = axum::Router::new().route("/ws", duplex::web_socket(&ws, |_s: duplex::Session| async {}));
    /// let (started, sessions) = tokio::sync::oneshot::channel();
    /// let closing = ws.clone();
    /// axum::serve(listener, router)
    ///     .with_graceful_shutdown(async move {
    ///         let _ = tokio::signal::ctrl_c().await;
    ///         // 1001 to every session at once, then up to 10 s for them to end.
    ///         let wait = tokio::spawn(async move { closing.shutdown(Duration::from_secs(10)).await });
    ///         let _ = started.send(wait);
    ///     })
    ///     .await?;
    /// // Upgraded connections are not axum's to wait for: wait for the sessions.
    /// if let Ok(wait) = sessions.await {
    ///     let _ = wait.await;
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn shutdown(&self, grace: Duration) {
        self.lifecycle.shutdown(grace).await;
    }

    /// How many sessions are live.
    pub fn live_sessions(&self) -> usize {
        self.lifecycle.live()
    }

    pub(crate) fn proto_config(&self, mode: Mode) -> ProtoConfig {
        let mut config = ProtoConfig::new(Role::Server);
        config.mode = mode;
        config.max_frame_size = self.max_frame_size;
        config.max_message_size = self.max_message_size;
        config.mask_outgoing = self.masking;
        config.ping_period = self.ping_period;
        config.pong_timeout = self.timeout;
        config.close_timeout = self.close_timeout;
        config.max_pending_bytes = self.incoming_buffer;
        config.max_queued_output = self.outgoing_buffer;
        config
    }
}
