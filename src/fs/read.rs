//! The data path: verified chunks from memory or the network, leaf values proven in blocks, and a
//! sequential-read detector that prefetches a growing window of chunks ahead of the reader.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroUsize;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, Weak};

use lru::LruCache;

use super::flight::{ChunkKey, SingleFlight};
use super::{Ctx, Fs, Handle, Source};
use crate::chunk::{verify_leaves, Cv, VerifiedChunk, VerifiedSpan, BLOCK_LOG2, PIECE_LOG2, PIECE_SIZE};
use crate::error::{Error, Result};
use crate::proto::msg::{Request, Response};

/// Leaf values are fetched and proven in aligned blocks of this many (32 KiB of values): the
/// first byte of a 1 TiB file costs one such block plus a logarithmic proof.
pub const CV_BLOCK: u64 = 1024;
/// A chunk or leaf block that fails verification is fetched again this many times, then EIO.
const ATTEMPTS: u32 = 3;
const PREFETCH_THREADS: usize = 12;
/// Reads up to this size that are not sequential may be served from a few pieces of a chunk in
/// the disk cache instead of the whole chunk.
const SPAN_MAX: u64 = 64 << 10;
/// Prefetched chunks of the disk cache are read in batches of this many bytes, or of a quarter
/// of the prefetch window when that is less (see [`disk_batch_due`]).
const DISK_BATCH: u64 = 2 << 20;
/// How far ahead of a sequential reader chunks that the disk cache holds are read: this many
/// bytes, at most [`DISK_WINDOW_CHUNKS`] chunks, and never less than the network's window
/// (`max_prefetch`). Reading from the local disk, a deeper window keeps more of its reads in
/// flight; the network's window stays at `max_prefetch` (see [`disk_window`]).
const DISK_WINDOW: u64 = 32 << 20;
const DISK_WINDOW_CHUNKS: u64 = 128;

/// How far apart reads of one sequential stream may arrive, in requests of their own size: the
/// kernel has up to this many FUSE requests of a file's readahead in flight (fuser's
/// max_background), and our worker threads answer them in whatever order they pick them up.
const REORDER: u64 = 16;

/// The sequential-read detector of one open file.
#[derive(Default)]
pub struct SeqState {
    /// The furthest end of the stream's reads so far.
    next_off: u64,
    /// Chunks to prefetch ahead; 0 while reads are not sequential.
    window: u64,
    /// The first chunk the stream has not left behind yet (see [`SeqState::passed`]).
    behind: u64,
    /// The longest read of the stream so far.
    longest: u64,
}

impl SeqState {
    /// Note a read of `offset..end` of a file in chunks of `1 << chunk_log2` bytes and return how
    /// many chunks to prefetch past it: the window doubles with each read that continues the
    /// stream, up to `cap`, and closes on a jump. A read continues the stream when it starts
    /// within one chunk of the stream's furthest end, before or after it; once a stream is open,
    /// within max(one chunk, `REORDER` reads of its size): readahead requests reach the worker
    /// threads a little out of order. With `read_ahead_kb` raised to 4 MiB, a one-chunk slack
    /// took that for a jump 56–67 times in a cold 1 GiB read (with the kernel's default 128 KiB
    /// for FUSE, never). Random reads, which open no stream, keep the one-chunk slack.
    pub fn advance(&mut self, offset: u64, end: u64, chunk_log2: u8, cap: u64) -> u64 {
        let chunk = 1u64 << chunk_log2;
        let slack = if self.window > 0 { chunk.max((end - offset).saturating_mul(REORDER)) } else { chunk };
        if offset == self.next_off || (self.next_off > 0 && offset.abs_diff(self.next_off) <= slack) {
            self.window = (self.window * 2).clamp(1, cap.max(1));
            self.next_off = self.next_off.max(end);
            self.longest = self.longest.max(end - offset);
        } else {
            self.window = 0;
            self.next_off = end;
            self.behind = offset >> chunk_log2;
            self.longest = end - offset;
        }
        self.window
    }

