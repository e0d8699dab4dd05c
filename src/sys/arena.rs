//! Memory for the io_uring ring's registered buffers: [`AlignedBuf`] (aligned for `O_DIRECT`,
//! freed with its own layout) and the [`Arena`] of equal slots that the ring registers, uses for
//! its operations and lends out as chunk buffers ([`Lease`], through [`Lender`]).

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::uring::poke;
use crate::chunk::pool::{Slot, SlotSource};

/// Heap memory aligned for `O_DIRECT`, freed with the layout it was allocated with.
pub struct AlignedBuf {
    pub(super) ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively (like Box<[u8]>); moving it to another
// thread moves that ownership.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` zeroed bytes aligned to `align` (a power of two). Panics on a zero length or a bad
    /// alignment (caller bugs); aborts like `Vec` when memory runs out.
    pub fn new(len: usize, align: usize) -> Self {
        let layout = Layout::from_size_align(len, align).expect("AlignedBuf: bad size or alignment");
        assert!(len > 0, "AlignedBuf: zero length");
        // SAFETY: the layout has a non-zero size (checked above).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else { handle_alloc_error(layout) };
        AlignedBuf { ptr, layout }
    }

    /// Touch every page now (a write of zero per page), so that the page faults, and on a
    /// virtual machine the host's, are paid by the calling thread rather than by whoever uses the
    /// memory first (for the arena: the ring thread, when registering pins it).
    pub fn prefault(&mut self) {
        let s = self.as_mut_slice();
        for b in s.iter_mut().step_by(4096) {
            // black_box: the compiler may not drop a store of zero into zeroed memory.
            *b = std::hint::black_box(0);
        }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr points to `len` initialised (zeroed at allocation) bytes we own; the shared
        // borrow of self prevents a concurrent &mut.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len()) }
    }

    pub(super) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Memory registered with the ring, in slots of one size. Slot `i` is registered at buffer index
/// `i`. A slot is either free (in `free`), used by one part of an operation in flight, or lent
/// out as a [`Lease`] that gives it back when dropped. Registered memory is never freed while the
/// ring exists: the ring thread holds the arena until the ring is gone, and every lease holds it.
///
/// Growing: new slots are allocated and their pages faulted in by a helper thread
/// (`wraith-uring-mem`), ahead of need (when fewer than [`LOW_WATER`] lendable slots are left), and
/// only registered by the ring thread, which pins pages that are already there. Faulting in fresh
/// memory is slow (the kernel zeroes every page; on this VM the host backs it too: ~0.5 s per
/// GiB), and done on the ring thread it stalled every read and write queued behind it.
pub struct Arena {
    pub(super) slot: usize,
    align: usize,
    /// Slots lending never takes: operations of up to this many parts always get their slots.
    pub(super) reserve: usize,
    pub(super) state: Mutex<ArenaState>,
    /// Wakes the helper thread that prepares memory.
    prepare: Condvar,
    /// The ring thread's eventfd.
    pub(super) wake: Arc<File>,
}

pub(super) struct ArenaState {
    /// Registered slots: slot `i` at buffer index `i`.
    pub(super) bufs: Vec<AlignedBuf>,
    pub(super) free: Vec<u16>,
    /// How many slots the ring's table holds.
    pub(super) max: usize,
    /// Memory prepared by the helper thread (faulted in), for the ring thread to register.
    pub(super) ready: Vec<AlignedBuf>,
    /// The helper thread should prepare another batch.
    want: bool,
    /// The ring is gone: the helper thread exits.
    stop: bool,
    /// The ring thread waits for slots to come back.
    pub(super) waiting: bool,
}

/// Slots prepared at a time.
const GROW_BY: usize = 32;
/// Fewer lendable slots than this left: prepare more before they run out.
const LOW_WATER: usize = 32;

impl ArenaState {
    pub(super) fn new(bufs: Vec<AlignedBuf>, max: usize) -> ArenaState {
        let free = (0..bufs.len() as u16).rev().collect();
        ArenaState { bufs, free, max, ready: Vec::new(), want: false, stop: false, waiting: false }
    }
}

impl Arena {
    pub(super) fn new(slot: usize, align: usize, reserve: usize, state: ArenaState, wake: Arc<File>) -> Arena {
        Arena { slot, align, reserve, state: Mutex::new(state), prepare: Condvar::new(), wake }
    }

