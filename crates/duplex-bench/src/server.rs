//! What every peer server shares, so that they differ only in the library:
//! the command line, the runtime (one worker thread), the limits.

use std::{future::Future, io, net::SocketAddr};

use tokio::net::TcpListener;

/// The largest message every server accepts (more than the 1 MiB scenario).
pub const MAX_MESSAGE_SIZE: usize = 64 << 20;

/// The largest frame every server accepts.
pub const MAX_FRAME_SIZE: usize = 16 << 20;

/// The capacity of the `tokio::sync::broadcast` channel that the peers'
/// `/broadcast` uses: far more than the publisher keeps in flight, so that
/// no subscriber lags in the benchmark.
pub const BROADCAST_CAPACITY: usize = 1024;

/// The command line of a server: `--addr ADDR` (default 127.0.0.1:9001) and
/// flags of its own.
#[derive(Debug, Clone)]
pub struct ServerArgs {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The other arguments, as given.
    pub flags: Vec<String>,
}

impl ServerArgs {
    /// Parses `std::env::args`; exits with a usage line on a bad address.
    pub fn parse() -> Self {
        let mut addr: SocketAddr = "127.0.0.1:9001".parse().expect("a valid default address");
        let mut flags = Vec::new();
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            if arg == "--addr" {
                let value = args.next().unwrap_or_default();
                addr = value.parse().unwrap_or_else(|_| {
                    eprintln!("usage: --addr HOST:PORT (got {value:?})");
                    std::process::exit(2);
                });
            } else if let Some(value) = arg.strip_prefix("--addr=") {
                addr = value.parse().unwrap_or_else(|_| {
                    eprintln!("usage: --addr HOST:PORT (got {value:?})");
                    std::process::exit(2);
                });
            } else {
                flags.push(arg);
            }
        }
        ServerArgs { addr, flags }
    }

    /// Whether `flag` was given.
    pub fn has(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// Runs `serve` on a tokio runtime with exactly one worker thread, the same
/// for every server, after binding `addr`. Prints `listening on ADDR` on
/// stdout once the listener is bound, which the runner waits for.
///
/// # Errors
/// Binding failed, or `serve` returned an error.
pub fn run<F, Fut>(addr: SocketAddr, serve: F) -> io::Result<()>
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = io::Result<()>> + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(addr).await?;
        println!("listening on {}", listener.local_addr()?);
        // On the worker, like every task it spawns, not on this thread.
        tokio::spawn(serve(listener))
            .await
            .map_err(io::Error::other)?
    })
}
