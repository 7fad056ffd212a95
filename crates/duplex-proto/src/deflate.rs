//! permessage-deflate (RFC 7692): negotiation of all four parameters and
//! per-message compression with raw DEFLATE (flate2 on zlib-rs).
//!
//! Memory is the cost that matters: zlib's deflate state is about 300 KiB
//! (window, chain and a fixed 128 KiB hash table) and its inflate state
//! about 40 KiB. By default the server compresses every message alone
//! (`server_no_context_takeover`) and asks the client to do the same
//! (`client_no_context_takeover`), so neither state needs to outlive a
//! message: each worker thread keeps one compressor per level and window
//! and one decompressor, reset after every message, and a connection holds
//! none. Context takeover is an opt-in that keeps both per connection.

use std::{cell::RefCell, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::{
    error::ProtocolError,
    extension::{Extension, ExtensionFactory, ExtensionOffer, Negotiated, SharedEncoding},
    frame::{OpCode, Rsv},
};

/// The extension token.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

/// The empty stored block that ends a sync flush; §7.2.1 removes it from
/// the wire and §7.2.2 puts it back before inflating.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Which messages to compress, beyond the size threshold.
pub type CompressPredicate = Arc<dyn Fn(OpCode, &[u8]) -> bool + Send + Sync>;

/// permessage-deflate's configuration (Ktor's `WebSocketDeflateExtension`
/// options, plus the window sizes Ktor cannot set), for a server
/// ([`ExtensionFactory`]) or a client ([`client_offer`](Self::client_offer),
/// [`client_accept`](Self::client_accept)). The parameters keep their RFC
/// names in both roles: `server_*` constrain the server's compressor,
/// `client_*` the client's.
///
/// ```
/// use duplex_proto::Deflate;
/// let deflate = Deflate::default()
///     .compression_level(6)
///     .compress_if_bigger_than(64)
///     .server_no_context_takeover(true);
/// # let _ = deflate;
/// ```
#[derive(Clone)]
pub struct Deflate {
    level: u32,
    threshold: usize,
    predicate: Option<CompressPredicate>,
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: u8,
    client_max_window_bits: u8,
    release_compressor_after: Option<Duration>,
}

impl Default for Deflate {
    /// Level 1 (zlib's fastest: Ktor's default is 6, which costs about
    /// twice the CPU per message for output about a tenth smaller on chat-sized JSON),
    /// compress messages over 32 bytes, windows
    /// of 15 bits, and no context kept in either direction: the response
    /// carries `server_no_context_takeover` and `client_no_context_takeover`
    /// (RFC 7692 §7.1.1), so that a connection holds no zlib state between
    /// messages. With context takeover turned on, an idle connection's
    /// compressor is released after 10 s.
    fn default() -> Self {
        Deflate {
            level: 1,
            threshold: 32,
            predicate: None,
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_max_window_bits: 15,
            client_max_window_bits: 15,
            release_compressor_after: Some(Duration::from_secs(10)),
        }
    }
}

impl std::fmt::Debug for Deflate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deflate")
            .field("level", &self.level)
            .field("threshold", &self.threshold)
            .field("predicate", &self.predicate.is_some())
            .field(
                "server_no_context_takeover",
                &self.server_no_context_takeover,
            )
            .field(
                "client_no_context_takeover",
                &self.client_no_context_takeover,
            )
            .field("server_max_window_bits", &self.server_max_window_bits)
            .field("client_max_window_bits", &self.client_max_window_bits)
            .field("release_compressor_after", &self.release_compressor_after)
            .finish()
    }
}

impl Deflate {
    /// zlib level 0 (store) to 9 (smallest). Default 1: every message
    /// compressed alone pays for a fresh zlib state as well (about 4 µs to
    /// clear zlib-rs's 128 KiB hash table), and level 1 keeps the whole
    /// cost near what framing the message costs.
    #[must_use]
    pub fn compression_level(mut self, level: u32) -> Self {
        self.level = level.min(9);
        self
    }

    /// Compresses only messages longer than `bytes` (Ktor's
    /// `compressIfBiggerThan`): tiny messages grow when compressed. Default 32.
    #[must_use]
    pub fn compress_if_bigger_than(mut self, bytes: usize) -> Self {
        self.threshold = bytes;
        self
    }

    /// Compresses only messages for which `predicate` holds (Ktor's
    /// `compressIf`), on top of the size threshold. Called again, the
    /// predicates combine: a message is compressed only if all hold, as in
    /// Ktor. The predicate must depend on the message alone: sessions of
    /// this configuration then still share one compression of a broadcast.
    #[must_use]
    pub fn compress_if(
        mut self,
        predicate: impl Fn(OpCode, &[u8]) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.predicate = Some(match self.predicate.take() {
            None => Arc::new(predicate),
            Some(before) => Arc::new(move |opcode, payload| {
                before(opcode, payload) && predicate(opcode, payload)
            }),
        });
        self
    }

    /// Compresses every message alone, even when the client did not ask,
    /// and says so in the response. Default **true**: the connection keeps
    /// no compressor between messages (a worker thread's is used and reset),
    /// and a message broadcast to many connections is compressed once for
    /// all. `false` keeps a compressor per connection while it sends
    /// (about 300 KiB with a 15-bit window, zlib's fixed hash table being
    /// 128 KiB of it), for a better ratio on streams of similar messages;
    /// see [`release_compressor_after`](Self::release_compressor_after).
    /// A client's `server_no_context_takeover` is always honoured.
    ///
    /// In a client: offer `server_no_context_takeover`, asking the server
    /// to compress each message alone, so that the client keeps no inflate
    /// window between messages.
    #[must_use]
    pub fn server_no_context_takeover(mut self, on: bool) -> Self {
        self.server_no_context_takeover = on;
        self
    }

    /// Asks the client to compress every message alone
    /// (`client_no_context_takeover` in the response, which §7.1.1.2 lets a
    /// server add), so that no inflate window is kept between messages.
    /// Default **true**. `false` lets a client that does not offer it keep
    /// its context, and the server then holds an inflate state per
    /// connection (about 40 KiB) for the connection's life.
    ///
    /// In a client: compress each message alone (with the thread's
    /// compressor) and say so in the offer; `false` keeps a compressor for
    /// the connection unless the server's response asks otherwise.
    #[must_use]
    pub fn client_no_context_takeover(mut self, on: bool) -> Self {
        self.client_no_context_takeover = on;
        self
    }

    /// With server context takeover, releases a connection's compressor once
    /// it has sent nothing for `after` (its next message starts from an
    /// empty window, which is always allowed); `None` keeps it for the
    /// connection's life. Default 10 s. Without context takeover there is
    /// nothing to release.
    #[must_use]
    pub fn release_compressor_after(mut self, after: Option<Duration>) -> Self {
        self.release_compressor_after = after;
        self
    }

