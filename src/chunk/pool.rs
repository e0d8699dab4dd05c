//! The buffers chunk bytes travel in (a response being reassembled, a chunk read back from the
//! disk cache, a verified chunk in the memory cache): [`Buf`], and where they come from.
//!
//! Two kinds of memory:
//! - **Registered slots**: when the disk cache runs on io_uring, its ring thread lends out slots
//!   of memory registered with the ring (a [`SlotSource`] installed with [`set_source`]). A
//!   response reassembled into one is written to the cache with `WriteFixed` straight from it,
//!   and a chunk read from the cache with `ReadFixed` is verified and served where it landed: no
//!   copy between the network, the cache and the reader. A slot goes back when its last holder
//!   drops it.
//! - **Heap buffers**, recycled here. Measured: without recycling, every chunk got freshly
//!   faulted-in, zeroed memory — the allocator hands freed pages back to the kernel and takes new
//!   ones — and page zeroing was 16 % of the client's CPU in a cold read over AF_XDP. A buffer
//!   handed back keeps its length, so taking it again for the same size writes nothing; whatever
//!   old bytes it holds are overwritten before anyone reads them (a reassembly is used only once
//!   every piece arrived; a disk read fills what it returns). Bounded: at most
//!   [`MAX_POOLED_BYTES`] wait here. The keeping is a [`Recycler`], which the server's aligned
//!   read buffers (`serve::bufs`) use too.
//!
//! This module holds no unsafe code: a slot's memory is reached only through the [`Slot`] trait,
//! implemented where the memory is made (`sys::uring`).

use std::any::Any;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, RwLock};

/// Smaller buffers are not worth it.
pub const MIN_POOLED: usize = 64 << 10;
/// At most this many bytes of buffers wait in the pool.
pub const MAX_POOLED_BYTES: usize = 64 << 20;

/// Memory lent by someone else (a registered io_uring slot), owned exclusively by its holder and
/// given back when dropped.
pub trait Slot: Send + Sync + 'static {
    /// The whole slot.
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
    /// For the lender to recognise its own slots.
    fn as_any(&self) -> &dyn Any;
}

/// Lends [`Slot`]s.
pub trait SlotSource: Send + Sync + 'static {
    /// A slot of at least `len` bytes, if one is free (None: the caller uses heap memory).
    fn lend(&self, len: usize) -> Option<Box<dyn Slot>>;
}

static SOURCE: RwLock<Option<Arc<dyn SlotSource>>> = RwLock::new(None);

/// Make `src` the place [`take`] borrows from first (replacing any other).
pub fn set_source(src: Arc<dyn SlotSource>) {
    *SOURCE.write().unwrap() = Some(src);
}

/// Stop borrowing from `src` (if it is the current source).
pub fn clear_source(src: &Arc<dyn SlotSource>) {
    let mut s = SOURCE.write().unwrap();
    if s.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, src)) {
        *s = None;
    }
}

/// Bytes of a chunk: heap memory or a lent slot. Derefs to exactly its length.
pub enum Buf {
    Heap(Vec<u8>),
    Slot(Box<dyn Slot>, usize),
}

impl Buf {
    /// The first `len` bytes of `slot` (panics if the slot is shorter: a caller bug).
    pub fn from_slot(slot: Box<dyn Slot>, len: usize) -> Buf {
        assert!(len <= slot.bytes().len(), "Buf::from_slot: {len} bytes do not fit the slot");
        Buf::Slot(slot, len)
    }

    /// Memory this buffer holds (what it costs, whatever its length).
    pub fn capacity(&self) -> usize {
        match self {
            Buf::Heap(v) => v.capacity(),
            Buf::Slot(s, _) => s.bytes().len(),
        }
    }

    /// The lent slot behind it, if any.
    pub fn slot(&self) -> Option<&dyn Slot> {
        match self {
            Buf::Heap(_) => None,
            Buf::Slot(s, _) => Some(&**s),
        }
    }

    pub fn truncate(&mut self, len: usize) {
        match self {
            Buf::Heap(v) => v.truncate(len),
            Buf::Slot(_, l) => *l = (*l).min(len),
        }
    }