    /// The chunks an open stream has left behind for good since the last call: those that end
    /// max(two chunks, `REORDER` of its longest reads) or more before its furthest end, from
    /// where the stream began. Late readahead requests still find theirs within that margin
    /// (sized by the longest read, so that a short one — the file's last bytes, a page fault —
    /// does not shrink it). Empty while no stream is open.
    pub fn passed(&mut self, chunk_log2: u8) -> std::ops::Range<u64> {
        if self.window == 0 {
            return 0..0;
        }
        let margin = (2u64 << chunk_log2).max(self.longest.saturating_mul(REORDER));
        let upto = self.next_off.saturating_sub(margin) >> chunk_log2;
        let from = self.behind;
        if upto <= from {
            return 0..0;
        }
        self.behind = upto;
        from..upto
    }
}

/// The file's root, its chunk size (log2; the leaf values differ with it) and the block.
type CvKey = ([u8; 32], u8, u64);

pub struct CvCache {
    lru: Mutex<LruCache<CvKey, Arc<Vec<Cv>>>>,
    flight: SingleFlight<CvKey, Arc<Vec<Cv>>>,
}

impl CvCache {
    pub fn new() -> Self {
        // 256 blocks × 32 KiB = 8 MiB of proven leaf values at most.
        CvCache { lru: Mutex::new(LruCache::new(NonZeroUsize::new(256).unwrap())), flight: SingleFlight::default() }
    }
}

/// The memory key of chunk `idx` of the handle's file version.
fn ckey(h: &Handle, idx: u64) -> ChunkKey {
    (h.info.root, h.geom.chunk_log2, idx)
}

fn name(h: &Handle) -> String {
    String::from_utf8_lossy(&h.path).into_owned()
}

/// The proven leaf value of chunk `idx`, or None for a single-chunk file (checked against the root).
fn leaf_cv(fs: &Fs, ctx: Ctx, h: &Handle, idx: u64) -> Result<Option<Cv>> {
    let n = h.geom.n_chunks();
    if n == 1 {
        return Ok(None);
    }
    let block = idx / CV_BLOCK;
    let key = (h.info.root, h.geom.chunk_log2, block);
    if let Some(v) = fs.cvs.lru.lock().unwrap().get(&key) {
        return Ok(Some(v[(idx % CV_BLOCK) as usize]));
    }
    let v = fs.cvs.flight.run(key, || fs.gave_up(ctx), || {
        let first = block * CV_BLOCK;
        let count = CV_BLOCK.min(n - first);
        let root = blake3::Hash::from_bytes(h.info.root);
        for attempt in 1..=ATTEMPTS {
            let req = Request::Cvs {
                share: fs.cfg.share.clone(),
                path: h.path.clone(),
                version: h.info.attr.version(),
                first,
                count: count as u32,
            };
            let (leaves, proof) = match fs.call(ctx, &req, count * 32 + 2048)? {
                Response::Cvs { leaves, proof } => (leaves, proof),
                _ => return Err(Error::Invalid),
            };
            if leaves.len() as u64 == count && verify_leaves(n, first, &leaves, &proof, &root).is_ok() {
                let v = Arc::new(leaves);
                fs.cvs.lru.lock().unwrap().put(key, v.clone());
                return Ok(v);
            }
            fs.counters.verify_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(file = %name(h), block, attempt, "chunk values failed their proof against the root; fetching again");
        }
        tracing::error!(file = %name(h), block, "chunk values failed verification {ATTEMPTS} times; returning EIO");
        Err(Error::IntegrityMismatch)
    })?;
    Ok(Some(v[(idx % CV_BLOCK) as usize]))
}

