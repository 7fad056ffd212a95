//! The bytes waiting to be written to the socket.
//!
//! Small frames are copied into one growing buffer, so that every reply made
//! while handling one read leaves in one write. Large payloads are not copied:
//! their `Bytes` queue behind their header and go out in a vectored write.

use std::{collections::VecDeque, io::IoSlice};

use bytes::{Buf, Bytes};

use crate::{
    frame::{FrameHeader, MAX_HEADER_LEN},
    mask::apply_mask,
};

/// Payloads up to this size are copied next to their header; larger ones
/// are queued by reference. A copy of a few KiB costs less than an extra
/// `iovec`, and a copy of a megabyte costs more.
const COPY_THRESHOLD: usize = 4096;

/// An emptied queue keeps a write buffer of at most this capacity for the
/// next frames; a larger one is released.
const KEEP_TAIL: usize = 256;

/// A queue of frames in wire form.
#[derive(Debug, Default)]
pub struct WriteQueue {
    /// Frozen chunks, in order, before `tail`.
    chunks: VecDeque<Bytes>,
    /// The buffer still being filled with small frames; its first `head`
    /// bytes are written.
    tail: Vec<u8>,
    head: usize,
    /// Bytes queued in all, `tail` included.
    len: usize,
    /// Bytes written since the queue was made.
    written: u64,
}

impl WriteQueue {
    /// An empty queue; it allocates on first use.
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes waiting to be written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Bytes written (passed to [`advance`](Self::advance)) since the
    /// queue was made: with [`len`](Self::len), where a frame queued now
    /// will end in the stream, and whether the peer has been sent it yet.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a frame: its header, then its payload, masked with `header.mask`
    /// if set.
    pub fn push_frame(&mut self, header: &FrameHeader, payload: Bytes) {
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header.encode(&mut head);
        self.len += head_len + payload.len();
        self.compact();
        match header.mask {
            Some(key) => {
                self.tail.reserve(head_len + payload.len());
                self.tail.extend_from_slice(&head[..head_len]);
                let start = self.tail.len();
                self.tail.extend_from_slice(&payload);
                apply_mask(&mut self.tail[start..], key, 0);
            }
            None if payload.len() <= COPY_THRESHOLD => {
                self.tail.reserve(head_len + payload.len());
                self.tail.extend_from_slice(&head[..head_len]);
                self.tail.extend_from_slice(&payload);
            }
            None => {
                self.tail.extend_from_slice(&head[..head_len]);
                self.freeze_tail();
                self.chunks.push_back(payload);
            }
        }
    }

    /// Queues bytes already in wire form (a frame encoded once for many
    /// connections).
    pub fn push_encoded(&mut self, encoded: Bytes) {
        self.len += encoded.len();
        if encoded.len() <= COPY_THRESHOLD {
            self.compact();
            self.tail.extend_from_slice(&encoded);
        } else {
            self.freeze_tail();
            self.chunks.push_back(encoded);
        }
    }

    /// Moves the unwritten part of `tail` into `chunks`, without copying,
    /// so that a large payload can queue behind it.
    fn freeze_tail(&mut self) {
        if self.head < self.tail.len() {
            let tail = Bytes::from(std::mem::take(&mut self.tail));
            self.chunks.push_back(tail.slice(self.head..));
        } else {
            self.tail.clear();
        }
        self.head = 0;
    }

    /// Drops the written front of `tail` once it is at least half of it, so
    /// that a queue that never empties does not grow without bound.
    fn compact(&mut self) {
        if self.head > 0 && self.head * 2 >= self.tail.len() {
            self.tail.drain(..self.head);
            self.head = 0;
        }
    }