    /// The largest window the server compresses with, 9 to 15 (zlib's raw
    /// deflate has no 8-bit window: an offer that limits the server to 8
    /// is declined). Default 15. In a client: below 15, the largest window
    /// the offer allows the server.
    #[must_use]
    pub fn server_max_window_bits(mut self, bits: u8) -> Self {
        self.server_max_window_bits = bits.clamp(9, 15);
        self
    }

    /// The largest window the server asks clients to compress with, when
    /// they allow it (`client_max_window_bits` in their offer), 8 to 15.
    /// Default 15. In a client: the largest window it compresses with
    /// (the server's answer may lower it; 8 means messages go uncompressed,
    /// zlib cannot produce a raw 8-bit window).
    #[must_use]
    pub fn client_max_window_bits(mut self, bits: u8) -> Self {
        self.client_max_window_bits = bits.clamp(8, 15);
        self
    }

    /// Reads one offer as §7.1 says. `None` declines it: an unknown or
    /// repeated parameter, a value out of range, or a
    /// `server_max_window_bits` of 8, which we cannot honour.
    fn accept(&self, offer: &ExtensionOffer) -> Option<DeflateParams> {
        let mut server_no_context = false;
        let mut client_no_context = false;
        let mut server_bits: Option<u8> = None;
        let mut client_bits: Option<Option<u8>> = None;
        let mut seen = Vec::with_capacity(offer.params.len());
        for (name, value) in &offer.params {
            if seen.contains(&name.as_str()) {
                return None;
            }
            seen.push(name.as_str());
            match (name.as_str(), value.as_deref()) {
                ("server_no_context_takeover", None) => server_no_context = true,
                ("client_no_context_takeover", None) => client_no_context = true,
                ("server_max_window_bits", Some(v)) => server_bits = Some(window_bits(v)?),
                ("client_max_window_bits", None) => client_bits = Some(None),
                ("client_max_window_bits", Some(v)) => client_bits = Some(Some(window_bits(v)?)),
                _ => return None,
            }
        }
        // §7.1.2.1: our window may not pass what the client allows, and
        // zlib's raw deflate has no 8-bit window (it silently uses 9,
        // whose back-references a 256-byte window cannot resolve). Such
        // an offer is declined, so that the client's next offer (or no
        // compression) is used: accepting it would leave every message
        // we send uncompressed, whatever its size.
        if server_bits == Some(8) {
            return None;
        }
        let server_window = server_bits.map_or(self.server_max_window_bits, |b| {
            b.min(self.server_max_window_bits)
        });
        // §7.1.2.2: we may limit the client's window only if it said it can.
        let client_window = match client_bits {
            None => None,
            Some(None) => (self.client_max_window_bits < 15).then_some(self.client_max_window_bits),
            Some(Some(offered)) => Some(offered.min(self.client_max_window_bits)),
        };
        Some(DeflateParams {
            server_no_context_takeover: server_no_context || self.server_no_context_takeover,
            client_no_context_takeover: client_no_context || self.client_no_context_takeover,
            server_max_window_bits: server_window,
            announce_server_window: server_bits.is_some() || server_window < 15,
            client_max_window_bits: client_window,
        })
    }
}

/// A window size value: 8 to 15, digits only, no leading zero (§7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    if value.len() > 2 || value.starts_with('0') || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|b| (8..=15).contains(b))
}

/// A server's `permessage-deflate` response that the client's offer did
/// not allow (RFC 7692 §7.1): the client must fail the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("permessage-deflate response refused: {0}")]
pub struct DeflateResponseError(pub String);

impl Deflate {
    /// The client's offer for this configuration: `permessage-deflate`
    /// with `client_max_window_bits` (bare at 15, which lets the server
    /// pick any window, or with our limit as a hint), `server_max_window_bits`
    /// below 15, and `server_no_context_takeover` /
    /// `client_no_context_takeover` when they are on. With the defaults:
    /// `permessage-deflate; server_no_context_takeover;
    /// client_no_context_takeover; client_max_window_bits`.
    pub fn client_offer(&self) -> ExtensionOffer {
        let mut offer = ExtensionOffer::new(PERMESSAGE_DEFLATE);
        if self.server_no_context_takeover {
            offer = offer.param("server_no_context_takeover", None);
        }
        if self.client_no_context_takeover {
            offer = offer.param("client_no_context_takeover", None);
        }
        if self.server_max_window_bits < 15 {
            offer = offer.param(
                "server_max_window_bits",
                Some(self.server_max_window_bits.to_string()),
            );
        }
        let client_bits =
            (self.client_max_window_bits < 15).then(|| self.client_max_window_bits.to_string());
        offer.param("client_max_window_bits", client_bits)
    }

    /// Reads the server's answer to [`client_offer`](Self::client_offer)
    /// as §7.1 says and returns the parameters for
    /// [`DeflateExtension::client`]. An answer without the
    /// `server_no_context_takeover` we offered is taken as it is (the
    /// server's messages are then inflated with a window kept for the
    /// connection), which is always safe.
    ///
    /// # Errors
    /// [`DeflateResponseError`] for an unknown or repeated parameter, a
    /// flag with a value, a window outside 8-15, a bare
    /// `client_max_window_bits` (§7.1.2.2: a response gives a value), or a
    /// `server_max_window_bits` larger than the one offered.
    pub fn client_accept(
        &self,
        response: &ExtensionOffer,
    ) -> Result<DeflateParams, DeflateResponseError> {
        let refuse = |why: String| Err(DeflateResponseError(why));
        if response.name != PERMESSAGE_DEFLATE {
            return refuse(format!("not {PERMESSAGE_DEFLATE}: {}", response.name));
        }
        let mut server_no_context = false;
        let mut client_no_context = false;
        let mut server_bits: Option<u8> = None;
        let mut client_bits: Option<u8> = None;
        let mut seen = Vec::with_capacity(response.params.len());
        for (name, value) in &response.params {
            if seen.contains(&name.as_str()) {
                return refuse(format!("{name} repeated"));
            }
            seen.push(name.as_str());
            let bits = |v: &str| {
                window_bits(v)
                    .ok_or_else(|| DeflateResponseError(format!("{name}={v} is not 8-15")))
            };
            match (name.as_str(), value.as_deref()) {
                ("server_no_context_takeover", None) => server_no_context = true,
                ("client_no_context_takeover", None) => client_no_context = true,
                ("server_max_window_bits", Some(v)) => server_bits = Some(bits(v)?),
                ("client_max_window_bits", Some(v)) => client_bits = Some(bits(v)?),
                (_, Some(v)) => return refuse(format!("unexpected parameter {name}={v}")),
                (_, None) => return refuse(format!("unexpected parameter {name}")),
            }
        }
        // §7.1.2.1: the server's window may not pass the one we asked for.
        if let Some(bits) = server_bits
            && self.server_max_window_bits < 15
            && bits > self.server_max_window_bits
        {
            return refuse(format!(
                "server_max_window_bits={bits} is larger than the {} offered",
                self.server_max_window_bits
            ));
        }
        Ok(DeflateParams {
            server_no_context_takeover: server_no_context,
            // The client may always compress each message alone.
            client_no_context_takeover: client_no_context || self.client_no_context_takeover,
            server_max_window_bits: server_bits.unwrap_or(15),
            announce_server_window: server_bits.is_some(),
            // Our own limit applies on top of the server's.
            client_max_window_bits: Some(client_bits.map_or(self.client_max_window_bits, |b| {
                b.min(self.client_max_window_bits)
            })),
        })
    }
}

