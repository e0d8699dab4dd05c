//! One thread that owns an io_uring ring, its registered aligned buffers and its table of
//! in-flight operations. Other threads hand it [`Op`]s by channel and get the result back through
//! a callback that runs on the ring thread (it should only send on a channel).
//!
//! - Buffers: an [`Arena`] of equal slots in mapped [`Region`]s (alignment from the device,
//!   see `sys::disk::dio_align`), registered with the ring; reads are `ReadFixed`, writes
//!   `WriteFixed`. An operation larger than one slot is split into parts, one slot and one SQE
//!   each. `n_bufs` slots are registered at start and kept for the ring's own parts; more are
//!   registered on demand (a sparse table of `max_bufs`) and lent out as chunk buffers
//!   ([`Lease`], through [`crate::chunk::pool`]): a response reassembled into one is written
//!   from it, and a read that fits one slot is handed over in the slot it landed in — the bytes
//!   are never copied between the network, the disk and the reader's chunk.
//! - A slot belongs to its operation until the kernel's completion for it arrives, whatever the
//!   requester does meanwhile; at shutdown the thread waits for every completion first. A lent
//!   slot comes back when its last holder drops it; the registered memory lives until the ring
//!   is gone and no lease is left.
//! - Batching: everything queued while the thread was waiting is pushed, then one
//!   `io_uring_enter` submits it all and waits for at least one completion.
//! - Waking: an `eventfd` read is kept armed in the ring; a requester writes the eventfd after
//!   queueing (so does a returned slot the thread waits for, and a borrower that found none), so
//!   the ring thread only ever sleeps inside `io_uring_enter`.
//! - Short reads on the reader's own ring: a reading thread may instead do a small read on a
//!   ring of its own ([`IoThread::read_here`], one registered buffer, waited for in place), two
//!   wake-ups fewer than a round trip through the ring thread. That ring, too, has one owner.
//! - Fallback: when the ring cannot be set up, buffers cannot be registered, or the kernel lacks
//!   an opcode, the thread says so once and serves the same requests with `pread`/`pwrite`.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::arena::{Arena, ArenaState, Lease, Lender, Region};
pub use super::arena::AlignedBuf;
use crate::chunk::pool::{Buf, Slot, SlotSource};

use io_uring::{opcode, types, IoUring, Probe};


/// One I/O request. Offsets and lengths must respect the file's `O_DIRECT` alignment when the
/// file was opened with `O_DIRECT` (the caller pads).
pub enum Op {
    /// Read `len` bytes at `offset`. Completes with the bytes read (shorter at end of file): in
    /// the registered slot they were read into when the read fits one slot and enough slots stay
    /// free, else copied to the heap.
    Read { file: Arc<File>, offset: u64, len: usize },
    /// Write `data`, zero-padded to `padded` bytes, at `offset`. Completes with an empty buffer.
    /// When `data` lies in one of this ring's slots and needs no padding it is written from
    /// there (no copy); otherwise it is copied into free slots first.
    Write { file: Arc<File>, offset: u64, data: Box<dyn AsRef<Buf> + Send>, padded: usize },
}

impl Op {
    fn len(&self) -> usize {
        match self {
            Op::Read { len, .. } => *len,
            Op::Write { padded, .. } => *padded,
        }
    }

    fn write_data(&self) -> Option<&Buf> {
        match self {
            Op::Write { data, .. } => Some((**data).as_ref()),
            Op::Read { .. } => None,
        }
    }
}

/// Called on the ring thread with the result of an [`Op`]. Keep it short (send on a channel).
pub type Done = Box<dyn FnOnce(io::Result<Buf>) + Send>;

enum Msg {
    /// Operations that go into the ring together (one `io_uring_enter`).
    Ops(Vec<(Op, Done)>),
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// io_uring with registered buffers (`ReadFixed`/`WriteFixed`).
    Uring,
    /// `pread`/`pwrite` on the owner thread (no usable io_uring).
    Sync,
}

#[derive(Clone, Debug)]
pub struct IoConfig {
    pub align: usize,
    /// Size of one slot of registered memory (a multiple of `align`).
    pub buf_size: usize,
    /// Slots registered at start and always kept for the ring's own use: the largest operation
    /// is `n_bufs` slots.
    pub n_bufs: usize,
    /// The most slots ever registered (lent ones included; more are added as they are asked for).
    pub max_bufs: usize,
    /// Use pread/pwrite even if io_uring works (tests).
    pub force_sync: bool,
}

/// The ring thread's counters, read at one moment ([`IoStats::snapshot`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct IoCounts {
    /// Operations (SQEs) submitted.
    pub sqes: u64,
    /// `io_uring_enter` calls.
    pub enters: u64,
    /// Most SQEs one `io_uring_enter` submitted.
    pub max_batch: u64,
    /// Writes issued straight from the data's own registered slot (no copy).
    pub zero_copy_writes: u64,
    /// Reads completed in the slot they landed in (no copy).
    pub zero_copy_reads: u64,
    /// Slots registered now.
    pub slots: u64,
    /// Reads done on the requesting thread's own ring ([`IoThread::read_here`]).
    pub here_reads: u64,
}

/// How much batching happened and how often bytes stayed where they were; see [`IoCounts`].
#[derive(Default, Debug)]
pub struct IoStats {
    pub sqes: AtomicU64,
    pub enters: AtomicU64,
    pub max_batch: AtomicU64,
    pub zero_copy_writes: AtomicU64,
    pub zero_copy_reads: AtomicU64,
    pub slots: AtomicU64,
    pub here_reads: AtomicU64,
    /// Tests: the ring thread's next `io_uring_enter` with operations in the ring fails as if the
    /// kernel refused it.
    #[cfg(test)]
    pub fail_enter: std::sync::atomic::AtomicBool,
}

