//! A test kit in the manner of Ktor's `testApplication`: serve an [`App`]
//! on a loopback port in one call, run a client session against it in one
//! call, and poke it with a raw client that writes any frame it likes.
//!
//! Ktor's echo test (the server asks a name, greets it, closes on "bye"):
//!
//! ```
//! use duplex::{App, CloseCode, CloseReason, Message, Session, testing::TestServer};
//!
//! async fn echo(mut session: Session) -> Result<(), duplex::Error> {
//!     session.send("Please enter your name").await?;
//!     while let Some(Message::Text(name)) = session.recv().await? {
//!         if name == "bye" {
//!             session.close(CloseReason::new(CloseCode::NORMAL, "Client said BYE")).await?;
//!         } else {
//!             session.send(format!("Hi, {name}!")).await?;
//!         }
//!     }
//!     Ok(())
//! }
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() {
//!     let server = TestServer::start(App::new().web_socket("/echo", echo)).await;
//!     server.connect("/echo", |mut session| async move {
//!         assert_eq!(session.recv().await.unwrap(), Some(Message::text("Please enter your name")));
//!         session.send("Ada").await.unwrap();
//!         assert_eq!(session.recv().await.unwrap(), Some(Message::text("Hi, Ada!")));
//!         session.send("bye").await.unwrap();
//!         assert_eq!(session.recv().await.unwrap(), None);
//!         assert_eq!(session.close_reason().await, CloseReason::new(CloseCode::NORMAL, "Client said BYE"));
//!     })
//!     .await;
//! }
//! ```
//!
//! Ktor's task tutorial, tested as its `ModuleTest` does: the server sends
//! typed values through the content converter and closes with "All done";
//! the client reads them back typed (`receiveDeserialized`):
//!
//! ```
//! use duplex::{App, CloseCode, CloseReason, Session, testing::TestServer};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, PartialEq, Serialize, Deserialize)]
//! struct Task {
//!     name: String,
//!     priority: u8,
//! }
//!
//! fn tasks() -> Vec<Task> {
//!     vec![
//!         Task { name: "cleaning".into(), priority: 1 },
//!         Task { name: "gardening".into(), priority: 3 },
//!     ]
//! }
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() {
//!     let app = App::new().web_socket("/tasks", |session: Session| async move {
//!         for task in tasks() {
//!             session.send_json(&task).await?;
//!         }
//!         session.close(CloseReason::new(CloseCode::NORMAL, "All done")).await
//!     });
//!     let server = TestServer::start(app).await;
//!     server.connect("/tasks", |mut session| async move {
//!         let mut got = Vec::new();
//!         while let Some(task) = session.recv_json::<Task>().await.unwrap() {
//!             got.push(task);
//!         }
//!         assert_eq!(got, tasks());
//!         assert_eq!(session.close_reason().await.reason, "All done");
//!     })
//!     .await;
//! }
//! ```
//!
//! The chat tutorial's broadcast, with two clients at once (each
//! `connect` is a future: join them):
//!
//! ```
//! use duplex::{App, Hub, Message, Session, testing::TestServer};
//!
//! #[tokio::main(flavor = "current_thread")]
//! async fn main() {
//!     let hub = Hub::new();
//!     let app = App::new().web_socket("/chat", move |mut session: Session| {
//!         let hub = hub.clone();
//!         async move {
//!             let me = hub.register(&session.sender());
//!             me.join("all");
//!             session.send("You are connected!").await?;
//!             while let Some(Message::Text(text)) = session.recv().await? {
//!                 hub.publish("all", format!("[user{}]: {text}", me.id()));
//!             }
//!             Ok::<_, duplex::Error>(())
//!         }
//!     });
//!     let server = TestServer::start(app).await;
//!     let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
//!     let listener = server.connect("/chat", |mut session| async move {
//!         assert_eq!(session.recv().await.unwrap(), Some(Message::text("You are connected!")));
//!         ready_tx.send(()).unwrap();
//!         session.recv().await.unwrap()
//!     });
//!     let speaker = server.connect("/chat", |mut session| async move {
//!         ready_rx.await.unwrap();
//!         assert_eq!(session.recv().await.unwrap(), Some(Message::text("You are connected!")));
//!         session.send("hello").await.unwrap();
//!         // The speaker is in the room too, so it hears itself.
//!         session.recv().await.unwrap()
//!     });
//!     let (heard, echoed) = tokio::join!(listener, speaker);
//!     let heard = heard.unwrap().into_text().unwrap();
//!     assert!(heard.starts_with("[user") && heard.ends_with("]: hello"), "{heard}");
//!     assert_eq!(echoed.unwrap().into_text().unwrap(), heard);
//! }
//! ```
//!
//! A failed assertion inside the closure panics once, in the test's task,
//! with its own message and location: the kit catches it inside the
//! session, closes the connection (1011) and resumes it after the
//! connection is torn down.
//!
//! Every wait of the kit is bounded by [`DEFAULT_TIMEOUT`] unless set with
//! `with_timeout`; a wait that runs out panics and says what it waited for.
//! All traffic goes to 127.0.0.1.

use std::{
    any::Any,
    future::Future,
    io,
    net::SocketAddr,
    panic::{AssertUnwindSafe, catch_unwind, resume_unwind},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

use crate::{
    App, Client, ClientError, CloseCode, CloseReason, Frame, OpCode, Rsv, Session,
    proto::accept_key,
};

/// How long any one wait of the kit lasts before it panics: 5 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// The masking key of the frames a [`RawTestClient`] writes unless told
/// otherwise.
pub const DEFAULT_MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// The `Sec-WebSocket-Key` of a raw client's upgrade request (RFC 6455 §1.3's
/// example).
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The largest response head a raw client reads.
const MAX_HEAD: usize = 16 << 10;

async fn within<F: Future>(timeout: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(timeout, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
    }
}

// ------------------------------------------------------------------ server

/// An [`App`] served on 127.0.0.1 on a free port. Dropping it signals a
/// graceful shutdown (sessions get 1001); [`stop`](Self::stop) also waits
/// for it.
pub struct TestServer {
    addr: SocketAddr,
    timeout: Duration,
    stop: Option<oneshot::Sender<()>>,
    serve: Option<JoinHandle<io::Result<()>>>,
}

impl TestServer {
    /// Binds 127.0.0.1:0 and serves `app` there with
    /// [`App::serve_with_shutdown`].
    ///
    /// # Panics
    /// If the port cannot be bound.
    pub async fn start(app: App) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("the listener's address");
        let (stop, stopped) = oneshot::channel::<()>();
        let app = app.raise_open_files_limit(false);
        let serve = tokio::spawn(app.serve_with_shutdown(listener, async move {
            // A dropped sender stops the server as well.
            let _ = stopped.await;
        }));
        TestServer {
            addr,
            timeout: DEFAULT_TIMEOUT,
            stop: Some(stop),
            serve: Some(serve),
        }
    }

    /// Sets how long each wait lasts (connecting, a whole
    /// [`connect`](Self::connect) session, [`stop`](Self::stop)), and the
    /// default of the raw clients it opens.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://127.0.0.1:PORT` followed by `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Connects a default [`Client`] to `path` and runs `test` with the
    /// session; returns what it returned once the session has ended.
    ///
    /// # Panics
    /// If the connection or its handshake fails, if the session takes
    /// longer than the timeout, and with `test`'s own panic (resumed here,
    /// once, after the connection is torn down).
    pub async fn connect<F, Fut, T>(&self, path: &str, test: F) -> T
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        self.connect_with(&Client::new(), path, test).await
    }

    /// [`connect`](Self::connect) with a client of your own (headers,
    /// subprotocols, session options).
    ///
    /// # Panics
    /// As [`connect`](Self::connect).
    pub async fn connect_with<F, Fut, T>(&self, client: &Client, path: &str, test: F) -> T
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        match self.try_connect_with(client, path, test).await {
            Ok(out) => out,
            Err(err) => panic!("connecting to {path}: {err}"),
        }
    }

    /// [`connect_with`](Self::connect_with) that returns a failed
    /// connection or handshake (a refused upgrade, say) as the error
    /// instead of panicking.
    ///
    /// # Errors
    /// [`ClientError`] from [`Client::connect`].
    ///
    /// # Panics
    /// If the session takes longer than the timeout, and with `test`'s own
    /// panic.
    pub async fn try_connect_with<F, Fut, T>(
        &self,
        client: &Client,
        path: &str,
        test: F,
    ) -> Result<T, ClientError>
    where
        F: FnOnce(Session) -> Fut,
        Fut: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let url = self.url(path);
        let session = client.connect(&url, |session: Session| {
            let sender = session.sender();
            let test = CatchUnwind(Box::pin(test(session)));
            async move {
                let outcome = test.await;
                if outcome.is_err() {
                    // The server sees the test fail, as it would a server
                    // handler's panic.
                    sender.close_now(CloseReason::new(CloseCode::INTERNAL_ERROR, "test panicked"));
                }
                outcome
            }
        });
        let what = format!("the client session on {path}");
        match within(self.timeout, &what, session).await? {
            Ok(out) => Ok(out),
            // Caught inside the session so that the client's driver does
            // not report it a second time; the hook already printed it.
            Err(panic) => resume_unwind(panic),
        }
    }

    /// Opens a [`RawTestClient`] on `path` with a valid upgrade request.
    pub async fn raw(&self, path: &str) -> RawTestClient {
        self.raw_with(path, HeaderMap::new()).await
    }

    /// Opens a [`RawTestClient`] on `path`; `headers` replace the upgrade
    /// request's headers of the same names or are added to them.
    pub async fn raw_with(&self, path: &str, headers: HeaderMap) -> RawTestClient {
        RawTestClient::connect(self.addr, path, headers)
            .await
            .with_timeout(self.timeout)
    }

    /// Signals the shutdown and waits for `serve_with_shutdown` to return.
    ///
    /// # Errors
    /// The listener's I/O error, if serving failed.
    ///
    /// # Panics
    /// If serving does not end within the timeout, or its task panicked.
    pub async fn stop(mut self) -> io::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let serve = self.serve.take().expect("serve handle");
        within(self.timeout, "the server to stop", serve)
            .await
            .expect("the server's task panicked")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        // The serve task goes on by itself: 1001 to every session, then it
        // returns within the app's shutdown grace.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A future whose panic becomes its `Err` output.
struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> Future for CatchUnwind<F> {
    type Output = Result<F::Output, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match catch_unwind(AssertUnwindSafe(|| self.0.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

// ------------------------------------------------------------------ frames

/// A frame as written on the wire, with nothing checked: any opcode (the
/// reserved ones too), RSV bits, FIN, masked or not. What a
/// [`RawTestClient`] sends and receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The FIN bit.
    pub fin: bool,
    /// The RSV bits.
    pub rsv: Rsv,
    /// The opcode's four bits.
    pub opcode: u8,
    /// The masking key: `Some` for a masked frame.
    pub mask: Option<[u8; 4]>,
    /// The payload, unmasked.
    pub payload: Bytes,
}

impl RawFrame {
    /// A final frame masked with [`DEFAULT_MASK`], as a client must send.
    pub fn new(opcode: OpCode, payload: impl Into<Bytes>) -> Self {
        Self::with_opcode(opcode.to_wire(), payload)
    }

    /// A final, masked frame with any opcode value, reserved ones included
    /// (only the low four bits count).
    pub fn with_opcode(opcode: u8, payload: impl Into<Bytes>) -> Self {
        RawFrame {
            fin: true,
            rsv: Rsv::NONE,
            opcode: opcode & 0x0f,
            mask: Some(DEFAULT_MASK),
            payload: payload.into(),
        }
    }

    /// A text frame.
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(OpCode::Text, text.into())
    }

    /// A binary frame.
    pub fn binary(data: impl Into<Bytes>) -> Self {
        Self::new(OpCode::Binary, data)
    }

    /// A continuation frame.
    pub fn continuation(data: impl Into<Bytes>) -> Self {
        Self::new(OpCode::Continuation, data)
    }

    /// A Ping.
    pub fn ping(data: impl Into<Bytes>) -> Self {
        Self::new(OpCode::Ping, data)
    }

    /// A Close with a code and a reason (not checked: any code, any bytes).
    pub fn close(code: impl Into<CloseCode>, reason: &str) -> Self {
        let mut payload = code.into().0.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        Self::new(OpCode::Close, payload)
    }

    /// Sets the FIN bit (false: a fragment with more to come).
    #[must_use]
    pub fn fin(mut self, fin: bool) -> Self {
        self.fin = fin;
        self
    }

    /// Sets the RSV bits.
    #[must_use]
    pub fn rsv(mut self, rsv: Rsv) -> Self {
        self.rsv = rsv;
        self
    }

    /// Sends it unmasked (a protocol error from a client, §5.1).
    #[must_use]
    pub fn unmasked(mut self) -> Self {
        self.mask = None;
        self
    }

    /// Masks it with `key`.
    #[must_use]
    pub fn masked_with(mut self, key: [u8; 4]) -> Self {
        self.mask = Some(key);
        self
    }

    /// The opcode, if it is not a reserved value.
    pub fn op(&self) -> Option<OpCode> {
        OpCode::from_wire(self.opcode).ok()
    }

    /// The payload as text, if it is UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.payload).ok()
    }

    /// The code and reason of a Close frame with a code (the reason decoded
    /// lossily); `None` for another frame or an empty Close.
    pub fn close_reason(&self) -> Option<(CloseCode, String)> {
        if self.opcode != OpCode::Close.to_wire() || self.payload.len() < 2 {
            return None;
        }
        let code = CloseCode(u16::from_be_bytes([self.payload[0], self.payload[1]]));
        Some((
            code,
            String::from_utf8_lossy(&self.payload[2..]).into_owned(),
        ))
    }

    /// The frame's bytes (§5.2), the length in its shortest form.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 14);
        out.push(u8::from(self.fin) << 7 | (self.rsv.0 & 0b111) << 4 | (self.opcode & 0x0f));
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len();
        if len < 126 {
            // Below 126 the length is its own byte.
            out.push(mask_bit | len as u8);
        } else if let Ok(len) = u16::try_from(len) {
            out.push(mask_bit | 126);
            out.extend_from_slice(&len.to_be_bytes());
        } else {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
        match self.mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(
                    self.payload
                        .iter()
                        .zip(key.iter().cycle())
                        .map(|(b, k)| b ^ k),
                );
            }
            None => out.extend_from_slice(&self.payload),
        }
        out
    }

    /// Parses one whole frame from the start of `buf`: the frame and the
    /// bytes it took, or `None` if it is not all there yet.
    pub fn decode(buf: &[u8]) -> Option<(RawFrame, usize)> {
        let [b0, b1, ..] = *buf else {
            return None;
        };
        let (len, mut at) = match b1 & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            Some(key)
        } else {
            None
        };
        let len = usize::try_from(len).ok()?;
        let mut payload = buf.get(at..at.checked_add(len)?)?.to_vec();
        if let Some(key) = mask {
            payload
                .iter_mut()
                .zip(key.iter().cycle())
                .for_each(|(b, k)| *b ^= k);
        }
        let frame = RawFrame {
            fin: b0 & 0x80 != 0,
            rsv: Rsv((b0 >> 4) & 0b111),
            opcode: b0 & 0x0f,
            mask,
            payload: payload.into(),
        };
        Some((frame, at + len))
    }
}

