//! `Connection::handle_input` in the client role on arbitrary bytes: the
//! first byte picks the mode, permessage-deflate and the limits, the second
//! the chunking (see `duplex_fuzz::run_connection`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    duplex_fuzz::run_connection(duplex_proto::Role::Client, data);
});