/// The parameters agreed for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeflateParams {
    /// We reset our compressor after every message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message; we reset our
    /// decompressor too.
    pub client_no_context_takeover: bool,
    /// Our compression window, in bits.
    pub server_max_window_bits: u8,
    /// Whether the response names our window.
    announce_server_window: bool,
    /// The client's window limit we answered with, if any.
    pub client_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// The response header item for these parameters.
    pub fn response(&self) -> ExtensionOffer {
        let mut response = ExtensionOffer::new(PERMESSAGE_DEFLATE);
        if self.server_no_context_takeover {
            response = response.param("server_no_context_takeover", None);
        }
        if self.client_no_context_takeover {
            response = response.param("client_no_context_takeover", None);
        }
        if self.announce_server_window {
            response = response.param(
                "server_max_window_bits",
                Some(self.server_max_window_bits.to_string()),
            );
        }
        if let Some(bits) = self.client_max_window_bits {
            response = response.param("client_max_window_bits", Some(bits.to_string()));
        }
        response
    }
}

impl ExtensionFactory for Deflate {
    fn name(&self) -> &str {
        PERMESSAGE_DEFLATE
    }

    fn rsv(&self) -> Rsv {
        Rsv::RSV1
    }

    /// §7.1: the first offer we can accept wins.
    fn negotiate(&self, offers: &[&ExtensionOffer]) -> Option<Negotiated> {
        let params = offers.iter().find_map(|offer| self.accept(offer))?;
        Some(Negotiated {
            response: params.response(),
            extension: Box::new(DeflateExtension::new(self.clone(), params)),
        })
    }
}

/// permessage-deflate on one connection.
pub struct DeflateExtension {
    config: Deflate,
    params: DeflateParams,
    /// With server context takeover only, created on the first compressed
    /// message (zlib's deflate state is about 300 KiB, too much to hold for
    /// connections that never need it) and dropped when idle. Without, the
    /// worker thread's compressor is used.
    compressor: Option<Compress>,
    /// With the peer's context takeover only; otherwise the thread's.
    decompressor: Option<Decompress>,
    /// Which end of the connection this is: it decides whose parameters
    /// constrain our compressor and whose our decompressor.
    client: bool,
}

impl std::fmt::Debug for DeflateExtension {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeflateExtension")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl DeflateExtension {
    /// The extension for agreed parameters.
    pub fn new(config: Deflate, params: DeflateParams) -> Self {
        DeflateExtension {
            config,
            params,
            compressor: None,
            decompressor: None,
            client: false,
        }
    }

    /// The extension in the client role, for parameters from
    /// [`Deflate::client_accept`]: it compresses under the client's
    /// constraints (`client_no_context_takeover`: each message alone, with
    /// the thread's compressor; `client_max_window_bits`: that window, and
    /// below 9 bits, which zlib cannot produce raw, messages go
    /// uncompressed as §6 allows) and inflates under the server's
    /// (`server_no_context_takeover`: the thread's decompressor; otherwise
    /// one kept for the connection).
    pub fn client(config: Deflate, params: DeflateParams) -> Self {
        DeflateExtension {
            client: true,
            ..DeflateExtension::new(config, params)
        }
    }

    /// Whether each message we send is compressed alone.
    fn own_no_context_takeover(&self) -> bool {
        if self.client {
            self.params.client_no_context_takeover
        } else {
            self.params.server_no_context_takeover
        }
    }

    /// The window we compress with.
    fn own_window_bits(&self) -> u8 {
        if self.client {
            self.params.client_max_window_bits.unwrap_or(15)
        } else {
            self.params.server_max_window_bits
        }
    }

    /// Whether the peer compresses each message alone.
    fn peer_no_context_takeover(&self) -> bool {
        if self.client {
            self.params.server_no_context_takeover
        } else {
            self.params.client_no_context_takeover
        }
    }

    /// The agreed parameters.
    pub fn params(&self) -> &DeflateParams {
        &self.params
    }

    fn wants_to_compress(&self, opcode: OpCode, payload: &[u8]) -> bool {
        // zlib cannot compress with an 8-bit window; sending uncompressed
        // messages is always allowed (§6), so a client that insists on one
        // gets uncompressed messages.
        self.own_window_bits() >= 9
            && payload.len() > self.config.threshold
            && self
                .config
                .predicate
                .as_ref()
                .is_none_or(|p| p(opcode, payload))
    }
}

impl Extension for DeflateExtension {
    fn name(&self) -> &str {
        PERMESSAGE_DEFLATE
    }

    /// Without server context takeover every message compresses alone:
    /// connections with the same level, window, threshold and predicate
    /// (the same `compress_if` of one configuration, told apart by its
    /// address) share the bytes.
    fn shared_encoding(&self) -> Option<SharedEncoding> {
        // A client's frames are masked one by one: nothing to share.
        if self.client || !self.params.server_no_context_takeover {
            return None;
        }
        let level = self.config.level;
        let bits = self.params.server_max_window_bits;
        let threshold = self.config.threshold;
        let predicate = self.config.predicate.clone();
        let predicate_id = predicate
            .as_ref()
            .map_or(0, |p| Arc::as_ptr(p).cast::<()>() as usize);
        Some(SharedEncoding::new(
            format!(
                "{PERMESSAGE_DEFLATE}/level={level}/bits={bits}/threshold={threshold}/predicate={predicate_id:x}"
            ),
            move |opcode, payload| {
                if bits < 9
                    || payload.len() <= threshold
                    || predicate.as_ref().is_some_and(|p| !p(opcode, payload))
                {
                    return Ok((Rsv::NONE, Bytes::copy_from_slice(payload)));
                }
                Ok((Rsv::RSV1, compress_standalone(level, bits, payload)?))
            },
        ))
    }

