//! What one address can make `duplex-chat` hold through its echo routes,
//! measured on the binary at its shipped defaults, in a process of its own
//! so that its resident memory is the server's alone (issue 19).
//!
//! The attack: 40 connections to `/mirror` offer permessage-deflate, each
//! sends three frames of about 61 KB that inflate to 60 MiB each, and reads
//! nothing. Offered with `server_max_window_bits=8` (a window zlib's raw
//! deflate cannot compress with), the server used to accept it, echo every
//! message uncompressed and hold each one whole in its write queue: 7.3 MB
//! sent took it from 8 MB to 4.5 GB until the write timeout. Now that offer
//! is declined (RFC 7692 §7.1.2.1), so compressed frames are a protocol
//! error, and the echo routes read at most 64 KiB a message, so a message
//! that inflates past it is refused with 1009 while it is inflated.
//!
//! The memory budget: sessions of one address, then of 16, flood `/mirror`
//! with messages it accepts and read nothing; without a budget each holds
//! about 2 MiB (a full input and a full output queue). With one, the
//! server holds about the budget, an address about its sixteenth, and new
//! sessions get 503 until the attackers are gone.
//!
//! All traffic goes to 127.0.0.0/8; every wait is bounded, and the server is
//! stopped as soon as it grows past the bound.

