//! One thread that owns an io_uring ring, its registered aligned buffers and its table of
//! in-flight operations. Other threads hand it [`Op`]s by channel and get the result back through
//! a callback that runs on the ring thread (it should only send on a channel).
//!
//! - Buffers: a pool of [`AlignedBuf`]s (alignment from the device, see `sys::disk::dio_align`),
//!   registered with `register_buffers`; reads are `ReadFixed`, writes `WriteFixed`. An operation
//!   larger than one buffer is split into parts, one buffer and one SQE each.
//! - A buffer belongs to its operation until the kernel's completion for it arrives, whatever the
//!   requester does meanwhile; at shutdown the thread waits for every completion first.
//! - Batching: everything queued while the thread was waiting is pushed, then one
//!   `io_uring_enter` submits it all and waits for at least one completion.
//! - Waking: an `eventfd` read is kept armed in the ring; a requester writes the eventfd after
//!   queueing, so the ring thread only ever sleeps inside `io_uring_enter`.
//! - Fallback: when the ring cannot be set up, buffers cannot be registered, or the kernel lacks
//!   an opcode, the thread says so once and serves the same requests with `pread`/`pwrite`.

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
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

use io_uring::{opcode, types, IoUring, Probe};

/// Heap memory aligned for `O_DIRECT`, freed with the layout it was allocated with.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
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

    fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// One I/O request. Offsets and lengths must respect the file's `O_DIRECT` alignment when the
/// file was opened with `O_DIRECT` (the caller pads).
pub enum Op {
    /// Read `len` bytes at `offset`. Completes with the bytes read (shorter at end of file).
    Read { file: Arc<File>, offset: u64, len: usize },
    /// Write `data`, zero-padded to `padded` bytes, at `offset`. Completes with an empty Vec.
    Write { file: Arc<File>, offset: u64, data: Box<dyn AsRef<[u8]> + Send>, padded: usize },
}

impl Op {
    fn len(&self) -> usize {
        match self {
            Op::Read { len, .. } => *len,
            Op::Write { padded, .. } => *padded,
        }
    }
}

/// Called on the ring thread with the result of an [`Op`]. Keep it short (send on a channel).
pub type Done = Box<dyn FnOnce(io::Result<Vec<u8>>) + Send>;

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
    /// Size of one pool buffer (a multiple of `align`).
    pub buf_size: usize,
    pub n_bufs: usize,
    /// Use pread/pwrite even if io_uring works (tests).
    pub force_sync: bool,
}

/// How much batching happened: operations (SQEs) per `io_uring_enter`.
#[derive(Default, Debug)]
pub struct IoStats {
    pub sqes: AtomicU64,
    pub enters: AtomicU64,
    /// Most SQEs one `io_uring_enter` submitted.
    pub max_batch: AtomicU64,
}

/// Handle to the ring thread. Dropping it stops the thread after every operation completed.
pub struct IoThread {
    tx: Sender<Msg>,
    wake: Option<File>,
    mode: Mode,
    join: Option<JoinHandle<()>>,
    pub stats: Arc<IoStats>,
}

const WAKE: u64 = u64::MAX;

impl IoThread {
    pub fn start(cfg: IoConfig) -> io::Result<IoThread> {
        assert!(cfg.align.is_power_of_two() && cfg.buf_size % cfg.align == 0 && cfg.n_bufs > 0);
        let (tx, rx) = channel();
        let stats = Arc::new(IoStats::default());
        let mut pool: Vec<AlignedBuf> = (0..cfg.n_bufs).map(|_| AlignedBuf::new(cfg.buf_size, cfg.align)).collect();
        let ring = if cfg.force_sync {
            None
        } else {
            match Ring::new(&mut pool) {
                Ok(r) => Some(r),
                Err(why) => {
                    tracing::warn!("io_uring is not usable here ({why}); the disk cache uses pread/pwrite");
                    None
                }
            }
        };
        let mode = if ring.is_some() { Mode::Uring } else { Mode::Sync };
        let wake = match &ring {
            Some(r) => Some(r.wake.try_clone()?),
            None => None,
        };
        let st = stats.clone();
        let join = std::thread::Builder::new().name("wraith-uring".into()).spawn(move || match ring {
            Some(r) => r.run(pool, rx, cfg.buf_size, &st),
            None => run_sync(pool, rx, cfg.buf_size),
        })?;
        Ok(IoThread { tx, wake, mode, join: Some(join), stats })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Queue `op`; `done` runs on the ring thread when it completed (or failed).
    pub fn submit(&self, op: Op, done: Done) {
        self.submit_many(vec![(op, done)]);
    }

    /// Queue several operations at once: they are pushed together and submitted with one
    /// `io_uring_enter` (as far as free buffers allow).
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

    fn poke(&self) {
        if let Some(w) = &self.wake {
            let _ = (&*w).write(&1u64.to_ne_bytes());
        }
    }
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

fn parts(len: usize, buf_size: usize) -> usize {
    len.div_ceil(buf_size).max(1)
}

fn copy_in(op: &Op, bufs: &mut [AlignedBuf], ids: &[u16], buf_size: usize) {
    if let Op::Write { data, padded, .. } = op {
        let data = data.as_ref().as_ref();
        for (i, &b) in ids.iter().enumerate() {
            let start = i * buf_size;
            let part = (*padded - start).min(buf_size);
            let dst = &mut bufs[b as usize].as_mut_slice()[..part];
            let have = data.len().saturating_sub(start).min(part);
            dst[..have].copy_from_slice(&data[start..start + have]);
            dst[have..].fill(0);
        }
    }
}

/// pread/pwrite, one operation at a time, through one aligned buffer.
fn run_sync(mut pool: Vec<AlignedBuf>, rx: Receiver<Msg>, buf_size: usize) {
    loop {
        match rx.recv() {
            Ok(Msg::Ops(ops)) => {
                for (op, done) in ops {
                    done(sync_op(&op, &mut pool[0], buf_size));
                }
            }
            Ok(Msg::Stop) | Err(_) => return,
        }
    }
}

fn sync_op(op: &Op, buf: &mut AlignedBuf, buf_size: usize) -> io::Result<Vec<u8>> {
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
            Ok(out)
        }
        Op::Write { file, offset, padded, .. } => {
            let mut done = 0;
            while done < *padded {
                let part = (*padded - done).min(buf_size);
                copy_in_part(op, buf, done, part);
                file.write_all_at(&buf.as_slice()[..part], offset + done as u64)?;
                done += part;
            }
            Ok(Vec::new())
        }
    }
}

