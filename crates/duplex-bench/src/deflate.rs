//! permessage-deflate (RFC 7692) for the load generator, written against
//! flate2 alone so that it checks the server's compression instead of
//! sharing its code: the offer a browser makes, the response's parameters,
//! and a compressor and decompressor that follow them.

use std::io;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// The offer Chromium makes, as an upgrade request header line.
pub const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// The four octets a sync flush ends with, removed from every message
/// (§7.2.1) and put back before inflating (§7.2.2).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// What the server's response agreed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The server compresses every message on its own (no shared context).
    pub server_no_context_takeover: bool,
    /// The client must compress every message on its own.
    pub client_no_context_takeover: bool,
    /// The window the client may use, in bits.
    pub client_max_window_bits: u8,
}

impl Params {
    /// The permessage-deflate parameters of a response's
    /// `Sec-WebSocket-Extensions` value; `None` if it did not accept the
    /// extension.
    ///
    /// # Errors
    /// A parameter the offer did not allow or cannot be followed (a client
    /// window of 8 bits, which zlib cannot produce raw).
    pub fn from_response(extensions: Option<&str>) -> io::Result<Option<Params>> {
        let Some(value) = extensions else {
            return Ok(None);
        };
        let Some(deflate) = value.split(',').map(str::trim).find(|e| {
            e.split(';')
                .next()
                .is_some_and(|n| n.trim().eq_ignore_ascii_case("permessage-deflate"))
        }) else {
            return Ok(None);
        };
        let mut params = Params {
            server_no_context_takeover: false,
            client_no_context_takeover: false,
            client_max_window_bits: 15,
        };
        for param in deflate.split(';').skip(1) {
            let (name, value) = match param.split_once('=') {
                Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
                None => (param.trim(), None),
            };
            let bits = || {
                value
                    .and_then(|v| v.parse::<u8>().ok())
                    .filter(|b| (8..=15).contains(b))
                    .ok_or_else(|| io::Error::other(format!("bad {name} in {deflate:?}")))
            };
            match name.to_ascii_lowercase().as_str() {
                "server_no_context_takeover" => params.server_no_context_takeover = true,
                "client_no_context_takeover" => params.client_no_context_takeover = true,
                "server_max_window_bits" => {
                    bits()?;
                }
                "client_max_window_bits" => params.client_max_window_bits = bits()?,
                _ => {
                    return Err(io::Error::other(format!(
                        "unknown permessage-deflate parameter in {deflate:?}"
                    )));
                }
            }
        }
        if params.client_max_window_bits < 9 {
            return Err(io::Error::other(
                "client_max_window_bits=8: zlib cannot compress with a raw 8-bit window",
            ));
        }
        Ok(Some(params))
    }
}

/// The client's compressor, honouring `client_no_context_takeover` and
/// `client_max_window_bits`.
pub struct Deflater {
    compress: Compress,
    reset_each: bool,
}

impl Deflater {
    /// A compressor at `level` (0-9) for the agreed `params`.
    pub fn new(params: &Params, level: u32) -> Self {
        Deflater {
            compress: Compress::new_with_window_bits(
                Compression::new(level.min(9)),
                false,
                params.client_max_window_bits,
            ),
            reset_each: params.client_no_context_takeover,
        }
    }

    /// One message's compressed payload, its flush tail removed.
    ///
    /// # Errors
    /// zlib failed.
    pub fn compress(&mut self, payload: &[u8]) -> io::Result<Vec<u8>> {
        if self.reset_each {
            self.compress.reset();
        }
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let start = self.compress.total_in();
        loop {
            let consumed = (self.compress.total_in() - start) as usize;
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(1024));
            }
            self.compress
                .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .map_err(io::Error::other)?;
            let done = (self.compress.total_in() - start) as usize == payload.len();
            // Room left in the output means the flush finished.
            if done && out.len() < out.capacity() {
                break;
            }
        }
        if !out.ends_with(&TAIL) {
            return Err(io::Error::other("a sync flush without its tail"));
        }
        out.truncate(out.len() - TAIL.len());
        Ok(out)
    }
}

/// The client's decompressor: standalone per message when the server
/// keeps no context, one stream over the connection's messages otherwise.
pub struct Inflater {
    decompress: Decompress,
    reset_each: bool,
}

