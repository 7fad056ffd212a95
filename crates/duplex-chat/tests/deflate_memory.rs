//! What an idle permessage-deflate connection costs the server, measured on
//! the `duplex-chat` binary (shipped defaults) in a process of its own, so
//! that its resident memory is the server's alone.
//!
//! 1,000 connections offer deflate the way Chromium does
//! (`permessage-deflate; client_max_window_bits`), each sends three
//! compressed 4 KiB text messages to `/mirror` and reads their compressed
//! echoes, then all sit idle. With the shipped policy (RFC 7692 §7.1.1:
//! `server_no_context_takeover`, and `client_no_context_takeover` asked of
//! the client) no zlib state outlives a message, and the growth of the
//! server's resident set per connection stays under 8 KiB. Keeping the
//! contexts, as before, costs about 300 KiB per connection.
//!
//! All traffic goes to 127.0.0.1; every wait is bounded.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const CONNECTIONS: usize = 1_000;
const MESSAGES: usize = 3;
const BOUND_KIB: f64 = 8.0;
const WAIT: Duration = Duration::from_secs(30);

struct ChatProcess(Child);

impl Drop for ChatProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in status")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Raw DEFLATE of one whole message, tail removed (RFC 7692 §7.2.1), with
/// a fresh window as `client_no_context_takeover` requires.
fn deflate(payload: &[u8]) -> Vec<u8> {
    let mut compressor = Compress::new(Compression::default(), false);
    let mut out = Vec::with_capacity(payload.len() + 64);
    compressor
        .compress_vec(payload, &mut out, FlushCompress::Sync)
        .expect("compress");
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(payload: &[u8]) -> Vec<u8> {
    let mut decompressor = Decompress::new(false);
    let mut input = payload.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(64 << 10);
    decompressor
        .decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .expect("inflate the server's message");
    out
}

/// A masked text frame with RSV1 (compressed), FIN set.
fn compressed_text_frame(compressed: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0xC1];
    let len = compressed.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(compressed.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Opens one Chromium-style deflate connection to `/mirror` and echoes
/// [`MESSAGES`] compressed messages; returns the idle stream.
async fn connect_and_exchange(port: u16, text: &[u8]) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!(
        "GET /mirror HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("read the head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("an ASCII head");
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(
        lower.contains(
            "sec-websocket-extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        ),
        "the shipped policy answers with both no-context-takeover flags: {head}"
    );
    let frame = compressed_text_frame(&deflate(text));
    for _ in 0..MESSAGES {
        stream.write_all(&frame).await.expect("write a message");
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).await.expect("read an echo");
        assert_eq!(header[0], 0xC1, "a compressed text frame comes back");
        let len = match header[1] {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.expect("length");
                usize::from(u16::from_be_bytes(ext))
            }
            n => usize::from(n),
        };
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).await.expect("payload");
        assert_eq!(
            inflate(&payload),
            text,
            "the echo inflates to what was sent"
        );
    }
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7692_7_1_1_idle_deflate_connections_hold_no_zlib_state_at_the_shipped_defaults() {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_duplex-chat"))
        .args([
            "--addr",
            &format!("127.0.0.1:{port}"),
            // All connections come from one address: lift only the
            // per-address limits, which are not what is measured.
            "--max-sessions-per-ip",
            "0",
            "--handshake-rate",
            "0",
        ])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start duplex-chat");
    let chat = ChatProcess(child);
    let pid = chat.0.id();
    let ready = async {
        loop {
            if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, ready)
        .await
        .expect("duplex-chat listens");
    let text: Vec<u8> =
        "{\"type\":\"message\",\"room\":\"general\",\"text\":\"hello, how are you?\"}\n"
            .repeat(64)
            .into_bytes()[..4096]
            .to_vec();
    // A few connections first, so that the worker threads' compressors and
    // the allocator's first arenas are counted in the baseline, as they are
    // paid once per process, not per connection.
    let mut warm = Vec::new();
    for _ in 0..8 {
        warm.push(connect_and_exchange(port, &text).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let open = async {
        let mut streams = Vec::with_capacity(CONNECTIONS);
        for _ in 0..CONNECTIONS / 50 {
            let batch = (0..50).map(|_| connect_and_exchange(port, &text));
            streams.extend(futures_util::future::join_all(batch).await);
        }
        streams
    };
    let streams = tokio::time::timeout(WAIT * 4, open)
        .await
        .expect("every connection opened and echoed");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    let per_connection = after.saturating_sub(before) as f64 / CONNECTIONS as f64;
    eprintln!(
        "duplex-chat RSS {before} KiB -> {after} KiB with {CONNECTIONS} idle deflate connections: \
         {per_connection:.2} KiB each"
    );
    assert!(
        per_connection <= BOUND_KIB,
        "an idle deflate connection costs {per_connection:.2} KiB, over {BOUND_KIB} KiB"
    );
    drop(streams);
    drop(warm);
}