    fn rsv(&self) -> Rsv {
        Rsv::RSV1
    }

    fn encode(&mut self, opcode: OpCode, payload: Bytes) -> Result<(Rsv, Bytes), ProtocolError> {
        if !self.wants_to_compress(opcode, &payload) {
            return Ok((Rsv::NONE, payload));
        }
        let level = self.config.level;
        let bits = self.own_window_bits();
        if self.own_no_context_takeover() {
            return Ok((Rsv::RSV1, compress_standalone(level, bits, &payload)?));
        }
        let compressor = self.compressor.get_or_insert_with(|| {
            Compress::new_with_window_bits(Compression::new(level), false, bits)
        });
        Ok((Rsv::RSV1, compress_message(compressor, &payload)?))
    }

    fn decode(
        &mut self,
        _opcode: OpCode,
        rsv: Rsv,
        payload: Bytes,
        max_size: u64,
    ) -> Result<Bytes, ProtocolError> {
        if !rsv.contains(Rsv::RSV1) {
            return Ok(payload);
        }
        if self.peer_no_context_takeover() {
            return with_thread_decompressor(|d| inflate_message(d, &payload, max_size));
        }
        // A 15-bit window inflates anything a smaller one produced, and 8
        // (which zlib cannot inflate raw) never reaches it.
        let decompressor = self
            .decompressor
            .get_or_insert_with(|| Decompress::new_with_window_bits(false, 15));
        inflate_message(decompressor, &payload, max_size)
    }

    fn idle_timeout(&self) -> Option<Duration> {
        if self.own_no_context_takeover() {
            return None;
        }
        self.config.release_compressor_after
    }

    fn release_idle(&mut self) {
        self.compressor = None;
    }
}

thread_local! {
    /// The thread's compressors for messages compressed alone, one per
    /// level and window (few: one configuration rarely yields more than
    /// two), each reset after use.
    static COMPRESSORS: RefCell<Vec<(u32, u8, Compress)>> = const { RefCell::new(Vec::new()) };
    /// The thread's decompressor for messages compressed alone; a 15-bit
    /// window inflates what any smaller one produced.
    static DECOMPRESSOR: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// Runs `f` with the thread's compressor for `level` and `window_bits`,
/// then resets it so that the next message starts from an empty window.
fn with_thread_compressor<R>(level: u32, window_bits: u8, f: impl FnOnce(&mut Compress) -> R) -> R {
    COMPRESSORS.with(|cell| {
        // `f` compresses and never comes back here, so the borrow is free.
        let mut compressors = cell.borrow_mut();
        let index = match compressors
            .iter()
            .position(|(l, b, _)| *l == level && *b == window_bits)
        {
            Some(index) => index,
            None => {
                let compressor =
                    Compress::new_with_window_bits(Compression::new(level), false, window_bits);
                compressors.push((level, window_bits, compressor));
                compressors.len() - 1
            }
        };
        let compressor = &mut compressors[index].2;
        let result = f(compressor);
        compressor.reset();
        result
    })
}

/// Runs `f` with the thread's decompressor, then resets it.
fn with_thread_decompressor<R>(f: impl FnOnce(&mut Decompress) -> R) -> R {
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        let decompressor = slot.get_or_insert_with(|| Decompress::new_with_window_bits(false, 15));
        let result = f(decompressor);
        decompressor.reset(false);
        result
    })
}

/// Compresses a whole message with a sync flush and removes the trailing
/// empty block (§7.2.1).
pub(crate) fn compress_message(
    compressor: &mut Compress,
    payload: &[u8],
) -> Result<Bytes, ProtocolError> {
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    let start_in = compressor.total_in();
    loop {
        let consumed = (compressor.total_in() - start_in) as usize;
        let input = payload.get(consumed..).unwrap_or_default();
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
        compressor
            .compress_vec(input, &mut out, FlushCompress::Sync)
            .map_err(|e| ProtocolError::ExtensionData(e.to_string()))?;
        let done = (compressor.total_in() - start_in) as usize == payload.len();
        // Output room left over means the flush completed.
        if done && out.len() < out.capacity() {
            break;
        }
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    } else {
        // Cannot happen with a sync flush; an empty stored block keeps the
        // message decodable if it ever does.
        out.push(0x00);
    }
    Ok(Bytes::from(out))
}

/// Compresses `payload` as a standalone message (no context before or
/// after), for sending the same bytes to many connections whose server
/// context is not kept.
///
/// It uses the calling thread's compressor for that level and window, so
/// nothing is allocated after the first call.
pub fn compress_standalone(
    level: u32,
    window_bits: u8,
    payload: &[u8],
) -> Result<Bytes, ProtocolError> {
    with_thread_compressor(level.min(9), window_bits.clamp(9, 15), |c| {
        compress_message(c, payload)
    })
}

/// Inflates a whole message (its tail put back, §7.2.2), failing with 1009
/// as soon as the output passes `max_size`: a small bomb never gets to
/// allocate its inflated size.
pub(crate) fn inflate_message(
    decompressor: &mut Decompress,
    payload: &[u8],
    max_size: u64,
) -> Result<Bytes, ProtocolError> {
    let mut out = BytesMut::new();
    let start_out = decompressor.total_out();
    for part in [payload, &TAIL[..]] {
        let mut offset = 0;
        loop {
            let produced = decompressor.total_out() - start_out;
            if produced > max_size {
                return Err(ProtocolError::MessageTooBig {
                    size: produced,
                    max: max_size,
                });
            }
            // Grow by steps, never beyond the limit plus one byte (to see
            // that it is passed).
            let room = (max_size - produced).saturating_add(1).clamp(1, 64 * 1024) as usize;
            let limit = out.len() + room;
            let before_in = decompressor.total_in();
            let before_out = decompressor.total_out();
            let input = part.get(offset..).unwrap_or_default();
            let status = inflate_into(decompressor, input, &mut out, limit)?;
            offset += (decompressor.total_in() - before_in) as usize;
            let wrote = (decompressor.total_out() - before_out) as usize;
            if status == Status::StreamEnd {
                // A final block ends the stream early; nothing after it counts.
                return finish(out, decompressor.total_out() - start_out, max_size);
            }
            // Done with this part once its input is in and the output had
            // room to spare, so nothing is left buffered inside zlib.
            if offset >= part.len() && wrote < room {
                break;
            }
            if wrote == 0 && decompressor.total_in() == before_in {
                return Err(ProtocolError::ExtensionData(
                    "inflate made no progress".into(),
                ));
            }
        }
    }
    finish(out, decompressor.total_out() - start_out, max_size)
}

