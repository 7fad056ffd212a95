//! What a hostile or vanished peer can make the server hold, over real
//! sockets at the shipped defaults: memory stays bounded and the
//! connection is dropped within the documented time.
//!
//! Memory is the growth of the peak resident set of this test process over
//! its resident set when the attack starts (nextest runs each test in a
//! process of its own).

mod common;

use std::{net::SocketAddr, time::Duration};

use common::{
    BINARY, MASK, PING, Server, encode_frame, reset_peak_rss, status_kib, upgrade_request,
};
use duplex::{CloseCode, WebSockets};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    time::Instant,
};

/// The shipped write timeout, and how much later than it the drop may be
/// seen. The tests that wait for it run on tokio's paused clock (server
/// and client in one thread; the clock jumps to the next timer when both
/// wait), so 20 s of protocol take no wall time.
const WRITE_TIMEOUT: Duration = Duration::from_secs(20);
const SLACK: Duration = Duration::from_secs(10);

/// Upgrades a connection whose receive window is about 4 KiB, and
/// returns it positioned after the 101.
async fn small_window_upgrade(addr: SocketAddr, path: &str, extra: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stream = socket.connect(addr).await.expect("connect");
    stream
        .write_all(upgrade_request(path, extra).as_bytes())
        .await
        .expect("write the upgrade request");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8];
        let n = common::within("the 101", stream.read(&mut byte))
            .await
            .expect("read the 101");
        assert_eq!(n, 1, "EOF in the response head");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "upgrade refused: {}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Writes `burst` until the server drops the connection; how long that