/// Chunk `idx` of the handle's file version, verified, and where it came from. Memory first,
/// then the disk cache (verified on every read; a bad entry is a miss), then the network (the
/// chunk is then offered to the disk cache, which writes it beside the read).
pub fn chunk(fs: &Fs, ctx: Ctx, h: &Handle, idx: u64) -> Result<(VerifiedChunk, Source)> {
    let key = ckey(h, idx);
    if let Some(c) = fs.chunks.get(&key) {
        fs.counters.chunk_hits.fetch_add(1, Ordering::Relaxed);
        return Ok(c);
    }
    fs.chunk_flight.run(key, || fs.gave_up(ctx), || {
        if let Some(disk) = &fs.disk {
            if let Some(c) = disk.load(&h.info.root, &h.geom, idx, || leaf_cv(fs, ctx, h, idx)) {
                fs.chunks.insert(key, c.clone(), Source::Cache);
                return Ok((c, Source::Cache));
            }
        }
        let root = blake3::Hash::from_bytes(h.info.root);
        for attempt in 1..=ATTEMPTS {
            let expected = leaf_cv(fs, ctx, h, idx)?;
            let req = Request::Read {
                share: fs.cfg.share.clone(),
                path: h.path.clone(),
                version: h.info.attr.version(),
                index: idx,
            };
            let data = match fs.call(ctx, &req, h.geom.chunk_len(idx) as u64 + 64)? {
                Response::Data(d) => d,
                _ => return Err(Error::Invalid),
            };
            fs.counters.chunks_fetched.fetch_add(1, Ordering::Relaxed);
            fs.counters.bytes_fetched.fetch_add(data.len() as u64, Ordering::Relaxed);
            match VerifiedChunk::verify(&h.geom, &root, idx, expected.as_ref(), data) {
                Ok(c) => {
                    fs.chunks.insert(key, c.clone(), Source::Network);
                    if let Some(disk) = &fs.disk {
                        disk.admit(&h.info.root, &h.geom, expected, &c);
                    }
                    return Ok((c, Source::Network));
                }
                Err(e) => {
                    fs.counters.verify_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(file = %name(h), chunk = idx, attempt, error = %e, "chunk failed BLAKE3 verification; fetching again");
                }
            }
        }
        tracing::error!(file = %name(h), chunk = idx, "chunk failed verification {ATTEMPTS} times; returning EIO");
        Err(Error::IntegrityMismatch)
    })
}

/// Bytes for a reader: a window into one verified chunk (no copy), or bytes gathered from several.
pub enum ReadData {
    Slice(VerifiedChunk, usize, usize),
    /// A window into pieces of a chunk verified alone.
    Span(VerifiedSpan, usize, usize),
    Owned(Vec<u8>),
}

impl ReadData {
    pub fn bytes(&self) -> &[u8] {
        match self {
            ReadData::Slice(c, from, to) => &c.bytes()[*from..*to],
            ReadData::Span(s, from, to) => &s.bytes()[*from..*to],
            ReadData::Owned(v) => v,
        }
    }
}

/// A small read that is not sequential, of a chunk that is not in memory but on disk, whose piece
/// CVs are known (remembered from this mount, or stored beside the data and proven): read and
/// verify only the pieces it covers, or, when it lies in one piece read that way before, only the
/// 4 KiB blocks it covers.
fn span_read(fs: &Fs, h: &Handle, idx: u64, offset: u64, end: u64) -> Option<ReadData> {
    let disk = fs.disk.as_ref()?;
    let key = ckey(h, idx);
    if end - offset > SPAN_MAX || fs.chunks.contains(&key) {
        return None;
    }
    let base = h.geom.chunk_offset(idx);
    let first = ((offset - base) >> PIECE_LOG2) as usize;
    let last = ((end - 1 - base) >> PIECE_LOG2) as usize;
    let span = match (first == last).then(|| fs.chunks.blocks(&key, first)).flatten() {
        Some(b) => {
            let in_piece = (offset - base) as usize - first * PIECE_SIZE;
            let (fb, lb) = (in_piece >> BLOCK_LOG2, (in_piece + (end - offset) as usize - 1) >> BLOCK_LOG2);
            disk.load_blocks(&h.info.root, &h.geom, &b, fb, lb - fb + 1)?
        }
        None => {
            // Remembered from this mount, or stored beside the data and checked against the
            // proven leaf.
            let pieces = fs.chunks.pieces(&key).or_else(|| {
                let p = disk.stored_pieces(&h.info.root, &h.geom, idx)?;
                fs.chunks.put_pieces(key, p.clone());
                Some(p)
            })?;
            let s = disk.load_span(&h.info.root, &h.geom, &pieces, first, last - first + 1)?;
            fs.chunks.put_blocks(key, s.block_cvs());
            s
        }
    };
    let (from, to) = ((offset - span.offset()) as usize, (end - span.offset()) as usize);
    if to > span.bytes().len() {
        return None;
    }
    fs.counters.bytes_read.fetch_add((to - from) as u64, Ordering::Relaxed);
    fs.note_source(h, Source::Cache);
    Some(ReadData::Span(span, from, to))
}

