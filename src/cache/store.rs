//! The cache directory: opening it (lock, replay, reconcile, compaction), verified reads through
//! the io_uring thread, admission of new chunks (written by [`super::writer`]), and pinned
//! backing files for passthrough.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use lru::LruCache;

use super::index::{Admit, ChunkRec, Evicted, FileMeta, Index};
use super::layout::{self, data_path, hex, Record, Root};
use super::writer::{self, WMsg};
use super::{CacheConfig, Stats};
use crate::chunk::{BlockCvs, Buf, Cv, Geometry, PieceCvs, VerifiedChunk, VerifiedSpan, BLOCK_SIZE, PIECE_SIZE};
use crate::sys::disk;
use crate::sys::uring::{IoConfig, IoCounts, IoThread, Mode, Op};

/// Writes admitted but not completed, at most, and their bytes: beyond either, chunks stream
/// through uncached. The bytes bound the memory that queued writes can keep alive after the
/// memory cache let go of their chunks; it is large enough that the writer catches up after
/// the pauses a busy 2-core machine gives it during a cold read (at 64 writes, a 1 GiB cold read
/// on loopback left a third of its chunks uncached).
const MAX_WRITES: u64 = 1024;
const MAX_WRITE_BYTES: u64 = 128 << 20;
/// Open data files kept.
const MAX_FDS: usize = 256;
/// A read from the cache that takes longer is a miss (the buffer stays with its operation).
const READ_DEADLINE: Duration = Duration::from_secs(10);
/// One slot of registered memory holds a chunk of the default size and the response's tag byte
/// (so a reassembled response is written to the cache from where it arrived).
const SLOT: usize = (256 << 10) + 1;
/// The largest chunk (16 MiB) is read or written in parts of one slot each, all at once.
const MAX_OP: usize = 16 << 20;
/// Registered beyond what chunks may hold: responses and reads in flight.
const LEND_SLACK: u64 = 64 << 20;
/// Waits of 100 ms for the directory's lock.
const LOCK_TRIES: u32 = 30;

/// What the store and its writer thread share.
pub(super) struct Shared {
    pub dir: PathBuf,
    pub index: Mutex<Index>,
    pub io: IoThread,
    fds: Mutex<LruCache<Root, (Arc<File>, bool)>>,
    /// To the writer thread; sent under the index lock so its order is the index's order.
    pub tx: Mutex<Sender<WMsg>>,
    pub align: u64,
    direct: bool,
    pub writes_inflight: AtomicU64,
    pub write_bytes_inflight: AtomicU64,
    pub stats: Stats,
    pub enospc_warned: AtomicBool,
    /// `cache_size`: the limit, unless a full filesystem cut it (see the writer's `regrow`).
    pub size: u64,
    read_error_warned: AtomicBool,
    /// Tests: the next journal append writes half its bytes, then fails (as `ENOSPC` part-way).
    #[cfg(test)]
    pub tear_next_append: AtomicBool,
}

pub struct Store {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
    /// Lends registered memory to chunk buffers while this store lives (io_uring mode).
    lender: Option<Arc<dyn crate::chunk::pool::SlotSource>>,
    _lock: File,
    pub replay_time: Duration,
}

/// A complete file's data file, pinned (never evicted) while this lives: the kernel reads it for
/// a passthrough open without asking us.
pub struct Pin {
    shared: Arc<Shared>,
    root: Root,
    pub file: File,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.shared.index.lock().unwrap().unpin(&self.root);
    }
}

fn mkdir_private(p: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(p)?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
}