    /// Fills `dst` with the queued chunks in order and returns how many it
    /// filled.
    pub fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let parts = self
            .chunks
            .iter()
            .map(|b| &b[..])
            .chain(std::iter::once(&self.tail[self.head..]));
        for (slot, part) in dst.iter_mut().zip(parts.filter(|p| !p.is_empty())) {
            *slot = IoSlice::new(part);
            n += 1;
        }
        n
    }

    /// The first contiguous chunk.
    pub fn chunk(&self) -> &[u8] {
        self.chunks
            .iter()
            .map(|b| &b[..])
            .find(|b| !b.is_empty())
            .unwrap_or(&self.tail[self.head..])
    }

    /// Drops the first `n` bytes, which were written.
    pub fn advance(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        self.written += n as u64;
        while n > 0 {
            match self.chunks.front_mut() {
                Some(front) if front.len() <= n => {
                    n -= front.len();
                    self.chunks.pop_front();
                }
                Some(front) => {
                    front.advance(n);
                    return;
                }
                None => {
                    self.head += n;
                    break;
                }
            }
        }
        if self.len == 0 {
            self.head = 0;
            if self.tail.capacity() <= KEEP_TAIL {
                // A small buffer is kept for the next reply: allocating
                // one per message cost more than an echo's own work.
                self.tail.clear();
            } else {
                // A larger one goes back, so that an idle connection does
                // not hold it.
                self.tail = Vec::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{OpCode, Rsv};

    fn header(len: usize, mask: Option<[u8; 4]>) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv: Rsv::NONE,
            opcode: OpCode::Binary,
            mask,
            payload_len: len as u64,
        }
    }

    fn drain(q: &mut WriteQueue, step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while !q.is_empty() {
            let mut slices = [IoSlice::new(&[]); 8];
            let n = q.chunks_vectored(&mut slices);
            let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            let take = flat.len().min(step);
            out.extend_from_slice(&flat[..take]);
            q.advance(take);
        }
        out
    }

    #[test]
    fn small_and_large_frames_leave_in_order() {
        let mut q = WriteQueue::new();
        let small = Bytes::from(vec![1u8; 10]);
        let large = Bytes::from(vec![2u8; 10_000]);
        q.push_frame(&header(10, None), small.clone());
        q.push_frame(&header(10_000, None), large.clone());
        q.push_frame(&header(10, None), small.clone());
        let total = q.len();
        for step in [1, 7, 4096, usize::MAX] {
            let mut q2 = WriteQueue::new();
            q2.push_frame(&header(10, None), small.clone());
            q2.push_frame(&header(10_000, None), large.clone());
            q2.push_frame(&header(10, None), small.clone());
            let bytes = drain(&mut q2, step);
            assert_eq!(bytes.len(), total);
            assert_eq!(&bytes[..2], &[0x82, 10]);
            assert_eq!(&bytes[12..16], &[0x82, 126, 0x27, 0x10]);
            assert!(bytes[16..10_016].iter().all(|&b| b == 2));
        }
    }

    #[test]
    fn an_emptied_queue_keeps_a_small_buffer_and_releases_a_large_one() {
        // Whether the emptied queue still holds memory it can write into.
        fn holds_buffer(q: &mut WriteQueue) -> bool {
            q.tail.capacity() > 0
        }
        let mut q = WriteQueue::new();
        for _ in 0..3 {
            q.push_frame(&header(20, None), Bytes::from(vec![7u8; 20]));
            assert_eq!(drain(&mut q, 9).len(), 22);
            assert!(holds_buffer(&mut q), "the small reply buffer is kept");
        }
        q.push_frame(&header(3000, None), Bytes::from(vec![7u8; 3000]));
        assert_eq!(drain(&mut q, usize::MAX).len(), 3004);
        assert!(!holds_buffer(&mut q), "an idle queue holds no large buffer");
        // A queue that was split for a large payload starts over as well.
        q.push_frame(&header(20, None), Bytes::from(vec![7u8; 20]));
        q.push_frame(&header(10_000, None), Bytes::from(vec![8u8; 10_000]));
        drain(&mut q, usize::MAX);
        assert!(!holds_buffer(&mut q));
        q.push_frame(&header(20, None), Bytes::from(vec![7u8; 20]));
        drain(&mut q, usize::MAX);
        assert!(holds_buffer(&mut q));
    }

    #[test]
    fn a_queue_that_never_empties_stays_bounded_and_in_order() {
        let mut q = WriteQueue::new();
        let mut expected = Vec::new();
        let mut written = Vec::new();
        // Deterministic pseudo-random sizes and partial writes.
        let mut seed = 0x2545_f491_u32;
        let mut next = |bound: u32| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 8) % bound
        };
        for i in 0..5_000u32 {
            // Mostly small frames, which share the buffer; now and then a
            // large one, queued by reference.
            let size = match next(10) {
                _ if i % 1_000 == 999 => 5_000 + next(3_000) as usize,
                0..=2 => next(1_000) as usize,
                _ => next(60) as usize,
            };
            let fill = (i % 251) as u8;
            let mask = (next(4) == 0).then_some([1, 2, 3, 4]);
            let payload = vec![fill; size];
            let mut head = [0u8; MAX_HEADER_LEN];
            let head_len = header(size, mask).encode(&mut head);
            let mut wire = head[..head_len].to_vec();
            let mut body = payload.clone();
            if let Some(key) = mask {
                apply_mask(&mut body, key, 0);
            }
            wire.extend_from_slice(&body);
            expected.extend_from_slice(&wire);
            q.push_frame(&header(size, mask), Bytes::from(payload));
            // Write some, but keep the queue from emptying most of the time.
            let step = next(2 * size as u32 + 64) as usize;
            let take = step.min(q.len().saturating_sub(1));
            let mut slices = [IoSlice::new(&[]); 8];
            let n = q.chunks_vectored(&mut slices);
            let flat: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
            written.extend_from_slice(&flat[..take.min(flat.len())]);
            q.advance(take.min(flat.len()));
            assert!(
                q.tail.capacity() < 64 * 1024,
                "tail grew to {}",
                q.tail.capacity()
            );
        }
        written.extend_from_slice(&drain(&mut q, 777));
        assert!(written == expected, "bytes out of order or lost");
    }

    #[test]
    fn masked_frames_are_masked_in_the_queue() {
        let mut q = WriteQueue::new();
        q.push_frame(
            &header(5, Some([0x37, 0xfa, 0x21, 0x3d])),
            Bytes::from_static(b"Hello"),
        );
        let bytes = drain(&mut q, usize::MAX);
        assert_eq!(bytes[6..], [0x7f, 0x9f, 0x4d, 0x51, 0x58]);
    }
}