pub fn read(fs: &Fs, ctx: Ctx, h: &Arc<Handle>, offset: u64, size: u32) -> Result<ReadData> {
    let fsize = h.info.attr.size;
    if offset >= fsize || size == 0 {
        return Ok(ReadData::Owned(Vec::new()));
    }
    let end = (offset + size as u64).min(fsize);
    let log2 = h.geom.chunk_log2;
    let (first, last) = (offset >> log2, (end - 1) >> log2);
    // Never more ahead than half the memory cache holds: prefetched chunks evicted before the
    // reader gets to them would be read twice (measured: a 96-chunk window with a 16 MiB memory
    // cache read 5x slower).
    let fits = ((fs.cfg.mem_cache >> log2) / 2).max(1);
    let (window, passed) = {
        let mut seq = h.seq.lock().unwrap();
        let w = seq.advance(offset, end, log2, disk_window(fs.cfg.max_prefetch, log2).min(fits));
        (w, seq.passed(log2))
    };
    // The network's part of the window: chunks past it are read ahead only from the disk cache.
    let net_window = window.min(fs.cfg.max_prefetch);
    // Drop-behind: a stream's chunks are in the page cache once read, and kept here as well they
    // filled the memory cache (and grew its registered memory, faulted in fresh) for nothing.
    fs.chunks.forget(h.info.root, h.geom.chunk_log2, passed);
    let n = h.geom.n_chunks();
    let mut from_disk = Vec::new();
    let reach = if fs.disk.is_some() { window } else { net_window };
    let ahead = last + 1..(last + 1 + reach).min(n);
    // What the disk cache holds of the window, asked once: beyond the network's part, only those
    // chunks have anything to do. (Asking per chunk, with the memory cache and the fetches in
    // flight looked up first, was ~400 lookups and locks per FUSE read in a cold read filling
    // the cache: ~0.1 CPU-s per GiB.)
    let on_disk = fs.disk.as_ref().map(|d| d.present_in(&h.info.root, ahead.clone())).unwrap_or_default();
    let mut disk_next = on_disk.iter().peekable();
    for c in ahead {
        let held = disk_next.next_if_eq(&&c).is_some();
        if !held && c > last + net_window {
            continue;
        }
        let key = ckey(h, c);
        if fs.chunks.contains(&key) || fs.chunk_flight.is_inflight(&key) {
            continue;
        }
        if held {
            // Chunks the disk cache holds are read together, claimed once a batch is due.
            if !fs.prefetch.claimed(&key) {
                from_disk.push(c)
            }
        } else if fs.prefetch.claim(key) {
            fs.prefetch.push(Job::One(h.clone(), c))
        }
    }
    if disk_batch_due(from_disk.len() as u64, last + 1 + window >= n, window, log2) {
        from_disk.retain(|&c| fs.prefetch.claim(ckey(h, c)));
        if !from_disk.is_empty() {
            fs.prefetch.push(Job::Disk(h.clone(), from_disk));
        }
    }
    if first == last {
        if window == 0 {
            if let Some(r) = span_read(fs, h, first, offset, end) {
                return Ok(r);
            }
        }
        let (chunk, s) = chunk(fs, ctx, h, first)?;
        let base = h.geom.chunk_offset(first);
        let (from, to) = ((offset - base) as usize, (end - base) as usize);
        fs.counters.bytes_read.fetch_add((to - from) as u64, Ordering::Relaxed);
        fs.note_source(h, s);
        return Ok(ReadData::Slice(chunk, from, to));
    }
    let mut out = Vec::with_capacity((end - offset) as usize);
    let mut src = Source::Cache;
    for c in first..=last {
        let (chunk, s) = chunk(fs, ctx, h, c)?;
        if s == Source::Network {
            src = Source::Network;
        }
        let base = h.geom.chunk_offset(c);
        let from = offset.max(base) - base;
        let to = end.min(base + chunk.len() as u64) - base;
        out.extend_from_slice(&chunk.bytes()[from as usize..to as usize]);
    }
    fs.counters.bytes_read.fetch_add(out.len() as u64, Ordering::Relaxed);
    fs.note_source(h, src);
    Ok(ReadData::Owned(out))
}

