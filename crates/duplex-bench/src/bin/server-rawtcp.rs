//! The raw TCP echo: answers the opening handshake with a fixed 101 (the
//! accept key computed properly), then returns every byte it reads, the
//! client's masked frames included, with one write per read. No framing, no
//! unmasking, no UTF-8 check: the physical limit of an echo on this machine.
//! It has no `/broadcast`.

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use duplex_bench::server::{self, ServerArgs};

fn main() -> std::io::Result<()> {
    let args = ServerArgs::parse();
    server::run(args.addr, serve)
}

async fn serve(listener: TcpListener) -> std::io::Result<()> {
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        tokio::spawn(connection(tcp));
    }
}

async fn connection(mut tcp: TcpStream) -> std::io::Result<()> {
    // The request, read a little at a time so that an idle connection keeps
    // no large buffer.
    let mut head = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let end = loop {
        let n = tcp.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(pos) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
        if head.len() > 16 << 10 {
            return Ok(());
        }
    };
    let key = String::from_utf8_lossy(&head[..end])
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.trim()
                .eq_ignore_ascii_case("sec-websocket-key")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_default();
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
    let response = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {accept}\r\n\r\n"
    );
    tcp.write_all(response.as_bytes()).await?;
    tcp.write_all(&head[end..]).await?;
    drop(head);
    // Wait for the first bytes before holding a buffer.
    tcp.readable().await?;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = tcp.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        tcp.write_all(&buf[..n]).await?;
    }
}