fn finish(out: BytesMut, produced: u64, max_size: u64) -> Result<Bytes, ProtocolError> {
    if produced > max_size {
        return Err(ProtocolError::MessageTooBig {
            size: produced,
            max: max_size,
        });
    }
    Ok(out.freeze())
}

/// One inflate call writing into `out` up to `limit` bytes of length.
fn inflate_into(
    decompressor: &mut Decompress,
    input: &[u8],
    out: &mut BytesMut,
    limit: usize,
) -> Result<Status, ProtocolError> {
    let start = out.len();
    out.resize(limit, 0);
    let before = decompressor.total_out();
    let result = decompressor.decompress(input, &mut out[start..limit], FlushDecompress::Sync);
    let written = (decompressor.total_out() - before) as usize;
    out.truncate(start + written);
    result.map_err(|e| ProtocolError::ExtensionData(e.to_string()))
}

#[cfg(test)]
mod rfc7692 {
    use super::*;
    use crate::extension::parse_extensions;

    fn negotiate(config: &Deflate, header: &str) -> Option<String> {
        let offers = parse_extensions(header).unwrap();
        let refs: Vec<&ExtensionOffer> = offers.iter().collect();
        config.negotiate(&refs).map(|n| n.response.to_string())
    }

    mod section_7_1_negotiation {
        use super::*;

        /// Context takeover allowed both ways: the response then echoes
        /// only what the client offered.
        fn keep() -> Deflate {
            Deflate::default()
                .server_no_context_takeover(false)
                .client_no_context_takeover(false)
        }

        /// §7.1.1.1 and §7.1.1.2: by default the server compresses every
        /// message alone and asks the client to, whatever it offered
        /// (Chromium offers a bare `client_max_window_bits`).
        #[test]
        fn default_response_turns_off_context_takeover_both_ways() {
            for offer in [
                "permessage-deflate",
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; server_no_context_takeover",
            ] {
                assert_eq!(
                    negotiate(&Deflate::default(), offer).as_deref(),
                    Some(
                        "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
                    ),
                    "{offer}"
                );
            }
        }

        #[test]
        fn no_parameters() {
            assert_eq!(
                negotiate(&keep(), "permessage-deflate").as_deref(),
                Some("permessage-deflate")
            );
        }

        #[test]
        fn both_no_context_takeover_flags_are_echoed() {
            assert_eq!(
                negotiate(
                    &keep(),
                    "permessage-deflate; client_no_context_takeover; server_no_context_takeover"
                )
                .as_deref(),
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
            );
        }

        #[test]
        fn server_may_add_no_context_takeover_on_its_own() {
            let config = keep()
                .server_no_context_takeover(true)
                .client_no_context_takeover(true);
            assert_eq!(
                negotiate(&config, "permessage-deflate").as_deref(),
                Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
            );
        }

        #[test]
        fn server_max_window_bits_each_value() {
            for bits in 9..=15 {
                let response = negotiate(
                    &keep(),
                    &format!("permessage-deflate; server_max_window_bits={bits}"),
                );
                assert_eq!(
                    response,
                    Some(format!("permessage-deflate; server_max_window_bits={bits}"))
                );
            }
        }

        /// §7.1.2.1: the server may not answer a window larger than the
        /// offered `server_max_window_bits`, and it cannot compress with 8
        /// bits (zlib's raw deflate uses 9 instead): the offer is declined
        /// and the next one, if any, is taken.
        #[test]
        fn rfc7692_7_1_2_1_an_offer_of_server_max_window_bits_8_is_declined() {
            for config in [Deflate::default(), keep()] {
                assert_eq!(
                    negotiate(&config, "permessage-deflate; server_max_window_bits=8"),
                    None
                );
            }
            assert_eq!(
                negotiate(
                    &keep(),
                    "permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=9"
                )
                .as_deref(),
                Some("permessage-deflate; server_max_window_bits=9")
            );
            assert_eq!(
                negotiate(
                    &keep(),
                    "permessage-deflate; server_max_window_bits=8; client_max_window_bits, permessage-deflate"
                )
                .as_deref(),
                Some("permessage-deflate")
            );
        }

        #[test]
        fn server_announces_a_smaller_window_of_its_own() {
            let config = keep().server_max_window_bits(10);
            assert_eq!(
                negotiate(&config, "permessage-deflate; server_max_window_bits=12").as_deref(),
                Some("permessage-deflate; server_max_window_bits=10")
            );
            assert_eq!(
                negotiate(&config, "permessage-deflate").as_deref(),
                Some("permessage-deflate; server_max_window_bits=10")
            );
        }

        #[test]
        fn client_max_window_bits_with_and_without_value() {
            let config = keep();
            // Bare: the client accepts a limit; we set none at 15.
            assert_eq!(
                negotiate(&config, "permessage-deflate; client_max_window_bits").as_deref(),
                Some("permessage-deflate")
            );
            for bits in 8..=15 {
                assert_eq!(
                    negotiate(
                        &config,
                        &format!("permessage-deflate; client_max_window_bits={bits}")
                    ),
                    Some(format!("permessage-deflate; client_max_window_bits={bits}"))
                );
            }
            let limited = keep().client_max_window_bits(10);
            assert_eq!(
                negotiate(&limited, "permessage-deflate; client_max_window_bits").as_deref(),
                Some("permessage-deflate; client_max_window_bits=10")
            );
            assert_eq!(
                negotiate(&limited, "permessage-deflate; client_max_window_bits=9").as_deref(),
                Some("permessage-deflate; client_max_window_bits=9")
            );
        }

        #[test]
        fn client_window_is_never_limited_unless_offered() {
            let limited = keep().client_max_window_bits(10);
            assert_eq!(
                negotiate(&limited, "permessage-deflate").as_deref(),
                Some("permessage-deflate")
            );
        }

        #[test]
        fn invalid_offers_are_declined() {
            for bad in [
                "permessage-deflate; server_max_window_bits",
                "permessage-deflate; server_max_window_bits=7",
                "permessage-deflate; server_max_window_bits=16",
                "permessage-deflate; server_max_window_bits=010",
                "permessage-deflate; client_max_window_bits=0",
                "permessage-deflate; server_no_context_takeover=1",
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                "permessage-deflate; unknown_param",
            ] {
                assert_eq!(negotiate(&keep(), bad), None, "{bad}");
            }
        }

