//! The duplex chat server: `/echo`, `/chat` and `/mirror` on 127.0.0.1:8080.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use duplex::{Deflate, WebSockets};

/// The duplex chat server.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Seconds between server pings; 0 turns pings off.
    #[arg(long, default_value_t = 30)]
    ping_period: u64,
    /// Seconds to wait for a Pong before closing with 1011.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    /// Largest frame accepted, in bytes (larger: close 1009).
    #[arg(long, default_value_t = 16 << 20)]
    max_frame_size: u64,
    /// Largest message accepted, in bytes (larger: close 1009).
    #[arg(long, default_value_t = 64 << 20)]
    max_message_size: u64,
    /// Mask server frames (RFC 6455 forbids it; browsers reject it).
    #[arg(long)]
    masking: bool,
    /// Do not offer permessage-deflate (RFC 7692).
    #[arg(long)]
    no_deflate: bool,
    /// Seconds to wait for sessions to close on shutdown.
    #[arg(long, default_value_t = 5)]
    shutdown_grace: u64,
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let websockets = WebSockets::default()
        .ping_period(Some(Duration::from_secs(args.ping_period)))
        .timeout(Duration::from_secs(args.timeout))
        .max_frame_size(args.max_frame_size)
        .max_message_size(args.max_message_size)
        .masking(args.masking);
    let websockets = if args.no_deflate {
        websockets
    } else {
        websockets
            .extension(Deflate::default())
            .map_err(std::io::Error::other)?
    };
    let listener = tokio::net::TcpListener::bind(args.addr).await?;
    tracing::info!("duplex-chat listening on http://{}", listener.local_addr()?);
    duplex_chat::app(websockets)
        .shutdown_grace(Duration::from_secs(args.shutdown_grace))
        .serve(listener)
        .await
}
