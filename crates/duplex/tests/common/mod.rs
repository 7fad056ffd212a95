//! Shared helpers for duplex's integration tests: a server on a free
//! loopback port, a raw TCP client that writes the opening handshake and
//! masked frames by hand and parses the server's frames by hand, a
//! tokio-tungstenite client as an independent implementation, and a channel
//! through which handlers report what they saw.
//!
//! Every wait is bounded by [`WAIT`]; all traffic goes to 127.0.0.1.
#![allow(dead_code)]

use std::{future::Future, io, net::SocketAddr, time::Duration};

use duplex::{App, CloseReason, Error, Handler, Session};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    task::JoinHandle,
};
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{self, client::IntoClientRequest, protocol::WebSocketConfig},
};

/// The longest any single wait in these tests may take.
pub(crate) const WAIT: Duration = Duration::from_secs(3);

thread_local! {
    /// [`WAIT`], or what [`set_wait`] set on this thread.
    static THIS_WAIT: std::cell::Cell<Duration> = const { std::cell::Cell::new(WAIT) };
}

/// Sets [`within`]'s bound for the waits of this thread (the test's own
/// future: tasks it spawns on other workers keep [`WAIT`]). For a test on
/// tokio's paused clock, which jumps to the next timer whenever every task
/// waits, the bound must be later than any deadline the test waits for, or
/// it would fire first (at no cost in wall time); a test that moves tens
/// of MiB in a debug build needs more than [`WAIT`] too.
pub(crate) fn set_wait(wait: Duration) {
    THIS_WAIT.with(|this| this.set(wait));
}

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub(crate) async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    let wait = THIS_WAIT.with(std::cell::Cell::get);
    match tokio::time::timeout(wait, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {wait:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------- server

/// An [`App`] served on 127.0.0.1 on a free port, until
/// [`shutdown`](Self::shutdown) or drop.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<io::Result<()>>>,
}

impl Server {
    pub(crate) async fn start(app: App) -> Server {
        Self::start_on(app, "127.0.0.1:0").await
    }

    /// [`start`](Self::start) on another loopback address, such as
    /// `[::1]:0`.
    pub(crate) async fn start_on(app: App, bind: &str) -> Server {
        let listener = TcpListener::bind(bind)
            .await
            .unwrap_or_else(|err| panic!("bind {bind}: {err}"));
        let addr = listener.local_addr().expect("local_addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = tokio::spawn(app.serve_with_shutdown(listener, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            stop: Some(stop),
            serve: Some(serve),
        }
    }

    /// Fires the shutdown signal and waits for `serve` to return.
    pub(crate) async fn shutdown(self) -> io::Result<()> {
        self.shutdown_within(WAIT).await
    }

    /// [`shutdown`](Self::shutdown), waiting up to `wait` for `serve`.
    pub(crate) async fn shutdown_within(mut self, wait: Duration) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let serve = self.serve.take().expect("serve handle");
        tokio::time::timeout(wait, serve)
            .await
            .expect("serve_with_shutdown to return in time")
            .expect("the serve task panicked")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(serve) = self.serve.take() {
            serve.abort();
        }
    }
}

// ---------------------------------------------------------------- reports

/// What handlers send to the test.
pub(crate) struct Reports<T> {
    rx: mpsc::UnboundedReceiver<T>,
}

pub(crate) fn reports<T>() -> (mpsc::UnboundedSender<T>, Reports<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (tx, Reports { rx })
}

impl<T> Reports<T> {
    pub(crate) async fn next(&mut self) -> T {
        within("a report from the handler", self.rx.recv())
            .await
            .expect("every handler ended without reporting")
    }
}

/// How a session ended, as its handler saw it.
#[derive(Debug)]
pub(crate) struct Ending {
    /// What the receive that ended the loop returned: `Ok(())` for
    /// `Ok(None)`, the error otherwise.
    pub(crate) recv: Result<(), Error>,
    /// `close_reason().await` after that.
    pub(crate) reason: CloseReason,
}