impl IoStats {
    pub fn snapshot(&self) -> IoCounts {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        IoCounts {
            sqes: g(&self.sqes),
            enters: g(&self.enters),
            max_batch: g(&self.max_batch),
            zero_copy_writes: g(&self.zero_copy_writes),
            zero_copy_reads: g(&self.zero_copy_reads),
            slots: g(&self.slots),
            here_reads: g(&self.here_reads),
        }
    }
}

/// Handle to the ring thread. Dropping it stops the thread after every operation completed.
pub struct IoThread {
    tx: Sender<Msg>,
    wake: Option<Arc<File>>,
    mode: Mode,
    align: usize,
    arena: Option<Arc<Arena>>,
    join: Option<JoinHandle<()>>,
    pub stats: Arc<IoStats>,
}

const WAKE: u64 = u64::MAX;
/// Fewer registered slots than this: not worth io_uring, use pread/pwrite.
const MIN_RESERVE: usize = 8;
/// The most buffers io_uring registers (IORING_MAX_REG_BUFFERS).
const MAX_REG_BUFFERS: usize = 16384;

impl IoThread {
    pub fn start(cfg: IoConfig) -> io::Result<IoThread> {
        assert!(cfg.align.is_power_of_two() && cfg.align <= 2 << 20 && cfg.buf_size % cfg.align == 0 && cfg.n_bufs > 0);
        let (tx, rx) = channel();
        let stats = Arc::new(IoStats::default());
        let ring = if cfg.force_sync {
            None
        } else {
            match Ring::new(&cfg) {
                Ok(r) => Some(r),
                Err(why) => {
                    tracing::warn!("io_uring is not usable here ({why}); the disk cache uses pread/pwrite");
                    None
                }
            }
        };
        let mode = if ring.is_some() { Mode::Uring } else { Mode::Sync };
        let wake = ring.as_ref().map(|r| r.arena.wake.clone());
        let arena = ring.as_ref().map(|r| r.arena.clone());
        let st = stats.clone();
        let join = std::thread::Builder::new().name("wraith-uring".into()).spawn(move || match ring {
            Some(r) => r.run(rx, &st),
            None => run_sync(AlignedBuf::new(cfg.buf_size, cfg.align), rx, cfg.buf_size),
        })?;
        Ok(IoThread { tx, wake, mode, align: cfg.align, arena, join: Some(join), stats })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Where chunk buffers can borrow registered memory (io_uring mode only): see
    /// [`crate::chunk::pool`].
    pub fn slot_source(&self) -> Option<Arc<dyn SlotSource>> {
        self.arena.as_ref().map(|a| Arc::new(Lender(a.clone())) as Arc<dyn SlotSource>)
    }

    /// Queue `op`; `done` runs on the ring thread when it completed (or failed).
    pub fn submit(&self, op: Op, done: Done) {
        self.submit_many(vec![(op, done)]);
    }

    /// Queue several operations at once: they are pushed together and submitted with one
    /// `io_uring_enter` (as far as free slots allow).
    pub fn submit_many(&self, ops: Vec<(Op, Done)>) {
        if ops.is_empty() {
            return;
        }
        if let Err(std::sync::mpsc::SendError(Msg::Ops(ops))) = self.tx.send(Msg::Ops(ops)) {
            for (_, done) in ops {
                done(Err(io::Error::new(io::ErrorKind::BrokenPipe, "io thread stopped")));
            }
            return;
        }
        self.poke();
    }

    /// Read `len` bytes (at most [`HERE_MAX`]) at `offset` of `file` on the calling thread's own
    /// small ring, waiting at most `deadline`: see [`Here`]. The bytes read after the first `skip`
    /// are copied out (fewer at end of file: the caller's `O_DIRECT` padding in front is never
    /// copied); a read past the deadline is an error of kind `TimedOut`. None: no ring of
    /// its own works on this thread, the read is too large, this thread's buffer still belongs
    /// to an earlier read that outlived its deadline, or this store uses pread/pwrite — submit
    /// it to the ring thread instead.
    pub fn read_here(&self, file: &File, offset: u64, len: usize, skip: usize, deadline: Duration) -> Option<io::Result<Buf>> {
        if self.mode != Mode::Uring || len > HERE_MAX {
            return None;
        }
        HERE.with(|h| {
            let mut h = h.borrow_mut();
            if h.as_ref().is_some_and(|r| r.as_ref().is_ok_and(|r| r.align < self.align)) {
                *h = None;
            }
            let here = h.get_or_insert_with(|| {
                Here::new(self.align).map_err(|e| tracing::debug!("no io_uring ring of this thread's own ({e}); reads go through the ring thread"))
            });
            let r = here.as_mut().ok()?.read(file, offset, len, skip, deadline)?;
            self.stats.here_reads.fetch_add(1, Ordering::Relaxed);
            Some(r)
        })
    }

    fn poke(&self) {
        if let Some(w) = &self.wake {
            poke(w);
        }
    }
}

pub(super) fn poke(wake: &File) {
    let _ = (&*wake).write(&1u64.to_ne_bytes());
}

impl Drop for IoThread {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        self.poke();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// The largest read a thread's own ring takes ([`IoThread::read_here`]): a few pieces and the
/// block in front of them.
pub const HERE_MAX: usize = 128 << 10;

thread_local! {
    /// This thread's own ring: made at its first short read, Err when it cannot be.
    static HERE: RefCell<Option<Result<Here, ()>>> = const { RefCell::new(None) };
}

/// A ring of one thread's own, for a reader's short random reads from the disk cache: the thread
/// submits one `ReadFixed` into the one buffer registered with it and waits in `io_uring_enter`
/// itself. Through the ring thread the same read wakes two threads more (the ring thread at the
/// request and at the completion), and on a VM a wake-up costs tens of microseconds. One owner,
/// like every ring: the thread it belongs to.
struct Here {
    ring: IoUring,
    /// Dropped after the ring; leaked instead while `busy` (the kernel may still write it).
    buf: std::mem::ManuallyDrop<AlignedBuf>,
    align: usize,
    /// A read outlived its deadline: the buffer belongs to it until its completion is reaped.
    busy: bool,
}

impl Here {
    fn new(align: usize) -> io::Result<Here> {
        let ring = IoUring::new(4)?;
        if !ring.params().is_feature_ext_arg() {
            // Kernel < 5.11: no timeout on the wait, so no deadline.
            return Err(io::Error::new(io::ErrorKind::Unsupported, "kernel lacks IORING_FEAT_EXT_ARG"));
        }
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::ReadFixed::CODE) {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "kernel lacks IORING_OP_READ_FIXED"));
        }
        let buf = AlignedBuf::new(HERE_MAX + align, align);
        let iov = libc::iovec { iov_base: buf.ptr.as_ptr().cast(), iov_len: buf.len() };
        // SAFETY: the iovec describes `buf`, which is freed only after the ring is gone (Drop
        // below), or never when a read may still be writing it.
        unsafe { ring.submitter().register_buffers(&[iov])? };
        Ok(Here { ring, buf: std::mem::ManuallyDrop::new(buf), align, busy: false })
    }

    fn read(&mut self, file: &File, offset: u64, len: usize, skip: usize, deadline: Duration) -> Option<io::Result<Buf>> {
        if self.busy {
            // The late read's completion, if it has come by now.
            self.busy = self.ring.completion().next().is_none();
            if self.busy {
                return None;
            }
        }
        let e = opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), self.buf.ptr.as_ptr(), len as u32, 0).offset(offset).build();
        // SAFETY: buffer 0 is `buf`, registered above, HERE_MAX + align ≥ len bytes long; it is
        // not in use (not busy), and stays ours until this read's completion is reaped: below,
        // or, past the deadline, by a later call (`busy`), or never (leaked in Drop). `file`
        // outlives the read only as far as the wait below: past the deadline the kernel holds
        // its own reference to the open file for the request. The SQ is empty (one read at a
        // time).
        unsafe { self.ring.submission().push(&e).expect("the thread's own ring has room") };
        let until = Instant::now() + deadline;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let ts = types::Timespec::new().sec(left.as_secs()).nsec(left.subsec_nanos());
            match self.ring.submitter().submit_with_args(1, &types::SubmitArgs::new().timespec(&ts)) {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY | libc::ETIME)) => {}
                Err(e) => {
                    // Whether the read went in is unknown: keep the buffer out of use for good
                    // (this thread's reads go through the ring thread from now on, this one too).
                    // Not the cache entry's fault, so not an error for it.
                    tracing::warn!("io_uring_enter on a reading thread's own ring failed ({e}); its reads go through the ring thread");
                    self.busy = true;
                    return None;
                }
            }
            if let Some(c) = self.ring.completion().next() {
                let r = c.result();
                return Some(if r < 0 {
                    Err(io::Error::from_raw_os_error(-r))
                } else {
                    let kept = self.buf.as_slice().get(skip..r as usize).unwrap_or_default();
                    let mut v = crate::chunk::pool::take_vec(kept.len());
                    v.copy_from_slice(kept);
                    Ok(v.into())
                });
            }
            if left.is_zero() {
                self.busy = true;
                return Some(Err(io::Error::new(io::ErrorKind::TimedOut, "disk read past its deadline")));
            }
        }
    }
}

