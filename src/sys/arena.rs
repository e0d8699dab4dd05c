//! Memory for the io_uring ring's registered buffers: [`AlignedBuf`] (aligned for `O_DIRECT`,
//! freed with its own layout), the [`Region`]s of mapped memory the arena's slots lie in, and the
//! [`Arena`] of equal slots that the ring registers, uses for its operations and lends out as
//! chunk buffers ([`Lease`], through [`Lender`]).

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
// SAFETY: shared access only reads (as_slice); writing needs &mut.
unsafe impl Sync for AlignedBuf {}

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
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Regions are mapped in multiples of this, aligned to it: a transparent huge page.
const RUN: usize = 2 << 20;

/// Anonymous memory for arena slots: mapped 2 MiB-aligned in whole 2 MiB runs, advised for
/// transparent huge pages (`MADV_HUGEPAGE`) and faulted in when made (`MADV_POPULATE_WRITE`,
/// kernel ≥ 5.14; a store per page before that). Unmapped when dropped.
///
/// Huge pages, measured on this VM (warm read of 1 GiB through the mount, chunks read from the
/// disk cache into slots, verified there and copied from there into FUSE replies): 0.73–0.91 s
/// against 0.95–1.22 s in 4 KiB pages — fewer pages to map for every O_DIRECT read and reply.
/// They cost more to fault in here (the host backs memory it took back with free page
/// reporting: ~0.7–0.8 core-s for a new mount's first ~290 MiB against ~0.12 s in 4 KiB pages),
/// once per mount and on the helper thread. Where the kernel has no huge page to give (THP off,
/// fragmented memory) the region gets small pages and works the same.
pub(super) struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: a Region owns its mapping exclusively; moving it to another thread moves that ownership.
unsafe impl Send for Region {}