/// took, or `None` after `limit`.
async fn write_until_dropped(
    stream: &mut TcpStream,
    burst: &[u8],
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    tokio::time::timeout(limit, async {
        while stream.write_all(burst).await.is_ok() {}
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn rfc6455_5_5_2_a_ping_flood_whose_pongs_are_never_read_holds_bounded_memory_and_is_dropped()
{
    common::set_wait(WRITE_TIMEOUT + SLACK);
    let (app, mut endings) = common::observed_mirror_app(WebSockets::default());
    let server = Server::start(app).await;
    let mut stream = small_window_upgrade(server.addr, "/mirror", "").await;
    reset_peak_rss();
    let before = status_kib("VmHWM");
    // 64 KiB of Pings with the largest payload a control frame may have:
    // each one asks for a 127-byte Pong that the peer never reads.
    let burst = encode_frame(true, 0, PING, &[b'p'; 125], Some(MASK)).repeat(500);
    let dropped = write_until_dropped(&mut stream, &burst, WRITE_TIMEOUT + SLACK).await;
    let grown = status_kib("VmHWM").saturating_sub(before);
    eprintln!("memory grew by {grown} KiB; dropped after {dropped:?}");
    assert!(
        grown < 8 * 1024,
        "the server held {grown} KiB for Pongs nobody reads (bound: 1 MiB queue)"
    );
    let dropped = dropped.expect("the connection is still open long after the write timeout");
    assert!(
        dropped >= WRITE_TIMEOUT - Duration::from_secs(1),
        "dropped after {dropped:?}"
    );
    let ending = endings.next().await;
    assert_eq!(ending.reason.code, CloseCode::ABNORMAL, "{ending:?}");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_reads_nothing_is_dropped_with_its_waiting_handler_after_the_write_timeout() {
    common::set_wait(WRITE_TIMEOUT + SLACK);
    let (app, mut endings) = common::observed_mirror_app(WebSockets::default());
    let server = Server::start(app).await;
    let mut stream = small_window_upgrade(server.addr, "/mirror", "").await;
    // Messages the mirror sends back to a peer that never reads them: the
    // outbox fills, the handler waits in `send`, its inbox fills, reading
    // pauses, and only the write timeout ends it.
    let burst = encode_frame(true, 0, BINARY, &[7u8; 16 * 1024], Some(MASK));
    let dropped = write_until_dropped(&mut stream, &burst, WRITE_TIMEOUT + SLACK)
        .await
        .expect("the connection is still open long after the write timeout");
    assert!(
        dropped >= WRITE_TIMEOUT - Duration::from_secs(1),
        "dropped after {dropped:?}"
    );
    let ending = endings.next().await;
    assert_eq!(ending.reason.code, CloseCode::ABNORMAL, "{ending:?}");
}

/// A peer that sends nothing and takes none of what it is sent never got
/// the Ping, which waits behind that output: when the Pong is due (30 s +
/// 15 s, the shipped defaults) it is closed as too slow to read (1008),
/// not as if it had not answered (1011). The write timeout is raised here
/// so that it does not end the connection first.
#[tokio::test(start_paused = true)]
async fn a_peer_that_takes_no_output_is_closed_as_too_slow_not_as_a_ping_timeout() {
    use duplex::{App, CloseReason, Session};
    common::set_wait(Duration::from_secs(120));
    let (tx, mut endings) = common::reports::<CloseReason>();
    let app = App::new()
        .install(WebSockets::default().write_timeout(Duration::from_secs(120)))
        .web_socket("/push", move |session: Session| {
            let tx = tx.clone();
            async move {
                // Pushes until the session ends (a feed to a client that
                // stopped reading).
                while session.send(vec![7u8; 64 * 1024]).await.is_ok() {}
                let _ = tx.send(session.close_reason().await);
            }
        });
    let server = Server::start(app).await;
    let _stream = small_window_upgrade(server.addr, "/push", "").await;
    assert_eq!(
        endings.next().await,
        CloseReason::new(CloseCode::POLICY_VIOLATION, "Peer too slow to read")
    );
}

/// `outgoing_buffer` (1 MiB by default) bounds what is queued, not only
/// when more may be queued: a message that does not fit in what is left
/// waits (`send`) or is refused (`try_send` is `Full`), and one larger than
/// the whole buffer is queued alone, once nothing else is. Everything sent
/// arrives whole and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_queued_only_where_it_fits_in_the_outgoing_buffer_and_a_larger_one_alone() {
    use duplex::{App, Session, TrySendError};
    const KIB: usize = 1024;
    let (tx, mut results) = common::reports::<Vec<Result<(), TrySendError>>>();
    let app = App::new().web_socket("/out", move |session: Session| {
        let tx = tx.clone();
        async move {
            // Within one poll of the connection task, nothing is written
            // between these.
            let results = vec![
                session.try_send(vec![1u8; 700 * KIB]),
                session.try_send(vec![2u8; 700 * KIB]),
                session.try_send(vec![3u8; 100 * KIB]),
            ];
            let _ = tx.send(results);
            // Larger than the whole buffer: sent once the rest is written.
            let _ = session.send(vec![4u8; 3 * 1024 * KIB]).await;
            let _ = session.send(vec![5u8; 700 * KIB]).await;
        }
    });
    let server = Server::start(app).await;
    let (response, mut client) =
        common::RawClient::request(server.addr, upgrade_request("/out", "")).await;
    assert_eq!(response.status, 101);
    let results = results.next().await;
    assert!(
        matches!(results[..], [Ok(()), Err(TrySendError::Full), Ok(())]),
        "700 KiB, 700 KiB (over the 1 MiB left: Full), 100 KiB: {results:?}"
    );
    for (fill, len) in [
        (1u8, 700 * KIB),
        (3, 100 * KIB),
        (4, 3 * 1024 * KIB),
        (5, 700 * KIB),
    ] {
        let frame = client.read_frame().await;
        assert_eq!(frame.payload.len(), len);
        assert!(frame.payload.iter().all(|&b| b == fill), "message {fill}");
    }
}

/// permessage-deflate: inflated bytes count against the inbox bound.
#[cfg(feature = "deflate")]
mod rfc7692 {
    use super::*;
    use common::reports;
    use duplex::{App, Deflate, Session};
    use flate2::{Compress, Compression, FlushCompress};

    /// `zeros` zero bytes as one permessage-deflate payload (tail removed),
    /// from a compressor of its own.
    fn compressed_zeros(zeros: usize) -> Vec<u8> {
        let mut compressor = Compress::new_with_window_bits(Compression::best(), false, 15);
        let mut out = Vec::with_capacity(zeros / 500 + 64);
        compressor
            .compress_vec(&vec![0u8; zeros], &mut out, FlushCompress::Sync)
            .expect("compress");
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]), "sync flush tail");
        out.truncate(out.len() - 4);
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rfc7692_small_compressed_messages_in_one_read_inflate_no_further_than_the_inbox_bound()
    {
        const WARM_UP: usize = 64;
        const MESSAGES: usize = 800;
        const INFLATED: usize = 64 * 1024;
        let (tx, mut received) = reports::<usize>();
        let websockets = WebSockets::default().extension(Deflate::default()).unwrap();
        let app =
            App::new()
                .install(websockets)
                .web_socket("/slow", move |mut session: Session| {
                    let tx = tx.clone();
                    async move {
                        // Plain 16 KiB messages first, taken at once: reads grow to
                        // their largest size (64 KiB).
                        for _ in 0..WARM_UP {
                            let _ = session.recv().await;
                        }
                        let _ = session.send_text("ready").await;
                        // Then busy elsewhere: what the peer sends meanwhile waits
                        // in the inbox, or in the socket.
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        let mut count = 0;
                        while let Ok(Some(message)) = session.recv().await {
                            assert_eq!(message.len(), INFLATED);
                            count += 1;
                            if count == MESSAGES {
                                break;
                            }
                        }
                        let _ = tx.send(count);
                    }
                });
        let server = Server::start(app).await;
        let mut stream = small_window_upgrade(
            server.addr,
            "/slow",
            "Sec-WebSocket-Extensions: permessage-deflate\r\n",
        )
        .await;
        let warm_up = encode_frame(true, 0, BINARY, &[1u8; 16 * 1024], Some(MASK)).repeat(WARM_UP);
        stream.write_all(&warm_up).await.expect("write the warm-up");
        let mut ready = [0u8; 7];
        common::within("ready", stream.read_exact(&mut ready))
            .await
            .expect("read ready");
        assert_eq!(&ready[2..], b"ready");
        let one = encode_frame(true, 0x40, BINARY, &compressed_zeros(INFLATED), Some(MASK));
        let burst = one.repeat(MESSAGES);
        assert!(
            burst.len() < 96 * 1024,
            "{MESSAGES} messages of {INFLATED} bytes fit in {} bytes on the wire",
            burst.len()
        );
        reset_peak_rss();
        let before = status_kib("VmHWM");
        stream.write_all(&burst).await.expect("write the messages");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let grown = status_kib("VmHWM").saturating_sub(before);
        eprintln!("memory grew by {grown} KiB");
        // The inbox bound (1 MiB) plus the message that crossed it, and
        // allocator slack; without the bound, one 64 KiB read inflates to
        // about 50 MiB.
        assert!(
            grown < 6 * 1024,
            "{grown} KiB inflated ahead of a handler that took nothing"
        );
        // Nothing accepted was lost: the handler gets every message.
        assert_eq!(received.next().await, MESSAGES);
    }
}