impl Drop for Here {
    fn drop(&mut self) {
        if !self.busy && self.ring.submitter().unregister_buffers().is_ok() {
            // SAFETY: no read is in flight and the buffer is no longer registered, so the kernel
            // has no way left to write it.
            unsafe { std::mem::ManuallyDrop::drop(&mut self.buf) }
        }
    }
}

fn parts(len: usize, buf_size: usize) -> usize {
    len.div_ceil(buf_size).max(1)
}

/// pread/pwrite, one operation at a time, through one aligned buffer.
fn run_sync(mut buf: AlignedBuf, rx: Receiver<Msg>, buf_size: usize) {
    loop {
        match rx.recv() {
            Ok(Msg::Ops(ops)) => {
                for (op, done) in ops {
                    done(sync_op(&op, &mut buf, buf_size));
                }
            }
            Ok(Msg::Stop) | Err(_) => return,
        }
    }
}

fn sync_op(op: &Op, buf: &mut AlignedBuf, buf_size: usize) -> io::Result<Buf> {
    match op {
        Op::Read { file, offset, len } => {
            let mut out = Vec::with_capacity(*len);
            while out.len() < *len {
                let want = (*len - out.len()).min(buf_size);
                let n = file.read_at(&mut buf.as_mut_slice()[..want], offset + out.len() as u64)?;
                out.extend_from_slice(&buf.as_slice()[..n]);
                if n < want {
                    break;
                }
            }
            Ok(out.into())
        }
        Op::Write { file, offset, padded, .. } => {
            let mut done = 0;
            while done < *padded {
                let part = (*padded - done).min(buf_size);
                copy_in_part(op, &mut buf.as_mut_slice()[..part], done);
                file.write_all_at(&buf.as_slice()[..part], offset + done as u64)?;
                done += part;
            }
            Ok(Vec::new().into())
        }
    }
}

/// Fill `dst` with the write's bytes from `start` on, zero past their end.
fn copy_in_part(op: &Op, dst: &mut [u8], start: usize) {
    if let Some(data) = op.write_data() {
        let have = data.len().saturating_sub(start).min(dst.len());
        dst[..have].copy_from_slice(&data[start..start + have]);
        dst[have..].fill(0);
    }
}