/// The prefetch window, in chunks, for chunks the disk cache holds (the network's is `net`).
///
/// Measured (1 GiB, warm from the disk cache, nothing in memory, the mount's 1 MiB readahead,
/// three rounds of two reads, alternating): 0.621–1.001 s with 32 chunks, 0.578–0.651 s with 64,
/// 0.535–0.596 s with 128 and 0.506–0.587 s with 256 (2 or 4 MiB batches alike). The network's
/// window at 128 made cold reads no faster (1.159–1.229 s against 1.100–1.259 s with a cache,
/// 1.010–1.237 against 0.901–1.224 without), so it stays where it was.
fn disk_window(net: u64, chunk_log2: u8) -> u64 {
    (DISK_WINDOW >> chunk_log2).min(DISK_WINDOW_CHUNKS).max(net)
}

/// Whether `ready` chunks of the disk cache, found in a prefetch window of `window` chunks of
/// `1 << chunk_log2` bytes, are worth one batch now: min(`DISK_BATCH` bytes, a quarter of the
/// window) — so that the reader stays most of a window behind — or whatever is left once the
/// window reaches the end of the file (`to_end`). A sequential reader of 128 KiB FUSE requests
/// frees half a 256 KiB chunk per request; batched as they came free, a warm GiB took
/// 1,540–2,260 disk requests and 0.85–0.99 s of the daemon's CPU, in 2 MiB batches ~540 and
/// 0.75–0.82 s.
fn disk_batch_due(ready: u64, to_end: bool, window: u64, chunk_log2: u8) -> bool {
    let batch = (DISK_BATCH >> chunk_log2).min(window / 4).max(1);
    ready > 0 && (ready >= batch || to_end)
}

/// Work for the prefetch threads.
pub enum Job {
    /// One chunk, from wherever it is (memory, disk, network).
    One(Arc<Handle>, u64),
    /// Chunks of one file that the disk cache holds, read with one batch of submissions.
    Disk(Arc<Handle>, Vec<u64>),
}

impl Job {
    fn keys(&self) -> Vec<ChunkKey> {
        match self {
            Job::One(h, i) => vec![ckey(h, *i)],
            Job::Disk(h, v) => v.iter().map(|&i| ckey(h, i)).collect(),
        }
    }
}

/// Threads that fetch chunks ahead of sequential readers. Jobs are dropped when the queue is full.
#[derive(Default)]
pub struct Prefetcher {
    tx: Mutex<Option<SyncSender<Job>>>,
    /// Chunks queued or being prefetched, so that the next read does not ask for them again.
    claimed: Mutex<HashSet<ChunkKey>>,
}

impl Prefetcher {
    pub fn start(fs: &Arc<Fs>) {
        let (tx, rx) = sync_channel::<Job>(256);
        *fs.prefetch.tx.lock().unwrap() = Some(tx);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..PREFETCH_THREADS {
            let (rx, weak): (Arc<Mutex<Receiver<Job>>>, Weak<Fs>) = (rx.clone(), Arc::downgrade(fs));
            let _ = std::thread::Builder::new().name(format!("wraith-prefetch-{i}")).spawn(move || loop {
                let job = rx.lock().unwrap().recv();
                let Ok(job) = job else { return };
                let Some(fs) = weak.upgrade() else { return };
                let keys = job.keys();
                run(&fs, job);
                let mut c = fs.prefetch.claimed.lock().unwrap();
                for k in keys {
                    c.remove(&k);
                }
            });
        }
    }

    fn claimed(&self, key: &ChunkKey) -> bool {
        self.claimed.lock().unwrap().contains(key)
    }

    /// Mark `key` as being prefetched; false if it already is.
    fn claim(&self, key: ChunkKey) -> bool {
        self.claimed.lock().unwrap().insert(key)
    }

