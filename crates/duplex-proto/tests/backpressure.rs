//! Input stops being consumed, inside a single input buffer, once the
//! inbox (events waiting for the user, decompressed bytes included) or the
//! outbox (the write queue, Pongs included) reaches its bound; the rest
//! stays in the buffer and is consumed, in order and with nothing lost,
//! once the user has taken events or the queue has been written.

use std::time::Instant;

use bytes::BytesMut;
use duplex_proto::{Config, Connection, Role, apply_mask};
#[cfg(feature = "deflate")]
use duplex_proto::{
    Deflate, Event, ExtensionFactory, ExtensionOffer, Message, PERMESSAGE_DEFLATE,
    compress_standalone,
};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A masked frame as a client sends it (payloads under 64 KiB).
fn client_frame(rsv1: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0x80 | if rsv1 { 0x40 } else { 0 } | opcode];
    match payload.len() {
        n @ 0..=125 => out.push(0x80 | n as u8),
        n => {
            out.push(0x80 | 126);
            out.extend_from_slice(&u16::try_from(n).unwrap().to_be_bytes());
        }
    }
    out.extend_from_slice(&KEY);
    let mut body = payload.to_vec();
    apply_mask(&mut body, KEY, 0);
    out.extend_from_slice(&body);
    out
}

fn server(config: impl FnOnce(&mut Config)) -> Connection {
    let mut c = Config::new(Role::Server);
    config(&mut c);
    Connection::new(c, Instant::now())
}

#[test]
fn rfc6455_5_5_2_pongs_for_a_ping_flood_stop_at_the_output_bound() {
    const BOUND: usize = 4096;
    let mut conn = server(|c| c.max_queued_output = BOUND);
    let ping = client_frame(false, 0x9, &[b'p'; 125]);
    let mut input = BytesMut::from(&ping.repeat(1000)[..]);
    conn.handle_input(Instant::now(), &mut input);
    // One Pong (127 bytes) may cross the bound: it is checked per frame.
    assert!(conn.outbox_full());
    assert!(
        conn.write_queue_len() < BOUND + 127,
        "{} bytes queued for a {BOUND}-byte bound",
        conn.write_queue_len()
    );
    let left = input.len();
    assert!(
        left > 0 && left % ping.len() == 0,
        "whole Pings stay unread"
    );
    // Feeding again changes nothing until the queue is written.
    conn.handle_input(Instant::now(), &mut input);
    assert_eq!(input.len(), left);
    // The peer reads: every Ping gets its Pong in the end.
    let mut pongs = 0;
    while !input.is_empty() || conn.write_queue_len() > 0 {
        pongs += count_frames(conn.write_queue());
        conn.handle_input(Instant::now(), &mut input);
    }
    assert_eq!(pongs, 1000);
}

/// Writes the whole queue out and counts its (unmasked, short) frames.
fn count_frames(queue: &mut duplex_proto::WriteQueue) -> usize {
    let mut bytes = Vec::new();
    while !queue.is_empty() {
        let chunk = queue.chunk().to_vec();
        queue.advance(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    let mut at = 0;
    let mut n = 0;
    while at < bytes.len() {
        assert_eq!(bytes[at], 0x8a, "a final Pong");
        at += 2 + usize::from(bytes[at + 1] & 0x7f);
        n += 1;
    }
    n
}

#[cfg(feature = "deflate")]
#[test]
fn rfc7692_inflated_bytes_stop_input_at_the_inbox_bound() {
    const BOUND: usize = 1 << 20;
    const INFLATED: usize = 64 * 1024;
    let mut conn = server(|c| c.max_pending_bytes = BOUND);
    let negotiated = Deflate::default()
        .negotiate(&[&ExtensionOffer::new(PERMESSAGE_DEFLATE)])
        .unwrap();
    conn.set_extensions(vec![negotiated.extension]);
    let compressed = compress_standalone(9, 15, &vec![0u8; INFLATED]).unwrap();
    let one = client_frame(true, 0x2, &compressed);
    let messages = 1000;
    let mut input = BytesMut::from(&one.repeat(messages)[..]);
    conn.handle_input(Instant::now(), &mut input);
    let (count, bytes) = conn.pending_events();
    assert!(conn.inbox_full());
    // The message that crossed the bound is the only one past it.
    assert!(
        bytes < BOUND + INFLATED,
        "{bytes} bytes inflated for a {BOUND}-byte bound"
    );
    assert_eq!(count, BOUND / INFLATED);
    assert_eq!(input.len(), (messages - count) * one.len());
    // Taking the events lets the rest through, in order, none lost.
    let mut taken = 0;
    loop {
        while let Some(event) = conn.poll_event() {
            let Event::Message(Message::Binary(data)) = event else {
                panic!("a binary message, got {event:?}");
            };
            assert_eq!(data.len(), INFLATED);
            taken += 1;
        }
        if input.is_empty() {
            break;
        }
        conn.handle_input(Instant::now(), &mut input);
    }
    assert_eq!(taken, messages);
}

#[test]
fn rfc6455_the_event_count_bounds_input_too() {
    let mut conn = server(|c| c.max_pending_events = 10);
    let mut input = BytesMut::from(&client_frame(false, 0x1, b"hi").repeat(100)[..]);
    conn.handle_input(Instant::now(), &mut input);
    assert_eq!(conn.pending_events().0, 10);
    assert_eq!(input.len(), 90 * 8);
}

/// The user's messages are held to `max_queued_output` as a whole: one
/// is queued while its frame fits in what is left; one larger than what is
/// left waits; one larger than the whole bound is let in only into an
/// empty queue, alone.
#[test]
fn a_message_is_queued_only_if_it_fits_in_what_is_left_of_the_output_bound() {
    use bytes::Bytes;
    use duplex_proto::{OpCode, Rsv};
    const BOUND: usize = 64 << 10;
    let mut conn = server(|c| c.max_queued_output = BOUND);
    assert!(
        conn.outbox_has_room_for(10 * BOUND),
        "an empty queue takes anything"
    );
    assert_eq!(
        (
            conn.frame_len(125),
            conn.frame_len(40 << 10),
            conn.frame_len(1 << 16)
        ),
        (127, 4 + (40 << 10), 10 + (1 << 16))
    );
    conn.send_data(OpCode::Binary, Rsv::NONE, Bytes::from(vec![1u8; 40 << 10]))
        .unwrap();
    let queued = conn.write_queue_len();
    assert_eq!(queued, conn.frame_len(40 << 10));
    assert!(!conn.outbox_full(), "under the bound");
    let left = BOUND - queued;
    assert!(conn.outbox_has_room_for(conn.frame_len(left - 4)));
    assert!(
        !conn.outbox_has_room_for(conn.frame_len(left - 3)),
        "one byte too many"
    );
    assert!(!conn.outbox_has_room_for(10 * BOUND));
    // Written: the large one is let in, alone.
    let queue = conn.write_queue();
    while !queue.is_empty() {
        let n = queue.chunk().len();
        queue.advance(n);
    }
    assert!(conn.outbox_has_room_for(conn.frame_len(10 * BOUND)));
    conn.send_data(
        OpCode::Binary,
        Rsv::NONE,
        Bytes::from(vec![2u8; 10 * BOUND]),
    )
    .unwrap();
    assert!(!conn.outbox_has_room_for(2), "nothing more while it waits");
}