impl Inflater {
    /// A decompressor for the agreed `params`.
    pub fn new(params: &Params) -> Self {
        Inflater {
            // A 15-bit window inflates what any smaller one produced.
            decompress: Decompress::new_with_window_bits(false, 15),
            reset_each: params.server_no_context_takeover,
        }
    }

    /// Inflates one compressed message of at most `max` bytes.
    ///
    /// # Errors
    /// Not valid DEFLATE, or larger than `max`.
    pub fn inflate(&mut self, payload: &[u8], max: usize) -> io::Result<Vec<u8>> {
        if self.reset_each {
            self.decompress.reset(false);
        }
        let mut out = Vec::with_capacity(max.min(64 << 10));
        for input in [payload, &TAIL[..]] {
            let start = self.decompress.total_in();
            loop {
                let consumed = (self.decompress.total_in() - start) as usize;
                if consumed == input.len() {
                    break;
                }
                // The last bytes of input may produce nothing: only output
                // past `max` fails.
                if out.len() > max {
                    return Err(io::Error::other(format!("inflates past {max} bytes")));
                }
                if out.capacity() == out.len() {
                    out.reserve(out.capacity().max(1024));
                }
                let status = self
                    .decompress
                    .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                    .map_err(|e| io::Error::other(format!("bad DEFLATE data: {e}")))?;
                if status == Status::StreamEnd {
                    return Err(io::Error::other("a final block inside a message"));
                }
            }
        }
        if out.len() > max {
            return Err(io::Error::other(format!("inflates past {max} bytes")));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(response: &str) -> Params {
        Params::from_response(Some(response)).unwrap().unwrap()
    }

    #[test]
    fn response_parameters() {
        assert_eq!(Params::from_response(None).unwrap(), None);
        assert_eq!(Params::from_response(Some("x-other")).unwrap(), None);
        let p = params(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=10",
        );
        assert!(p.server_no_context_takeover && p.client_no_context_takeover);
        assert_eq!(p.client_max_window_bits, 10);
        assert_eq!(params("permessage-deflate").client_max_window_bits, 15);
        assert!(
            Params::from_response(Some("permessage-deflate; client_max_window_bits=8")).is_err()
        );
        assert!(
            Params::from_response(Some("permessage-deflate; client_max_window_bits=16")).is_err()
        );
        assert!(Params::from_response(Some("permessage-deflate; foo")).is_err());
    }

    #[test]
    fn round_trips_with_and_without_context() {
        let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog "
            .repeat(100)
            .to_vec();
        for response in [
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; client_max_window_bits=9",
        ] {
            let p = params(response);
            // Both directions are ours here: the client's output as if the
            // server had sent it with the same context rule.
            let mirrored = Params {
                server_no_context_takeover: p.client_no_context_takeover,
                ..p
            };
            let (mut d, mut i) = (Deflater::new(&p, 1), Inflater::new(&mirrored));
            let mut sizes = Vec::new();
            for _ in 0..3 {
                let c = d.compress(&text).unwrap();
                assert!(c.len() < text.len() / 4, "{response}: {} bytes", c.len());
                sizes.push(c.len());
                assert_eq!(i.inflate(&c, 1 << 20).unwrap(), text);
            }
            // With context kept, repeats compress to a back-reference.
            if p.client_no_context_takeover {
                assert_eq!(sizes[0], sizes[2]);
            } else {
                assert!(sizes[2] < sizes[0], "{sizes:?}");
            }
            assert!(i.inflate(&d.compress(&text).unwrap(), 100).is_err());
            // Exactly at the limit is not past it.
            let mut i = Inflater::new(&Params {
                server_no_context_takeover: true,
                ..p
            });
            let mut d = Deflater::new(
                &Params {
                    client_no_context_takeover: true,
                    ..p
                },
                1,
            );
            assert_eq!(
                i.inflate(&d.compress(&text).unwrap(), text.len()).unwrap(),
                text
            );
        }
        let p = params("permessage-deflate");
        assert!(Inflater::new(&p).inflate(&[0xff; 16], 1 << 20).is_err());
    }
}