impl Store {
    /// Open (or create) the cache in `cfg.dir`. Errors are for a person: the caller logs them
    /// and runs without a disk cache.
    pub fn open(cfg: &CacheConfig) -> Result<Store, String> {
        let t0 = Instant::now();
        let dir = cfg.dir.clone();
        let ctx = |what: &str, e: io::Error| format!("cache {}: {what}: {e}", dir.display());
        mkdir_private(&dir.join("data")).map_err(|e| ctx("cannot create", e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| ctx("chmod", e))?;
        let lock = OpenOptions::new().create(true).truncate(false).write(true).mode(0o600).open(dir.join("lock"));
        let lock = lock.map_err(|e| ctx("lock file", e))?;
        // A mount that was just unmounted may still be flushing: give it a moment.
        let mut tries = 0;
        while !disk::try_lock_exclusive(&lock).map_err(|e| ctx("lock", e))? {
            tries += 1;
            if tries > LOCK_TRIES {
                return Err(format!("cache {} is in use by another mount (give each mount its own cache_dir)", dir.display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let jpath = dir.join("journal");
        let mut jf = OpenOptions::new().create(true).truncate(false).read(true).write(true).mode(0o600).open(&jpath);
        let jf = jf.as_mut().map_err(|e| ctx("journal", io::Error::new(e.kind(), e.to_string())))?;
        let (align, direct) = probe_direct(&dir, jf);
        // Evicting a chunk punches a hole; without that the cache could not give space back,
        // and would outgrow `cache_size` on disk.
        if let Err(e) = probe_punch(&dir) {
            return Err(format!("cache {}: its filesystem cannot punch holes ({e}); give cache_dir on ext4, xfs, btrfs or tmpfs", dir.display()));
        }
        let mut index = Index::new(u64::MAX, align as u64);
        let mut bytes = Vec::new();
        jf.read_to_end(&mut bytes).map_err(|e| ctx("read journal", e))?;
        if !bytes.is_empty() {
            match layout::replay(&bytes) {
                Ok((recs, clean)) => {
                    if !clean {
                        tracing::warn!(dir = %dir.display(), "cache journal ends in a torn or damaged record (a crash?); replayed up to it");
                    }
                    for r in recs {
                        apply(&mut index, r);
                    }
                }
                Err(e) => tracing::warn!(dir = %dir.display(), error = ?e, "cache journal is foreign or of another version; starting empty"),
            }
        }
        let evicted = index.set_limit(cfg.size);
        reconcile(&dir, &mut index, &evicted);
        compact(&dir, &index).map_err(|e| ctx("rewrite journal", e))?;
        let journal = OpenOptions::new().append(true).open(&jpath).map_err(|e| ctx("journal", e))?;
        let buf_size = round_up(SLOT, align);
        let n_bufs = MAX_OP.div_ceil(buf_size) + 8;
        let max_bufs = n_bufs + ((cfg.lend_bytes + LEND_SLACK) / buf_size as u64) as usize;
        let io = IoThread::start(IoConfig { align, buf_size, n_bufs, max_bufs, force_sync: cfg.force_sync })
            .map_err(|e| ctx("I/O thread", e))?;
        let lender = io.slot_source();
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            index: Mutex::new(index),
            io,
            fds: Mutex::new(LruCache::new(NonZeroUsize::new(MAX_FDS).unwrap())),
            tx: Mutex::new(tx.clone()),
            align: align as u64,
            direct,
            writes_inflight: AtomicU64::new(0),
            write_bytes_inflight: AtomicU64::new(0),
            stats: Stats::default(),
            enospc_warned: AtomicBool::new(false),
            size: cfg.size,
            read_error_warned: AtomicBool::new(false),
            #[cfg(test)]
            tear_next_append: AtomicBool::new(false),
        });
        let s2 = shared.clone();
        let writer = std::thread::Builder::new()
            .name("wraith-cache-writer".into())
            .spawn(move || writer::run(s2, rx, tx, journal))
            .map_err(|e| ctx("writer thread", e))?;
        let replay_time = t0.elapsed();
        let ix = shared.index.lock().unwrap();
        tracing::info!(
            dir = %dir.display(), chunks = ix.chunks(), used = ix.used(), limit = cfg.size, align, direct,
            io = ?shared.io.mode(), ms = replay_time.as_millis() as u64, "disk cache ready"
        );
        drop(ix);
        // Lend only once nothing can fail any more (a failed start must not leave a lender behind).
        if let Some(l) = &lender {
            crate::chunk::pool::set_source(l.clone());
        }
        Ok(Store { shared, writer: Some(writer), lender, _lock: lock, replay_time })
    }

    pub fn mode(&self) -> Mode {
        self.shared.io.mode()
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// How well submissions batch and how often bytes stayed where they were.
    pub fn io_stats(&self) -> IoCounts {
        self.shared.io.stats.snapshot()
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// (chunks, bytes used, limit)
    pub fn usage(&self) -> (u64, u64, u64) {
        let ix = self.shared.index.lock().unwrap();
        (ix.chunks() as u64, ix.used(), ix.limit())
    }

    #[cfg(test)]
    pub fn contains(&self, root: &Root, idx: u64) -> bool {
        self.shared.index.lock().unwrap().contains(root, idx)
    }

    /// The chunks of `root` in `range` that are on disk, in order (one look at the index).
    pub fn present_in(&self, root: &Root, range: std::ops::Range<u64>) -> Vec<u64> {
        self.shared.index.lock().unwrap().present_in(root, range)
    }

    /// Fraction of the file's chunks on local disk.
    pub fn fraction(&self, root: &Root, geom: &Geometry) -> f64 {
        let ix = self.shared.index.lock().unwrap();
        if ix.meta(root).is_some_and(|m| m != meta_of(geom)) {
            return 0.0;
        }
        ix.present(root) as f64 / geom.n_chunks() as f64
    }

    /// Chunk `idx` from disk, verified; None is a miss. `leaf` gives the proven leaf value when
    /// the stored ones cannot stand in (file incomplete); its error is a miss too (offline).
    pub fn load(
        &self,
        root: &Root,
        geom: &Geometry,
        idx: u64,
        leaf: impl FnOnce() -> crate::error::Result<Option<Cv>>,
    ) -> Option<VerifiedChunk> {
        let p = self.prepare(root, geom, idx)?;
        let (tx, rx) = sync_channel(1);
        self.shared.io.submit(p.op(geom, idx), Box::new(move |r| drop(tx.send(r))));
        self.finish(root, geom, idx, p, rx.recv_timeout(READ_DEADLINE), leaf)
    }

    /// Several chunks of one file from disk, their reads submitted together (one
    /// `io_uring_enter`), each verified as by [`Store::load`] and handed to `each` as soon as it
    /// is (in the order asked), None for a miss (not held, damaged, failed).
    pub fn load_many(
        &self,
        root: &Root,
        geom: &Geometry,
        idxs: &[u64],
        leaf: impl Fn(u64) -> crate::error::Result<Option<Cv>>,
        mut each: impl FnMut(u64, Option<VerifiedChunk>),
    ) {
        let mut ops = Vec::new();
        let mut waits = Vec::new();
        for &idx in idxs {
            match self.prepare(root, geom, idx) {
                Some(p) => {
                    let (tx, rx) = sync_channel(1);
                    ops.push((p.op(geom, idx), Box::new(move |r| drop(tx.send(r))) as crate::sys::uring::Done));
                    waits.push((idx, Some((p, rx))));
                }
                None => waits.push((idx, None)),
            }
        }
        self.shared.io.submit_many(ops);
        let deadline = Instant::now() + READ_DEADLINE;
        for (idx, w) in waits {
            let c = w.and_then(|(p, rx)| {
                let r = rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
                self.finish(root, geom, idx, p, r, || leaf(idx))
            });
            each(idx, c);
        }
    }

    /// The piece values of chunk `idx` stored beside its data, if the chunk is present, the file's
    /// stored leaf values are proven against its root, and they merge into the chunk's leaf value.
    pub fn stored_pieces(&self, root: &Root, geom: &Geometry, idx: u64) -> Option<PieceCvs> {
        use std::os::unix::fs::FileExt;
        let n = crate::chunk::pieces_in(geom, idx)?;
        let leaf = {
            let mut ix = self.shared.index.lock().unwrap();
            let rec = ix.lookup(root, idx).filter(|_| ix.meta(root) == Some(meta_of(geom)))?;
            if !ix.proven(root) {
                return None;
            }
            rec.cv
        };
        let f = File::open(layout::pieces_path(&self.shared.dir, root)).ok()?;
        let mut buf = vec![0u8; n * 32];
        f.read_exact_at(&mut buf, layout::pieces_offset(geom.chunk_log2, idx)).ok()?;
        PieceCvs::from_stored(geom, idx, &buf, &leaf)
    }

    /// Pieces `first..first + n` of chunk `idx`, read alone and verified against the chunk's
    /// piece CVs (from when it was verified whole); None is a miss (a damaged entry is dropped,
    /// so the caller's whole-chunk path fetches it again). The span keeps the block CVs it was
    /// verified through, for [`Store::load_blocks`].
    pub fn load_span(&self, root: &Root, geom: &Geometry, pieces: &PieceCvs, first: usize, n: usize) -> Option<VerifiedSpan> {
        let idx = pieces.index();
        let what = || format!("pieces {first}..{}", first + n);
        self.load_part(root, geom, idx, first * PIECE_SIZE..(first + n) * PIECE_SIZE, what, |data| VerifiedSpan::verify(geom, pieces, first, data))
    }

    /// Blocks `first..first + n` of one piece, read alone and verified against the piece's block
    /// CVs (from when it was read as a piece): a random 4 KiB read reads 4 KiB, not the piece.
    /// None is a miss, as for [`Store::load_span`]; blocks the piece does not have are one too
    /// (and no fault of the entry's).
    pub fn load_blocks(&self, root: &Root, geom: &Geometry, blocks: &BlockCvs, first: usize, n: usize) -> Option<VerifiedSpan> {
        if n == 0 || first + n > blocks.len() {
            return None;
        }
        let start = blocks.piece() * PIECE_SIZE + first * BLOCK_SIZE;
        let what = || format!("blocks {first}..{} of piece {}", first + n, blocks.piece());
        let s = self.load_part(root, geom, blocks.chunk(), start..start + n * BLOCK_SIZE, what, |data| VerifiedSpan::verify_blocks(geom, blocks, first, data))?;
        Stats::add(&self.shared.stats.block_reads, 1);
        Some(s)
    }

    /// Bytes `part` of chunk `idx` (cut at its end) read from disk and checked by `verify`; None
    /// is a miss (a damaged entry, one that fails `verify`, is dropped).
    fn load_part(
        &self,
        root: &Root,
        geom: &Geometry,
        idx: u64,
        part: std::ops::Range<usize>,
        what: impl FnOnce() -> String,
        verify: impl FnOnce(Vec<u8>) -> Result<VerifiedSpan, crate::chunk::ChunkError>,
    ) -> Option<VerifiedSpan> {
        let sh = &self.shared;
        let p = self.prepare(root, geom, idx)?;
        let start = part.start;
        let len = (p.rec.len as usize).min(part.end).saturating_sub(start);
        if len == 0 {
            return None;
        }
        // O_DIRECT: start and length on the device's block (a 4 KiB boundary is one unless the
        // device's block is larger); the extra bytes in front are cut off below.
        let lead = if p.direct { start % sh.align as usize } else { 0 };
        let read_len = if p.direct { round_up(lead + len, sh.align as usize) } else { len };
        let offset = geom.chunk_offset(idx) + (start - lead) as u64;
        // On this thread's own ring when it has one (two wake-ups fewer), else the ring thread's;
        // either way the bytes past `lead` are copied out once.
        let r = match sh.io.read_here(&p.file, offset, read_len, lead, READ_DEADLINE) {
            Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut => Err(RecvTimeoutError::Timeout),
            Some(r) => Ok(r),
            None => {
                let (tx, rx) = sync_channel(1);
                sh.io.submit(Op::Read { file: p.file.clone(), offset, len: read_len }, Box::new(move |r| drop(tx.send(r))));
                rx.recv_timeout(READ_DEADLINE).map(|r| r.map(|b| Buf::from(b.get(lead..).unwrap_or_default().to_vec())))
            }
        };
        let mut data = self.read_result(root, idx, r, len)?.into_vec();
        data.truncate(len);
        match verify(data) {
            Ok(s) => {
                Stats::add(&sh.stats.span_reads, 1);
                Stats::add(&sh.stats.bytes_from_cache, len as u64);
                Some(s)
            }
            Err(e) => {
                Stats::add(&sh.stats.verify_failures, 1);
                self.damaged(root, idx, &format!("failed BLAKE3 verification of {} ({e})", what()));
                None
            }
        }
    }

    /// The index entry and the open data file for a read of chunk `idx`; None is a miss.
    fn prepare(&self, root: &Root, geom: &Geometry, idx: u64) -> Option<Prepared> {
        let sh = &self.shared;
        let rec = {
            let mut ix = sh.index.lock().unwrap();
            match ix.lookup(root, idx) {
                Some(r) if ix.meta(root) == Some(meta_of(geom)) => r,
                _ => {
                    Stats::add(&sh.stats.misses, 1);
                    return None;
                }
            }
        };
        let (file, direct) = match sh.file(root, geom, false) {
            Ok(f) => f,
            Err(e) => {
                self.unreadable(root, idx, "cannot open the data file", e);
                return None;
            }
        };
        let len = rec.len as usize;
        let read_len = if direct { round_up(len, sh.align as usize) } else { len };
        Some(Prepared { rec, file, read_len, direct })
    }

    /// Check what a read returned and make it a verified chunk; anything wrong is a miss (and a
    /// damaged entry is dropped).
    fn finish(
        &self,
        root: &Root,
        geom: &Geometry,
        idx: u64,
        p: Prepared,
        r: Result<io::Result<Buf>, RecvTimeoutError>,
        leaf: impl FnOnce() -> crate::error::Result<Option<Cv>>,
    ) -> Option<VerifiedChunk> {
        let sh = &self.shared;
        let (rec, len) = (p.rec, p.rec.len as usize);
        if len != geom.chunk_len(idx) {
            self.damaged(root, idx, "a length that is not the chunk's");
            return None;
        }
        let mut data = self.read_result(root, idx, r, len)?;
        data.truncate(len);
        let n = geom.n_chunks();
        let expected = if n == 1 {
            None
        } else if sh.index.lock().unwrap().proven(root) {
            Some(rec.cv)
        } else {
            match leaf() {
                Ok(cv) => cv,
                Err(_) => {
                    Stats::add(&sh.stats.misses, 1);
                    return None;
                }
            }
        };
        match VerifiedChunk::verify(geom, &blake3::Hash::from_bytes(*root), idx, expected.as_ref(), data) {
            Ok(c) => {
                sh.index.lock().unwrap().mark_verified(root, idx);
                Stats::add(&sh.stats.hits, 1);
                Stats::add(&sh.stats.bytes_from_cache, len as u64);
                Some(c)
            }
            Err(e) => {
                Stats::add(&sh.stats.verify_failures, 1);
                self.damaged(root, idx, &format!("failed BLAKE3 verification ({e})"));
                None
            }
        }
    }

    /// The bytes a cache read of chunk `idx` returned, at least `want` of them. A read error or a
    /// short read drops the entry (damaged); a read past the deadline is a miss.
    fn read_result(&self, root: &Root, idx: u64, r: Result<io::Result<Buf>, RecvTimeoutError>, want: usize) -> Option<Buf> {
        match r {
            Ok(Ok(d)) if d.len() >= want => Some(d),
            Ok(Ok(_)) => {
                self.damaged(root, idx, "short read");
                None
            }
            Ok(Err(e)) => {
                self.unreadable(root, idx, "read error", e);
                None
            }
            Err(_) => {
                tracing::warn!(file = %hex(root), chunk = idx, "disk cache read took over {READ_DEADLINE:?}; fetching from the server");
                Stats::add(&self.shared.stats.misses, 1);
                None
            }
        }
    }

    /// A chunk that could not be read: damaged when the error is about the bytes on disk (or
    /// the file is gone); otherwise (out of memory or descriptors, a busy or stopped ring) the
    /// entry is fine and only this read is a miss.
    fn unreadable(&self, root: &Root, idx: u64, what: &str, e: io::Error) {
        let sh = &self.shared;
        if e.kind() == io::ErrorKind::NotFound || about_the_data(&e) {
            self.damaged(root, idx, &format!("{what}: {e}"));
            return;
        }
        Stats::add(&sh.stats.misses, 1);
        if !sh.read_error_warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(file = %hex(root), chunk = idx, error = %e, "disk cache {what}; fetching from the server (the entry is kept; later such errors are logged at debug level)");
        } else {
            tracing::debug!(file = %hex(root), chunk = idx, error = %e, "disk cache {what}; fetching from the server");
        }
    }

    /// Forget a damaged chunk, release its bytes (not under a passthrough open: see
    /// [`WMsg::Forget`]), log.
    fn damaged(&self, root: &Root, idx: u64, why: &str) {
        let sh = &self.shared;
        Stats::add(&sh.stats.misses, 1);
        tracing::warn!(file = %hex(root), chunk = idx, "disk cache entry {why}; dropped, fetching from the server");
        let mut ix = sh.index.lock().unwrap();
        let pinned = ix.pinned(root);
        if let Some(e) = ix.remove(root, idx) {
            let msg = if pinned { WMsg::Forget(e) } else { WMsg::Release(vec![e], false) };
            let _ = sh.tx.lock().unwrap().send(msg);
        }
    }

    /// Offer a verified chunk for caching. Never blocks on disk: the writer thread writes it, and
    /// records it only once the write completed. Not admitted (no room, too many writes queued):
    /// the read just goes on uncached.
    pub fn admit(&self, root: &Root, geom: &Geometry, cv: Option<Cv>, chunk: &VerifiedChunk) {
        let sh = &self.shared;
        if sh.writes_inflight.load(Ordering::Relaxed) >= MAX_WRITES
            || sh.write_bytes_inflight.load(Ordering::Relaxed) + chunk.len() as u64 > MAX_WRITE_BYTES
        {
            Stats::add(&sh.stats.not_admitted, 1);
            return;
        }
        let mut ix = sh.index.lock().unwrap();
        let tx = sh.tx.lock().unwrap();
        let idx = chunk.index();
        match ix.reserve(root, meta_of(geom), idx, chunk.len() as u32) {
            Admit::Yes(ev) => {
                if !ev.is_empty() {
                    let _ = tx.send(WMsg::Release(ev, true));
                }
                sh.writes_inflight.fetch_add(1, Ordering::Relaxed);
                let queued = sh.write_bytes_inflight.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                sh.stats.write_queue_peak.fetch_max(queued, Ordering::Relaxed);
                let rec = ChunkRec { len: chunk.len() as u32, cv: cv.unwrap_or([0; 32]) };
                let _ = tx.send(WMsg::Write { root: *root, meta: meta_of(geom), idx, rec, chunk: chunk.clone() });
            }
            Admit::Already => {}
            Admit::No(ev) => {
                if !ev.is_empty() {
                    let _ = tx.send(WMsg::Release(ev, true));
                }
                Stats::add(&sh.stats.not_admitted, 1);
            }
        }
    }

    /// The data file of a complete file whose every chunk was verified since start, opened for
    /// reading and pinned, for a passthrough open. None otherwise.
    pub fn pin_complete(&self, root: &Root, geom: &Geometry) -> Option<Pin> {
        let sh = &self.shared;
        let mut ix = sh.index.lock().unwrap();
        if ix.meta(root) != Some(meta_of(geom)) || !ix.all_verified(root) {
            return None;
        }
        let file = File::open(data_path(&sh.dir, root)).ok()?;
        if file.metadata().ok()?.len() != geom.size {
            return None;
        }
        ix.pin(root);
        Some(Pin { shared: sh.clone(), root: *root, file })
    }

    /// Wait until every admitted write completed and is recorded (tests, benchmarks).
    pub fn flush(&self) {
        let (tx, rx) = sync_channel(1);
        let _ = self.shared.tx.lock().unwrap().send(WMsg::Flush(tx));
        let _ = rx.recv_timeout(Duration::from_secs(60));
    }

    pub fn describe(&self) -> String {
        // One look at the index, so that the figures add up.
        let (chunks, used, spare, limit) = {
            let ix = self.shared.index.lock().unwrap();
            (ix.chunks(), ix.used(), ix.spare(), ix.limit())
        };
        format!(
            "cache_dir {}\ncache_io {}\ncache_chunks {chunks}\ncache_used_bytes {used}\ncache_spare_bytes {spare}\ncache_limit_bytes {limit}\n",
            self.shared.dir.display(),
            match self.mode() {
                Mode::Uring => "io_uring",
                Mode::Sync => "pread/pwrite",
            }
        )
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(l) = &self.lender {
            crate::chunk::pool::clear_source(l);
        }
        let _ = self.shared.tx.lock().unwrap().send(WMsg::Stop);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

impl Shared {
    /// An admitted write finished (written or failed): its room in the write queue is free.
    pub fn write_done(&self, len: u32) {
        self.writes_inflight.fetch_sub(1, Ordering::Relaxed);
        self.write_bytes_inflight.fetch_sub(len as u64, Ordering::Relaxed);
    }

    /// The open data file of `root` and whether it is `O_DIRECT`; `create` makes it (sparse, at
    /// the file's size, mode 0600).
    pub(super) fn file(&self, root: &Root, geom: &Geometry, create: bool) -> io::Result<(Arc<File>, bool)> {
        let cached = self.fds.lock().unwrap().get(root).cloned();
        if let Some(f) = cached {
            // A data file deleted behind our back is gone for the cache too (no orphan writes).
            if f.0.metadata().is_ok_and(|m| m.nlink() > 0) {
                return Ok(f);
            }
            self.forget_fd(root);
        }
        let path = data_path(&self.dir, root);
        if create {
            mkdir_private(&self.dir.join("data").join(&hex(root)[..2]))?;
        }
        let direct = self.direct && geom.chunk_size() % self.align == 0;
        let mut o = OpenOptions::new();
        o.read(true).write(true).create(create).truncate(false).mode(0o600);
        if direct {
            o.custom_flags(libc::O_DIRECT);
        }
        let f = o.open(&path)?;
        if f.metadata()?.len() != geom.size {
            f.set_len(geom.size)?;
        }
        let e = (Arc::new(f), direct);
        self.fds.lock().unwrap().put(*root, e.clone());
        Ok(e)
    }

    pub(super) fn forget_fd(&self, root: &Root) {
        self.fds.lock().unwrap().pop(root);
    }
}

/// A chunk read about to be submitted: its index entry and data file.
struct Prepared {
    rec: ChunkRec,
    file: Arc<File>,
    read_len: usize,
    /// The data file is open with O_DIRECT (reads are rounded up to the block).
    direct: bool,
}

impl Prepared {
    fn op(&self, geom: &Geometry, idx: u64) -> Op {
        Op::Read { file: self.file.clone(), offset: geom.chunk_offset(idx), len: self.read_len }
    }
}

/// Remove a file version's data file and the piece values beside it.
pub(super) fn remove_version(dir: &Path, root: &Root) {
    let _ = std::fs::remove_file(layout::pieces_path(dir, root));
    let _ = std::fs::remove_file(data_path(dir, root));
}

pub(super) fn meta_of(geom: &Geometry) -> FileMeta {
    FileMeta { size: geom.size, chunk_log2: geom.chunk_log2 }
}

/// Whether a failed read says the bytes on disk are bad (then the entry is dropped), rather than
/// that this one read could not be done.
fn about_the_data(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EUCLEAN) | Some(libc::EBADMSG) | Some(libc::ENODATA))
}

pub(super) fn round_up(n: usize, align: usize) -> usize {
    n.div_ceil(align) * align
}

/// The bytes chunk `idx` may hold on disk, for releasing it: its own length, and for the last
/// chunk up to the alignment (a padded tail; past the end of the file there is nothing else).
/// Rounding a chunk shorter than the alignment in the middle of a file would release the start
/// of the next chunks, which stay recorded as verified.
pub(super) fn disk_span(g: &Geometry, idx: u64, align: u64) -> u64 {
    let len = g.chunk_len(idx) as u64;
    if idx + 1 >= g.n_chunks() { len.div_ceil(align) * align } else { len }
}

fn apply(ix: &mut Index, r: Record) {
    match r {
        Record::Present { root, idx, size, chunk_log2, len, cv } => {
            let meta = FileMeta { size, chunk_log2 };
            let Ok(g) = Geometry::new(size, chunk_log2) else { return };
            if idx < g.n_chunks() && len as usize == g.chunk_len(idx) {
                ix.insert_replayed(&root, meta, idx, ChunkRec { len, cv });
            }
        }
        Record::Absent { root, idx } => {
            ix.remove(&root, idx);
        }
        Record::FileGone { root } => {
            ix.remove_file(&root);
        }
    }
}

/// Whether the cache's filesystem releases a punched range: Err only when it says it cannot
/// (`EOPNOTSUPP`, `ENOSYS`: vfat, some network and FUSE filesystems); any other failure (a full
/// disk) proves nothing, and the cache deals with it when it happens.
fn probe_punch(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    if PUNCH_UNSUPPORTED.get() {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    let probe = dir.join("data/.punch-probe");
    let r = (|| {
        let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).open(&probe)?;
        (&f).write_all(&[1u8; 8192])?;
        disk::punch_hole(&f, 0, 4096)
    })();
    let _ = std::fs::remove_file(&probe);
    match r {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)) => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
thread_local! {
    /// Test switch: this thread's `Store::open` finds a filesystem that cannot punch holes.
    pub(super) static PUNCH_UNSUPPORTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `O_DIRECT` alignment of the cache's filesystem and whether `O_DIRECT` works there at all.
fn probe_direct(dir: &Path, journal: &File) -> (usize, bool) {
    let align = disk::dio_align(journal);
    let probe = dir.join("data/.probe");
    let ok = OpenOptions::new().read(true).write(true).create(true).truncate(true).mode(0o600).custom_flags(libc::O_DIRECT).open(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    match (align, ok) {
        (Some(a), true) => (a.max(512), true),
        (None, true) => (4096, true),
        (_, false) => {
            tracing::info!(dir = %dir.display(), "the cache's filesystem does not support O_DIRECT; using buffered I/O");
            (4096, false)
        }
    }
}

/// Make the data files agree with the index: delete files the index does not know, drop index
/// entries whose file vanished, release space held by chunks that are not recorded (a write
/// that completed just before a crash, before its record), and release what `evicted` lists.
fn reconcile(dir: &Path, ix: &mut Index, evicted: &[Evicted]) {
    let mut seen = HashSet::new();
    let data = dir.join("data");
    for sub in std::fs::read_dir(&data).into_iter().flatten().flatten() {
        let files = std::fs::read_dir(sub.path()).into_iter().flatten().flatten();
        for f in files {
            let name = f.file_name();
            // A pieces file stays while its file version is known.
            if let Some(base) = name.to_str().and_then(|n| n.strip_suffix(layout::PIECES_SUFFIX)) {
                if layout::root_of_name(base).is_none_or(|r| ix.meta(&r).is_none()) {
                    let _ = std::fs::remove_file(f.path());
                }
                continue;
            }
            let root = name.to_str().and_then(layout::root_of_name);
            match root.and_then(|r| ix.meta(&r).map(|m| (r, m))) {
                None => {
                    let _ = std::fs::remove_file(f.path());
                }
                Some((root, meta)) => {
                    seen.insert(root);
                    release_unrecorded(&f.path(), ix, &root, meta);
                }
            }
        }
    }
    let known: Vec<Root> = ix.files().map(|(r, _, _)| *r).collect();
    for r in known.iter().filter(|r| !seen.contains(*r)) {
        tracing::warn!(file = %hex(r), "disk cache data file is missing; forgetting its chunks");
        ix.remove_file(r);
        remove_version(dir, r);
    }
    for e in evicted {
        if e.file_empty {
            remove_version(dir, &e.root);
        } else if let Ok(f) = OpenOptions::new().write(true).open(data_path(dir, &e.root)) {
            let g = e.meta.geom();
            let _ = disk::punch_hole(&f, g.chunk_offset(e.idx), disk_span(&g, e.idx, ix.align()));
        }
    }
}

/// Blocks `st_blocks` may count beside a data file's chunks that are the filesystem's own (ext4's
/// extent tree: 4-12 KiB measured for a 24 MiB file in 64 KiB extents). A file holding more than
/// its recorded chunks and this has room no record names: left by a crash while it was allocated
/// ahead (a group's unwritten slots) or written before its record.
const FS_OWN_BLOCKS: u64 = 64 << 10;

fn release_unrecorded(path: &Path, ix: &mut Index, root: &Root, meta: FileMeta) {
    let mut present: Vec<u64> = ix.files().find(|(r, _, _)| *r == root).map(|(_, _, c)| c.iter().map(|x| x.0).collect()).unwrap_or_default();
    present.sort_unstable();
    let g = meta.geom();
    let mut pieces = path.as_os_str().to_owned();
    pieces.push(layout::PIECES_SUFFIX);
    release_unrecorded_pieces(Path::new(&pieces), &g, &present);
    let Ok(f) = OpenOptions::new().write(true).open(path) else { return };
    let Ok(m) = f.metadata() else { return };
    if m.len() != meta.size && f.set_len(meta.size).is_err() {
        return;
    }
    let expected: u64 = present.len() as u64 * ix.cost(1u32 << meta.chunk_log2.min(31));
    if m.blocks() * 512 <= expected + FS_OWN_BLOCKS {
        return;
    }
    // One punch per run of absent chunks (a huge sparse file with a few chunks is a few calls,
    // not one per chunk); the run to the end covers the whole last block.
    punch_runs(&f, &present, g.n_chunks(), |i| g.chunk_offset(i));
}

/// The pieces file beside a data file: values of chunks not recorded (evicted in an earlier run
/// before their blocks could go, or written before a crash) are released, one punch per run.
fn release_unrecorded_pieces(path: &Path, g: &Geometry, present: &[u64]) {
    if crate::chunk::pieces_in(g, 0).is_none() {
        return;
    }
    let Ok(f) = OpenOptions::new().write(true).open(path) else { return };
    let Ok(m) = f.metadata() else { return };
    // The blocks that the present chunks' values lie in (`present` is sorted).
    let block = m.blksize().max(1);
    let (mut blocks, mut last) = (0u64, None);
    for &i in present {
        let (a, b) = (layout::pieces_offset(g.chunk_log2, i) / block, (layout::pieces_offset(g.chunk_log2, i + 1) - 1) / block);
        let from = last.map_or(a, |l: u64| a.max(l + 1));
        blocks += (b + 1).saturating_sub(from);
        last = Some(b);
    }
    if m.blocks() * 512 <= blocks * block + FS_OWN_BLOCKS {
        return;
    }
    punch_runs(&f, present, g.n_chunks(), |i| layout::pieces_offset(g.chunk_log2, i));
}

/// Punch out, in `f`, each run of chunks between the sorted `present` ones (and after the last,
/// to the end), where chunk `i` starts at `offset(i)`.
fn punch_runs(f: &File, present: &[u64], n_chunks: u64, offset: impl Fn(u64) -> u64) {
    let mut start = 0;
    for p in present.iter().copied().chain(std::iter::once(n_chunks)) {
        if p > start {
            let _ = disk::punch_hole(f, offset(start), offset(p) - offset(start));
        }
        start = p + 1;
    }
}

/// Rewrite the journal with one record per present chunk, least recently used first, through a
/// temporary file and a rename (a crash leaves the old or the new journal).
pub(super) fn compact(dir: &Path, ix: &Index) -> io::Result<()> {
    write_journal(dir, &encode_compact(ix))
}

/// The compacted journal's bytes: the header and one record per present chunk, least recently
/// used first.
pub(super) fn encode_compact(ix: &Index) -> Vec<u8> {
    let mut out = Vec::with_capacity(layout::HEADER_LEN + ix.chunks() * layout::RECORD_LEN);
    out.extend_from_slice(&layout::encode_header());
    for (root, meta, idx, c) in ix.oldest_first() {
        let r = Record::Present { root, idx, size: meta.size, chunk_log2: meta.chunk_log2, len: c.len, cv: c.cv };
        out.extend_from_slice(&r.encode());
    }
    out
}

/// Replace the journal with `out` (see [`compact`]).
pub(super) fn write_journal(dir: &Path, out: &[u8]) -> io::Result<()> {
    let tmp = dir.join("journal.tmp");
    let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    f.write_all(out)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join("journal"))
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