fn copy_in_part(op: &Op, buf: &mut AlignedBuf, start: usize, part: usize) {
    if let Op::Write { data, .. } = op {
        let data = data.as_ref().as_ref();
        let have = data.len().saturating_sub(start).min(part);
        let dst = &mut buf.as_mut_slice()[..part];
        dst[..have].copy_from_slice(&data[start..start + have]);
        dst[have..].fill(0);
    }
}

struct InFlight {
    op: Op,
    done: Done,
    bufs: Vec<u16>,
    left: usize,
    out: Vec<u8>,
    /// Smallest end of a short part (reads) — the result is cut there.
    short: Option<usize>,
    err: Option<io::Error>,
}

struct Ring {
    ring: IoUring,
    wake: File,
    wake_buf: Box<u64>,
}

impl Ring {
    fn new(pool: &mut [AlignedBuf]) -> io::Result<Ring> {
        let ring = IoUring::new((pool.len() as u32 + 8).next_power_of_two().max(64))?;
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
        let iovecs: Vec<libc::iovec> = pool
            .iter_mut()
            .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
            .collect();
        // SAFETY: every iovec describes a live AlignedBuf of the pool. The pool moves into the ring
        // thread together with the ring (heap memory does not move) and is dropped only after the
        // ring (see `run`), so the registered memory outlives the registration.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        // SAFETY: eventfd(2) has no memory arguments; a non-negative return is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Ring { ring, wake, wake_buf: Box::new(0) })
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), (&mut *self.wake_buf as *mut u64).cast(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: wake_buf is a heap u64 owned by self that lives until the wake read's completion
        // has been reaped (run() waits for it before returning); the fd stays open as long.
        // The SQ has room: it holds n_bufs + 8 entries and at most n_bufs parts are ever queued.
        unsafe { self.ring.submission().push(&e).expect("submission queue has room for the wake read") };
    }