    /// Append one byte: in place when the slot has room after the bytes, else the bytes move
    /// to the heap.
    pub fn push(&mut self, byte: u8) {
        match self {
            Buf::Heap(v) => v.push(byte),
            Buf::Slot(s, l) if *l < s.bytes().len() => {
                s.bytes_mut()[*l] = byte;
                *l += 1;
            }
            Buf::Slot(..) => {
                let mut v = Vec::with_capacity(self.len() + 1);
                v.extend_from_slice(self);
                v.push(byte);
                *self = Buf::Heap(v);
            }
        }
    }

    /// Remove and return the last byte.
    pub fn pop(&mut self) -> Option<u8> {
        match self {
            Buf::Heap(v) => v.pop(),
            Buf::Slot(s, l) => {
                *l = l.checked_sub(1)?;
                Some(s.bytes()[*l])
            }
        }
    }

    /// The bytes as a Vec (copied out of a slot; a heap buffer is handed over as it is).
    pub fn into_vec(mut self) -> Vec<u8> {
        match &mut self {
            Buf::Heap(v) => std::mem::take(v),
            Buf::Slot(..) => self.to_vec(),
        }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Heap(v) => v,
            Buf::Slot(s, l) => &s.bytes()[..*l],
        }
    }
}

impl DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Buf::Heap(v) => v,
            Buf::Slot(s, l) => &mut s.bytes_mut()[..*l],
        }
    }
}

impl AsRef<[u8]> for Buf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsRef<Buf> for Buf {
    fn as_ref(&self) -> &Buf {
        self
    }
}

impl From<Vec<u8>> for Buf {
    fn from(v: Vec<u8>) -> Buf {
        Buf::Heap(v)
    }
}

impl Clone for Buf {
    /// A copy on the heap.
    fn clone(&self) -> Buf {
        Buf::Heap(self.to_vec())
    }
}

impl PartialEq for Buf {
    fn eq(&self, other: &Buf) -> bool {
        **self == **other
    }
}

impl Eq for Buf {}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.slot().is_some() { "slot" } else { "heap" };
        write!(f, "Buf({kind}, {} bytes)", self.len())
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Buf::Heap(v) = self {
            give(std::mem::take(v));
        }
    }
}

/// A buffer a [`Recycler`] can keep: it knows how many bytes it holds.
pub trait Room {
    fn room(&self) -> usize;
}

impl Room for Vec<u8> {
    fn room(&self) -> usize {
        self.capacity()
    }
}

/// Buffers waiting to be reused, taken back by size class, bounded in bytes and in count.
pub struct Recycler<T> {
    free: Mutex<(Vec<T>, usize)>,
    max_bytes: usize,
    max_count: usize,
}

impl<T: Room> Recycler<T> {
    pub const fn new(max_bytes: usize, max_count: usize) -> Self {
        Recycler { free: Mutex::new((Vec::new(), 0)), max_bytes, max_count }
    }

    /// A kept buffer of at least `len` bytes and less than twice that (a 16 MiB buffer must not
    /// be pinned by a 64 KiB chunk), the one given back last.
    pub fn take(&self, len: usize) -> Option<T> {
        let mut f = self.free.lock().unwrap();
        let i = f.0.iter().rposition(|b| b.room() >= len && b.room() / 2 <= len)?;
        let b = f.0.swap_remove(i);
        f.1 -= b.room();
        Some(b)
    }

    /// Whether a buffer of `room` bytes would be kept now.
    pub fn has_room(&self, room: usize) -> bool {
        let f = self.free.lock().unwrap();
        f.0.len() < self.max_count && f.1 + room <= self.max_bytes
    }

    /// Keep `b` for reuse, unless that would pass a bound (then it is dropped).
    pub fn give(&self, b: T) {
        let room = b.room();
        let mut f = self.free.lock().unwrap();
        if f.0.len() < self.max_count && f.1 + room <= self.max_bytes {
            f.1 += room;
            f.0.push(b);
        }
    }

    /// Bytes and buffers kept.
    pub fn kept(&self) -> (usize, usize) {
        let f = self.free.lock().unwrap();
        (f.1, f.0.len())
    }
}

static FREE: Recycler<Vec<u8>> = Recycler::new(MAX_POOLED_BYTES, MAX_POOLED_BYTES / MIN_POOLED);

/// A buffer of exactly `len` bytes, contents unspecified: a lent slot when the source has one
/// free, else a recycled heap buffer (zero if new).
pub fn take(len: usize) -> Buf {
    if len >= MIN_POOLED {
        let src = SOURCE.read().unwrap().clone();
        if let Some(s) = src.and_then(|src| src.lend(len)) {
            return Buf::from_slot(s, len);
        }
    }
    Buf::Heap(take_vec(len))
}

