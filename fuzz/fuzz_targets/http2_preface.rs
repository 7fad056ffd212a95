//! How a clear-text connection is told to be HTTP/2 or HTTP/1.1 (RFC 9113
//! §3.4), by `duplex::fuzzing::sniff_preface` on the bytes read so far,
//! fed as the accept path sees them: growing, a chunk at a time.
//!
//! Checks: a verdict, once given, is the same for every longer input (the
//! server never has to take it back); HTTP/2 exactly when the first four
//! bytes are the preface's ("PRI "); more is asked for only while fewer
//! than four bytes have come and they agree with it; an HTTP/1.1 request
//! line (a method token other than the reserved PRI, and a space) is never
//! taken for HTTP/2.
#![no_main]

use duplex::fuzzing::{Preface, sniff_preface};
use libfuzzer_sys::fuzz_target;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fuzz_target!(|data: &[u8]| {
    // Byte 0 picks the chunk size, so that every split is reached.
    let Some((&chunk, bytes)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk % 8) + 1;
    let agrees = |b: &[u8]| {
        let n = b.len().min(4);
        b[..n] == PREFACE[..n]
    };
    let mut first_verdict = None;
    let mut end = 0;
    loop {
        let seen = &bytes[..end];
        let verdict = sniff_preface(seen);
        match verdict {
            Preface::Http2 => assert!(agrees(seen) && seen.len() >= 4, "{seen:?}"),
            Preface::Http1 => assert!(!agrees(seen), "{seen:?}"),
            Preface::NeedMore => assert!(agrees(seen) && seen.len() < 4, "{seen:?}"),
        }
        if let Some(first) = first_verdict {
            assert_eq!(verdict, first, "a verdict changed at {end} bytes");
        } else if verdict != Preface::NeedMore {
            first_verdict = Some(verdict);
        }
        if end == bytes.len() {
            break;
        }
        end = (end + chunk).min(bytes.len());
    }
    // "METHOD " with a token method is an HTTP/1.1 request.
    if let Some(space) = bytes.iter().position(|&b| b == b' ')
        && space > 0
        && bytes[..space].iter().all(u8::is_ascii_uppercase)
        && &bytes[..space] != b"PRI"
    {
        assert_eq!(sniff_preface(bytes), Preface::Http1);
    }
});