/// Register `iovecs` at table indexes `at..`, one per call: the kernel may register part of a
/// batch and report only how many (which `register_buffers_update` drops), so one at a time is
/// the way to know exactly which are registered. Returns how many were, and the error that
/// stopped it.
///
/// # Safety
/// Every iovec must describe memory that stays valid until it is unregistered or the ring is
/// gone.
unsafe fn register_each(ring: &IoUring, at: usize, iovecs: &[libc::iovec]) -> (usize, Option<io::Error>) {
    for (i, v) in iovecs.iter().enumerate() {
        // SAFETY: the caller's promise, for this one iovec.
        if let Err(e) = unsafe { ring.submitter().register_buffers_update((at + i) as u32, std::slice::from_ref(v), None) } {
            return (i, Some(e));
        }
    }
    (iovecs.len(), None)
}

struct InFlight {
    op: Op,
    done: Done,
    /// The slot of each part (None: a write from its data's own slot).
    slots: Vec<Option<Lease>>,
    left: usize,
    /// Bytes read so far into the heap (reads of several parts).
    out: Option<Vec<u8>>,
    /// Smallest end of a short part (reads) — the result is cut there.
    short: Option<usize>,
    err: Option<io::Error>,
}

struct Ring {
    ring: IoUring,
    arena: Arc<Arena>,
    wake_buf: Box<u64>,
    warned_grow: bool,
    /// For operations of more parts than the reserve has slots: pread/pwrite through this.
    big: AlignedBuf,
    /// The thread that prepares memory for the arena to grow (when it may grow).
    preparer: Option<JoinHandle<()>>,
}