    /// Ask the helper thread for more memory, unless the table is full or it is at it already.
    pub(super) fn want_more(&self, st: &mut ArenaState) {
        if !st.want && !st.stop && st.bufs.len() + st.ready.len() < st.max {
            st.want = true;
            self.prepare.notify_one();
        }
    }

    /// The helper thread: prepare [`GROW_BY`] slots whenever asked, hand them to the ring thread.
    pub(super) fn spawn_preparer(self: &Arc<Self>) -> io::Result<JoinHandle<()>> {
        let a = self.clone();
        std::thread::Builder::new().name("wraith-uring-mem".into()).spawn(move || loop {
            let n = {
                let mut st = a.state.lock().unwrap();
                while !st.want && !st.stop {
                    st = a.prepare.wait(st).unwrap();
                }
                if st.stop {
                    return;
                }
                GROW_BY.min(st.max.saturating_sub(st.bufs.len() + st.ready.len()))
            };
            let new: Vec<AlignedBuf> = (0..n)
                .map(|_| {
                    let mut b = AlignedBuf::new(a.slot, a.align);
                    b.prefault();
                    b
                })
                .collect();
            let mut st = a.state.lock().unwrap();
            st.ready.extend(new);
            st.want = false;
            drop(st);
            poke(&a.wake);
        })
    }

    /// The ring is going: the helper thread stops.
    pub(super) fn stop_preparer(&self) {
        self.state.lock().unwrap().stop = true;
        self.prepare.notify_all();
    }

    pub(super) fn lease(self: &Arc<Self>, st: &ArenaState, id: u16) -> Lease {
        Lease { arena: self.clone(), id, ptr: st.bufs[id as usize].ptr, len: self.slot }
    }

    /// `n` slots for an operation's parts (reserve included), or None (then the ring waits).
    pub(super) fn take(self: &Arc<Self>, n: usize) -> Option<Vec<Lease>> {
        let mut st = self.state.lock().unwrap();
        if st.free.len() < n {
            st.waiting = true;
            return None;
        }
        let at = st.free.len() - n;
        let ids: Vec<u16> = st.free.drain(at..).collect();
        Some(ids.into_iter().map(|id| self.lease(&st, id)).collect())
    }

    /// Whether a slot may leave the ring for good (as a read's result) and keep the reserve.
    pub(super) fn can_lend(&self) -> bool {
        self.state.lock().unwrap().free.len() >= self.reserve
    }

    fn give_back(&self, id: u16) {
        let mut st = self.state.lock().unwrap();
        st.free.push(id);
        if std::mem::take(&mut st.waiting) {
            drop(st);
            poke(&self.wake);
        }
    }
}

/// Lends the arena's slots to chunk buffers (see [`crate::chunk::pool`]), never its reserve.
pub(super) struct Lender(pub(super) Arc<Arena>);

impl SlotSource for Lender {
    fn lend(&self, len: usize) -> Option<Box<dyn Slot>> {
        let a = &self.0;
        if len > a.slot {
            return None;
        }
        let mut st = a.state.lock().unwrap();
        if st.free.len() < a.reserve + LOW_WATER {
            a.want_more(&mut st);
        }
        if st.free.len() > a.reserve {
            let id = st.free.pop().unwrap();
            return Some(Box::new(a.lease(&st, id)));
        }
        None
    }
}

/// One slot of the arena, owned by whoever holds it; back to the free list when dropped.
pub struct Lease {
    pub(super) arena: Arc<Arena>,
    pub(super) id: u16,
    pub(super) ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Lease owns its slot's bytes exclusively (the id is out of the free list until the
// Lease drops), like a Box<[u8]>; the memory lives as long as the arena, which the Lease holds.
unsafe impl Send for Lease {}
// SAFETY: shared access only reads (as_slice); writing needs &mut.
unsafe impl Sync for Lease {}

impl Slot for Lease {
    fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is the slot's allocation (an AlignedBuf the arena keeps until it
        // drops, after this Lease), initialised at allocation, and no one else uses this slot.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.arena.give_back(self.id);
    }
}