    fn run(mut self, mut pool: Vec<AlignedBuf>, rx: Receiver<Msg>, buf_size: usize, stats: &IoStats) {
        let mut free: Vec<u16> = (0..pool.len() as u16).rev().collect();
        let mut table: Vec<Option<InFlight>> = Vec::new();
        let mut pending: VecDeque<(Op, Done)> = VecDeque::new();
        let mut inflight = 0usize;
        let mut stopping = false;
        let mut wake_armed = true;
        let mut batch = 0u64;
        self.arm_wake();
        loop {
            // Start what fits in the free buffers, in order.
            while let Some((op, _)) = pending.front() {
                let need = parts(op.len(), buf_size);
                if need > pool.len() {
                    let (_, done) = pending.pop_front().unwrap();
                    done(Err(io::Error::new(io::ErrorKind::InvalidInput, "operation larger than the buffer pool")));
                    continue;
                }
                if need > free.len() {
                    break;
                }
                let (op, done) = pending.pop_front().unwrap();
                let ids: Vec<u16> = (0..need).map(|_| free.pop().unwrap()).collect();
                copy_in(&op, &mut pool, &ids, buf_size);
                let slot = table.iter().position(Option::is_none).unwrap_or_else(|| {
                    table.push(None);
                    table.len() - 1
                });
                for (i, &b) in ids.iter().enumerate() {
                    let start = i * buf_size;
                    let part = (op.len() - start).min(buf_size) as u32;
                    let ptr = pool[b as usize].as_mut_ptr();
                    let ud = ((slot as u64) << 16) | i as u64;
                    let e = match &op {
                        Op::Read { file, offset, .. } => {
                            opcode::ReadFixed::new(types::Fd(file.as_raw_fd()), ptr, part, b)
                                .offset(offset + start as u64)
                                .build()
                        }
                        Op::Write { file, offset, .. } => {
                            opcode::WriteFixed::new(types::Fd(file.as_raw_fd()), ptr, part, b)
                                .offset(offset + start as u64)
                                .build()
                        }
                    };
                    // SAFETY: buffer b is registered at index b, is `part` bytes or longer and
                    // is removed from the free list until this part's completion is reaped; the
                    // file is kept open by the Arc inside the InFlight entry until then. The SQ
                    // holds n_bufs + 8 entries and at most n_bufs parts + 1 wake are queued.
                    unsafe { self.ring.submission().push(&e.user_data(ud)).expect("submission queue has room") };
                    stats.sqes.fetch_add(1, Ordering::Relaxed);
                    batch += 1;
                }
                let out = match &op {
                    Op::Read { len, .. } => crate::chunk::pool::take(*len),
                    Op::Write { .. } => Vec::new(),
                };
                table[slot] = Some(InFlight { op, done, left: ids.len(), bufs: ids, out, short: None, err: None });
                inflight += 1;
            }
            if stopping && inflight == 0 && pending.is_empty() {
                if !wake_armed {
                    break;
                }
                // Complete our own wake read so its buffer is not in use when we return.
                let _ = (&self.wake).write(&1u64.to_ne_bytes());
            }
            stats.enters.fetch_add(1, Ordering::Relaxed);
            stats.max_batch.fetch_max(batch, Ordering::Relaxed);
            batch = 0;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => {
                    tracing::error!("io_uring_enter failed: {e}; the disk cache stops");
                    // Nothing can complete any more: fail what waits (buffers stay leaked in-kernel).
                    for (_, done) in pending.drain(..) {
                        done(Err(io::Error::other("io_uring failed")));
                    }
                    std::mem::forget(pool);
                    return;
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
                let (slot, part) = ((ud >> 16) as usize, (ud & 0xffff) as usize);
                let Some(f) = table[slot].as_mut() else { continue };
                let b = f.bufs[part];
                let start = part * buf_size;
                let want = (f.op.len() - start).min(buf_size);
                if res < 0 {
                    f.err.get_or_insert(io::Error::from_raw_os_error(-res));
                } else {
                    let n = res as usize;
                    match &f.op {
                        Op::Read { .. } => {
                            f.out[start..start + n].copy_from_slice(&pool[b as usize].as_slice()[..n]);
                            if n < want {
                                f.short = Some(f.short.map_or(start + n, |s| s.min(start + n)));
                            }
                        }
                        Op::Write { .. } if n < want => {
                            f.err.get_or_insert(io::Error::new(io::ErrorKind::WriteZero, "short write"));
                        }
                        Op::Write { .. } => {}
                    }
                }
                free.push(b);
                f.left -= 1;
                if f.left == 0 {
                    let mut f = table[slot].take().unwrap();
                    inflight -= 1;
                    let r = match f.err.take() {
                        Some(e) => Err(e),
                        None => {
                            if let Some(s) = f.short {
                                f.out.truncate(s);
                            }
                            Ok(std::mem::take(&mut f.out))
                        }
                    };
                    (f.done)(r);
                }
            }
        }
        // The ring (and its registration) goes first, then the buffers.
        drop(self);
        drop(pool);
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
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 4, force_sync }).unwrap();
        if force_sync {
            assert_eq!(io.mode(), Mode::Sync);
        }
        let (tx, rx) = sync_channel(64);
        // Many writes at once (more than the pool: some wait for buffers), one of three parts.
        for i in 0..20u64 {
            let data: Vec<u8> = (0..5000).map(|j| (i as usize * 7 + j) as u8).collect();
            let tx = tx.clone();
            io.submit(
                Op::Write { file: f.clone(), offset: i * 8192, data: Box::new(data), padded: 8192 },
                Box::new(move |r| tx.send(r.map(|_| ())).unwrap()),
            );
        }
        let big: Vec<u8> = (0..20000).map(|j| (j % 251) as u8).collect();
        let txb = tx.clone();
        io.submit(
            Op::Write { file: f.clone(), offset: 20 * 8192, data: Box::new(big.clone()), padded: 20480 },
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
        io.submit(Op::Read { file: f.clone(), offset: 20 * 8192, len: 24576 }, Box::new(move |r| rtx.send((0, r)).unwrap()));
        let got = rrx.recv().unwrap().1.unwrap();
        assert_eq!(got.len(), 20480);
        assert_eq!(&got[..20000], &big[..]);
        drop(io);
    }

    #[test]
    fn uring_roundtrip_and_batching() {
        roundtrip(false);
    }

    #[test]
    fn submit_many_goes_in_with_one_enter() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::File::create(dir.path().join("f")).unwrap().set_len(8 * 8192).unwrap();
        let f = Arc::new(std::fs::File::open(dir.path().join("f")).unwrap());
        let io = IoThread::start(IoConfig { align: 4096, buf_size: 8192, n_bufs: 8, force_sync: false }).unwrap();
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
