//! Recycles the large buffers that chunk bytes travel in (a response being reassembled, a chunk
//! read back from the disk cache, a verified chunk in the memory cache).
//!
//! Measured: without it, every chunk got freshly faulted-in, zeroed memory — the allocator hands
//! freed pages back to the kernel and takes new ones — and page zeroing was 16 % of the client's
//! CPU in a cold read over AF_XDP. A buffer handed back keeps its length, so taking it again for
//! the same size writes nothing; whatever old bytes it holds are overwritten before anyone reads
//! them (a reassembly is used only once every piece arrived; a disk read fills what it returns).
//! Bounded: at most [`MAX_POOLED_BYTES`] wait here.

use std::sync::Mutex;

/// Smaller buffers are not worth it.
pub const MIN_POOLED: usize = 64 << 10;
/// At most this many bytes of buffers wait in the pool.
pub const MAX_POOLED_BYTES: usize = 64 << 20;

struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

static FREE: Mutex<Free> = Mutex::new(Free { bufs: Vec::new(), bytes: 0 });

/// A buffer of exactly `len` bytes (contents unspecified if recycled, zero if new).
pub fn take(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        let mut f = FREE.lock().unwrap();
        // Same size class only: a 16 MiB buffer must not be pinned by a 64 KiB chunk.
        if let Some(i) = f.bufs.iter().rposition(|v| v.capacity() >= len && v.capacity() / 2 <= len) {
            let mut v = f.bufs.swap_remove(i);
            f.bytes -= v.capacity();
            drop(f);
            v.resize(len, 0);
            return v;
        }
    }
    vec![0; len]
}

/// Hand a buffer back for reuse (dropped instead when small or when the pool is full).
pub fn give(mut v: Vec<u8>) {
    let cap = v.capacity();
    if cap < MIN_POOLED {
        return;
    }
    {
        let mut f = FREE.lock().unwrap();
        if f.bytes + cap > MAX_POOLED_BYTES {
            return;
        }
        f.bytes += cap;
    }
    // Full length, so that taking it for up to its capacity writes nothing (usually this
    // zeroes only the byte or two a decoder popped).
    v.resize(cap, 0);
    let mut f = FREE.lock().unwrap();
    f.bufs.push(v);
}

/// Bytes waiting in the pool (tests, stats).
pub fn pooled_bytes() -> usize {
    FREE.lock().unwrap().bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_same_size_and_stays_bounded() {
        let a = take(256 << 10);
        assert_eq!(a.len(), 256 << 10);
        let p = a.as_ptr();
        give(a);
        let b = take((256 << 10) - 1);
        assert_eq!(b.len(), (256 << 10) - 1);
        assert_eq!(b.as_ptr(), p, "the same buffer came back");
        give(b);
        // A much smaller request does not take it.
        let c = take(100 << 10);
        assert_ne!(c.as_ptr(), p);
        // Small buffers are not kept; the pool never holds more than its bound.
        give(vec![0; 100]);
        for _ in 0..(MAX_POOLED_BYTES / (1 << 20)) + 8 {
            give(vec![0; 1 << 20]);
        }
        assert!(pooled_bytes() <= MAX_POOLED_BYTES);
    }
}