use std::{
    net::{IpAddr, Ipv4Addr},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use flate2::{Compress, Compression, FlushCompress};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

const CONNECTIONS: usize = 40;
const MESSAGES: usize = 3;
const INFLATED: usize = 60 << 20;
const BOUND_KIB: u64 = 256 << 10;
const WAIT: Duration = Duration::from_secs(30);
/// How long the server is watched after the last frame is sent.
const WATCH: Duration = Duration::from_secs(5);

struct ChatProcess(Child);

impl Drop for ChatProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("the field in status")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `zeros` zero bytes as one permessage-deflate payload (tail removed),
/// compressed a chunk at a time.
fn compressed_zeros(zeros: usize) -> Vec<u8> {
    let chunk = vec![0u8; 1 << 20];
    let mut compressor = Compress::new(Compression::best(), false);
    let mut out = Vec::with_capacity(zeros / 500);
    let mut left = zeros;
    while left > 0 {
        let take = left.min(chunk.len());
        let before = compressor.total_in();
        out.reserve(64 << 10);
        compressor
            .compress_vec(&chunk[..take], &mut out, FlushCompress::None)
            .expect("compress");
        left -= (compressor.total_in() - before) as usize;
    }
    loop {
        out.reserve(64 << 10);
        compressor
            .compress_vec(&[], &mut out, FlushCompress::Sync)
            .expect("compress");
        if out.ends_with(&[0, 0, 0xff, 0xff]) {
            break;
        }
    }
    out.truncate(out.len() - 4);
    out
}

/// A masked binary frame with RSV1 (compressed), FIN set.
fn compressed_binary_frame(compressed: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0xC2];
    let len = compressed.len();
    if len < 126 {
        frame.push(0x80 | len as u8);
    } else if len <= 0xffff {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(compressed.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Sends an upgrade request for `/mirror` from `source`, offering `offer`
/// when there is one; returns the stream and the answer's head.
async fn request_upgrade(port: u16, source: IpAddr, offer: Option<&str>) -> (TcpStream, String) {
    let socket = TcpSocket::new_v4().expect("a socket");
    socket
        .bind((source, 0).into())
        .expect("bind the source address");
    let mut stream = socket
        .connect(([127, 0, 0, 1], port).into())
        .await
        .expect("connect");
    let offer = offer
        .map(|offer| format!("Sec-WebSocket-Extensions: {offer}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET /mirror HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n{offer}\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("read the head");
        head.push(byte[0]);
    }
    (stream, String::from_utf8(head).expect("an ASCII head"))
}

/// Upgrades to `/mirror` offering `offer`; returns the stream and the
/// answer's `Sec-WebSocket-Extensions`, if any.
async fn upgrade(port: u16, from: IpAddr, offer: &str) -> (TcpStream, Option<String>) {
    let (stream, head) = request_upgrade(port, from, Some(offer)).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let extensions = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-extensions")
            .then(|| value.trim().to_owned())
    });
    (stream, extensions)
}

/// Reads frames until a Close and returns its code (`None` if the
/// connection ends without one). Data frames are skipped.
async fn close_code(stream: &mut TcpStream) -> Option<u16> {
    loop {
        let mut header = [0u8; 2];
        stream.read_exact(&mut header).await.ok()?;
        let len = match header[1] & 0x7f {
            126 => {
                let mut ext = [0u8; 2];
                stream.read_exact(&mut ext).await.ok()?;
                u64::from(u16::from_be_bytes(ext))
            }
            127 => {
                let mut ext = [0u8; 8];
                stream.read_exact(&mut ext).await.ok()?;
                u64::from_be_bytes(ext)
            }
            n => u64::from(n),
        };
        let mut payload = vec![0u8; usize::try_from(len.min(1 << 20)).ok()?];
        if header[0] & 0x0f == 0x8 {
            stream.read_exact(&mut payload).await.ok()?;
            return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
        }
        let mut left = len;
        while left > 0 {
            let take = left.min(payload.len() as u64) as usize;
            stream.read_exact(&mut payload[..take]).await.ok()?;
            left -= take as u64;
        }
    }
}

/// Starts the binary at its shipped defaults but for `args`, and waits
/// until it listens.
async fn start_chat(port: u16, args: &[&str]) -> ChatProcess {
    let child = Command::new(env!("CARGO_BIN_EXE_duplex-chat"))
        .args(["--addr", &format!("127.0.0.1:{port}")])
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start duplex-chat");
    let chat = ChatProcess(child);
    let ready = async {
        while TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(WAIT, ready)
        .await
        .expect("duplex-chat listens");
    chat
}

/// Runs the attack with `offer` and returns, per connection, the close
/// code it got; fails as soon as the server's resident set grows past the
/// bound.
async fn attack(
    offer: &str,
    expect_extensions: Option<&str>,
    sources: &[IpAddr],
) -> Vec<Option<u16>> {
    let port = free_port();
    let chat = start_chat(port, &[]).await;
    let pid = chat.0.id();
    let frame = compressed_binary_frame(&compressed_zeros(INFLATED));
    assert!(
        (55_000..65_536).contains(&frame.len()),
        "a frame of about 61 KB: {}",
        frame.len()
    );
    let baseline = status_kib(pid, "VmRSS");
    let connections = CONNECTIONS * sources.len();
    let mut streams = Vec::with_capacity(connections);
    let mut answers = Vec::with_capacity(connections);
    for &from in sources {
        for _ in 0..CONNECTIONS {
            let (stream, extensions) = upgrade(port, from, offer).await;
            answers.push(extensions);
            streams.push(stream);
        }
    }
    let sent = connections * MESSAGES * frame.len();
    let sent_at = std::cell::Cell::new(None::<Instant>);
    let send = async {
        for stream in &mut streams {
            for _ in 0..MESSAGES {
                // A server that closed already may refuse the rest.
                if stream.write_all(&frame).await.is_err() {
                    break;
                }
            }
        }
        sent_at.set(Some(Instant::now()));
        // While the server still holds whatever the attack left it.
        served(port).await;
    };
    // Watched while sending too: the growth is what the sends cause.
    let watch = async {
        let grown = |pid| status_kib(pid, "VmHWM").saturating_sub(baseline);
        loop {
            let growth = grown(pid);
            assert!(
                growth < BOUND_KIB,
                "duplex-chat grew by {} MiB (from {} MiB) for {sent} bytes sent; the bound is {} MiB",
                growth >> 10,
                baseline >> 10,
                BOUND_KIB >> 10
            );
            if sent_at.get().is_some_and(|at| at.elapsed() >= WATCH) {
                return growth;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (growth, ()) = tokio::time::timeout(WAIT, async { tokio::join!(watch, send) })
        .await
        .expect("the attack ran within its time");
    eprintln!(
        "offer {offer:?}: {sent} bytes sent on {connections} connections; duplex-chat peak RSS \
         {growth} KiB over a baseline of {baseline} KiB"
    );
    // Checked after the memory, which is what the attack is about.
    for answer in &answers {
        assert_eq!(answer.as_deref(), expect_extensions, "{offer}");
    }
    let mut codes = Vec::with_capacity(connections);
    for stream in &mut streams {
        codes.push(
            tokio::time::timeout(WAIT, close_code(stream))
                .await
                .expect("each connection ends in time"),
        );
    }
    codes
}

/// The attack as reported: the 8-bit window offer is declined, so
/// the session has no compression, a compressed frame is a protocol error
/// (1002), and nothing is inflated or echoed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_mirror_connections_offering_an_8_bit_window_and_reading_nothing_hold_under_256_mib()
{
    let codes = attack(
        "permessage-deflate; server_max_window_bits=8",
        None,
        &[LOCALHOST],
    )
    .await;
    assert!(codes.iter().all(|c| *c == Some(1002)), "{codes:?}");
}

/// The same from 16 addresses, 40 connections each: the server grows by
/// far less than 30% of the machine's memory (the bound is 256 MiB), and a
/// client of another address is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_addresses_of_forty_connections_offering_an_8_bit_window_hold_under_256_mib() {
    let sources: Vec<_> = (2..18).map(source).collect();
    let codes = attack(
        "permessage-deflate; server_max_window_bits=8",
        None,
        &sources,
    )
    .await;
    assert!(codes.iter().all(|c| *c == Some(1002)), "{codes:?}");
}

/// A client of an address the attack does not use opens a session on
/// `/mirror` and gets its message back.
async fn served(port: u16) {
    let (mut stream, head) = request_upgrade(port, source(200), None).await;
    assert!(head.starts_with("HTTP/1.1 101"), "another address: {head}");
    let mut frame = vec![0x81, 0x80 | 10, 0, 0, 0, 0];
    frame.extend_from_slice(b"still here");
    stream.write_all(&frame).await.expect("write");
    let mut echo = [0u8; 12];
    stream.read_exact(&mut echo).await.expect("the echo");
    assert_eq!(&echo[2..], b"still here", "another address's echo");
}

/// The same attack with an offer the server accepts: the echo routes read
/// at most 64 KiB a message, so each message is refused with 1009 while it
/// is inflated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_mirror_connections_sending_messages_that_inflate_to_60_mib_get_1009_and_hold_under_256_mib()
 {
    let codes = attack(
        "permessage-deflate",
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
        &[LOCALHOST],
    )
    .await;
    assert!(codes.iter().all(|c| *c == Some(1009)), "{codes:?}");
}

/// The memory budget of the attacks below: small enough that what the
/// attackers could hold without it (about 2 MiB a connection: a full
/// input queue and a full output queue) is far past it.
const BUDGET: usize = 32 << 20;
/// How long the attackers send.
const FLOOD: Duration = Duration::from_secs(4);

/// A masked binary frame of `len` bytes, FIN set.
fn binary_frame(len: usize) -> Vec<u8> {
    let mut frame = vec![0x82, 0x80 | 126];
    frame.extend_from_slice(&u16::try_from(len).expect("under 64 KiB").to_be_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.resize(frame.len() + len, b'x');
    frame
}

fn source(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Opens `per_address` sessions on `/mirror` from each of `sources`; each
/// sends 60 KB messages for [`FLOOD`] and reads nothing. Returns the
/// streams, still open.
async fn flood(port: u16, sources: &[IpAddr], per_address: usize) -> Vec<TcpStream> {
    let mut streams = Vec::new();
    for &from in sources {
        for _ in 0..per_address {
            let (stream, head) = request_upgrade(port, from, None).await;
            assert!(head.starts_with("HTTP/1.1 101"), "{from}: {head}");
            streams.push(stream);
        }
    }
    let until = tokio::time::Instant::now() + FLOOD;
    let frame = std::sync::Arc::new(binary_frame(60_000));
    let senders: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            let frame = std::sync::Arc::clone(&frame);
            tokio::spawn(async move {
                // Blocked writes are what a server that stopped reading
                // looks like: the deadline ends them.
                while let Ok(Ok(())) =
                    tokio::time::timeout_at(until, stream.write_all(&frame)).await
                {}
                stream
            })
        })
        .collect();
    let mut streams = Vec::with_capacity(senders.len());
    for sender in senders {
        streams.push(sender.await.expect("a sender"));
    }
    streams
}

/// The status code of an upgrade from `from`.
async fn upgrade_status(port: u16, from: IpAddr) -> String {
    let (_stream, head) = request_upgrade(port, from, None).await;
    head.split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

/// Waits until an upgrade from `from` is accepted again.
async fn accepted_again(port: u16, from: IpAddr) {
    let again = async {
        while upgrade_status(port, from).await != "101" {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    // Well before the first Ping (30 s), which would find them gone too.
    tokio::time::timeout(Duration::from_secs(10), again)
        .await
        .expect("sessions are accepted again within 10 s of the attackers leaving");
}

fn growth_kib(pid: u32, baseline: u64) -> u64 {
    status_kib(pid, "VmHWM").saturating_sub(baseline)
}

/// One address's 160 sessions flood `/mirror` and read nothing: they hold
/// at most about its sixteenth of the memory budget, the address's next
/// session gets 503, and another address is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_a_sixteenth_of_the_memory_budget() {
    let port = free_port();
    let chat = start_chat(port, &["--memory-budget", &BUDGET.to_string()]).await;
    let pid = chat.0.id();
    let baseline = status_kib(pid, "VmRSS");
    let streams = flood(port, &[source(2)], 160).await;
    let growth = growth_kib(pid, baseline);
    eprintln!("one address, 160 sessions: peak RSS +{growth} KiB over {baseline} KiB");
    assert!(
        growth < (BUDGET / 2 / 1024) as u64,
        "duplex-chat grew by {growth} KiB for one address; its share is {} KiB",
        BUDGET / 16 / 1024
    );
    assert_eq!(
        upgrade_status(port, source(2)).await,
        "503",
        "the address's next session"
    );
    assert_eq!(
        upgrade_status(port, source(3)).await,
        "101",
        "another address"
    );
    drop(streams);
    accepted_again(port, source(2)).await;
}

/// 16 addresses with 40 sessions each flood `/mirror` and read nothing:
/// the server holds about its budget (without it, about 1.3 GB; the
/// budget does not count the message each echo handler holds while it
/// waits to send it, hence the bound of twice the budget), every new
/// session gets 503 while it does, and sessions are accepted again once
/// the attackers are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_addresses_hold_at_most_about_the_memory_budget_and_new_sessions_get_503() {
    let port = free_port();
    let chat = start_chat(port, &["--memory-budget", &BUDGET.to_string()]).await;
    let pid = chat.0.id();
    let baseline = status_kib(pid, "VmRSS");
    let sources: Vec<_> = (2..18).map(source).collect();
    let streams = flood(port, &sources, 40).await;
    let growth = growth_kib(pid, baseline);
    eprintln!("16 addresses, 640 sessions: peak RSS +{growth} KiB over {baseline} KiB");
    assert!(
        growth < (BUDGET * 2 / 1024) as u64,
        "duplex-chat grew by {growth} KiB; the budget is {} KiB",
        BUDGET / 1024
    );
    assert_eq!(
        upgrade_status(port, source(100)).await,
        "503",
        "a new address"
    );
    // The server lets go of peers that leave even while it reads none of
    // them (without looking, only at the next Ping, 30 s on).
    drop(streams);
    accepted_again(port, source(100)).await;
}

/// A masked binary frame of `len` bytes that does not end its message.
fn first_fragment(len: usize) -> Vec<u8> {
    let mut frame = binary_frame(len);
    frame[0] = 0x02;
    frame
}

/// Messages left unfinished hold memory too: 20 addresses open up to 25
/// sessions each, and each sends 30 KB of a message, then 30 KB more, and
/// never its end (30 MB in all, past the 8 MiB budget and each address's
/// 512 KiB share). New sessions get 503 once the budget or an address's
/// share is held, and every session stops being read past its hard mark. A session of another address that answers
/// every Ping is not timed out while the budget keeps it from reading
/// (Pings every second here), the paused sessions holding unfinished
/// messages are closed with 1013 after 15 s of pause (those still read
/// time out on the Pings they do not answer), and then the other session
/// is read again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unfinished_messages_count_and_the_paused_holders_are_closed_with_1013() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    const BUDGET: usize = 8 << 20;
    let port = free_port();
    let chat = start_chat(
        port,
        &[
            "--memory-budget",
            &BUDGET.to_string(),
            "--ping-period",
            "1",
            "--timeout",
            "1",
        ],
    )
    .await;
    let pid = chat.0.id();
    let (mut victim, _) =
        tokio_tungstenite::client_async(format!("ws://127.0.0.1:{port}/mirror"), {
            let socket = TcpSocket::new_v4().expect("a socket");
            socket.bind((source(200), 0).into()).expect("bind");
            socket
                .connect(([127, 0, 0, 1], port).into())
                .await
                .expect("connect")
        })
        .await
        .expect("the other address's session");
    let baseline = status_kib(pid, "VmRSS");
    let fragment = first_fragment(30_000);
    let mut holders = Vec::new();
    let mut refused = 0;
    for from in (5..25).map(source) {
        for _ in 0..25 {
            let (mut stream, head) = request_upgrade(port, from, None).await;
            if head.starts_with("HTTP/1.1 503") {
                refused += 1;
                continue;
            }
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            stream.write_all(&fragment).await.expect("a fragment");
            holders.push(stream);
        }
    }
    // New sessions stop at the budget; those open push the use past its
    // hard mark with a second piece each, and every session stops being
    // read.
    let mut continuation = binary_frame(30_000);
    continuation[0] = 0x00;
    for stream in &mut holders {
        stream
            .write_all(&continuation)
            .await
            .expect("a second piece");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let growth = growth_kib(pid, baseline);
    eprintln!(
        "{} sessions hold unfinished messages, {refused} refused: peak RSS +{growth} KiB",
        holders.len()
    );
    assert!(refused > 0, "the address's share was never used up");
    assert!(
        growth < (BUDGET * 2 / 1024) as u64,
        "grew by {growth} KiB for unfinished messages; the budget is {} KiB",
        BUDGET / 1024
    );
    // Five Pings' worth: the other session, which answers them (the
    // client answers as it reads), is still open.
    let watch = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match victim.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                ended => return ended,
            }
        }
    })
    .await;
    assert!(watch.is_err(), "the other session ended: {watch:?}");
    // The holders are closed with 1013 once paused for 15 s.
    let mut codes = Vec::new();
    for stream in &mut holders {
        codes.push(
            tokio::time::timeout(Duration::from_secs(20), close_code(stream))
                .await
                .expect("each holder is closed in time"),
        );
    }
    // Those still read answered no Ping (these raw clients read nothing):
    // 1011; those the budget paused were waited for, then shed: 1013.
    assert!(
        codes.iter().all(|code| matches!(code, Some(1011 | 1013))),
        "{codes:?}"
    );
    assert!(codes.contains(&Some(1013)), "none was shed: {codes:?}");
    victim
        .send(Message::text("still here"))
        .await
        .expect("send");
    let echo = tokio::time::timeout(WAIT, async {
        loop {
            match victim.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => return other,
            }
        }
    })
    .await
    .expect("the echo in time");
    assert!(
        matches!(echo, Some(Ok(Message::Text(ref text))) if text.as_str() == "still here"),
        "{echo:?}"
    );
}