impl From<Frame> for RawFrame {
    fn from(frame: Frame) -> Self {
        RawFrame {
            fin: frame.fin,
            rsv: frame.rsv,
            opcode: frame.opcode.to_wire(),
            mask: Some(DEFAULT_MASK),
            payload: frame.payload,
        }
    }
}

// ------------------------------------------------------------------ raw client

/// A WebSocket client over a bare TCP stream that checks nothing: it
/// writes the upgrade request, keeps the response's status and headers,
/// writes whatever frames or bytes it is given and parses what comes back.
///
/// ```
/// use duplex::{App, CloseCode, Session, testing::{RawFrame, TestServer}};
/// use http::StatusCode;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let app = App::new().web_socket("/sink", |mut session: Session| async move {
///     while let Ok(Some(_)) = session.recv().await {}
/// });
/// let server = TestServer::start(app).await;
/// let mut client = server.raw("/sink").await;
/// assert_eq!(client.status(), StatusCode::SWITCHING_PROTOCOLS);
/// client.send_frame(RawFrame::text("not masked").unmasked()).await;
/// assert_eq!(client.expect_close().await.0, CloseCode::PROTOCOL_ERROR);
/// # }
/// ```
pub struct RawTestClient {
    stream: TcpStream,
    buf: BytesMut,
    status: StatusCode,
    headers: HeaderMap,
    timeout: Duration,
}

