//! permessage-deflate's decode on arbitrary compressed messages with a small
//! output limit, one extension across several messages (context takeover),
//! and a round trip of arbitrary text through encode and decode.
//!
//! Checks: the output never passes the limit; a failure is 1009 when the
//! output would pass it and 1007 otherwise; what encode made decodes back
//! to the same bytes.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use duplex_proto::{
    Deflate, Extension, ExtensionFactory, OpCode, ProtocolError, Rsv, parse_extensions,
};

#[derive(Debug, Arbitrary)]
struct Input {
    client_no_context_takeover: bool,
    /// The output limit, kept small so bombs are cheap to find.
    max_size: u16,
    messages: Vec<Vec<u8>>,
    /// Compressed by a server-side extension, then inflated.
    round_trip: Vec<u8>,
}

fn extension(config: Deflate, offer: &str) -> Box<dyn Extension> {
    let offers = parse_extensions(offer).expect("valid offer");
    let refs: Vec<_> = offers.iter().collect();
    config.negotiate(&refs).expect("accepted").extension
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(input) = Input::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    let offer = if input.client_no_context_takeover {
        "permessage-deflate; client_no_context_takeover"
    } else {
        "permessage-deflate"
    };
    let max = u64::from(input.max_size % 8192);
    let mut inflater = extension(Deflate::default(), offer);
    for message in input.messages.iter().take(8) {
        let payload = Bytes::copy_from_slice(message);
        match inflater.decode(OpCode::Binary, Rsv::RSV1, payload, max) {
            Ok(out) => assert!(out.len() as u64 <= max, "{} bytes over {max}", out.len()),
            Err(err @ ProtocolError::MessageTooBig { size, max: limit }) => {
                assert_eq!(limit, max);
                assert!(size > max, "{err}");
                assert_eq!(err.close_code().0, 1009);
            }
            Err(err @ ProtocolError::ExtensionData(_)) => {
                assert_eq!(err.close_code().0, 1007);
                // The context is broken now: a real connection fails here.
                break;
            }
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    // The server compresses, a fresh extension of the same agreement
    // inflates: what went in comes out.
    let mut deflater = extension(Deflate::default().compress_if_bigger_than(0), offer);
    let mut receiver = extension(Deflate::default(), offer);
    let payload = Bytes::from(input.round_trip);
    let (rsv, wire) = deflater
        .encode(OpCode::Binary, payload.clone())
        .expect("compression never fails");
    let limit = payload.len() as u64;
    let back = receiver
        .decode(OpCode::Binary, rsv, wire.clone(), limit)
        .expect("our own compression inflates");
    assert_eq!(back, payload);
    if limit > 0 {
        let mut receiver = extension(Deflate::default(), offer);
        let err = receiver
            .decode(OpCode::Binary, rsv, wire, limit - 1)
            .expect_err("one byte over the limit");
        assert_eq!(err.close_code().0, 1009);
    }
});