/// A heap buffer of exactly `len` bytes (contents unspecified if recycled, zero if new).
pub fn take_vec(len: usize) -> Vec<u8> {
    if len >= MIN_POOLED {
        if let Some(mut v) = FREE.take(len) {
            v.resize(len, 0);
            return v;
        }
    }
    vec![0; len]
}

/// Hand a buffer back for reuse (dropped instead when small or when the pool is full).
pub fn give(mut v: Vec<u8>) {
    let cap = v.capacity();
    if cap < MIN_POOLED || !FREE.has_room(cap) {
        return;
    }
    // Full length, so that taking it for up to its capacity writes nothing (usually this
    // zeroes only the byte or two a decoder popped).
    v.resize(cap, 0);
    FREE.give(v);
}

/// Bytes waiting in the pool (tests, stats).
pub fn pooled_bytes() -> usize {
    FREE.kept().0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_same_size_and_stays_bounded() {
        let a = take_vec(256 << 10);
        assert_eq!(a.len(), 256 << 10);
        let p = a.as_ptr();
        give(a);
        let b = take_vec((256 << 10) - 1);
        assert_eq!(b.len(), (256 << 10) - 1);
        assert_eq!(b.as_ptr(), p, "the same buffer came back");
        give(b);
        // A much smaller request does not take it. (Checked by capacity, not address: the pool
        // is shared with the tests running beside this one, and one that took the buffer and
        // freed it lets the allocator hand its address to this request.)
        let c = take_vec(100 << 10);
        assert!(c.capacity() < 256 << 10, "a 100 KiB request took a {} byte buffer", c.capacity());
        // Small buffers are not kept; the pool never holds more than its bound.
        give(vec![0; 100]);
        for _ in 0..(MAX_POOLED_BYTES / (1 << 20)) + 8 {
            give(vec![0; 1 << 20]);
        }
        assert!(pooled_bytes() <= MAX_POOLED_BYTES);
    }

    /// Heap memory standing in for a registered slot; counts how many are out.
    struct TestSlot(Box<[u8]>, Arc<std::sync::atomic::AtomicUsize>);

    impl Slot for TestSlot {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn bytes_mut(&mut self) -> &mut [u8] {
            &mut self.0
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    impl Drop for TestSlot {
        fn drop(&mut self) {
            self.1.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    struct TestSource(Arc<std::sync::atomic::AtomicUsize>);

    impl SlotSource for TestSource {
        fn lend(&self, len: usize) -> Option<Box<dyn Slot>> {
            (len <= 300 << 10).then(|| {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Box::new(TestSlot(vec![0xee; 300 << 10].into_boxed_slice(), self.0.clone())) as Box<dyn Slot>
            })
        }
    }

    #[test]
    fn buf_in_a_lent_slot_behaves_like_a_vec_and_goes_back() {
        let out = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let src: Arc<dyn SlotSource> = Arc::new(TestSource(out.clone()));
        let mut b = Buf::from_slot(src.lend(1000).unwrap(), 1000);
        assert_eq!(b.len(), 1000);
        assert_eq!(b.capacity(), 300 << 10);
        assert!(b.slot().is_some());
        b[..3].copy_from_slice(b"abc");
        b[999] = 7;
        assert_eq!(b.pop(), Some(7));
        assert_eq!(b.len(), 999);
        b.truncate(3);
        assert_eq!(&b[..], b"abc");
        b.truncate(10); // never grows
        assert_eq!(b.len(), 3);
        assert_eq!(b.clone(), Buf::from(b"abc".to_vec()));
        assert!(b.clone().slot().is_none(), "a clone is on the heap");
        assert_eq!(b.into_vec(), b"abc");
        assert_eq!(out.load(std::sync::atomic::Ordering::SeqCst), 0, "the slot went back");
        let mut e = Buf::from_slot(src.lend(1).unwrap(), 0);
        assert_eq!(e.pop(), None);
        drop(e);
        // A heap Buf hands its Vec over without a copy.
        let v = vec![1u8; 100 << 10];
        let p = v.as_ptr();
        let back = Buf::from(v).into_vec();
        assert_eq!(back.as_ptr(), p);
    }
}