        /// Every combination of the four parameters (§7.1.1.1, §7.1.1.2,
        /// §7.1.2.1, §7.1.2.2), against the default configuration.
        #[test]
        fn every_parameter_combination() {
            // 8 for the server's window is declined (see
            // `rfc7692_7_1_2_1_an_offer_of_server_max_window_bits_8_is_declined`).
            let windows = || std::iter::once(None).chain((9..=15).map(Some));
            for snct in [false, true] {
                for cnct in [false, true] {
                    for smwb in windows() {
                        // None: absent; Some(None): bare; Some(Some(b)): with a value.
                        for cmwb in std::iter::once(None)
                            .chain(std::iter::once(Some(None)))
                            .chain((8..=15).map(|b| Some(Some(b))))
                        {
                            let mut offer = String::from("permessage-deflate");
                            if snct {
                                offer.push_str("; server_no_context_takeover");
                            }
                            if cnct {
                                offer.push_str("; client_no_context_takeover");
                            }
                            if let Some(b) = smwb {
                                offer.push_str(&format!("; server_max_window_bits={b}"));
                            }
                            match cmwb {
                                Some(None) => offer.push_str("; client_max_window_bits"),
                                Some(Some(b)) => {
                                    offer.push_str(&format!("; client_max_window_bits={b}"))
                                }
                                None => {}
                            }
                            let response = negotiate(&keep(), &offer)
                                .unwrap_or_else(|| panic!("declined {offer}"));
                            let answer = parse_extensions(&response).unwrap().remove(0);
                            let get = |name: &str| {
                                answer
                                    .params
                                    .iter()
                                    .find(|(k, _)| k == name)
                                    .map(|(_, v)| v.clone())
                            };
                            // Flags are echoed exactly when offered.
                            assert_eq!(
                                get("server_no_context_takeover").is_some(),
                                snct,
                                "{offer}"
                            );
                            assert_eq!(
                                get("client_no_context_takeover").is_some(),
                                cnct,
                                "{offer}"
                            );
                            // Our window: named with the offered value when offered.
                            assert_eq!(
                                get("server_max_window_bits"),
                                smwb.map(|b| Some(b.to_string())),
                                "{offer}"
                            );
                            // The client's window: never unless offered, always
                            // with a value in a response (§7.1.2.2).
                            match cmwb {
                                None => assert_eq!(get("client_max_window_bits"), None, "{offer}"),
                                Some(None) => {
                                    assert_eq!(get("client_max_window_bits"), None, "{offer}")
                                }
                                Some(Some(b)) => assert_eq!(
                                    get("client_max_window_bits"),
                                    Some(Some(b.to_string())),
                                    "{offer}"
                                ),
                            }
                            // And the answer is itself a valid offer we would accept.
                            assert!(keep().accept(&answer).is_some(), "{response}");
                        }
                    }
                }
            }
        }

        #[test]
        fn first_acceptable_offer_wins() {
            assert_eq!(
                negotiate(
                    &keep(),
                    "permessage-deflate; server_max_window_bits=20, permessage-deflate; client_no_context_takeover, permessage-deflate"
                )
                .as_deref(),
                Some("permessage-deflate; client_no_context_takeover")
            );
        }
    }

    /// The client role: the offer, the checks on the server's answer
    /// (§7.1), and messages both ways between a client and a server
    /// extension set up from one real negotiation.
    mod client_role {
        use super::*;

        fn answer(config: &Deflate, header: &str) -> Result<DeflateParams, DeflateResponseError> {
            config.client_accept(&parse_extensions(header).unwrap().remove(0))
        }

        #[test]
        fn default_offer_asks_no_context_takeover_both_ways() {
            assert_eq!(
                Deflate::default().client_offer().to_string(),
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits"
            );
            let custom = Deflate::default()
                .server_no_context_takeover(false)
                .client_no_context_takeover(false)
                .server_max_window_bits(10)
                .client_max_window_bits(12);
            assert_eq!(
                custom.client_offer().to_string(),
                "permessage-deflate; server_max_window_bits=10; client_max_window_bits=12"
            );
        }

        #[test]
        fn responses_the_offer_allows_are_accepted() {
            let config = Deflate::default();
            let params = answer(&config, "permessage-deflate").unwrap();
            assert!(!params.server_no_context_takeover);
            // Our own policy: each message alone even when not answered.
            assert!(params.client_no_context_takeover);
            assert_eq!(params.client_max_window_bits, Some(15));
            let params = answer(
                &config,
                "permessage-deflate; server_no_context_takeover; client_max_window_bits=10; server_max_window_bits=12",
            )
            .unwrap();
            assert!(params.server_no_context_takeover);
            assert_eq!(params.client_max_window_bits, Some(10));
            assert_eq!(params.server_max_window_bits, 12);
            // Our limit holds below the server's.
            let small = Deflate::default().client_max_window_bits(9);
            let params = answer(&small, "permessage-deflate; client_max_window_bits=12").unwrap();
            assert_eq!(params.client_max_window_bits, Some(9));
        }

        #[test]
        fn responses_the_offer_did_not_allow_are_refused() {
            let config = Deflate::default().server_max_window_bits(10);
            for bad in [
                "permessage-deflate; unknown",
                "permessage-deflate; x=1",
                "permessage-deflate; server_no_context_takeover=1",
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                // §7.1.2.2: a response's client_max_window_bits has a value.
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; client_max_window_bits=16",
                "permessage-deflate; server_max_window_bits=7",
                "permessage-deflate; server_max_window_bits",
                // §7.1.2.1: larger than offered.
                "permessage-deflate; server_max_window_bits=11",
                "x-other",
            ] {
                assert!(answer(&config, bad).is_err(), "{bad} accepted");
            }
        }

        /// A client and a server configured alike, negotiated through the
        /// client's own offer, exchange messages both ways; a decoder that
        /// kept no context reads the messages after the first one only if
        /// each was compressed alone.
        #[test]
        fn client_and_server_round_trip_for_every_context_policy() {
            for server_nct in [false, true] {
                for client_nct in [false, true] {
                    let config = Deflate::default()
                        .compress_if_bigger_than(0)
                        .server_no_context_takeover(server_nct)
                        .client_no_context_takeover(client_nct);
                    let offer = config.client_offer();
                    let negotiated = config.negotiate(&[&offer]).expect("accepted");
                    let params = config.client_accept(&negotiated.response).unwrap();
                    assert_eq!(params.server_no_context_takeover, server_nct);
                    assert_eq!(params.client_no_context_takeover, client_nct);
                    let mut server = negotiated.extension;
                    let mut client = DeflateExtension::client(config.clone(), params);
                    let msg = Bytes::from(b"a fairly repetitive message, ".repeat(40));
                    let mut sizes = Vec::new();
                    for _ in 0..3 {
                        let (rsv, wire) = client.encode(OpCode::Text, msg.clone()).unwrap();
                        assert_eq!(rsv, Rsv::RSV1);
                        sizes.push(wire.len());
                        // A fresh decoder proves the message stands alone.
                        if client_nct {
                            let mut fresh = DeflateExtension::new(config.clone(), params);
                            assert_eq!(
                                fresh
                                    .decode(OpCode::Text, rsv, wire.clone(), 1 << 20)
                                    .unwrap(),
                                msg
                            );
                        }
                        assert_eq!(
                            server.decode(OpCode::Text, rsv, wire, 1 << 20).unwrap(),
                            msg
                        );
                        let (rsv, wire) = server.encode(OpCode::Text, msg.clone()).unwrap();
                        assert_eq!(
                            client.decode(OpCode::Text, rsv, wire, 1 << 20).unwrap(),
                            msg
                        );
                    }
                    // With the context kept, repeats are smaller.
                    assert_eq!(sizes[1] < sizes[0], !client_nct, "{sizes:?}");
                }
            }
        }