/// A mirror handler that reports how its session ended.
pub(crate) fn observed_mirror(tx: mpsc::UnboundedSender<Ending>) -> impl Handler<Session> {
    move |mut session: Session| {
        let tx = tx.clone();
        async move {
            let recv = loop {
                match session.recv().await {
                    // A failed send means the session is closing: keep
                    // receiving until the end is known.
                    Ok(Some(message)) => drop(session.send(message).await),
                    Ok(None) => break Ok(()),
                    Err(err) => break Err(err),
                }
            };
            let reason = session.close_reason().await;
            let _ = tx.send(Ending { recv, reason });
        }
    }
}

/// An app whose `/mirror` reports how each session ended.
pub(crate) fn observed_mirror_app(websockets: duplex::WebSockets) -> (App, Reports<Ending>) {
    let (tx, rx) = reports();
    let app = App::new()
        .install(websockets)
        .web_socket("/mirror", observed_mirror(tx));
    (app, rx)
}

// ---------------------------------------------------------------- raw HTTP

/// The key of RFC 6455 §1.3 and the accept value the RFC gives for it.
pub(crate) const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub(crate) const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A valid upgrade request for `path`, with `extra` header lines (each
/// ending in CRLF) added.
pub(crate) fn upgrade_request(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\n\
         Host: 127.0.0.1\r\n\
         Upgrade: websocket\r\n\
         Connection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\n\
         Sec-WebSocket-Version: 13\r\n\
         {extra}\r\n"
    )
}

/// A parsed HTTP response head.
#[derive(Debug)]
pub(crate) struct HttpResponse {
    pub(crate) status: u16,
    pub(crate) headers: Vec<(String, String)>,
}

impl HttpResponse {
    /// The first value of a header, by case-insensitive name.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

// ---------------------------------------------------------------- raw frames

pub(crate) const CONTINUATION: u8 = 0x0;
pub(crate) const TEXT: u8 = 0x1;
pub(crate) const BINARY: u8 = 0x2;
pub(crate) const CLOSE: u8 = 0x8;
pub(crate) const PING: u8 = 0x9;
pub(crate) const PONG: u8 = 0xA;

pub(crate) const RSV1: u8 = 0x40;
pub(crate) const RSV2: u8 = 0x20;
pub(crate) const RSV3: u8 = 0x10;

/// The mask key of the frames we write.
pub(crate) const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Encodes one frame (RFC 6455 §5.2) by hand. `rsv` holds the RSV bits in
/// their header positions (0x40, 0x20, 0x10).
pub(crate) fn encode_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    payload: &[u8],
    mask: Option<[u8; 4]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(if fin { 0x80 } else { 0 } | (rsv & 0x70) | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A Close payload: the code, big-endian, then the reason.
pub(crate) fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut payload = code.to_be_bytes().to_vec();
    payload.extend_from_slice(reason.as_bytes());
    payload
}

/// A frame as the server wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RawFrame {
    pub(crate) fin: bool,
    pub(crate) rsv: u8,
    pub(crate) opcode: u8,
    pub(crate) masked: bool,
    /// Unmasked.
    pub(crate) payload: Vec<u8>,
}

impl RawFrame {
    /// The code and reason of a Close frame.
    pub(crate) fn close_code_and_reason(&self) -> (u16, String) {
        assert_eq!(self.opcode, CLOSE, "expected a Close frame, got {self:?}");
        assert!(
            self.payload.len() >= 2,
            "Close frame without a status code: {self:?}"
        );
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        let reason = String::from_utf8(self.payload[2..].to_vec()).expect("close reason is UTF-8");
        (code, reason)
    }
}

