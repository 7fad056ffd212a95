//! The bytes waiting to be written to the socket.
//!
//! Small frames are copied into one growing buffer, so that every reply made
//! while handling one read leaves in one write. Large payloads are not copied:
//! their `Bytes` queue behind their header and go out in a vectored write.

use std::{collections::VecDeque, io::IoSlice};

use bytes::{Buf, Bytes, BytesMut};

use crate::{
    frame::{FrameHeader, MAX_HEADER_LEN},
    mask::apply_mask,
};

/// Payloads up to this size are copied next to their header; larger ones
/// are queued by reference. A copy of a few KiB costs less than an extra
/// `iovec`, and a copy of a megabyte costs more.
const COPY_THRESHOLD: usize = 4096;

/// A queue of frames in wire form.
#[derive(Debug, Default)]
pub struct WriteQueue {
    /// Frozen chunks, in order, before `tail`.
    chunks: VecDeque<Bytes>,
    /// The chunk still being filled with small frames.
    tail: BytesMut,
    /// Bytes queued in all, `tail` included.
    len: usize,
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

    /// Whether nothing waits to be written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queues a frame: its header, then its payload, masked with `header.mask`
    /// if set.
    pub fn push_frame(&mut self, header: &FrameHeader, payload: Bytes) {
        let mut head = [0u8; MAX_HEADER_LEN];
        let head_len = header.encode(&mut head);
        self.tail.extend_from_slice(&head[..head_len]);
        self.len += head_len + payload.len();
        match header.mask {
            Some(key) => {
                let start = self.tail.len();
                self.tail.extend_from_slice(&payload);
                apply_mask(&mut self.tail[start..], key, 0);
            }
            None if payload.len() <= COPY_THRESHOLD => self.tail.extend_from_slice(&payload),
            None => {
                self.chunks.push_back(self.tail.split().freeze());
                self.chunks.push_back(payload);
            }
        }
    }

    /// Queues bytes already in wire form (a frame encoded once for many
    /// connections).
    pub fn push_encoded(&mut self, encoded: Bytes) {
        self.len += encoded.len();
        if encoded.len() <= COPY_THRESHOLD {
            self.tail.extend_from_slice(&encoded);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(encoded);
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
            .chain(std::iter::once(&self.tail[..]));
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
            .unwrap_or(&self.tail[..])
    }

    /// Drops the first `n` bytes, which were written.
    pub fn advance(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
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
                    self.tail.advance(n);
                    return;
                }
            }
        }
        if self.len == 0 {
            // Nothing waits: give the buffer back, so that an idle
            // connection holds none (the next write allocates anew).
            self.tail = BytesMut::new();
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