        #[test]
        fn client_window_8_sends_uncompressed() {
            let config = Deflate::default().compress_if_bigger_than(0);
            let params = answer(&config, "permessage-deflate; client_max_window_bits=8").unwrap();
            let mut client = DeflateExtension::client(config, params);
            let (rsv, wire) = client
                .encode(OpCode::Binary, Bytes::from(vec![b'x'; 1000]))
                .unwrap();
            assert_eq!((rsv, wire.len()), (Rsv::NONE, 1000));
        }

        #[test]
        fn client_compresses_with_the_answered_window() {
            // A random block repeated 2,000 bytes apart: a 15-bit window
            // finds the repeats, 9 bits (512 bytes) cannot reach them.
            let mut x = 0x9e37_79b9_u32;
            let block: Vec<u8> = (0..2000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect();
            let payload = Bytes::from(block.repeat(10));
            let config = Deflate::default().compress_if_bigger_than(0);
            let wire_with = |header: &str| {
                let params = answer(&config, header).unwrap();
                let mut client = DeflateExtension::client(config.clone(), params);
                let (rsv, wire) = client.encode(OpCode::Binary, payload.clone()).unwrap();
                assert_eq!(rsv, Rsv::RSV1);
                let mut server = DeflateExtension::new(config.clone(), params);
                let back = server.decode(OpCode::Binary, rsv, wire.clone(), 1 << 20);
                assert_eq!(back.unwrap(), payload);
                wire.len()
            };
            let narrow = wire_with("permessage-deflate; client_max_window_bits=9");
            let wide = wire_with("permessage-deflate");
            assert!(
                narrow > payload.len() * 9 / 10,
                "{narrow} bytes with 9 bits"
            );
            assert!(wide < payload.len() / 3, "{wide} bytes with 15 bits");
        }
    }

    mod section_7_2_compression {
        use super::*;

        fn pair(params: DeflateParams) -> (DeflateExtension, DeflateExtension) {
            let config = Deflate::default().compress_if_bigger_than(0);
            (
                DeflateExtension::new(config.clone(), params),
                DeflateExtension::new(config, params),
            )
        }

        fn params(no_context: bool, bits: u8) -> DeflateParams {
            DeflateParams {
                server_no_context_takeover: no_context,
                client_no_context_takeover: no_context,
                server_max_window_bits: bits,
                announce_server_window: true,
                client_max_window_bits: None,
            }
        }

        #[test]
        fn rfc_example_hello_without_tail() {
            // §7.2.3.1: "Hello" compressed is f2 48 cd c9 c9 07 00.
            let mut ext = pair(params(false, 15)).0;
            let (rsv, out) = ext
                .encode(OpCode::Text, Bytes::from_static(b"Hello"))
                .unwrap();
            assert_eq!(rsv, Rsv::RSV1);
            assert!(!out.ends_with(&TAIL));
            let mut inflater = DeflateExtension::new(Deflate::default(), params(false, 15));
            let back = inflater
                .decode(
                    OpCode::Text,
                    Rsv::RSV1,
                    Bytes::from_static(&[0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00]),
                    100,
                )
                .unwrap();
            assert_eq!(&back[..], b"Hello");
        }

        #[test]
        fn round_trip_every_window_and_context_mode() {
            for bits in 9..=15 {
                for no_context in [false, true] {
                    let (mut sender, mut receiver) = pair(params(no_context, bits));
                    for size in [0usize, 1, 100, 5000, 200_000] {
                        let payload: Vec<u8> = (0..size).map(|i| (i % 7) as u8 + b'a').collect();
                        let (rsv, wire) = sender
                            .encode(OpCode::Binary, Bytes::from(payload.clone()))
                            .unwrap();
                        let back = receiver.decode(OpCode::Binary, rsv, wire, 1 << 30).unwrap();
                        assert_eq!(
                            back.len(),
                            payload.len(),
                            "bits {bits} no_context {no_context} size {size}"
                        );
                        assert_eq!(&back[..], &payload[..]);
                    }
                }
            }
        }

        #[test]
        fn context_takeover_makes_repeats_smaller() {
            let (mut sender, _) = pair(params(false, 15));
            let msg =
                Bytes::from_static(b"a fairly repetitive message, a fairly repetitive message");
            let first = sender.encode(OpCode::Text, msg.clone()).unwrap().1;
            let second = sender.encode(OpCode::Text, msg).unwrap().1;
            assert!(second.len() < first.len());
        }

        #[test]
        fn standalone_compression_matches_no_context_takeover() {
            let payload = b"broadcast me to a thousand sessions".repeat(10);
            let once = compress_standalone(6, 15, &payload).unwrap();
            let mut receiver = DeflateExtension::new(Deflate::default(), params(true, 15));
            let back = receiver
                .decode(OpCode::Text, Rsv::RSV1, once, 1 << 20)
                .unwrap();
            assert_eq!(&back[..], &payload[..]);
        }

        #[test]
        fn small_messages_and_window_8_stay_uncompressed() {
            let mut ext = DeflateExtension::new(Deflate::default(), params(false, 15));
            let (rsv, _) = ext
                .encode(OpCode::Text, Bytes::from_static(b"tiny"))
                .unwrap();
            assert_eq!(rsv, Rsv::NONE);
            let mut eight = DeflateExtension::new(
                Deflate::default().compress_if_bigger_than(0),
                params(false, 8),
            );
            let (rsv, _) = eight
                .encode(OpCode::Text, Bytes::from(vec![b'x'; 1000]))
                .unwrap();
            assert_eq!(rsv, Rsv::NONE);
        }

        #[test]
        fn predicate_decides_per_message() {
            let config = Deflate::default()
                .compress_if_bigger_than(0)
                .compress_if(|op, _| op == OpCode::Text);
            let mut ext = DeflateExtension::new(config, params(false, 15));
            assert_eq!(
                ext.encode(OpCode::Text, Bytes::from_static(b"some text"))
                    .unwrap()
                    .0,
                Rsv::RSV1
            );
            assert_eq!(
                ext.encode(OpCode::Binary, Bytes::from_static(b"some data"))
                    .unwrap()
                    .0,
                Rsv::NONE
            );
        }