/// Parses one whole frame from the start of `buf`, if it is all there.
fn parse_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    let [b0, b1, ..] = *buf else {
        return None;
    };
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7f {
        126 => {
            let bytes = buf.get(2..4)?;
            (u64::from(u16::from_be_bytes([bytes[0], bytes[1]])), 4)
        }
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    let key = if masked {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    let len = usize::try_from(len).expect("frame length fits usize");
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(key) = key {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    let frame = RawFrame {
        fin: b0 & 0x80 != 0,
        rsv: b0 & 0x70,
        opcode: b0 & 0x0f,
        masked,
        payload,
    };
    Some((frame, at + len))
}

// ---------------------------------------------------------------- raw client

/// A WebSocket client over a bare TCP stream: every byte it writes is
/// written by hand, every byte it reads is parsed by hand.
pub(crate) struct RawClient {
    pub(crate) stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects and writes `request` as given; returns the response head and
    /// the client, positioned after the head.
    pub(crate) async fn request(
        addr: SocketAddr,
        request: impl AsRef<[u8]>,
    ) -> (HttpResponse, RawClient) {
        let stream = within("TCP connect", TcpStream::connect(addr))
            .await
            .expect("connect to the test server");
        stream.set_nodelay(true).expect("set_nodelay");
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
        };
        let response = client.send_request(request).await;
        (response, client)
    }

    /// Writes another request on this connection and reads the response
    /// head.
    pub(crate) async fn send_request(&mut self, request: impl AsRef<[u8]>) -> HttpResponse {
        self.write(request.as_ref()).await;
        self.read_response_head().await
    }

    /// Reads and drops `len` bytes (a response body).
    pub(crate) async fn skip(&mut self, len: usize) {
        while self.buf.len() < len {
            let n = within("a response body", self.stream.read_buf(&mut self.buf))
                .await
                .expect("read the response body");
            assert!(n > 0, "EOF inside a response body");
        }
        self.buf.drain(..len);
    }

    /// Connects to `path` with a valid upgrade request and checks the 101.
    pub(crate) async fn connect(addr: SocketAddr, path: &str) -> RawClient {
        let (response, client) = Self::request(addr, &upgrade_request(path, "")).await;
        assert_eq!(
            response.status, 101,
            "upgrade to {path} refused: {response:?}"
        );
        assert_eq!(
            response.header("Sec-WebSocket-Accept"),
            Some(ACCEPT),
            "wrong accept key: {response:?}"
        );
        client
    }

    async fn read_response_head(&mut self) -> HttpResponse {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let n = within("the HTTP response", self.stream.read_buf(&mut self.buf))
                .await
                .expect("read the HTTP response");
            assert!(
                n > 0,
                "EOF before the end of the response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let head = String::from_utf8(self.buf[..end].to_vec()).expect("response head is UTF-8");
        self.buf.drain(..end);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        HttpResponse { status, headers }
    }

    /// Writes bytes as they are.
    pub(crate) async fn write(&mut self, bytes: &[u8]) {
        within("a write", self.stream.write_all(bytes))
            .await
            .expect("write to the server");
    }

    /// Writes one masked frame.
    pub(crate) async fn send(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        self.write(&encode_frame(fin, 0, opcode, payload, Some(MASK)))
            .await;
    }

    /// Writes one masked, final frame.
    pub(crate) async fn send_final(&mut self, opcode: u8, payload: &[u8]) {
        self.send(true, opcode, payload).await;
    }

    /// Writes a masked Close with `code` and `reason`.
    pub(crate) async fn send_close(&mut self, code: u16, reason: &str) {
        self.send_final(CLOSE, &close_payload(code, reason)).await;
    }

    /// Reads the next frame the server sends.
    pub(crate) async fn read_frame(&mut self) -> RawFrame {
        loop {
            if let Some((frame, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return frame;
            }
            let n = within(
                "a frame from the server",
                self.stream.read_buf(&mut self.buf),
            )
            .await
            .expect("read from the server");
            assert!(
                n > 0,
                "EOF before a whole frame ({} bytes buffered)",
                self.buf.len()
            );
        }
    }

    /// Reads the next frame and checks that it is a Close; returns its code
    /// and reason.
    pub(crate) async fn read_close(&mut self) -> (u16, String) {
        let frame = self.read_frame().await;
        assert!(!frame.masked, "server frames must not be masked: {frame:?}");
        frame.close_code_and_reason()
    }

    /// Checks that the server closes the TCP connection: nothing more than
    /// EOF arrives.
    pub(crate) async fn expect_eof(&mut self) {
        assert!(
            self.buf.is_empty(),
            "unread bytes before EOF: {:?}",
            self.buf
        );
        let n = within(
            "the server to close the TCP connection",
            self.stream.read_buf(&mut self.buf),
        )
        .await
        .expect("the server reset the connection instead of closing it");
        assert_eq!(n, 0, "expected EOF, got {:?}", self.buf);
    }

    /// Expects a Close with `code` and then EOF; returns the reason.
    pub(crate) async fn expect_close_then_eof(&mut self, code: u16) -> String {
        let (got, reason) = self.read_close().await;
        assert_eq!(got, code, "close code (reason {reason:?})");
        self.expect_eof().await;
        reason
    }
}

// ---------------------------------------------------------------- tungstenite

pub(crate) type Ws = WebSocketStream<TcpStream>;
pub(crate) use tungstenite::Message as WsMessage;

/// A tungstenite configuration that accepts messages of up to 64 MiB.
pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

/// Connects a tokio-tungstenite client with `request` (built from
/// `ws://addr/path` and changed as the test likes).
pub(crate) async fn ws_connect_request(
    addr: SocketAddr,
    request: tungstenite::handshake::client::Request,
) -> (Ws, tungstenite::handshake::client::Response) {
    let tcp = within("TCP connect", TcpStream::connect(addr))
        .await
        .expect("connect to the test server");
    within(
        "the WebSocket handshake",
        tokio_tungstenite::client_async_with_config(request, tcp, Some(ws_config())),
    )
    .await
    .expect("WebSocket handshake")
}

/// The request for `ws://addr/path`.
pub(crate) fn ws_request(addr: SocketAddr, path: &str) -> tungstenite::handshake::client::Request {
    format!("ws://{addr}{path}")
        .into_client_request()
        .expect("a valid URL")
}

/// Connects a tokio-tungstenite client to `path`.
pub(crate) async fn ws_connect(addr: SocketAddr, path: &str) -> Ws {
    ws_connect_request(addr, ws_request(addr, path)).await.0
}

/// The next message, which must come within [`WAIT`].
pub(crate) async fn ws_next(ws: &mut Ws) -> WsMessage {
    within("a message from the server", ws.next())
        .await
        .expect("the connection ended")
        .expect("a WebSocket error")
}

/// Sends `message`, within [`WAIT`].
pub(crate) async fn ws_send(ws: &mut Ws, message: impl Into<WsMessage>) {
    within("a send", ws.send(message.into()))
        .await
        .expect("send to the server");
}

/// Reads until a Close arrives (answering it, as tungstenite does) and
/// returns its code and reason; then reads on until the stream ends.
pub(crate) async fn ws_expect_close(ws: &mut Ws) -> (u16, String) {
    let close = loop {
        match ws_next(ws).await {
            WsMessage::Close(Some(frame)) => {
                break (u16::from(frame.code), frame.reason.as_str().to_owned());
            }
            WsMessage::Close(None) => panic!("Close without a status code"),
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            other => panic!("expected a Close, got {other:?}"),
        }
    };
    // tungstenite answers the Close; the stream then ends.
    if let Some(Ok(other)) = within("the end of the stream after Close", ws.next()).await {
        panic!("data after Close: {other:?}");
    }
    close
}

/// A text message for tungstenite.
pub(crate) fn ws_text(text: &str) -> WsMessage {
    WsMessage::text(text)
}

// ---------------------------------------------------------------- memory

/// A field of /proc/self/status in KiB (`VmHWM`: the peak resident set since
/// the last [`reset_peak_rss`]; `VmRSS`: the resident set now).
pub(crate) fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
}

/// Resets `VmHWM` to the current resident set (proc(5), clear_refs "5"), so
/// that a peak read afterwards is the growth from now.
pub(crate) fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5").expect("write 5 to /proc/self/clear_refs");
}

// ------------------------------------------------------------ child server

/// A server in a process of its own: the test binary itself, running only
/// the `#[ignore]`d test `name`, which prints `PORT <port>` and serves
/// until its standard input closes. For floods of 10,000 connections, whose
/// two ends in one process would pass its limit of open files. Stopped
/// when dropped.
pub(crate) struct ChildServer {
    child: std::process::Child,
    pub(crate) addr: SocketAddr,
}

impl ChildServer {
    /// The child's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn start(name: &str) -> ChildServer {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().expect("current_exe"))
            .args([name, "--exact", "--ignored", "--nocapture"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("spawn the child server");
        let stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
        let port = stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("PORT ").and_then(|p| p.parse().ok()))
            .expect("the child server's port");
        ChildServer {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The body of the child's test: serves `app` on 127.0.0.1 and prints
    /// its port, until standard input closes.
    pub(crate) async fn serve(app: App) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        println!("PORT {}", listener.local_addr().expect("local_addr").port());
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        });
        app.serve_with_shutdown(listener, async move {
            let _ = stdin_closed.await;
        })
        .await
        .expect("serve");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        if self.child.try_wait().ok().flatten().is_none() {
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
