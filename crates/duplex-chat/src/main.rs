//! The duplex chat server on 127.0.0.1:8080: the chat page on `/`, its JSON
//! protocol on `/chat`, the plain-text chat on `/chat/plain`, `/echo`,
//! `/mirror` and Prometheus metrics on `/metrics`.

#![forbid(unsafe_code)]

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use duplex::{Deflate, WebSockets};

/// The duplex chat server.
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    long_about = "The duplex chat server.\n\n\
        Open http://ADDR/ in a browser for the chat page. WebSocket endpoints: \
        /chat (the page's JSON protocol, see PROTOCOL.md), /chat/plain (plain-text \
        chat), /echo and /mirror. Prometheus metrics on /metrics.",
    after_help = "Example: duplex-chat --addr 0.0.0.0:8080 --history 100 --rate 2 --burst 5\n\n\
        /chat and /chat/plain are rate-limited and capped by the options above; \
        /echo and /mirror (for conformance suites and benchmarks) are not rate-limited and \
        read --echo-max-message bytes a message."
)]
struct Args {
    /// Address to listen on (use 0.0.0.0:PORT to accept other machines).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Serve /metrics on this address only (for example 127.0.0.1:9090),
    /// not next to the public routes.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Messages kept per room and per pair of direct messages, for recovery; joining sends the last 50 at most.
    #[arg(long, default_value_t = 200)]
    history: usize,
    /// Bytes of a room's history kept (as sent on joining); the oldest messages go first.
    #[arg(long, default_value_t = 128 << 10)]
    history_bytes: usize,
    /// Longest chat message, in characters.
    #[arg(long, default_value_t = 2000)]
    max_text: usize,
    /// Longest chat message, in bytes of UTF-8.
    #[arg(long, default_value_t = 4096)]
    max_text_bytes: usize,
    /// Chat requests (or /chat/plain lines) a connection may send per second on average; 0: no limit.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Chat requests (or /chat/plain lines) a connection may send in a burst.
    #[arg(long, default_value_t = 10)]
    burst: u32,
    /// Names in use at once on /chat; one more gets server_full and close 1013.
    #[arg(long, default_value_t = 10_000)]
    max_users: usize,
    /// Rooms the server keeps (in use, or idle with history); beyond: server_rooms_full.
    #[arg(long, default_value_t = 1000)]
    max_total_rooms: usize,
    /// Members of one room (and people on /chat/plain); beyond: room_full (plain: close 1013).
    #[arg(long, default_value_t = 1000)]
    max_members: usize,
    /// Rooms one chat connection may be in at once; beyond: too_many_rooms.
    #[arg(long, default_value_t = 20)]
    max_rooms: usize,
    /// Rooms nobody is in whose history is kept (the most recently used).
    #[arg(long, default_value_t = 256)]
    max_idle_rooms: usize,
    /// Seconds between server pings; 0 turns pings off.
    #[arg(long, default_value_t = 30)]
    ping_period: u64,
    /// Seconds to wait for a Pong before closing with 1011.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    /// Largest frame accepted, in bytes (larger: close 1009).
    #[arg(long, default_value_t = 16 << 20)]
    max_frame_size: u64,
    /// Largest message accepted, in bytes (larger: close 1009); /chat and /chat/plain read 64 KiB at most.
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: u64,
    /// Largest message (and frame) /echo and /mirror read, in bytes, inflated
    /// bytes included (larger: close 1009); at most --max-message-size.
    /// Conformance suites need 16777216.
    #[arg(long, default_value_t = 64 << 10, value_name = "BYTES")]
    echo_max_message: u64,
    /// Mask server frames (RFC 6455 forbids it; browsers reject it).
    #[arg(long)]
    masking: bool,
    /// Do not offer permessage-deflate (RFC 7692).
    #[arg(long)]
    no_deflate: bool,
    /// Seconds to wait for sessions to close on shutdown; then they are dropped.
    #[arg(long, default_value_t = 5)]
    shutdown_grace: u64,
    /// Another origin whose pages may open sessions (for example
    /// https://chat.example.com), besides this server's own; repeat for more.
    /// Pages of any other origin get 403 (cross-site WebSocket hijacking).
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Seconds queued output may wait for a peer that reads none of it; then it is dropped.
    #[arg(long, default_value_t = 20)]
    write_timeout: u64,
    /// WebSocket sessions open at once; one more gets 503.
    #[arg(long, default_value_t = 10_000)]
    max_sessions: usize,
    /// WebSocket sessions open at once from one address (0: no limit); one more gets 429.
    #[arg(long, default_value_t = 1_000)]
    max_sessions_per_ip: usize,
    /// Bytes all WebSocket sessions may hold together (read and not yet
    /// handled, queued and not yet sent); past it the largest holders stop
    /// being read and new sessions get 503; one address may hold a
    /// sixteenth. 0: no budget. Default: a quarter of the machine's (or
    /// the container's) memory.
    #[arg(long, value_name = "BYTES")]
    memory_budget: Option<usize>,
    /// WebSocket handshakes per second from one address (0: no limit); past it, 429.
    #[arg(long, default_value_t = 50)]
    handshake_rate: u32,
    /// WebSocket handshakes from one address in a burst.
    #[arg(long, default_value_t = 1_000)]
    handshake_burst: u32,
    /// Share names, rooms, presence, direct messages and history with every
    /// node on this Redis (redis://HOST:PORT/); without it, all is kept in
    /// this process.
    #[arg(long, value_name = "URL")]
    redis_url: Option<String>,
    /// The prefix of the chat's Redis keys and channels: nodes with the same
    /// prefix on one Redis are one chat.
    #[arg(long, default_value = "duplex-chat", requires = "redis_url")]
    redis_prefix: String,
    /// When Redis cannot be reached at start, keep trying instead of exiting.
    #[arg(long, requires = "redis_url")]
    redis_retry: bool,
    /// This node's id in Redis (random by default).
    #[arg(long, requires = "redis_url")]
    node_id: Option<String>,
    /// With Redis: new rooms and new direct conversations (streams in
    /// Redis) one connection may start per second on average (0: no
    /// limit); past it, rate_limited.
    #[arg(long, default_value_t = duplex_chat::RedisOptions::NEW_STREAMS_RATE)]
    new_streams_rate: f64,
    /// With Redis: new streams one connection may start at once.
    #[arg(long, default_value_t = duplex_chat::RedisOptions::NEW_STREAMS_BURST)]
    new_streams_burst: u32,
    /// With Redis: new streams the connections of one address (IPv6: one
    /// /64) may start per second on average (0: no limit).
    #[arg(long, default_value_t = duplex_chat::RedisOptions::NEW_STREAMS_RATE_PER_ADDRESS)]
    new_streams_rate_per_ip: f64,
    /// With Redis: new streams the connections of one address may start at once.
    #[arg(long, default_value_t = duplex_chat::RedisOptions::NEW_STREAMS_BURST_PER_ADDRESS)]
    new_streams_burst_per_ip: u32,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    // Before anything records a metric.
    let _ = duplex_chat::prometheus();
    let websockets = WebSockets::default()
        .ping_period(Some(Duration::from_secs(args.ping_period)))
        .timeout(Duration::from_secs(args.timeout))
        .max_frame_size(args.max_frame_size)
        .max_message_size(args.max_message_size)
        .masking(args.masking)
        .allowed_origins(args.allowed_origins)
        .write_timeout(Duration::from_secs(args.write_timeout.max(1)))
        .max_sessions(args.max_sessions)
        .max_sessions_per_ip((args.max_sessions_per_ip > 0).then_some(args.max_sessions_per_ip))
        .handshake_rate(
            (args.handshake_rate > 0).then_some((args.handshake_rate, args.handshake_burst.max(1))),
        );
    let websockets = match args.memory_budget {
        Some(bytes) => websockets.memory_budget((bytes > 0).then_some(bytes)),
        None => websockets,
    };
    let websockets = if args.no_deflate {
        websockets
    } else {
        websockets
            .extension(Deflate::default())
            .map_err(std::io::Error::other)?
    };
    let options = duplex_chat::ChatOptions {
        history: args.history,
        history_bytes: args.history_bytes,
        max_text_chars: args.max_text.max(1),
        max_text_bytes: args.max_text_bytes.max(4),
        rate: args.rate.max(0.0),
        burst: args.burst.max(1),
        max_users: args.max_users.max(1),
        max_total_rooms: args.max_total_rooms.max(1),
        max_members_per_room: args.max_members.max(1),
        max_rooms_per_user: args.max_rooms.max(1),
        max_idle_rooms: args.max_idle_rooms,
        echo_max_message: args.echo_max_message.max(1),
    };
    tokio::spawn(duplex_chat::memory::release_after_sessions_end(
        websockets.clone(),
    ));
    let chat = match args.redis_url {
        Some(url) => {
            let redis = duplex_chat::RedisOptions {
                prefix: args.redis_prefix,
                node_id: args.node_id,
                retry: args.redis_retry,
                new_streams_rate: args.new_streams_rate.max(0.0),
                new_streams_burst: args.new_streams_burst.max(1),
                new_streams_rate_per_address: args.new_streams_rate_per_ip.max(0.0),
                new_streams_burst_per_address: args.new_streams_burst_per_ip.max(1),
                ..duplex_chat::RedisOptions::new(url)
            };
            match duplex_chat::Chat::with_redis(options, redis).await {
                Ok(chat) => chat,
                Err(err) => {
                    tracing::error!("{err}");
                    eprintln!("duplex-chat: {err}");
                    std::process::exit(1);
                }
            }
        }
        None => duplex_chat::Chat::new(options),
    };
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    tracing::info!(
        "duplex-chat listening: open http://{} in a browser",
        listener.local_addr()?
    );
    let grace = Duration::from_secs(args.shutdown_grace);
    let Some(metrics_addr) = args.metrics_addr else {
        return duplex_chat::app_for(websockets, chat)
            .shutdown_grace(grace)
            .serve(listener)
            .await;
    };
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr).await?;
    tracing::info!(
        "metrics on http://{}/metrics",
        metrics_listener.local_addr()?
    );
    // Both stop on the same Ctrl-C or SIGTERM.
    let public = duplex_chat::public_app_for(websockets, chat)
        .shutdown_grace(grace)
        .serve(listener);
    let metrics = duplex_chat::metrics_app()
        .shutdown_grace(grace)
        .serve(metrics_listener);
    tokio::try_join!(public, metrics).map(|_| ())
}