        /// Ktor's `compressIf`: the conditions are ANDed.
        #[test]
        fn predicates_combine_with_and() {
            let config = Deflate::default()
                .compress_if_bigger_than(0)
                .compress_if(|op, _| op == OpCode::Text)
                .compress_if(|_, payload| payload.starts_with(b"z"));
            let mut ext = DeflateExtension::new(config, params(false, 15));
            let mut rsv =
                |op, bytes: &'static [u8]| ext.encode(op, Bytes::from_static(bytes)).unwrap().0;
            assert_eq!(rsv(OpCode::Text, b"zzzz text"), Rsv::RSV1);
            assert_eq!(rsv(OpCode::Text, b"text"), Rsv::NONE);
            assert_eq!(rsv(OpCode::Binary, b"zzzz data"), Rsv::NONE);
        }

        /// A predicate keeps compress-once broadcasting: sessions of one
        /// configuration share an encoding (equal keys) that applies the
        /// predicate; another configuration's predicate is another encoding.
        #[test]
        fn a_predicate_keeps_a_shared_encoding_per_configuration() {
            let config = Deflate::default()
                .compress_if_bigger_than(0)
                .compress_if(|op, _| op == OpCode::Text);
            let one = DeflateExtension::new(config.clone(), params(true, 15));
            let two = DeflateExtension::new(config, params(true, 15));
            let other = DeflateExtension::new(
                Deflate::default()
                    .compress_if_bigger_than(0)
                    .compress_if(|op, _| op == OpCode::Text),
                params(true, 15),
            );
            let shared = one
                .shared_encoding()
                .expect("still shared with a predicate");
            assert_eq!(Some(&shared), two.shared_encoding().as_ref());
            assert_ne!(Some(&shared), other.shared_encoding().as_ref());
            assert_eq!(
                shared.encode(OpCode::Text, b"some text").unwrap().0,
                Rsv::RSV1
            );
            assert_eq!(
                shared.encode(OpCode::Binary, b"some data").unwrap().0,
                Rsv::NONE
            );
        }

        #[test]
        fn bomb_fails_with_1009_before_inflating_it_all() {
            let payload = vec![0u8; 50 << 20];
            let bomb = compress_standalone(9, 15, &payload).unwrap();
            assert!(bomb.len() < 100 << 10, "{} bytes", bomb.len());
            let mut receiver = DeflateExtension::new(Deflate::default(), params(false, 15));
            let err = receiver
                .decode(OpCode::Binary, Rsv::RSV1, bomb, 1 << 20)
                .unwrap_err();
            assert!(matches!(err, ProtocolError::MessageTooBig { max, .. } if max == 1 << 20));
            assert_eq!(err.close_code().0, 1009);
        }

        /// Inflates `payload` with a fresh raw decompressor, returning the
        /// result and how many bytes zlib produced in all.
        fn inflate_counting(payload: &[u8], max: u64) -> (Result<Bytes, ProtocolError>, u64) {
            let mut decompressor = Decompress::new_with_window_bits(false, 15);
            let result = inflate_message(&mut decompressor, payload, max);
            (result, decompressor.total_out())
        }

        #[test]
        fn bomb_inflation_stops_at_the_limit() {
            // 50 MiB of zeros in well under 100 KiB: only the limit plus the
            // one byte that shows it is passed may ever be produced.
            let bomb = compress_standalone(9, 15, &vec![0u8; 50 << 20]).unwrap();
            for max in [1u64, 1000, 64 << 10, (64 << 10) + 1, 1 << 20, 3 << 20] {
                let (result, produced) = inflate_counting(&bomb, max);
                let err = result.unwrap_err();
                assert_eq!(err.close_code().0, 1009, "max {max}");
                let ProtocolError::MessageTooBig {
                    size,
                    max: reported,
                } = err
                else {
                    panic!("max {max}: {err:?}");
                };
                assert_eq!(reported, max);
                assert_eq!(size, max + 1, "max {max}: reported size");
                assert_eq!(
                    produced,
                    max + 1,
                    "max {max}: zlib produced {produced} bytes"
                );
            }
        }

        #[test]
        fn limit_is_exact_for_messages_around_it() {
            // Random-looking bytes so the compressed form is not tiny and the
            // input is fed over several inflate calls.
            let mut x = 0x2545_f491_u32;
            let payload: Vec<u8> = (0..300_000)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    b'a' + (x % 4) as u8
                })
                .collect();
            for len in [1usize, 125, 65_535, 65_536, 65_537, 200_000, 300_000] {
                let wire = compress_standalone(6, 15, &payload[..len]).unwrap();
                let max = len as u64;
                let (ok, _) = inflate_counting(&wire, max);
                assert_eq!(
                    &ok.unwrap()[..],
                    &payload[..len],
                    "len {len} at its own limit"
                );
                let (err, produced) = inflate_counting(&wire, max - 1);
                let err = err.unwrap_err();
                assert!(
                    matches!(err, ProtocolError::MessageTooBig { size, max: m } if size == max && m == max - 1),
                    "len {len} over a limit one byte short: {err:?}"
                );
                assert_eq!(produced, max, "len {len}");
            }
        }

        #[test]
        fn limit_holds_with_context_takeover_across_messages() {
            // The second message's count starts at its own first byte, not at
            // the stream's: one under the limit each, two in a row pass.
            let (mut sender, mut receiver) = pair(params(false, 15));
            let msg = Bytes::from(vec![b'z'; 10_000]);
            for _ in 0..2 {
                let (rsv, wire) = sender.encode(OpCode::Binary, msg.clone()).unwrap();
                let back = receiver.decode(OpCode::Binary, rsv, wire, 10_000).unwrap();
                assert_eq!(back.len(), 10_000);
            }
            let (rsv, wire) = sender
                .encode(OpCode::Binary, Bytes::from(vec![b'z'; 10_001]))
                .unwrap();
            let err = receiver
                .decode(OpCode::Binary, rsv, wire, 10_000)
                .unwrap_err();
            assert_eq!(err.close_code().0, 1009);
        }

        #[test]
        fn corrupt_data_fails_with_1007() {
            let mut receiver = DeflateExtension::new(Deflate::default(), params(false, 15));
            let err = receiver
                .decode(
                    OpCode::Binary,
                    Rsv::RSV1,
                    Bytes::from_static(&[0xff, 0xff, 0xff, 0x00, 0x12]),
                    1 << 20,
                )
                .unwrap_err();
            assert_eq!(err.close_code().0, 1007);
        }
    }
}