impl RawTestClient {
    /// Connects to `addr` and writes a valid upgrade request for `path`
    /// (with [`KEY`]); `headers` replace those of the same names or are
    /// added. The response's head is read, whatever its status.
    ///
    /// # Panics
    /// If connecting or the response head fails, or takes longer than
    /// [`DEFAULT_TIMEOUT`].
    pub async fn connect(addr: SocketAddr, path: &str, headers: HeaderMap) -> RawTestClient {
        let mut request = HeaderMap::new();
        let defaults = [
            ("host", addr.to_string()),
            ("upgrade", "websocket".to_owned()),
            ("connection", "Upgrade".to_owned()),
            ("sec-websocket-key", KEY.to_owned()),
            ("sec-websocket-version", "13".to_owned()),
        ];
        for (name, value) in defaults {
            let value = HeaderValue::try_from(value).expect("a valid header value");
            request.insert(HeaderName::from_static(name), value);
        }
        let mut last = None;
        for (name, value) in headers {
            // `None` continues the previous name's values.
            let name = name.or_else(|| last.clone()).expect("a header name");
            if last.as_ref() != Some(&name) {
                request.remove(&name);
            }
            request.append(name.clone(), value);
            last = Some(name);
        }
        let mut head = format!("GET {path} HTTP/1.1\r\n").into_bytes();
        crate::client::push_header_lines(&mut head, &request);
        Self::request(addr, head).await
    }

