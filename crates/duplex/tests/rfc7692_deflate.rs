//! permessage-deflate over real sockets: a decompression bomb is refused
//! with 1009 before it is inflated, and memory stays bounded.

mod common;

use common::{RawClient, Server, reset_peak_rss, status_kib, upgrade_request};
use duplex::{App, Deflate, Session, WebSockets};
use flate2::{Compress, Compression, FlushCompress};

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
    let request = upgrade_request(
        "/mirror",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    let connect = || async {
        let (response, client) = RawClient::request(server.addr, request.clone()).await;
        assert_eq!(response.status, 101);
        assert_eq!(
            response.header("Sec-WebSocket-Extensions"),
            Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
        );
        client
    };
    // A compressed binary message: FIN, RSV1, opcode 2.
    let compressed_binary =
        |payload: &[u8]| common::encode_frame(true, 0x40, 0x2, payload, Some([1, 2, 3, 4]));

    // Warm-up: one message just under the limit, inflated and echoed, so the
    // allocator already holds what a legitimate message costs and the
    // samples below measure only what the bomb adds.
    let mut client = connect().await;
    client
        .write(&compressed_binary(&compressed_zeros((1 << 20) - 1)))
        .await;
    let echo = client.read_frame().await;
    assert_eq!(echo.opcode, 0x2, "the warm-up message comes back: {echo:?}");
    client.send_close(1000, "").await;
    assert_eq!(client.read_close().await.0, 1000);

    // Several samples, each from a fresh peak: the inflated output may reach
    // the 1 MiB limit (plus the buffer's growth), so about 2 MiB are measured;
    // inflating 20 MiB (a limit 20 times too loose) cannot fit under the
    // bound in any sample. The smallest sample is judged, so a burst of
    // allocator noise in one of them does not fail the test.
    const SAMPLES: usize = 3;
    const BOUND_KIB: u64 = 8 << 10;
    let baseline = status_kib("VmRSS");
    let mut growth_kib = Vec::new();
    for _ in 0..SAMPLES {
        let mut client = connect().await;
        reset_peak_rss();
        client.write(&compressed_binary(&bomb)).await;
        let (code, _) = client.read_close().await;
        assert_eq!(code, 1009);
        growth_kib.push(status_kib("VmHWM").saturating_sub(baseline));
    }
    let least = *growth_kib.iter().min().unwrap();
    assert!(
        least < BOUND_KIB,
        "peak memory grew by {growth_kib:?} KiB (per sample, over {baseline} KiB) for a 256 MiB bomb \
         against a 1 MiB limit; the bound is {BOUND_KIB} KiB"
    );
    eprintln!("bomb: peak growth per sample {growth_kib:?} KiB over a baseline of {baseline} KiB");
}