    fn push(&self, job: Job) {
        let keys = job.keys();
        let sent = match self.tx.lock().unwrap().as_ref() {
            Some(tx) => tx.try_send(job).is_ok(),
            None => false,
        };
        if !sent {
            let mut c = self.claimed.lock().unwrap();
            for k in keys {
                c.remove(&k);
            }
        }
    }
}

fn run(fs: &Fs, job: Job) {
    match job {
        Job::One(h, idx) => {
            if let Err(e) = chunk(fs, Ctx::default(), &h, idx) {
                tracing::debug!(chunk = idx, error = %e, "prefetch failed");
            }
        }
        Job::Disk(h, idxs) => {
            let Some(disk) = &fs.disk else { return };
            let root = h.info.root;
            // Lead the single-flight of each chunk read here: a reader that gets to one before
            // its read completes waits for it instead of reading it again.
            let mut leads: HashMap<u64, _> = fs
                .chunk_flight
                .lead(idxs.iter().filter(|&&i| !fs.chunks.contains(&ckey(&h, i))).map(|&i| ckey(&h, i)))
                .into_iter()
                .map(|l| (l.key().2, l))
                .collect();
            let idxs: Vec<u64> = idxs.into_iter().filter(|i| leads.contains_key(i)).collect();
            let mut missed = Vec::new();
            // The first chunk whose leaf value cannot be had (server unreachable, say) ends the
            // batch's asking: the rest are let go at once instead of one deadline each, so a
            // reader waiting on the k-th does not wait k deadlines.
            let leaf_failed = std::cell::RefCell::new(None::<Error>);
            let leaf = |i| {
                if let Some(e) = leaf_failed.borrow().clone() {
                    return Err(e);
                }
                leaf_cv(fs, Ctx::default(), &h, i).inspect_err(|e| *leaf_failed.borrow_mut() = Some(e.clone()))
            };
            disk.load_many(&root, &h.geom, &idxs, leaf, |idx, c| {
                let lead = leads.remove(&idx);
                match c {
                    Some(c) => {
                        fs.chunks.insert(ckey(&h, idx), c.clone(), Source::Cache);
                        if let Some(l) = lead {
                            l.finish(Ok((c, Source::Cache)));
                        }
                    }
                    // Gone or damaged since: let go of it (whoever waits asks again), then the
                    // usual way (network, with the single-flight).
                    None => {
                        drop(lead);
                        missed.push(idx);
                    }
                }
            });
            drop(leads);
            if leaf_failed.into_inner().is_some() {
                return; // prefetching is best effort: the readers ask for what they need
            }
            for idx in missed {
                if let Err(e) = chunk(fs, Ctx::default(), &h, idx) {
                    tracing::debug!(chunk = idx, error = %e, "prefetch failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{disk_batch_due, SeqState};

    const K: u64 = 1 << 10;

    #[test]
    fn reads_in_order_open_the_window_up_to_its_cap() {
        let mut s = SeqState::default();
        let got: Vec<u64> = (0..8).map(|i| s.advance(i * 128 * K, (i + 1) * 128 * K, 18, 32)).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 32, 32]);
    }

    #[test]
    fn readahead_arriving_out_of_order_keeps_the_window() {
        let mut s = SeqState::default();
        let mb = 1024 * K;
        for i in 0..6 {
            s.advance(i * mb, (i + 1) * mb, 18, 32);
        }
        // Requests 6..12 answered in the order the worker threads took them.
        for i in [7, 6, 9, 11, 8, 10] {
            assert_eq!(s.advance(i * mb, (i + 1) * mb, 18, 32), 32, "request {i}");
        }
        assert_eq!(s.next_off, 12 * mb, "a late read does not move the stream back");
    }

    #[test]
    fn a_stream_lets_go_of_what_it_passed_once_and_in_order() {
        let mut s = SeqState::default();
        let mut gone = Vec::new();
        for i in 0..32 {
            s.advance(i * 128 * K, (i + 1) * 128 * K, 18, 32);
            gone.extend(s.passed(18));
        }
        // 4 MiB read in 128 KiB requests: 2 MiB (16 requests) kept behind, 8 chunks let go.
        assert_eq!(gone, (0..8).collect::<Vec<_>>());
        // A late request inside the margin changes nothing.
        s.advance(3 << 20, (3 << 20) + 128 * K, 18, 32);
        assert!(s.passed(18).is_empty());
        // Nor does a short read: the margin stays 16 of the stream's longest reads.
        s.advance(4 << 20, (4 << 20) + 4 * K, 18, 32);
        assert!(s.passed(18).is_empty(), "a 4 KiB read does not shrink the margin to two chunks");
        // A jump closes the stream; the new one never lets go of chunks before where it began.
        let far = 64 << 20;
        s.advance(far, far + 128 * K, 18, 32);
        assert!(s.passed(18).is_empty(), "no stream open");
        let mut gone = Vec::new();
        for i in 1..40 {
            s.advance(far + i * 128 * K, far + (i + 1) * 128 * K, 18, 32);
            gone.extend(s.passed(18));
        }
        assert_eq!(gone.first(), Some(&256), "from the chunk the stream began in");
        assert!(gone.windows(2).all(|w| w[1] == w[0] + 1));
        // Random reads let go of nothing.
        let mut s = SeqState::default();
        for i in 0..8u64 {
            s.advance((i * 7 % 5) << 24, ((i * 7 % 5) << 24) + 4 * K, 18, 32);
            assert!(s.passed(18).is_empty());
        }
    }

    #[test]
    fn a_jump_or_a_small_random_read_closes_it() {
        let mut s = SeqState::default();
        for i in 0..4 {
            s.advance(i * 128 * K, (i + 1) * 128 * K, 18, 32);
        }
        let far = (64 << 20) + 512 * K;
        assert_eq!(s.advance(far, far + 128 * K, 18, 32), 0, "64 MiB ahead");
        let mut s = SeqState::default();
        s.advance(0, 4 * K, 18, 32);
        // 4 KiB reads: a slack of one chunk (256 KiB), not 16 x 4 KiB.
        assert_eq!(s.advance(200 * K, 204 * K, 18, 32), 2, "within a chunk: still a stream");
        assert_eq!(s.advance(900 * K, 904 * K, 18, 32), 0, "3 chunks away: random");
    }

    #[test]
    fn random_64k_reads_open_no_stream() {
        // 64 KiB reads 512 KiB apart: within 16 reads of their size, but no stream is open.
        let mut s = SeqState::default();
        assert_eq!(s.advance(4 << 20, (4 << 20) + 64 * K, 18, 32), 0);
        for i in 1..8u64 {
            let off = (4 << 20) + i * 576 * K;
            assert_eq!(s.advance(off, off + 64 * K, 18, 32), 0, "read {i}");
        }
    }

    #[test]
    fn the_disk_caches_window_is_32_mib_within_128_chunks_and_never_below_the_networks() {
        use super::disk_window;
        assert_eq!(disk_window(32, 18), 128, "256 KiB chunks: 32 MiB");
        assert_eq!(disk_window(32, 16), 128, "64 KiB chunks: 128 chunks, 8 MiB");
        assert_eq!(disk_window(32, 20), 32, "1 MiB chunks: 32 MiB");
        assert_eq!(disk_window(32, 24), 32, "16 MiB chunks: the network's window (memory bounds it further)");
        assert_eq!(disk_window(200, 18), 200);
    }

    #[test]
    fn disk_reads_wait_for_a_batch_unless_the_window_is_small_or_at_the_end() {
        // 256 KiB chunks, a full window of 32: 8 chunks (2 MiB) make a batch.
        assert!(!disk_batch_due(7, false, 32, 18));
        assert!(disk_batch_due(8, false, 32, 18));
        assert!(disk_batch_due(1, true, 32, 18), "the file's last chunks go at once");
        assert!(!disk_batch_due(0, true, 32, 18));
        // While the window opens, a quarter of it is a batch: the first reads are not held back.
        assert!(disk_batch_due(1, false, 1, 18) && disk_batch_due(1, false, 2, 18));
        assert!(!disk_batch_due(1, false, 8, 18) && disk_batch_due(2, false, 8, 18));
        // Small chunks: a quarter of the window, not 2 MiB of them.
        assert!(disk_batch_due(8, false, 32, 12));
        // Huge chunks: one is a batch.
        assert!(disk_batch_due(1, false, 32, 24));
    }
}