    /// Connects to `addr`, writes `request` as it is (any bytes) and reads
    /// the response's head.
    ///
    /// # Panics
    /// As [`connect`](Self::connect).
    pub async fn request(addr: SocketAddr, request: impl AsRef<[u8]>) -> RawTestClient {
        let timeout = DEFAULT_TIMEOUT;
        let stream = within(timeout, "TCP connect", TcpStream::connect(addr))
            .await
            .expect("connect to the test server");
        stream.set_nodelay(true).expect("set TCP_NODELAY");
        let mut client = RawTestClient {
            stream,
            buf: BytesMut::new(),
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            timeout,
        };
        client.send_raw(request).await;
        client.read_head().await;
        client
    }

    async fn read_head(&mut self) {
        let end = loop {
            if let Some(at) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            assert!(
                self.buf.len() <= MAX_HEAD,
                "response head over {MAX_HEAD} bytes"
            );
            let n = within(
                self.timeout,
                "the response head",
                self.stream.read_buf(&mut self.buf),
            )
            .await
            .expect("read the response head");
            assert!(
                n > 0,
                "EOF before the end of the response head: {:?}",
                String::from_utf8_lossy(&self.buf)
            );
        };
        let mut parsed = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut parsed);
        response
            .parse(&self.buf[..end])
            .unwrap_or_else(|e| panic!("malformed response head: {e}"));
        self.status = response
            .code
            .and_then(|code| StatusCode::from_u16(code).ok())
            .expect("a valid status code");
        for header in response.headers.iter() {
            let name = HeaderName::try_from(header.name).expect("a valid header name");
            let value = HeaderValue::try_from(header.value).expect("a valid header value");
            self.headers.append(name, value);
        }
        self.buf.advance(end);
    }

    /// Sets how long each wait lasts.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The response's status (101 for an upgrade).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The response's headers.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// Whether the server switched protocols with the right
    /// `Sec-WebSocket-Accept` for [`KEY`] (§4.2.2).
    pub fn is_upgraded(&self) -> bool {
        self.status == StatusCode::SWITCHING_PROTOCOLS
            && self
                .headers
                .get("sec-websocket-accept")
                .is_some_and(|v| v.as_bytes() == accept_key(KEY.as_bytes()).as_bytes())
    }

    /// The response's body as far as it has arrived with the head, or up
    /// to `Content-Length` bytes.
    ///
    /// # Panics
    /// If reading fails or times out.
    pub async fn body(&mut self) -> Bytes {
        let len = self
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .unwrap_or(self.buf.len());
        while self.buf.len() < len {
            let n = within(
                self.timeout,
                "the response body",
                self.stream.read_buf(&mut self.buf),
            )
            .await
            .expect("read the response body");
            assert!(n > 0, "EOF inside the response body");
        }
        self.buf.split_to(len).freeze()
    }

    /// Writes `bytes` as they are.
    ///
    /// # Panics
    /// If writing fails or times out.
    pub async fn send_raw(&mut self, bytes: impl AsRef<[u8]>) {
        within(
            self.timeout,
            "a write",
            self.stream.write_all(bytes.as_ref()),
        )
        .await
        .expect("write to the server");
    }

    /// Writes one frame.
    ///
    /// # Panics
    /// As [`send_raw`](Self::send_raw).
    pub async fn send_frame(&mut self, frame: impl Into<RawFrame>) {
        let bytes = frame.into().encode();
        self.send_raw(bytes).await;
    }

    /// Writes a masked text frame.
    ///
    /// # Panics
    /// As [`send_raw`](Self::send_raw).
    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.send_frame(RawFrame::text(text)).await;
    }

    /// Writes a masked Close with `code` and `reason`.
    ///
    /// # Panics
    /// As [`send_raw`](Self::send_raw).
    pub async fn send_close(&mut self, code: impl Into<CloseCode>, reason: &str) {
        self.send_frame(RawFrame::close(code, reason)).await;
    }

    /// The next frame from the server; `None` at EOF (or a reset) with no
    /// partial frame left.
    ///
    /// # Panics
    /// If no frame comes within the timeout, or the connection ends inside
    /// a frame.
    pub async fn next_frame(&mut self) -> Option<RawFrame> {
        loop {
            if let Some((frame, used)) = RawFrame::decode(&self.buf) {
                self.buf.advance(used);
                return Some(frame);
            }
            let read = within(
                self.timeout,
                "a frame from the server",
                self.stream.read_buf(&mut self.buf),
            )
            .await;
            if matches!(read, Ok(0) | Err(_)) {
                assert!(
                    self.buf.is_empty(),
                    "the connection ended inside a frame ({} bytes: {:?})",
                    self.buf.len(),
                    self.buf
                );
                return None;
            }
        }
    }

    /// The text of the next frame, which must be a final text frame.
    ///
    /// # Panics
    /// If it is not one, or as [`next_frame`](Self::next_frame).
    pub async fn expect_text(&mut self) -> String {
        match self.next_frame().await {
            Some(frame) if frame.fin && frame.op() == Some(OpCode::Text) => frame
                .as_text()
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("text frame that is not UTF-8: {frame:?}")),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Reads frames until a Close (skipping the others) and returns its code
    /// and reason; 1005 "" for an empty Close.
    ///
    /// # Panics
    /// If the connection ends first, or as [`next_frame`](Self::next_frame).
    pub async fn expect_close(&mut self) -> (CloseCode, String) {
        loop {
            match self.next_frame().await {
                Some(frame) if frame.op() == Some(OpCode::Close) => {
                    assert!(
                        frame.mask.is_none(),
                        "a masked Close from the server: {frame:?}"
                    );
                    return frame
                        .close_reason()
                        .unwrap_or((CloseCode::NO_STATUS, String::new()));
                }
                Some(_) => {}
                None => panic!("the connection ended without a Close"),
            }
        }
    }

    /// Checks that nothing but EOF comes: the server closed the TCP
    /// connection.
    ///
    /// # Panics
    /// If a frame comes, or as [`next_frame`](Self::next_frame).
    pub async fn expect_eof(&mut self) {
        if let Some(frame) = self.next_frame().await {
            panic!("expected EOF, got {frame:?}");
        }
    }

    /// The TCP stream, for what the kit does not cover (half-closing it,
    /// say).
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}
