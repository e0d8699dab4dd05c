//! The cache's writer thread: writes admitted chunks through the io_uring thread, records a chunk
//! in the journal and the index only after its write completed, releases evicted and damaged
//! chunks (hole punch, or delete a file left empty), allocates blocks ahead for files filled in
//! order and gives back what they did not use (`prealloc`), and compacts the journal when it grows.
//! One thread owns the journal, so records are appended in one order.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::time::{Duration, Instant};
use std::sync::Arc;

use super::index::{ChunkRec, Evicted, FileMeta};
use super::layout::{self, hex, pieces_offset, pieces_path, Record, Root};
use super::prealloc::{Groups, Plan};
use super::store::{disk_span, round_up, Shared};
use super::Stats;
use crate::chunk::{Buf, Geometry, VerifiedChunk};
use crate::sys::disk;
use crate::sys::uring::{Done, Op};

pub(super) enum WMsg {
    /// Write an admitted (reserved) chunk.
    Write { root: Root, meta: FileMeta, idx: u64, rec: ChunkRec, chunk: VerifiedChunk },
    /// A write finished (sent by the io_uring thread).
    Done {
        root: Root,
        meta: FileMeta,
        idx: u64,
        rec: ChunkRec,
        padded: usize,
        file: Arc<File>,
        /// The chunk's piece values, written beside the data once it is written.
        pieces: Option<Vec<u8>>,
        result: io::Result<()>,
    },
    /// Release chunks taken out of the index; `true` counts them as evictions.
    Release(Vec<Evicted>, bool),
    /// Record a damaged chunk of a pinned file absent without releasing its bytes: the kernel
    /// reads that file for a passthrough open, and a hole would hand it zeros. The chunk fetched
    /// again is written over them.
    Forget(Evicted),
    /// Answer once every write queued before is recorded.
    Flush(SyncSender<()>),
    Stop,
}

struct ChunkBytes(VerifiedChunk);

impl AsRef<Buf> for ChunkBytes {
    fn as_ref(&self) -> &Buf {
        self.0.buf()
    }
}

fn no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

struct Writer {
    sh: Arc<Shared>,
    me: Sender<WMsg>,
    journal: File,
    pending: Vec<u8>,
    appended: u64,
    inflight: u64,
    flushes: Vec<SyncSender<()>>,
    /// The piece-value file written last, kept open: chunks of one file arrive in a row, and
    /// opening it per chunk was 15 % of this thread's time in a cold read.
    pcv: Option<(Root, File)>,
    /// The piece-value file released from last, and its block size: evictions take a file's
    /// chunks in a row as well.
    pcv_released: Option<(Root, File, u64)>,
    /// Files filled in order, whose blocks are allocated a group at a time.
    groups: Groups,
    /// When the room on the filesystem was last checked (or the limit cut).
    regrow_checked: Instant,
    /// The journal's length after the last whole append (None: unknown).
    journal_len: Option<u64>,
    /// Writes made ready in this pass, submitted together at its end.
    ops: Vec<(Op, Done)>,
}

/// How long the writer pauses between passes while busy, and how many pauses that find nothing
/// it makes before it sleeps until the next message. A write starts up to a pause late; the
/// writes admitted but not done stay bounded by the store (`MAX_WRITES`, `MAX_WRITE_BYTES`).
const PAUSE: Duration = Duration::from_millis(1);
const PAUSES_BEFORE_SLEEP: u32 = 3;

/// Writes submitted to the io_uring thread at once at most.
const OPS_BATCH: usize = 64;

/// How long the writer waits without work before it gives back the room it allocated ahead.
const IDLE_GIVE_BACK: Duration = Duration::from_secs(2);

/// How often a limit cut by a full filesystem is checked against the room the filesystem has.
const REGROW_EVERY: Duration = Duration::from_secs(2);

/// Room the cache leaves free on its filesystem when it grows back after `ENOSPC`: 1 % of the
/// filesystem, at least this.
const FREE_MARGIN_MIN: u64 = 1 << 20;

/// Spare slots (blocks allocated ahead) the cache holds at most: an eighth of its size, and no
/// more than a few streams' groups.
fn spare_cap(limit: u64) -> u64 {
    (limit / 8).min(4 * super::prealloc::GROUP)
}

