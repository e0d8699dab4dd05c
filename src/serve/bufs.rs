//! The buffers the server reads chunks into: aligned for `O_DIRECT`, so the bytes land where they
//! are sent from, and recycled, so that a chunk read neither zeroes nor faults in fresh memory.
//!
//! Before (perf of the server's workers during a cold 1 GiB read through a mount): each
//! `O_DIRECT` read went into a freshly zeroed heap buffer at its first 4 KiB boundary, and the
//! chunk was then moved to the buffer's start. In one run, where the allocator's block began off
//! a page boundary, that move was 281 of the workers' 790 samples (a copy of every byte); in
//! another the block was aligned and nothing moved, and zeroing and page faults took ~50 of 575.
//! With these buffers: neither (507 samples). Bounded: at most [`MAX_FREE`] buffers and
//! [`MAX_FREE_BYTES`] wait for reuse. What a recycled buffer held before is never sent: a chunk
//! is sent only once a read filled every one of its bytes (a read that fails sends nothing).

use crate::chunk::pool::{Buf, Recycler, Room, Slot};
use crate::sys::arena::AlignedBuf;

/// `O_DIRECT` needs buffer, offset and length aligned to the device's block size; 4096 covers
/// the usual 512 and 4096.
pub const ALIGN: usize = 4096;
/// At most this many bytes of buffers wait to be reused,
pub const MAX_FREE_BYTES: usize = 64 << 20;
/// in at most this many buffers (one is in use per worker with a response in flight; the count
/// keeps the search short when chunks are small).
pub const MAX_FREE: usize = 64;

impl Room for AlignedBuf {
    fn room(&self) -> usize {
        self.len()
    }
}

static FREE: Recycler<AlignedBuf> = Recycler::new(MAX_FREE_BYTES, MAX_FREE);

/// A buffer of at least `len` bytes aligned to [`ALIGN`], contents unspecified (zero if new). It
/// goes back to be reused when the last [`Buf`] made of it drops.
pub fn take(len: usize) -> ReadBuf {
    let len = len.max(1).next_multiple_of(ALIGN);
    ReadBuf(Some(FREE.take(len).unwrap_or_else(|| AlignedBuf::new(len, ALIGN))))
}

/// One buffer from [`take`].
pub struct ReadBuf(Option<AlignedBuf>);

impl ReadBuf {
    /// The first `len` bytes, as a chunk buffer (the rest stays spare room, for the response's
    /// tag byte).
    pub fn into_buf(self, len: usize) -> Buf {
        Buf::from_slot(Box::new(self), len)
    }
}

impl Slot for ReadBuf {
    fn bytes(&self) -> &[u8] {
        self.0.as_ref().map_or(&[], |b| b.as_slice())
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.as_mut().map_or(&mut [], |b| b.as_mut_slice())
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            FREE.give(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_reused_within_their_size_class_and_bounded() {
        // 300 KiB: a size class no other test reads chunks in.
        let a = take(300 << 10);
        assert_eq!(a.bytes().as_ptr() as usize % ALIGN, 0);
        assert!(a.bytes().len() >= 300 << 10);
        let at = a.bytes().as_ptr();
        let mut buf = a.into_buf(1000);
        assert_eq!(buf.len(), 1000);
        buf.push(7);
        assert_eq!((buf.len(), buf[1000]), (1001, 7));
        drop(buf);
        // Other tests may take buffers meanwhile: look for ours among a few.
        let again: Vec<ReadBuf> = (0..8).map(|_| take(300 << 10)).collect();
        assert!(again.iter().any(|b| b.bytes().as_ptr() == at), "a buffer of the same size is reused");
        let small = take(4096);
        assert!(small.bytes().len() < 300 << 10, "a small read does not hold a large buffer");
        drop(again);
        drop(small);
        let many: Vec<ReadBuf> = (0..(MAX_FREE_BYTES >> 20) + 8).map(|_| take(1 << 20)).collect();
        drop(many);
        let tiny: Vec<ReadBuf> = (0..MAX_FREE + 8).map(|_| take(1)).collect();
        drop(tiny);
        let (bytes, count) = FREE.kept();
        assert!(bytes <= MAX_FREE_BYTES && count <= MAX_FREE, "{bytes} bytes in {count} buffers");
    }
}
