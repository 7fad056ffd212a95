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
    let server = mirror(
        WebSockets::default()
            .max_message_size(1 << 20)
            .extension(Deflate::default())
            .unwrap(),
    )
    .await;
    let bomb = compressed_zeros(256 << 20);
    assert!(
        bomb.len() < 1 << 20,
        "the bomb is small on the wire: {} bytes",
        bomb.len()
    );
    let connect = || async {
        let (response, client) = offer_deflate(&server).await;
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

/// Text that compresses poorly on its own (pseudo-random letters) but to a
/// few bytes when the previous message is in the window: the compressed
/// size tells whether the server's compressor kept its context.
fn noisy_text(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    (0..len)
        .map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            b'a' + (state >> 24) as u8 % 26
        })
        .collect()
}

/// Sends `text` uncompressed and returns the compressed echo's payload size
/// and its inflation by `inflater` (which keeps its window, as a client
/// that allows context takeover does).
async fn echo_size(
    client: &mut RawClient,
    inflater: &mut flate2::Decompress,
    text: &[u8],
) -> usize {
    client.send_final(0x1, text).await;
    let frame = client.read_frame().await;
    assert_eq!(frame.rsv, 0x40, "the echo is compressed (RSV1)");
    let mut input = frame.payload.clone();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(text.len() + 64);
    inflater
        .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
        .expect("the echo inflates with the client's window");
    assert_eq!(out, text, "the echo inflates to what was sent");
    frame.payload.len()
}

/// `/mirror`, echoing every message, with `websockets`.
async fn mirror(websockets: WebSockets) -> Server {
    let app =
        App::new()
            .install(websockets)
            .web_socket("/mirror", |mut session: Session| async move {
                while let Ok(Some(message)) = session.recv().await {
                    let _ = session.send(message).await;
                }
            });
    Server::start(app).await
}

/// An upgrade of `/mirror` offering a bare permessage-deflate; the 101.
async fn offer_deflate(server: &Server) -> (common::HttpResponse, RawClient) {
    let request = upgrade_request(
        "/mirror",
        "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    );
    let (response, client) = RawClient::request(server.addr, request).await;
    assert_eq!(response.status, 101);
    (response, client)
}

/// §7.1.1.1: with the shipped policy the server compresses every message
/// with an empty window (the same message twice compresses to the same
/// size), and says so in its response.
#[tokio::test]
async fn rfc7692_7_1_1_1_by_default_every_message_is_compressed_alone() {
    let server = mirror(WebSockets::default().extension(Deflate::default()).unwrap()).await;
    let (response, mut client) = offer_deflate(&server).await;
    assert!(
        response
            .header("Sec-WebSocket-Extensions")
            .is_some_and(|h| h.contains("server_no_context_takeover")),
        "{:?}",
        response.header("Sec-WebSocket-Extensions")
    );
    let text = noisy_text(2048);
    let mut inflater = flate2::Decompress::new(false);
    let first = echo_size(&mut client, &mut inflater, &text).await;
    let second = echo_size(&mut client, &mut inflater, &text).await;
    assert_eq!(
        first, second,
        "no context: the repeat compresses as the first did"
    );
}

/// With context takeover turned on, the server's compressor keeps its
/// window between messages (a repeat compresses to a few bytes) until the
/// connection has sent nothing for `release_compressor_after`; then it is
/// released and the next message starts from an empty window, which a
/// client that kept its own window still inflates (§7.1.1.1 allows a server
/// to stop using context at any time; only the client's window must stay).
#[tokio::test]
async fn rfc7692_7_1_1_1_an_idle_connection_releases_its_compressor_and_its_client_still_inflates()
{
    let idle = std::time::Duration::from_millis(300);
    let deflate = Deflate::default()
        .server_no_context_takeover(false)
        .client_no_context_takeover(false)
        .release_compressor_after(Some(idle));
    let server = mirror(WebSockets::default().extension(deflate).unwrap()).await;
    let (response, mut client) = offer_deflate(&server).await;
    assert_eq!(
        response.header("Sec-WebSocket-Extensions"),
        Some("permessage-deflate"),
        "context takeover allowed both ways"
    );
    let text = noisy_text(2048);
    let mut inflater = flate2::Decompress::new(false);
    let first = echo_size(&mut client, &mut inflater, &text).await;
    let repeat = echo_size(&mut client, &mut inflater, &text).await;
    assert!(
        repeat * 10 < first,
        "context kept while busy: {repeat} bytes for the repeat against {first}"
    );
    tokio::time::sleep(idle * 3).await;
    let after_idle = echo_size(&mut client, &mut inflater, &text).await;
    assert_eq!(
        after_idle, first,
        "after {idle:?} idle the compressor started again from an empty window"
    );
    let repeat_again = echo_size(&mut client, &mut inflater, &text).await;
    assert!(
        repeat_again * 10 < first,
        "and keeps context again while busy"
    );
}

/// §7.1.2.1: an offer that limits the server's window to 8 bits, which
/// zlib's raw deflate cannot produce, is declined over a real socket: with
/// it alone the session runs without compression (and a compressed frame
/// is a protocol error, 1002); with a second offer after it, the second is
/// taken and the echo comes back compressed.
#[tokio::test]
async fn rfc7692_7_1_2_1_an_offer_of_server_max_window_bits_8_is_declined() {
    let server = mirror(WebSockets::default().extension(Deflate::default()).unwrap()).await;
    let upgrade =
        |offer: &str| upgrade_request("/mirror", &format!("Sec-WebSocket-Extensions: {offer}\r\n"));

    let (response, mut client) = RawClient::request(
        server.addr,
        upgrade("permessage-deflate; server_max_window_bits=8"),
    )
    .await;
    assert_eq!(response.status, 101);
    assert_eq!(response.header("Sec-WebSocket-Extensions"), None);
    let text = vec![b'a'; 4096];
    client.send_final(0x1, &text).await;
    let echo = client.read_frame().await;
    assert_eq!((echo.rsv, echo.payload.len()), (0, text.len()));
    client
        .write(&common::encode_frame(
            true,
            0x40,
            0x2,
            &compressed_zeros(100),
            Some([1, 2, 3, 4]),
        ))
        .await;
    assert_eq!(client.read_close().await.0, 1002);

    let (response, mut client) = RawClient::request(
        server.addr,
        upgrade("permessage-deflate; server_max_window_bits=8, permessage-deflate"),
    )
    .await;
    assert_eq!(response.status, 101);
    assert_eq!(
        response.header("Sec-WebSocket-Extensions"),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    client.send_final(0x1, &text).await;
    let echo = client.read_frame().await;
    assert_eq!(echo.rsv, 0x40, "the echo is compressed");
    assert!(echo.payload.len() < 100, "{} bytes", echo.payload.len());
}