pub(super) fn run(sh: Arc<Shared>, rx: Receiver<WMsg>, me: Sender<WMsg>, journal: File) {
    let mut w = Writer {
        sh,
        me,
        pending: Vec::new(),
        appended: 0,
        inflight: 0,
        flushes: Vec::new(),
        pcv: None,
        pcv_released: None,
        groups: Groups::default(),
        regrow_checked: Instant::now(),
        journal_len: journal.metadata().ok().map(|m| m.len()),
        journal,
        ops: Vec::new(),
    };
    let mut stopping = false;
    // Pauses in a row that found nothing new (see PAUSE).
    let mut empty_pauses = 0;
    loop {
        if stopping && w.inflight == 0 {
            w.give_back_all();
            w.flush_journal();
            return;
        }
        match rx.try_recv() {
            Ok(m) => {
                w.handle(m, &mut stopping);
                empty_pauses = 0;
                if w.ops.len() >= OPS_BATCH {
                    w.submit_ops();
                }
                continue;
            }
            Err(TryRecvError::Disconnected) => {
                w.submit_ops();
                return;
            }
            Err(TryRecvError::Empty) => {}
        }
        // Everything queued is handled: submit its writes together, record what completed.
        w.submit_ops();
        w.flush_journal();
        if w.inflight == 0 {
            for f in w.flushes.drain(..) {
                let _ = f.send(());
            }
        }
        // While chunks stream in (a file being read) or writes are under way, pause instead of
        // sleeping until the next message: each message would wake this thread (two per chunk,
        // the chunk and its completion), and the io_uring thread once per write, which in a
        // cold read cost more than the writing. After a pause, one pass takes what came.
        if empty_pauses < PAUSES_BEFORE_SLEEP && (w.inflight > 0 || empty_pauses > 0) {
            std::thread::sleep(PAUSE);
            empty_pauses += 1;
            continue;
        }
        empty_pauses = 0;
        // Room allocated ahead is not held by an idle writer: a stream that stopped (a file
        // read in part) gives it back after a while without writes.
        match rx.recv_timeout(IDLE_GIVE_BACK) {
            Ok(m) => w.handle(m, &mut stopping),
            Err(RecvTimeoutError::Timeout) => {
                w.give_back_all();
                w.regrow();
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

impl Writer {
    fn handle(&mut self, msg: WMsg, stopping: &mut bool) {
        match msg {
            WMsg::Write { root, meta, idx, rec, chunk } => self.write(root, meta, idx, rec, chunk),
            WMsg::Done { root, meta, idx, rec, padded, file, pieces, result } => {
                self.inflight -= 1;
                self.sh.write_done(rec.len);
                let ok = result.is_ok();
                self.done(root, meta, idx, rec, padded, &file, result);
                if let (true, Some(p)) = (ok, pieces) {
                    self.write_pieces(&root, meta, idx, &p);
                }
            }
            WMsg::Release(list, count) => {
                for e in list {
                    self.release(e, count);
                }
            }
            WMsg::Forget(e) if e.file_empty => self.delete(&e.root),
            WMsg::Forget(e) => self.pending.extend_from_slice(&Record::Absent { root: e.root, idx: e.idx }.encode()),
            WMsg::Flush(tx) => self.flushes.push(tx),
            WMsg::Stop => *stopping = true,
        }
    }

    fn write(&mut self, root: Root, meta: FileMeta, idx: u64, rec: ChunkRec, chunk: VerifiedChunk) {
        let g = meta.geom();
        let (file, direct) = match self.sh.file(&root, &g, true) {
            Ok(f) => f,
            Err(e) => {
                self.sh.write_done(rec.len);
                self.failed(root, idx, rec, e);
                return;
            }
        };
        let len = chunk.len();
        let padded = if direct { round_up(len, self.sh.align as usize) } else { len };
        if direct {
            // Blocks allocated beforehand make the write an overwrite, which the kernel can
            // start without blocking, so io_uring issues it at once; a write into a hole needs
            // allocation, which io_uring hands to a worker thread that serves one file's writes
            // one at a time. Where fallocate is not supported the write allocates as before.
            if let Err(e) = self.allocate(&root, &g, idx, padded, &file) {
                if no_space(&e) {
                    // Part of it may be allocated: release it, it will not be recorded.
                    let _ = disk::punch_hole(&*file, g.chunk_offset(idx), padded as u64);
                    self.groups.punched(&root, &g, idx);
                    self.sh.write_done(rec.len);
                    self.failed(root, idx, rec, e);
                    return;
                }
            }
        }
        let me = self.me.clone();
        let f2 = file.clone();
        let pieces = chunk.pieces().map(|p| p.to_bytes());
        let op = Op::Write { file, offset: g.chunk_offset(idx), data: Box::new(ChunkBytes(chunk)), padded };
        self.inflight += 1;
        self.ops.push((
            op,
            Box::new(move |r| {
                let _ = me.send(WMsg::Done { root, meta, idx, rec, padded, file: f2, pieces, result: r.map(|_| ()) });
            }),
        ));
    }

    /// Hand the writes made ready to the io_uring thread, in one message and one wake-up.
    fn submit_ops(&mut self) {
        if !self.ops.is_empty() {
            self.sh.io.submit_many(std::mem::take(&mut self.ops));
        }
    }

    /// Allocate the blocks chunk `idx` is written to: its own, or its whole group while the
    /// file is filled in order (see `prealloc`).
    fn allocate(&mut self, root: &Root, g: &Geometry, idx: u64, padded: usize, file: &File) -> io::Result<()> {
        let (plan, dropped) = self.groups.plan(root, g, idx, self.sh.align);
        if let Some(d) = dropped {
            self.give_back(&d, None);
        }
        let own = || disk::allocate(file, g.chunk_offset(idx), padded as u64);
        match plan {
            Plan::Done => Ok(()),
            Plan::Chunk => own(),
            Plan::Group { group, first, end, offset, len } => {
                let marked = {
                    let mut ix = self.sh.index.lock().unwrap();
                    let cap = spare_cap(ix.limit());
                    ix.add_spare(root, first..end, cap)
                };
                let Some(marked) = marked else { return own() };
                match disk::allocate(file, offset, len) {
                    Ok(()) => {
                        self.groups.allocated(root, group);
                        Stats::add(&self.sh.stats.prealloc_groups, 1);
                        Ok(())
                    }
                    Err(_) => {
                        // Some of it may be allocated: release the slots marked for it.
                        self.give_back(root, Some(&marked));
                        own()
                    }
                }
            }
        }
    }

    /// Release the blocks of `root`'s spare slots (those in `only`, or all): allocated ahead,
    /// holding no chunk, not being written.
    fn give_back(&mut self, root: &Root, only: Option<&[u64]>) {
        self.groups.forget(root);
        let Some((meta, slots, empty)) = self.sh.index.lock().unwrap().take_spare(root, only) else { return };
        if empty {
            self.delete(root);
            return;
        }
        if slots.is_empty() {
            return;
        }
        let g = meta.geom();
        let Ok((f, _)) = self.sh.file(root, &g, false) else { return };
        let mut slots = slots;
        slots.sort_unstable();
        // Runs of neighbouring slots are released with one call.
        let mut i = 0;
        while i < slots.len() {
            let mut j = i + 1;
            while j < slots.len() && slots[j] == slots[j - 1] + 1 {
                j += 1;
            }
            let start = g.chunk_offset(slots[i]);
            let end = g.chunk_offset(slots[j - 1]) + disk_span(&g, slots[j - 1], self.sh.align);
            let _ = disk::punch_hole(&*f, start, end - start);
            i = j;
        }
    }

    fn give_back_all(&mut self) {
        let files = {
            let ix = self.sh.index.lock().unwrap();
            if ix.spare() == 0 {
                return;
            }
            ix.spare_files()
        };
        for r in files {
            self.give_back(&r, None);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn done(&mut self, root: Root, meta: FileMeta, idx: u64, rec: ChunkRec, padded: usize, file: &File, r: io::Result<()>) {
        // A padded tail write extends the file past its size: cut it back.
        let r = r.and_then(|()| if padded > rec.len as usize { file.set_len(meta.size) } else { Ok(()) });
        match r {
            Ok(()) => {
                let rp = Record::Present { root, idx, size: meta.size, chunk_log2: meta.chunk_log2, len: rec.len, cv: rec.cv };
                self.pending.extend_from_slice(&rp.encode());
                self.sh.index.lock().unwrap().commit(&root, idx, rec);
                Stats::add(&self.sh.stats.chunks_written, 1);
                Stats::add(&self.sh.stats.bytes_written, rec.len as u64);
            }
            Err(e) => {
                // Whatever reached the disk is not recorded; release it.
                let _ = disk::punch_hole(file, meta.geom().chunk_offset(idx), padded as u64);
                self.groups.punched(&root, &meta.geom(), idx);
                self.failed(root, idx, rec, e);
            }
        }
    }

    fn failed(&mut self, root: Root, idx: u64, rec: ChunkRec, e: io::Error) {
        Stats::add(&self.sh.stats.not_admitted, 1);
        let mut ix = self.sh.index.lock().unwrap();
        let empty = ix.abort(&root, idx, rec.len);
        if no_space(&e) {
            // The disk is fuller than cache_size assumed: give back the blocks allocated ahead,
            // and make the limit what is held and still being written (this chunk's reservation
            // is already given up). Nothing is evicted for writes under way, so a burst of
            // failures does not empty the cache; a new chunk is admitted only by evicting one.
            drop(ix);
            self.give_back_all();
            let mut ix = self.sh.index.lock().unwrap();
            let held = (ix.used() + ix.reserved()).min(ix.limit());
            let ev = ix.set_limit(held);
            drop(ix);
            for e in ev {
                self.release(e, true);
            }
            self.regrow_checked = Instant::now();
            if !self.sh.enospc_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(dir = %self.sh.dir.display(), limit = held, "cache filesystem is full; the cache keeps {held} bytes, and reads stream through uncached when it cannot admit, until the filesystem has room again");
            }
        } else {
            drop(ix);
            Stats::add(&self.sh.stats.write_errors, 1);
            tracing::warn!(file = %hex(&root), chunk = idx, error = %e, "disk cache write failed; not cached");
        }
        if empty {
            self.delete(&root);
        }
    }

    fn release(&mut self, e: Evicted, count: bool) {
        if count {
            Stats::add(&self.sh.stats.evictions, 1);
        }
        if e.file_empty {
            self.delete(&e.root);
            return;
        }
        let g = e.meta.geom();
        if let Ok((f, _)) = self.sh.file(&e.root, &g, false) {
            let _ = disk::punch_hole(&*f, g.chunk_offset(e.idx), disk_span(&g, e.idx, self.sh.align));
        }
        self.groups.punched(&e.root, &g, e.idx);
        self.release_pieces(&e.root, &g, e.idx);
        self.pending.extend_from_slice(&Record::Absent { root: e.root, idx: e.idx }.encode());
    }

    /// Free a released chunk's piece values, and the blocks of the pieces file that no chunk
    /// held any more has values in (`layout::pieces_release`): without it a file streamed
    /// through the cache kept 0.2 % of its size in values of chunks long gone.
    fn release_pieces(&mut self, root: &Root, g: &Geometry, idx: u64) {
        use std::os::unix::fs::MetadataExt;
        if crate::chunk::pieces_in(g, idx).is_none() {
            return;
        }
        if self.pcv_released.as_ref().is_none_or(|(r, _, _)| r != root) {
            self.pcv_released = None;
            let Ok(f) = std::fs::OpenOptions::new().write(true).open(pieces_path(&self.sh.dir, root)) else { return };
            let block = f.metadata().map_or(4096, |m| m.blksize());
            self.pcv_released = Some((*root, f, block));
        }
        let Some((_, f, block)) = &self.pcv_released else { return };
        let span = {
            let ix = self.sh.index.lock().unwrap();
            layout::pieces_release(g.chunk_log2, g.n_chunks(), idx, *block, |j| ix.holds(root, j))
        };
        let _ = disk::punch_hole(f, span.start, span.end - span.start);
    }

    /// Store a chunk's piece values beside its data (best effort: without them a small read
    /// after a remount reads the whole chunk once).
    fn write_pieces(&mut self, root: &Root, meta: FileMeta, idx: u64, bytes: &[u8]) {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        if self.pcv.as_ref().is_none_or(|(r, _)| r != root) {
            self.pcv = None;
            match std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(pieces_path(&self.sh.dir, root))
            {
                Ok(f) => self.pcv = Some((*root, f)),
                Err(e) => {
                    tracing::debug!(file = %hex(root), chunk = idx, error = %e, "cannot store piece values");
                    return;
                }
            }
        }
        let Some((_, f)) = &self.pcv else { return };
        if let Err(e) = f.write_all_at(bytes, pieces_offset(meta.chunk_log2, idx)) {
            tracing::debug!(file = %hex(root), chunk = idx, error = %e, "cannot store piece values");
            self.pcv = None;
        }
    }

    fn delete(&mut self, root: &Root) {
        self.groups.forget(root);
        self.sh.forget_fd(root);
        if self.pcv.as_ref().is_some_and(|(r, _)| r == root) {
            self.pcv = None;
        }
        if self.pcv_released.as_ref().is_some_and(|(r, _, _)| r == root) {
            self.pcv_released = None;
        }
        super::store::remove_version(&self.sh.dir, root);
        self.pending.extend_from_slice(&Record::FileGone { root: *root }.encode());
    }

    /// After `ENOSPC` cut the limit to what the cache held: once the filesystem has room again
    /// (something else freed space), grow it back toward `cache_size`, leaving a margin free.
    fn regrow(&mut self) {
        if self.regrow_checked.elapsed() < REGROW_EVERY || self.sh.index.lock().unwrap().limit() >= self.sh.size {
            return;
        }
        self.regrow_checked = Instant::now();
        let Ok(st) = crate::sys::fs::fstatvfs(std::os::fd::AsFd::as_fd(&self.journal)) else { return };
        let avail = st.bavail.saturating_mul(st.frsize);
        let margin = (st.blocks.saturating_mul(st.frsize) / 100).max(FREE_MARGIN_MIN);
        let mut ix = self.sh.index.lock().unwrap();
        let held = ix.used() + ix.reserved() + ix.spare();
        let limit = (held + avail.saturating_sub(margin)).min(self.sh.size);
        if limit > ix.limit() {
            let ev = ix.set_limit(limit);
            drop(ix);
            debug_assert!(ev.is_empty());
            self.sh.enospc_warned.store(false, Ordering::Relaxed);
            tracing::info!(dir = %self.sh.dir.display(), limit, "cache filesystem has room again; the cache may hold {limit} bytes");
        }
    }

    fn flush_journal(&mut self) {
        self.regrow();
        if self.pending.is_empty() {
            return;
        }
        match self.append(&self.pending) {
            Ok(()) => self.journal_len = self.journal_len.map(|n| n + self.pending.len() as u64),
            Err(e) => {
                // Records lost here only make the cache forget chunks (start-up reconciles the
                // space, and a chunk whose `absent` was lost fails verification). A part written
                // (ENOSPC) is cut off: replay stops at a torn record, which would hide every
                // record appended after it.
                tracing::warn!(error = %e, "cannot append to the disk cache journal");
                if let Some(n) = self.journal_len {
                    if self.journal.set_len(n).is_err() {
                        self.journal_len = None;
                    }
                }
            }
        }
        self.appended += (self.pending.len() / super::layout::RECORD_LEN) as u64;
        self.pending.clear();
        let live = self.sh.index.lock().unwrap().chunks() as u64;
        if self.appended > 2 * live + 65536 {
            self.compact();
        }
    }

    fn append(&self, records: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if self.sh.tear_next_append.swap(false, Ordering::SeqCst) {
            // Always inside a record, whatever the number of records pending.
            let rl = super::layout::RECORD_LEN;
            let cut = (records.len() / rl / 2) * rl + rl / 2;
            (&self.journal).write_all(&records[..cut])?;
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        (&self.journal).write_all(records)
    }

    fn compact(&mut self) {
        // Only the encoding holds the index lock, not the write and fsync: what changes in the
        // index meanwhile reaches the new journal as records this thread appends after it.
        let out = super::store::encode_compact(&self.sh.index.lock().unwrap());
        let r = super::store::write_journal(&self.sh.dir, &out);
        match r.and_then(|()| std::fs::OpenOptions::new().append(true).open(self.sh.dir.join("journal"))) {
            Ok(j) => {
                self.journal = j;
                self.journal_len = Some(out.len() as u64);
                self.appended = 0;
            }
            Err(e) => tracing::warn!(error = %e, "cannot compact the disk cache journal"),
        }
    }
}
