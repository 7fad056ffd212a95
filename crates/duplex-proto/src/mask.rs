//! Masking (RFC 6455 §5.3): XOR of the payload with a 4-byte key.
//!
//! Every client-to-server payload byte passes through here, so the loop works
//! eight bytes at a time on a key widened to a `u64`, which the compiler
//! turns into SIMD; only the last few bytes go one at a time.

/// XORs `buf` in place with `key`, as if `buf` began `offset` bytes into the
/// masked payload.
///
/// Masking is its own inverse, so the same call masks and unmasks. The
/// `offset` lets a frame that arrives in pieces be unmasked piece by piece.
///
/// ```
/// let key = [1, 2, 3, 4];
/// let mut whole = *b"hello world";
/// duplex_proto::apply_mask(&mut whole, key, 0);
/// let mut split = *b"hello world";
/// let (a, b) = split.split_at_mut(5);
/// duplex_proto::apply_mask(a, key, 0);
/// duplex_proto::apply_mask(b, key, 5);
/// assert_eq!(whole, split);
/// ```
#[inline]
pub fn apply_mask(buf: &mut [u8], key: [u8; 4], offset: usize) {
    let key = rotate_key(key, offset);
    let (words, rest) = buf.as_chunks_mut::<8>();
    if !words.is_empty() {
        let wide = u64::from_ne_bytes([
            key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
        ]);
        for word in words {
            *word = (u64::from_ne_bytes(*word) ^ wide).to_ne_bytes();
        }
    }
    // Each word is 8 bytes, a multiple of the key length, so the tail starts
    // at key position 0 again.
    for (byte, k) in rest.iter_mut().zip(key.iter().cycle()) {
        *byte ^= k;
    }
}

/// The key as seen from `offset` bytes into the payload.
#[inline]
fn rotate_key(key: [u8; 4], offset: usize) -> [u8; 4] {
    let mut rotated = key;
    rotated.rotate_left(offset % 4);
    rotated
}

/// The reference byte loop the fast path must equal.
#[cfg(test)]
fn apply_mask_bytewise(buf: &mut [u8], key: [u8; 4], offset: usize) {
    for (i, byte) in buf.iter_mut().enumerate() {
        *byte ^= key[(offset + i) % 4];
    }
}

#[cfg(test)]
mod rfc6455_5_3_masking {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 + 7) as u8).collect()
    }

    #[test]
    fn word_loop_equals_byte_loop_for_every_length_and_offset() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0..=130 {
            for offset in 0..8 {
                // Start the slice at every alignment too, so unaligned loads are covered.
                for align in 0..8 {
                    let mut fast = sample(len + align);
                    let mut slow = fast.clone();
                    apply_mask(&mut fast[align..], key, offset);
                    apply_mask_bytewise(&mut slow[align..], key, offset);
                    assert_eq!(fast, slow, "len {len} offset {offset} align {align}");
                }
            }
        }
    }

    #[test]
    fn masking_twice_restores_the_payload() {
        let original = sample(1000);
        let mut data = original.clone();
        apply_mask(&mut data, [9, 8, 7, 6], 3);
        assert_ne!(data, original);
        apply_mask(&mut data, [9, 8, 7, 6], 3);
        assert_eq!(data, original);
    }

    #[test]
    fn split_unmasking_equals_whole_unmasking() {
        let key = [0xde, 0xad, 0xbe, 0xef];
        for cut in 0..=70 {
            let mut whole = sample(70);
            let mut pieces = whole.clone();
            apply_mask(&mut whole, key, 0);
            let (a, b) = pieces.split_at_mut(cut);
            apply_mask(a, key, 0);
            apply_mask(b, key, cut);
            assert_eq!(whole, pieces, "cut at {cut}");
        }
    }

    #[test]
    fn rfc_example_hello() {
        // RFC 6455 §5.7: "Hello" masked with 37 fa 21 3d.
        let mut data = *b"Hello";
        apply_mask(&mut data, [0x37, 0xfa, 0x21, 0x3d], 0);
        assert_eq!(data, [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }
}
