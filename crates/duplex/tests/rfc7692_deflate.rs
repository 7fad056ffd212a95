//! permessage-deflate over real sockets: a decompression bomb is refused
//! with 1009 before it is inflated, and memory stays bounded.

mod common;

use common::{RawClient, Server, upgrade_request};
use duplex::{App, Deflate, Session, WebSockets};
use flate2::{Compress, Compression, FlushCompress};

/// Peak resident memory of this process, from /proc (kB).
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status")
}

/// `zeros` zero bytes as one permessage-deflate payload (tail removed),
/// compressed a chunk at a time so the test never holds the inflated size.
fn compressed_zeros(zeros: usize) -> Vec<u8> {
    let chunk = vec![0u8; 1 << 20];
    let mut compressor = Compress::new_with_window_bits(Compression::best(), false, 15);
    let mut out = Vec::with_capacity(zeros / 500);
    let mut left = zeros;
    while left > 0 {
        let take = left.min(chunk.len());
        let before = compressor.total_in();
        out.reserve(64 << 10);
        compressor
            .compress_vec(&chunk[..take], &mut out, FlushCompress::None)
            .unwrap();
        left -= (compressor.total_in() - before) as usize;
    }
    loop {
        out.reserve(64 << 10);
        compressor
            .compress_vec(&[], &mut out, FlushCompress::Sync)
            .unwrap();
        if out.ends_with(&[0, 0, 0xff, 0xff]) {
            break;
        }
    }
    out.truncate(out.len() - 4);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc7692_decompression_bomb_is_refused_with_1009_and_memory_stays_bounded() {
    let websockets = WebSockets::default()
        .max_message_size(1 << 20)
        .extension(Deflate::default())
        .unwrap();
    let app =
        App::new()
            .install(websockets)
            .web_socket("/mirror", |mut session: Session| async move {
                while let Ok(Some(message)) = session.recv().await {
                    let _ = session.send(message).await;
                }
            });
    let server = Server::start(app).await;
    let bomb = compressed_zeros(256 << 20);
    assert!(
        bomb.len() < 1 << 20,
        "the bomb is small on the wire: {} bytes",
        bomb.len()
    );
    let before = peak_rss_kib();

    let request = upgrade_request(
        "/mirror",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    let (response, mut client) = RawClient::request(server.addr, request).await;
    assert_eq!(response.status, 101);
    assert_eq!(
        response.header("Sec-WebSocket-Extensions"),
        Some("permessage-deflate")
    );
    // A compressed binary message: FIN, RSV1, opcode 2.
    client
        .write(&common::encode_frame(
            true,
            0x40,
            0x2,
            &bomb,
            Some([1, 2, 3, 4]),
        ))
        .await;
    let (code, _) = client.read_close().await;
    assert_eq!(code, 1009);

    let grown_mib = (peak_rss_kib().saturating_sub(before)) / 1024;
    assert!(
        grown_mib < 32,
        "peak memory grew by {grown_mib} MiB for a 256 MiB bomb against a 1 MiB limit"
    );
}