impl Ring {
    fn new(cfg: &IoConfig) -> io::Result<Ring> {
        let max = cfg.max_bufs.max(cfg.n_bufs).min(MAX_REG_BUFFERS);
        // SAFETY: eventfd(2) has no memory arguments; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let wake = Arc::new(File::from(unsafe { OwnedFd::from_raw_fd(fd) }));
        // The memory is made before the ring: on every early return below, the ring (declared
        // after it) is dropped first, so registered memory outlives its registration.
        let region = Region::new(Region::bytes(cfg.buf_size, cfg.n_bufs))?;
        let mut iovecs = region.slots(cfg.buf_size, cfg.n_bufs);
        // Every queued part holds a slot (or is a write from its own slot): room for all of them.
        let ring = IoUring::new((max as u32 + 8).next_power_of_two().clamp(64, 32768))?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::ReadFixed::CODE, "READ_FIXED"),
            (opcode::WriteFixed::CODE, "WRITE_FIXED"),
            (opcode::Read::CODE, "READ"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("kernel lacks IORING_OP_{name}")));
            }
        }
        let sparse = ring.submitter().register_buffers_sparse(max as u32);
        let max = match sparse {
            // SAFETY: every iovec describes a slot of `region`, which moves into the arena, which
            // outlives the ring (see `run`), so the registered memory outlives the registration.
            Ok(()) => match unsafe { register_each(&ring, 0, &iovecs) } {
                (n, _) if n == iovecs.len() => max,
                // Part of the reserve (the memory lock limit of a user without CAP_IPC_LOCK,
                // often 8 MiB): enough to copy chunks through, none to lend; operations larger
                // than that go by pread/pwrite on the ring thread.
                (n, Some(e)) if n >= MIN_RESERVE => {
                    tracing::info!(
                        "io_uring registered {n} of {} buffers ({e}; RLIMIT_MEMLOCK?): chunks are copied through them, not kept in registered memory",
                        iovecs.len()
                    );
                    iovecs.truncate(n);
                    n
                }
                (n, e) => {
                    let e = e.unwrap_or_else(|| io::Error::other("short registration"));
                    return Err(io::Error::new(e.kind(), format!("registered {n} of {} buffers: {e}", iovecs.len())));
                }
            },
            Err(_) => {
                // SAFETY: as above.
                unsafe { ring.submitter().register_buffers(&iovecs)? };
                cfg.n_bufs
            }
        };
        let reserve = iovecs.len();
        let arena = Arc::new(Arena::new(cfg.buf_size, reserve, ArenaState::new(region, &iovecs, max), wake));
        let preparer = if max > reserve {
            match arena.spawn_preparer() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::info!("io_uring arena cannot grow: no thread to prepare memory ({e}); chunks use heap memory");
                    arena.state.lock().unwrap().max = reserve;
                    None
                }
            }
        } else {
            None
        };
        let big = AlignedBuf::new(cfg.buf_size, cfg.align);
        Ok(Ring { ring, arena, wake_buf: Box::new(0), warned_grow: false, big, preparer })
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(types::Fd(self.arena.wake.as_raw_fd()), (&mut *self.wake_buf as *mut u64).cast(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: wake_buf is a heap u64 owned by self that lives until the wake read's completion
        // has been reaped (run() waits for it before returning); the fd stays open as long (the
        // arena holds it). The SQ has room: it holds more entries than there are slots, and every
        // queued part holds a slot.
        unsafe { self.ring.submission().push(&e).expect("submission queue has room for the wake read") };
    }

    /// Register the slots the preparing thread made ready (see [`Arena`]). Their pages are
    /// there already, so registering only pins them; only this thread ever adds slots.
    fn grow(&mut self, stats: &IoStats) {
        let a = self.arena.clone();
        let (have, mut room, new) = {
            let mut st = a.state.lock().unwrap();
            if st.ready.is_empty() {
                return;
            }
            (st.slots.len(), st.max.saturating_sub(st.slots.len()), std::mem::take(&mut st.ready))
        };
        let mut regs: Vec<(Region, Vec<libc::iovec>)> = Vec::new();
        let mut err = None;
        let mut at = have;
        for (region, n) in new {
            // A region nothing of which gets registered is unmapped here, when it drops.
            if err.is_some() || room == 0 {
                continue;
            }
            let mut iovecs = region.slots(self.arena.slot, n.min(room));
            // SAFETY: the iovecs describe slots of `region`, which moves into the arena below
            // (mapped memory does not move) and lives until after the ring is gone, also when
            // only part of it was registered.
            let (done, e) = unsafe { register_each(&self.ring, at, &iovecs) };
            iovecs.truncate(done);
            err = e;
            if iovecs.is_empty() {
                continue;
            }
            at += iovecs.len();
            room -= iovecs.len();
            regs.push((region, iovecs));
        }
        let done = at - have;
        let mut st = a.state.lock().unwrap();
        for (region, iovecs) in regs {
            st.add(region, &iovecs);
        }
        st.free.extend((have..have + done).map(|i| i as u16));
        stats.slots.store(st.slots.len() as u64, Ordering::Relaxed);
        if let Some(e) = err {
            // Memory lock limit reached (RLIMIT_MEMLOCK without CAP_IPC_LOCK), most likely.
            st.max = have + done;
            if !std::mem::replace(&mut self.warned_grow, true) {
                tracing::info!("io_uring registered {} buffers and no more ({e}); further chunks use heap memory", have + done);
            }
        }
    }

    fn run(mut self, rx: Receiver<Msg>, stats: &IoStats) {
        let slot = self.arena.slot;
        let mut table: Vec<Option<InFlight>> = Vec::new();
        let mut pending: VecDeque<(Op, Done)> = VecDeque::new();
        let mut inflight = 0usize;
        let mut stopping = false;
        let mut wake_armed = true;
        let mut batch = 0u64;
        stats.slots.store(self.arena.reserve as u64, Ordering::Relaxed);
        self.arm_wake();
        loop {
            self.grow(stats);
            // Start what fits in the free slots, in order.
            while let Some((op, _)) = pending.front() {
                // A write whose bytes already lie in one of our slots goes from there.
                let own = op.write_data().and_then(|d| {
                    let l = d.slot()?.as_any().downcast_ref::<Lease>()?;
                    (Arc::ptr_eq(&l.arena, &self.arena) && d.len() == op.len()).then_some((l.ptr, l.id))
                });
                let need = if own.is_some() { 0 } else { parts(op.len(), slot) };
                if need > self.arena.reserve {
                    // Only with a partly registered reserve (or a chunk over 16 MiB): served
                    // synchronously here, rare and bounded.
                    let (op, done) = pending.pop_front().unwrap();
                    done(sync_op(&op, &mut self.big, slot));
                    continue;
                }
                let Some(mut slots) = self.arena.take(need) else { break };
                let (op, done) = pending.pop_front().unwrap();
                for (i, l) in slots.iter_mut().enumerate() {
                    let start = i * slot;
                    let part = (op.len() - start).min(slot);
                    copy_in_part(&op, &mut l.bytes_mut()[..part], start);
                }
                let idx = table.iter().position(Option::is_none).unwrap_or_else(|| {
                    table.push(None);
                    table.len() - 1
                });
                let places: Vec<(NonNull<u8>, u16)> = match own {
                    Some(p) => vec![p],
                    None => slots.iter().map(|l| (l.ptr, l.id)).collect(),
                };
                for (i, &(ptr, id)) in places.iter().enumerate() {
                    let start = i * slot;
                    let part = (op.len() - start).min(slot) as u32;
                    let ud = ((idx as u64) << 16) | i as u64;
                    let e = match &op {
                        Op::Read { file, offset, .. } => {
                            opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), ptr.as_ptr(), part, id)
                                .offset(offset + start as u64)
                                .build()
                        }
                        Op::Write { file, offset, .. } => {
                            opcode::WriteFixed::new(types::Fd(file.as_raw_fd()), ptr.as_ptr(), part, id)
                                .offset(offset + start as u64)
                                .build()
                        }
                    };
                    // SAFETY: slot `id` is registered at index `id` and is `part` bytes or longer.
                    // It stays ours until this part's completion is reaped: a part's Lease, or
                    // the write's own data (kept alive by the op), sit in the InFlight entry
                    // until then; the kernel only reads a write's data. The file is kept open by
                    // the Arc in the op. The SQ has more entries than there are slots.
                    unsafe { self.ring.submission().push(&e.user_data(ud)).expect("submission queue has room") };
                    stats.sqes.fetch_add(1, Ordering::Relaxed);
                    batch += 1;
                }
                if own.is_some() {
                    stats.zero_copy_writes.fetch_add(1, Ordering::Relaxed);
                }
                let out = match &op {
                    Op::Read { len, .. } if places.len() > 1 => Some(crate::chunk::pool::take_vec(*len)),
                    _ => None,
                };
                let slots: Vec<Option<Lease>> = if own.is_some() { vec![None] } else { slots.into_iter().map(Some).collect() };
                table[idx] = Some(InFlight { op, done, left: places.len(), slots, out, short: None, err: None });
                inflight += 1;
            }
            if stopping && inflight == 0 && pending.is_empty() {
                if !wake_armed {
                    break;
                }
                // Complete our own wake read so its buffer is not in use when we return.
                poke(&self.arena.wake);
            }
            stats.enters.fetch_add(1, Ordering::Relaxed);
            stats.max_batch.fetch_max(batch, Ordering::Relaxed);
            batch = 0;
            #[cfg(test)]
            let r = if inflight > 0 && stats.fail_enter.swap(false, Ordering::Relaxed) {
                Err(io::Error::from_raw_os_error(libc::EFAULT))
            } else {
                self.ring.submit_and_wait(1)
            };
            #[cfg(not(test))]
            let r = self.ring.submit_and_wait(1);
            match r {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)) => {}
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    // The kernel is short of memory for requests for a moment: try again.
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => {
                    tracing::error!("io_uring_enter failed: {e}; the disk cache goes on with pread/pwrite");
                    // What is in flight may still be the kernel's: its slots, a write's bytes
                    // and the wake read's buffer are leaked (the arena with them), and its
                    // requester gets an error, so nobody waits for it forever.
                    for f in table.drain(..).flatten() {
                        let InFlight { op, done, slots, .. } = f;
                        std::mem::forget((op, slots));
                        done(Err(io::Error::other("io_uring failed")));
                    }
                    std::mem::forget(self.arena.clone());
                    std::mem::forget(std::mem::take(&mut self.wake_buf));
                    self.serve_sync(pending, &rx, stopping);
                    break;
                }
            }
            let cqes: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
            for (ud, res) in cqes {
                if ud == WAKE {
                    wake_armed = false;
                    loop {
                        match rx.try_recv() {
                            Ok(Msg::Ops(ops)) => pending.extend(ops),
                            Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => {
                                stopping = true;
                                break;
                            }
                            Err(TryRecvError::Empty) => break,
                        }
                    }
                    if !stopping {
                        self.arm_wake();
                        wake_armed = true;
                    }
                    continue;
                }
                let (idx, part) = ((ud >> 16) as usize, (ud & 0xffff) as usize);
                let Some(f) = table[idx].as_mut() else { continue };
                let start = part * slot;
                let want = (f.op.len() - start).min(slot);
                if res < 0 {
                    f.err.get_or_insert(io::Error::from_raw_os_error(-res));
                } else {
                    let n = res as usize;
                    if n < want {
                        f.short = Some(f.short.map_or(start + n, |s| s.min(start + n)));
                    }
                    if let Some(out) = f.out.as_mut() {
                        if let Some(l) = f.slots[part].take() {
                            out[start..start + n].copy_from_slice(&l.bytes()[..n]);
                        }
                    }
                }
                f.left -= 1;
                if f.left == 0 {
                    let f = table[idx].take().unwrap();
                    inflight -= 1;
                    self.finish(f, stats);
                }
            }
        }
        // The ring (and its registration) goes first, then the arena (unless leases hold it).
        self.arena.stop_preparer();
        if let Some(j) = self.preparer.take() {
            let _ = j.join();
        }
        let Ring { ring, arena, wake_buf, big, .. } = self;
        drop(big);
        drop(ring);
        drop(wake_buf);
        drop(arena);
    }

    /// After the ring failed: every operation, those waiting and those still to come, with
    /// pread/pwrite on this thread until the store stops.
    fn serve_sync(&mut self, mut pending: VecDeque<(Op, Done)>, rx: &Receiver<Msg>, mut stopping: bool) {
        let slot = self.arena.slot;
        loop {
            while let Some((op, done)) = pending.pop_front() {
                done(sync_op(&op, &mut self.big, slot));
            }
            if stopping {
                return;
            }
            match rx.recv() {
                Ok(Msg::Ops(ops)) => pending.extend(ops),
                Ok(Msg::Stop) | Err(_) => stopping = true,
            }
        }
    }

    /// Hand a completed operation's result to its requester.
    fn finish(&self, mut f: InFlight, stats: &IoStats) {
        let r = match (f.err.take(), &f.op) {
            (Some(e), _) => Err(e),
            (None, Op::Write { .. }) if f.short.is_some() => Err(io::Error::new(io::ErrorKind::WriteZero, "short write")),
            (None, Op::Write { .. }) => Ok(Buf::from(Vec::new())),
            (None, Op::Read { len, .. }) => {
                let n = f.short.unwrap_or(*len);
                match (f.out.take(), f.slots.pop().flatten()) {
                    (Some(mut out), _) => {
                        out.truncate(n);
                        Ok(out.into())
                    }
                    // Where it landed, if the ring keeps its reserve without this slot.
                    (None, Some(l)) if self.arena.can_lend() => {
                        stats.zero_copy_reads.fetch_add(1, Ordering::Relaxed);
                        Ok(Buf::from_slot(Box::new(l), n))
                    }
                    (None, Some(l)) => {
                        // Register more, so that later reads can stay where they land.
                        let mut st = self.arena.state.lock().unwrap();
                        self.arena.want_more(&mut st);
                        drop(st);
                        let mut v = crate::chunk::pool::take_vec(n);
                        v.copy_from_slice(&l.bytes()[..n]);
                        Ok(v.into())
                    }
                    (None, None) => Ok(Buf::from(Vec::new())),
                }
            }
        };
        drop(f.slots);
        (f.done)(r);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::sync_channel;

    fn roundtrip(force_sync: bool) {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap(),
        );
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 4, max_bufs: 4, force_sync }).unwrap();
        if force_sync {
            assert_eq!(io.mode(), Mode::Sync);
        }
        let (tx, rx) = sync_channel(64);
        // Many writes at once (more than the pool: some wait for buffers), one of three parts.
        for i in 0..20u64 {
            let data: Vec<u8> = (0..5000).map(|j| (i as usize * 7 + j) as u8).collect();
            let tx = tx.clone();
            io.submit(
                Op::Write { file: f.clone(), offset: i * 8192, data: Box::new(Buf::from(data)), padded: 8192 },
                Box::new(move |r| tx.send(r.map(|_| ())).unwrap()),
            );
        }
        let big: Vec<u8> = (0..20000).map(|j| (j % 251) as u8).collect();
        let txb = tx.clone();
        io.submit(
            Op::Write { file: f.clone(), offset: 20 * 8192, data: Box::new(Buf::from(big.clone())), padded: 20480 },
            Box::new(move |r| txb.send(r.map(|_| ())).unwrap()),
        );
        for _ in 0..21 {
            rx.recv().unwrap().unwrap();
        }
        let (rtx, rrx) = sync_channel(64);
        for i in 0..20u64 {
            let rtx = rtx.clone();
            io.submit(Op::Read { file: f.clone(), offset: i * 8192, len: 8192 }, Box::new(move |r| rtx.send((i, r)).unwrap()));
        }
        for _ in 0..20 {
            let (i, r) = rrx.recv().unwrap();
            let got = r.unwrap();
            let want: Vec<u8> = (0..5000).map(|j| (i as usize * 7 + j) as u8).collect();
            assert_eq!(&got[..5000], &want[..]);
            assert!(got[5000..].iter().all(|&b| b == 0));
        }
        // Read across the end of the file: short.
        let rtx2 = rtx.clone();
        io.submit(Op::Read { file: f.clone(), offset: 20 * 8192, len: 24576 }, Box::new(move |r| rtx2.send((0, r)).unwrap()));
        let got = rrx.recv().unwrap().1.unwrap();
        assert_eq!(got.len(), 20480);
        assert_eq!(&got[..20000], &big[..]);
        // More parts than the pool has slots: written and read all the same (synchronously).
        let huge: Vec<u8> = (0..6 * 8192).map(|j| (j % 253) as u8).collect();
        let txh = tx.clone();
        io.submit(
            Op::Write { file: f.clone(), offset: 24 * 8192, data: Box::new(Buf::from(huge.clone())), padded: huge.len() },
            Box::new(move |r| txh.send(r.map(|_| ())).unwrap()),
        );
        rx.recv().unwrap().unwrap();
        io.submit(Op::Read { file: f.clone(), offset: 24 * 8192, len: huge.len() }, Box::new(move |r| rtx.send((0, r)).unwrap()));
        assert_eq!(&rrx.recv().unwrap().1.unwrap()[..], &huge[..]);
        drop(io);
    }

    /// An `io_uring_enter` that fails for good: what was in the ring gets an error (nobody
    /// waits forever), what comes later is served with pread/pwrite, and the thread stops.
    #[test]
    fn a_failed_ring_answers_everything_and_goes_on_with_pread() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap(),
        );
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 4, max_bufs: 4, force_sync: false }).unwrap();
        if io.mode() != Mode::Uring {
            panic!("io_uring is not available here");
        }
        let (tx, rx) = sync_channel(64);
        let write = |i: u64, tx: std::sync::mpsc::SyncSender<io::Result<()>>| {
            let data: Vec<u8> = (0..8192).map(|j| (i as usize * 5 + j) as u8).collect();
            io.submit(
                Op::Write { file: f.clone(), offset: i * 8192, data: Box::new(Buf::from(data)), padded: 8192 },
                Box::new(move |r| tx.send(r.map(|_| ())).unwrap()),
            );
        };
        io.stats.fail_enter.store(true, Ordering::Relaxed);
        let ops: Vec<(Op, Done)> = (0..8u64)
            .map(|i| {
                let tx = tx.clone();
                let data: Vec<u8> = (0..8192).map(|j| (i as usize * 5 + j) as u8).collect();
                let op = Op::Write { file: f.clone(), offset: i * 8192, data: Box::new(Buf::from(data)), padded: 8192 };
                let done: Done = Box::new(move |r| tx.send(r.map(|_| ())).unwrap());
                (op, done)
            })
            .collect();
        io.submit_many(ops);
        let mut failed = 0;
        for _ in 0..8 {
            if rx.recv_timeout(Duration::from_secs(10)).expect("every write is answered").is_err() {
                failed += 1;
            }
        }
        assert!(failed >= 1, "the writes in the failed ring get an error");
        for i in 0..8 {
            write(i, tx.clone());
            rx.recv_timeout(Duration::from_secs(10)).expect("answered").expect("written with pwrite");
        }
        let (rtx, rrx) = sync_channel(8);
        io.submit(Op::Read { file: f.clone(), offset: 3 * 8192, len: 8192 }, Box::new(move |r| rtx.send(r).unwrap()));
        let got = rrx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        let want: Vec<u8> = (0..8192).map(|j| (3 * 5 + j) as u8).collect();
        assert_eq!(&got[..], &want[..]);
        drop(io);
    }

    #[test]
    fn uring_roundtrip_and_batching() {
        roundtrip(false);
    }

    /// A thread's own ring: reads land right (short at end of file), too large a read or a store
    /// on pread/pwrite goes to the ring thread, and a read past its deadline keeps the buffer
    /// until its completion is reaped (a pipe that stays empty stands in for a stuck disk).
    #[test]
    fn reads_on_the_threads_own_ring() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..40000u32).map(|j| (j % 241) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let f = std::fs::File::open(dir.path().join("f")).unwrap();
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 4, max_bufs: 4, force_sync: false }).unwrap();
        let secs = std::time::Duration::from_secs(5);
        let got = io.read_here(&f, 8192, 16384, 0, secs).expect("a ring of its own").unwrap();
        assert_eq!(&got[..], &data[8192..24576]);
        let tail = io.read_here(&f, 32768, 16384, 0, secs).unwrap().unwrap();
        assert_eq!(&tail[..], &data[32768..], "short at end of file");
        let skipped = io.read_here(&f, 8192, 8192, 512, secs).unwrap().unwrap();
        assert_eq!(&skipped[..], &data[8704..16384], "the first bytes skipped, not copied");
        assert!(io.read_here(&f, 0, HERE_MAX + 1, 0, secs).is_none(), "too large: the ring thread's");
        assert_eq!(io.stats.here_reads.load(Ordering::Relaxed), 3);
        // Another thread gets a ring of its own.
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(&io.read_here(&f, 0, 4096, 0, secs).unwrap().unwrap()[..], &data[..4096]));
        });
        let sync = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 4, max_bufs: 4, force_sync: true }).unwrap();
        assert!(sync.read_here(&f, 0, 4096, 0, secs).is_none(), "pread/pwrite mode: no ring here");

        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into `fds`, which we then own.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both are fresh descriptors nothing else owns.
        let (r, mut w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        let t0 = Instant::now();
        let late = io.read_here(&r, 0, 4096, 0, std::time::Duration::from_millis(100)).unwrap();
        assert_eq!(late.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert!(t0.elapsed() < secs, "the deadline holds");
        assert!(io.read_here(&f, 0, 4096, 0, secs).is_none(), "the buffer still belongs to the late read");
        w.write_all(b"late").unwrap();
        let mut again = None;
        for _ in 0..500 {
            again = io.read_here(&f, 4096, 4096, 0, secs);
            if again.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let again = again.expect("the late read's completion frees the buffer").unwrap();
        assert_eq!(&again[..], &data[4096..8192], "the late read's bytes never show up in a later one");
    }

    #[test]
    fn submit_many_goes_in_with_one_enter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join("f")).unwrap().set_len(8 * 8192).unwrap();
        let f = Arc::new(std::fs::File::open(dir.path().join("f")).unwrap());
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 8, max_bufs: 8, force_sync: false }).unwrap();
        assert_eq!(io.mode(), Mode::Uring, "io_uring is usable on the machines this runs on");
        let (tx, rx) = sync_channel(8);
        let ops = (0..8u64)
            .map(|i| {
                let tx = tx.clone();
                let done: Done = Box::new(move |r| tx.send(r.map(|d| d.len())).unwrap());
                (Op::Read { file: f.clone(), offset: i * 8192, len: 8192 }, done)
            })
            .collect();
        io.submit_many(ops);
        for _ in 0..8 {
            assert_eq!(rx.recv().unwrap().unwrap(), 8192);
        }
        assert_eq!(io.stats.sqes.load(Ordering::Relaxed), 8);
        assert_eq!(io.stats.max_batch.load(Ordering::Relaxed), 8, "the eight reads went in with one enter");
    }

    /// Lent slots: the arena grows on demand up to its bound and never lends its reserve; a write
    /// from a lent slot and a read into one copy nothing; a returned slot is lent again.
    #[test]
    fn lent_slots_are_written_and_read_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let f = Arc::new(
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.path().join("f")).unwrap(),
        );
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 4, max_bufs: 12, force_sync: false }).unwrap();
        assert_eq!(io.mode(), Mode::Uring, "io_uring is usable on the machines this runs on");
        let src = io.slot_source().expect("io_uring mode lends slots");
        assert!(src.lend(8193).is_none(), "larger than a slot");
        // The reserve is never lent: the first ask only makes the ring register more.
        let mut lent = Vec::new();
        for _ in 0..2000 {
            match src.lend(8192) {
                Some(s) => lent.push(s),
                None if io.stats.slots.load(Ordering::Relaxed) >= 12 && lent.len() >= 8 => break,
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
        assert_eq!(lent.len(), 8, "12 slots at most, 4 of them kept");
        assert_eq!(io.stats.slots.load(Ordering::Relaxed), 12);
        // Write two lent slots' bytes from where they are.
        let mut bufs: Vec<Buf> = lent.drain(..2).map(|s| Buf::from_slot(s, 8192)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            b.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 31 + j) as u8);
        }
        let (tx, rx) = sync_channel(8);
        for (i, b) in bufs.into_iter().enumerate() {
            let tx = tx.clone();
            io.submit(
                Op::Write { file: f.clone(), offset: i as u64 * 8192, data: Box::new(b), padded: 8192 },
                Box::new(move |r| tx.send(r.map(|_| ())).unwrap()),
            );
        }
        rx.recv().unwrap().unwrap();
        rx.recv().unwrap().unwrap();
        assert_eq!(io.stats.zero_copy_writes.load(Ordering::Relaxed), 2);
        // Those two slots are back; a read lands in a slot and stays there (the reserve is whole).
        let (rtx, rrx) = sync_channel(8);
        for i in 0..2u64 {
            let rtx = rtx.clone();
            io.submit(Op::Read { file: f.clone(), offset: i * 8192, len: 8192 }, Box::new(move |r| rtx.send((i, r)).unwrap()));
        }
        let mut got = Vec::new();
        for _ in 0..2 {
            let (i, r) = rrx.recv().unwrap();
            let b = r.unwrap();
            assert!(b.iter().enumerate().all(|(j, &x)| x == (i as usize * 31 + j) as u8));
            got.push(b);
        }
        assert!(got.iter().all(|b| b.slot().is_some()), "reads were handed over in their slots");
        assert_eq!(io.stats.zero_copy_reads.load(Ordering::Relaxed), 2);
        // With every lendable slot out, a read is copied to the heap and its slot kept.
        assert!(src.lend(8192).is_none(), "the reads hold the last two lendable slots");
        drop(got);
        lent.extend((0..2).map(|_| src.lend(8192).unwrap()));
        assert!(src.lend(8192).is_none());
        io.submit(Op::Read { file: f.clone(), offset: 0, len: 8192 }, Box::new(move |r| rtx.send((0, r)).unwrap()));
        let b = rrx.recv().unwrap().1.unwrap();
        assert!(b.slot().is_none() && b[1] == 1);
        assert_eq!(io.stats.zero_copy_reads.load(Ordering::Relaxed), 2);
        // Leases may outlive the ring.
        drop(io);
        drop(lent);
    }

    #[test]
    fn forced_fallback_roundtrip() {
        roundtrip(true);
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let b = AlignedBuf::new(8192, 4096);
        assert_eq!(b.as_slice().as_ptr() as usize % 4096, 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }
}
