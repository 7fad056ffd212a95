//! `parse_extensions` and `negotiate` with permessage-deflate factories on
//! arbitrary header values.
//!
//! Checks: a parsed header prints back to the same offers; a negotiated
//! answer parses, would itself be accepted, and keeps to what the offer it
//! answers allowed (RFC 7692 §7.1).
#![no_main]

use std::sync::{Arc, OnceLock};

use duplex_proto::{
    Deflate, ExtensionFactory, ExtensionOffer, PERMESSAGE_DEFLATE, negotiate, parse_extensions,
};

fn factories() -> &'static [Vec<Arc<dyn ExtensionFactory>>] {
    static FACTORIES: OnceLock<Vec<Vec<Arc<dyn ExtensionFactory>>>> = OnceLock::new();
    FACTORIES.get_or_init(|| {
        vec![
            vec![Arc::new(Deflate::default())],
            vec![Arc::new(
                Deflate::default()
                    .server_max_window_bits(10)
                    .client_max_window_bits(9)
                    .client_no_context_takeover(true),
            )],
        ]
    })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn param<'a>(offer: &'a ExtensionOffer, name: &str) -> Option<Option<&'a str>> {
    offer
        .params
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_deref())
}

fn bits(value: Option<&str>) -> u8 {
    let value = value.expect("window bits with a value");
    let bits: u8 = value.parse().expect("window bits are a number");
    assert!((8..=15).contains(&bits), "window bits {bits}");
    bits
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(offers) = parse_extensions(header) else {
        return;
    };
    for offer in &offers {
        assert!(is_token(&offer.name), "name {:?}", offer.name);
        for (name, value) in &offer.params {
            assert!(is_token(name), "parameter {name:?}");
            assert!(value.as_deref().is_none_or(is_token), "value {value:?}");
        }
        let printed = offer.to_string();
        assert_eq!(
            parse_extensions(&printed).as_deref(),
            Ok(std::slice::from_ref(offer)),
            "{printed}"
        );
    }
    for factories in factories() {
        let negotiated = negotiate(factories, &offers);
        assert!(negotiated.len() <= 1);
        let Some(negotiated) = negotiated.first() else {
            continue;
        };
        let response = &negotiated.response;
        assert_eq!(response.name, PERMESSAGE_DEFLATE);
        assert_eq!(
            parse_extensions(&response.to_string()).as_deref(),
            Ok(std::slice::from_ref(response))
        );
        // The offer answered is the first one accepted on its own.
        let answered = offers
            .iter()
            .find(|o| !negotiate(factories, std::slice::from_ref(*o)).is_empty())
            .expect("an accepted offer");
        assert_eq!(answered.name, PERMESSAGE_DEFLATE);
        for flag in ["server_no_context_takeover", "client_no_context_takeover"] {
            if param(answered, flag).is_some() {
                assert_eq!(param(response, flag), Some(None), "{flag} not echoed");
            }
        }
        // §7.1.2.1: our window may not pass what the client asked for.
        if let Some(asked) = param(answered, "server_max_window_bits") {
            let answer = param(response, "server_max_window_bits").expect("window answered");
            assert!(bits(answer) <= bits(asked));
        }
        // §7.1.2.2: the client's window is limited only if it allows it,
        // and never above a value it named.
        if let Some(limit) = param(response, "client_max_window_bits") {
            let allowed = param(answered, "client_max_window_bits")
                .expect("client_max_window_bits answered but not offered");
            if allowed.is_some() {
                assert!(bits(limit) <= bits(allowed));
            } else {
                bits(limit);
            }
        }
        // The answer is an offer the same server accepts.
        let again = negotiate(factories, std::slice::from_ref(response));
        assert_eq!(again.len(), 1, "answer {response} declined");
    }
});