impl Region {
    /// `want` bytes, zeroed and faulted in, at the start of a mapping of whole 2 MiB runs (the
    /// rest of the last run is mapped but not populated, though with huge pages it is backed
    /// anyway; [`Region::fit`] counts the slots that fit there, so growth uses it).
    pub(super) fn new(want: usize) -> io::Result<Region> {
        let len = want.max(1).next_multiple_of(RUN);
        let span = len + RUN;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing touches no
        // existing memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(RUN);
        let (head, tail) = (aligned - start, span - (aligned - start) - len);
        // SAFETY: head and tail are page-aligned ends of the mapping just made, outside the
        // aligned run we keep; nothing refers to them.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((aligned + len) as *mut libc::c_void, tail);
            }
        }
        let region = Region { ptr: NonNull::new(aligned as *mut u8).expect("mmap returned null"), len };
        let fill = want.max(1).next_multiple_of(4096);
        // SAFETY: madvise on our own mapping; neither advice changes its contents (zero). Both
        // may fail harmlessly: no huge pages (THP off), or no populate (before 5.14: the pages
        // are then touched one by one below).
        let populated = unsafe {
            libc::madvise(region.ptr.as_ptr().cast(), len, libc::MADV_HUGEPAGE);
            libc::madvise(region.ptr.as_ptr().cast(), fill, libc::MADV_POPULATE_WRITE)
        };
        if populated != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                // Out of memory (ENOMEM) and the like: say so rather than touch pages into the
                // OOM killer; the region is unmapped when dropped here.
                return Err(e);
            }
            // A kernel before 5.14, without populate: touch each page.
            for off in (0..fill).step_by(4096) {
                // SAFETY: off < fill <= len, inside the mapping; a volatile store of zero into zeroed
                // memory, which the compiler may not drop, faults the page in.
                unsafe { region.ptr.as_ptr().add(off).write_volatile(0) };
            }
        }
        Ok(region)
    }

    /// The iovecs of `n` slots of `slot` bytes from the start, each at a page boundary.
    pub(super) fn slots(&self, slot: usize, n: usize) -> Vec<libc::iovec> {
        let stride = Self::stride(slot);
        assert!(stride * n <= self.len, "Region: {n} slots of {slot} bytes do not fit in {}", self.len);
        (0..n)
            .map(|i| {
                // SAFETY: i * stride < len: inside the mapping.
                let base = unsafe { self.ptr.as_ptr().add(i * stride) };
                libc::iovec { iov_base: base.cast(), iov_len: slot }
            })
            .collect()
    }

    /// Bytes from one slot's start to the next: slots start at page boundaries (256.5 KiB slots
    /// packed end to end would start mid-page and span one page more each).
    pub(super) fn stride(slot: usize) -> usize {
        slot.next_multiple_of(4096)
    }

    /// Bytes to ask [`Region::new`] for, for `n` slots.
    pub(super) fn bytes(slot: usize, n: usize) -> usize {
        Self::stride(slot) * n
    }

    /// How many slots of `slot` bytes fill the 2 MiB runs that `want` of them need.
    pub(super) fn fit(slot: usize, want: usize) -> usize {
        Self::bytes(slot, want).next_multiple_of(RUN) / Self::stride(slot)
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: ptr..ptr+len is the mapping this Region made and owns; it is unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A registered slot's first byte, inside a [`Region`] the arena keeps.
#[derive(Clone, Copy)]
pub(super) struct SlotPtr(NonNull<u8>);

// SAFETY: a plain address; who may use the bytes behind it is decided by the arena's free list
// and the Lease that holds the slot.
unsafe impl Send for SlotPtr {}

/// Memory registered with the ring, in slots of one size. Slot `i` is registered at buffer index
/// `i`. A slot is either free (in `free`), used by one part of an operation in flight, or lent
/// out as a [`Lease`] that gives it back when dropped. Registered memory is never freed while the
/// ring exists: the ring thread holds the arena until the ring is gone, and every lease holds it.
///
/// Growing: new slots are mapped (a [`Region`] of about [`GROW_BY`] slots) and faulted in by a
/// helper thread (`wraith-uring-mem`), ahead of need (when fewer than [`LOW_WATER`] lendable
/// slots are left), and only registered by the ring thread, which pins pages that are already
/// there. Faulting in fresh memory is slow (the kernel zeroes every page; on this VM the host
/// backs it too: figures at [`Region`]), and done on the ring thread it stalled every read and
/// write queued behind it.
pub struct Arena {
    pub(super) slot: usize,
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
    pub(super) slots: Vec<SlotPtr>,
    /// The memory the slots lie in (also any part of it whose registration failed: the kernel may
    /// hold the rest of the region).
    regions: Vec<Region>,
    pub(super) free: Vec<u16>,
    /// How many slots the ring's table holds.
    pub(super) max: usize,
    /// Memory prepared by the helper thread (faulted in), for the ring thread to register: a
    /// region and how many slots it holds.
    pub(super) ready: Vec<(Region, usize)>,
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
    /// The state of an arena whose first `slots` (registered, all free) lie in `region`.
    pub(super) fn new(region: Region, slots: &[libc::iovec], max: usize) -> ArenaState {
        let free = (0..slots.len() as u16).rev().collect();
        let mut st = ArenaState {
            slots: Vec::new(),
            regions: Vec::new(),
            free,
            max,
            ready: Vec::new(),
            want: false,
            stop: false,
            waiting: false,
        };
        st.add(region, slots);
        st
    }

    /// Keep `region`, whose `slots` (a prefix of them, possibly none) were registered at the next
    /// buffer indices; they are not free yet.
    pub(super) fn add(&mut self, region: Region, slots: &[libc::iovec]) {
        let ptr = |v: &libc::iovec| SlotPtr(NonNull::new(v.iov_base.cast()).expect("slot in a region"));
        self.slots.extend(slots.iter().map(ptr));
        self.regions.push(region);
    }

    /// Slots registered plus slots prepared.
    fn planned(&self) -> usize {
        self.slots.len() + self.ready.iter().map(|r| r.1).sum::<usize>()
    }
}

impl Arena {
    /// An arena of slots of `slot` bytes; alignment: slots lie one stride apart from a region's
    /// 2 MiB-aligned start, so each is aligned to every power of two up to 2 MiB that divides
    /// the stride (`slot` rounded up to 4 KiB).
    pub(super) fn new(slot: usize, reserve: usize, state: ArenaState, wake: Arc<File>) -> Arena {
        Arena { slot, reserve, state: Mutex::new(state), prepare: Condvar::new(), wake }
    }

    /// Ask the helper thread for more memory, unless the table is full or it is at it already.
    pub(super) fn want_more(&self, st: &mut ArenaState) {
        if !st.want && !st.stop && st.planned() < st.max {
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
                Region::fit(a.slot, GROW_BY).min(st.max.saturating_sub(st.planned()))
            };
            // Out of memory: no more growth; chunks use heap memory instead.
            let new = if n > 0 {
                Region::new(Region::bytes(a.slot, n))
                    .inspect_err(|e| tracing::info!("io_uring arena stops growing: cannot map memory ({e}); further chunks use heap memory"))
                    .ok()
            } else {
                None
            };
            let mut st = a.state.lock().unwrap();
            match new {
                Some(r) => st.ready.push((r, n)),
                None => st.max = st.planned(),
            }
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
        Lease { arena: self.clone(), id, ptr: st.slots[id as usize].0, len: self.slot }
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
        // SAFETY: ptr..ptr+len is the slot's memory (in a Region the arena keeps until it drops,
        // after this Lease), initialised (zeroed) when mapped, and no one else uses this slot.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_slots_are_aligned_zeroed_and_writable() {
        let slot = 262_656; // 256.5 KiB: a multiple of 512, not of 4096
        let n = Region::fit(slot, 3);
        assert_eq!(n, (2 << 20) / 266_240, "three slots fit in one 2 MiB run, which holds {n}");
        let r = Region::new(Region::bytes(slot, n)).unwrap();
        let iov = r.slots(slot, n);
        assert_eq!(iov[0].iov_base as usize % (2 << 20), 0);
        for (i, v) in iov.iter().enumerate() {
            assert_eq!(v.iov_base as usize % 4096, 0);
            assert_eq!(v.iov_len, slot);
            // SAFETY: the iovec describes `slot` bytes of the live region, used by nothing else.
            let b = unsafe { std::slice::from_raw_parts_mut(v.iov_base as *mut u8, slot) };
            assert!(b.iter().all(|&x| x == 0), "slot {i} not zeroed");
            b.fill(i as u8 + 1);
        }
        // SAFETY: as above, read back after all slots were written: they do not overlap.
        let first = unsafe { std::slice::from_raw_parts(iov[0].iov_base as *const u8, slot) };
        assert!(first.iter().all(|&x| x == 1));
        assert!(std::panic::catch_unwind(|| r.slots(slot, n + 1)).is_err(), "more slots than mapped");
    }
}
