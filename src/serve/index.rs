//! Server hash index: the BLAKE3 tree of each file version, computed once, persisted in the state
//! directory and read back with `pread` (never held in memory).
//!
//! # Tree file layout (format version 1)
//!
//! Name: lowercase hex of `blake3(dev ‖ ino ‖ size ‖ mtime_ns ‖ ctime_ns ‖ chunk_log2)` (integers
//! little-endian, 8 bytes each, `chunk_log2` one byte) followed by `.tree`. All integers little-endian.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0  | 8  | magic `b"WRAITHTR"` |
//! | 8  | 4  | format version, `1` (u32) |
//! | 12 | 8  | `Version::dev` (u64) |
//! | 20 | 8  | `Version::ino` (u64) |
//! | 28 | 8  | `Version::size` (u64) |
//! | 36 | 8  | `Version::mtime_ns` (i64) |
//! | 44 | 8  | `Version::ctime_ns` (i64) |
//! | 52 | 1  | `chunk_log2` |
//! | 53 | 8  | `n_leaves` (u64) = `Geometry::n_chunks` |
//! | 61 | 32 | BLAKE3 root (what `b3sum` prints) |
//! | 93 | 3  | reserved, zero |
//! | 96 | …  | the table: levels `0..n_levels(n_leaves)` back to back, 32-byte CVs |
//!
//! Level `j` (aligned subtrees over `2^j` leaves, see [`crate::chunk`]) holds `level_len(n, j)` CVs and starts
//! at `96 + 32 * sum_{i<j} level_len(n, i)`. A single-chunk file has no table: the file is the header alone.
//!
//! Old versions are collected: the index remembers the version it last served per (device, inode,
//! chunk size) and deletes the tree of an older version once a newer one is served (the file
//! has changed, so that tree can never be asked for again), and a scan at start, in the
//! background, keeps only the newest tree (by ctime, then mtime) of each such triple. Trees of
//! files deleted for good stay until their inode number is reused (the index never sees paths).
//!
//! The file is written to a temporary name, synced and renamed, header last, so a reader sees either
//! nothing or a whole file. Loading checks the header against the expected version, the file length and
//! (for two or more leaves) that the stored nodes give the stored root; anything else is a miss: the file
//! is deleted and rebuilt.

use crate::chunk::{self, Cv, Geometry, NodeSource, TreeBuilder};
use crate::error::Error;
use crate::types::Version;
use lru::LruCache;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io;
use std::num::NonZeroUsize;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"WRAITHTR";
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: u64 = 96;
/// Open tree files kept (one file descriptor each).
const MAX_OPEN_TREES: usize = 256;
/// Inodes whose served version is remembered for collecting old trees (~80 B each).
const CURRENT_ENTRIES: usize = 262_144;
/// Hashing reads at least this much per `pread` (whole chunks).
const MIN_READ: u64 = 256 * 1024;
/// Table writes are batched per level up to this many bytes.
const WRITE_BATCH: usize = 16 * 1024;

type Key = (Version, u8);

/// File versions waiting for a hashing thread (or being hashed) at most.
const MAX_PENDING: usize = 256;

/// Persisted BLAKE3 trees of file versions, with a bounded set of open ones and a small pool of
/// background hashing threads (at most one computation per `(version, chunk_log2)`).
pub struct HashIndex {
    shared: Arc<Shared>,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    max_workers: usize,
    /// Versions waiting to be hashed or being hashed at most; each holds its file open.
    max_pending: usize,
    /// Callers waiting for a version being hashed, and how many may: the others are answered
    /// BUSY at once (see [`HashIndex::set_max_waiters`]).
    waiters: AtomicUsize,
    max_waiters: AtomicUsize,
    /// Bytes read from source files for hashing (tests use it to tell a load from a rebuild).
    hashed_bytes: AtomicU64,
    /// The version each (dev, ino, chunk_log2) was last served at: trees of others are stale.
    /// Bounded; a forgotten entry only means the next start's scan collects that old tree.
    current: Mutex<LruCache<(u64, u64, u8), Version>>,
    /// Stale tree files deleted (tests, logs).
    collected: AtomicU64,
}

struct State {
    open: LruCache<Key, Arc<FileTree>>,
    pending: HashMap<Key, Arc<Job>>,
    queue: VecDeque<Arc<Job>>,
    workers: usize,
}

/// One computation; everyone asking for the same key waits on the same job.
struct Job {
    key: Key,
    file: Arc<File>,
    done: Mutex<Option<Result<Arc<FileTree>, Error>>>,
    cond: Condvar,
}

/// The tree of one file version, backed by its open tree file.
pub struct FileTree {
    file: File,
    geom: Geometry,
    root: blake3::Hash,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl HashIndex {
    /// `state_dir` is created (mode 0700) if missing. Temporary files left by dead processes are removed.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        Self::with_capacity(state_dir, MAX_OPEN_TREES)
    }

    fn with_capacity(state_dir: &Path, capacity: usize) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        remove_dead_temp_files(state_dir);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(HashIndex {
            shared: Arc::new(Shared {
                dir: state_dir.to_path_buf(),
                state: Mutex::new(State {
                    open: LruCache::new(NonZeroUsize::new(capacity.max(1)).expect("nonzero")),
                    pending: HashMap::new(),
                    queue: VecDeque::new(),
                    workers: 0,
                }),
                max_workers: cores.clamp(1, 8),
                max_pending: MAX_PENDING,
                waiters: AtomicUsize::new(0),
                max_waiters: AtomicUsize::new(usize::MAX),
                hashed_bytes: AtomicU64::new(0),
                current: Mutex::new(LruCache::new(NonZeroUsize::new(CURRENT_ENTRIES).expect("nonzero"))),
                collected: AtomicU64::new(0),
            }),
        })
    }

    /// Like [`HashIndex::open`], and delete the trees of superseded versions in the background.
    pub fn open_and_collect(state_dir: &Path) -> io::Result<Self> {
        let index = Self::open(state_dir)?;
        let shared = index.shared.clone();
        let _ = std::thread::Builder::new().name("wraith-tree-gc".into()).spawn(move || {
            let t0 = Instant::now();
            let n = shared.collect_stale();
            if n > 0 {
                tracing::info!(removed = n, ms = t0.elapsed().as_millis() as u64, "removed hash trees of superseded file versions");
            }
        });
        Ok(index)
    }

    /// Delete, now, every tree that is not the newest of its (dev, ino, chunk size). Returns how
    /// many were deleted.
    pub fn collect_stale(&self) -> usize {
        self.shared.collect_stale()
    }

    /// Stale tree files deleted so far.
    pub fn collected(&self) -> u64 {
        self.shared.collected.load(Ordering::Relaxed)
    }

    /// The tree of this file version: from memory, from the state directory, or computed by reading
    /// `file` chunk by chunk and persisted. Concurrent calls for the same `(version, chunk_log2)` share
    /// one computation, which runs on a background thread; if it is not done within `wait` this returns
    /// `Busy` and the computation goes on (ask again).
    ///
    /// `Stale` if `file`'s size, mtime or ctime differ from `version` when asked (checked on every call,
    /// also when the tree is known), before hashing or after it; nothing is persisted then.
    /// `Invalid` for a chunk size out of range; `Io` for read or write failures.
    pub fn get(
        &self,
        file: Arc<File>,
        version: Version,
        chunk_log2: u8,
        wait: Duration,
    ) -> Result<Arc<FileTree>, Error> {
        Geometry::new(version.size, chunk_log2).map_err(|_| Error::Invalid)?;
        check_version(&file, &version)?;
        let key = (version, chunk_log2);
        let shared = &self.shared;
        {
            let mut st = lock(&shared.state);
            if let Some(tree) = st.open.get(&key) {
                return Ok(tree.clone());
            }
            if let Some(job) = st.pending.get(&key).cloned() {
                Shared::ensure_workers(shared, &mut st);
                drop(st);
                return shared.wait(&job, wait);
            }
        }
        // Loading a persisted tree is a few small reads: do it here, not in the queue.
        if let Loaded::Tree(tree) = load(&shared.tree_path(&key), &key) {
            shared.supersede(&key);
            let mut st = lock(&shared.state);
            return Ok(st.open.get_or_insert(key, || Arc::new(tree)).clone());
        }
        let job = {
            let mut st = lock(&shared.state);
            if let Some(tree) = st.open.get(&key) {
                return Ok(tree.clone());
            }
            if !st.pending.contains_key(&key) && st.pending.len() >= shared.max_pending {
                // Opening files faster than they hash must not hold ever more of them open
                // (the server would run out of descriptors): BUSY, and the client asks again.
                return Err(Error::Busy);
            }
            let job = st.pending.get(&key).cloned().unwrap_or_else(|| {
                let job = Arc::new(Job {
                    key,
                    file,
                    done: Mutex::new(None),
                    cond: Condvar::new(),
                });
                st.pending.insert(key, job.clone());
                st.queue.push_back(job.clone());
                job
            });
            Shared::ensure_workers(shared, &mut st);
            job
        };
        shared.wait(&job, wait)
    }

    /// Let at most `n` callers of [`HashIndex::get`] wait for hashing at once; the others get
    /// BUSY at once when the tree is not ready (a known tree never waits). The server lets half
    /// of its workers wait, so that opens of big new files never hold every worker while other
    /// requests queue behind them.
    pub fn set_max_waiters(&self, n: usize) {
        self.shared.max_waiters.store(n, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn max_waiters(&self) -> usize {
        self.shared.max_waiters.load(Ordering::Relaxed)
    }
}

/// A caller's place among those that wait for hashing, given back on drop.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Job {
    fn wait(&self, wait: Duration) -> Result<Arc<FileTree>, Error> {
        let deadline = Instant::now().checked_add(wait);
        let mut done = lock(&self.done);
        loop {
            if let Some(result) = done.as_ref() {
                return result.clone();
            }
            done = match deadline {
                None => self.cond.wait(done).unwrap_or_else(|p| p.into_inner()),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Busy);
                    }
                    self.cond
                        .wait_timeout(done, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }
}

impl Shared {
    /// Wait up to `wait` for `job`, if a waiter's place is free; else only take its result if
    /// it is there.
    fn wait(&self, job: &Job, wait: Duration) -> Result<Arc<FileTree>, Error> {
        let taken = self.waiters.fetch_add(1, Ordering::Relaxed);
        let _place = Waiting(&self.waiters);
        let wait = if taken < self.max_waiters.load(Ordering::Relaxed) { wait } else { Duration::ZERO };
        job.wait(wait)
    }

    fn tree_path(&self, key: &Key) -> PathBuf {
        self.dir.join(format!("{}.tree", key_name(key)))
    }

    /// `key` was just served, so the file was at that version a moment ago (callers checked):
    /// the tree of an *older* version of the same inode and chunk size is stale. A version older
    /// than the one remembered (a slow job finishing after the file changed again) changes
    /// nothing; its tree goes at the next scan.
    fn supersede(&self, key: &Key) {
        let (v, log2) = *key;
        let old = {
            let mut cur = lock(&self.current);
            match cur.get(&(v.dev, v.ino, log2)) {
                Some(c) if !later(&v, c) => return,
                _ => cur.put((v.dev, v.ino, log2), v),
            }
        };
        if let Some(old) = old {
            self.remove_tree(&(old, log2));
        }
    }

    fn remove_tree(&self, key: &Key) {
        lock(&self.state).open.pop(key);
        if std::fs::remove_file(self.tree_path(key)).is_ok() {
            self.collected.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn collect_stale(&self) -> usize {
        let before = self.collected.load(Ordering::Relaxed);
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return 0 };
        let mut newest: HashMap<(u64, u64, u8), Version> = HashMap::new();
        let mut stale = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| n.ends_with(".tree")) {
                continue;
            }
            let mut b = [0u8; HEADER_LEN as usize];
            let Some(h) = File::open(entry.path()).ok().filter(|f| f.read_exact_at(&mut b, 0).is_ok()).and_then(|_| Header::decode(&b))
            else {
                continue; // foreign or damaged: `load` deals with it when asked
            };
            let (v, log2) = (h.version, h.chunk_log2);
            if entry.path() != self.tree_path(&(v, log2)) {
                continue;
            }
            match newest.get_mut(&(v.dev, v.ino, log2)) {
                Some(n) if later(&v, n) => stale.push((std::mem::replace(n, v), log2)),
                Some(n) if later(n, &v) => stale.push((v, log2)),
                Some(_) => {} // same times, another size: keep both, the asked one decides
                None => {
                    newest.insert((v.dev, v.ino, log2), v);
                }
            }
        }
        for (k, v) in newest {
            // Served meanwhile at a later version: the scan's newest is stale too.
            let cur = *lock(&self.current).get_or_insert(k, || v);
            if later(&cur, &v) {
                stale.push((v, k.2));
            }
        }
        for key in stale {
            // Only what something later has replaced (checked again: served versions move on).
            let cur = lock(&self.current).peek(&(key.0.dev, key.0.ino, key.1)).copied();
            if cur.is_some_and(|c| later(&c, &key.0)) {
                self.remove_tree(&key);
            }
        }
        (self.collected.load(Ordering::Relaxed) - before) as usize
    }

    /// Start workers for queued jobs, up to `max_workers`. A worker exits when the queue is empty.
    fn ensure_workers(this: &Arc<Self>, st: &mut State) {
        while st.workers < this.max_workers && st.workers < st.queue.len() {
            let shared = this.clone();
            let spawned = std::thread::Builder::new()
                .name("wraith-hash".into())
                .spawn(move || shared.work());
            match spawned {
                Ok(_) => st.workers += 1,
                // The job stays queued; the next `get` tries again.
                Err(e) => {
                    tracing::warn!("cannot start a hashing thread: {e}");
                    break;
                }
            }
        }
    }

    fn work(&self) {
        loop {
            let job = {
                let mut st = lock(&self.state);
                match st.queue.pop_front() {
                    Some(job) => job,
                    None => {
                        st.workers -= 1;
                        return;
                    }
                }
            };
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.load_or_build(&job)))
                    .unwrap_or_else(|_| Err(Error::Io(libc::EIO)));
            if result.is_ok() {
                self.supersede(&job.key);
            }
            {
                let mut st = lock(&self.state);
                st.pending.remove(&job.key);
                if let Ok(tree) = &result {
                    st.open.put(job.key, tree.clone());
                }
            }
            *lock(&job.done) = Some(result);
            job.cond.notify_all();
        }
    }

    fn load_or_build(&self, job: &Job) -> Result<Arc<FileTree>, Error> {
        let path = self.tree_path(&job.key);
        match load(&path, &job.key) {
            Loaded::Tree(tree) => return Ok(Arc::new(tree)),
            Loaded::Missing => {}
            Loaded::Invalid => {
                tracing::warn!("discarding damaged or foreign tree file {}", path.display());
                // If this fails too, the rename below replaces the file anyway.
                let _ = std::fs::remove_file(&path);
            }
        }
        self.build(job, &path).map(Arc::new)
    }

    fn build(&self, job: &Job, path: &Path) -> Result<FileTree, Error> {
        let (version, chunk_log2) = job.key;
        let geom = Geometry::new(version.size, chunk_log2).map_err(|_| Error::Invalid)?;
        check_version(&job.file, &version)?;
        let tmp = temp_path(path);
        let io = |e: io::Error| Error::from_io(&e);
        let out = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        let guard = RemoveOnDrop(&tmp);
        let root = self.hash_into(&job.file, &geom, &out)?;
        check_version(&job.file, &version)?;
        let header = Header {
            version,
            chunk_log2,
            n_leaves: geom.n_chunks(),
            root: *root.as_bytes(),
        };
        out.write_all_at(&header.encode(), 0).map_err(io)?;
        out.sync_data().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        std::mem::forget(guard);
        Ok(FileTree {
            file: out,
            geom,
            root,
        })
    }

    /// Hash `src` and write the table of `geom` into `out` after the header; returns the root.
    fn hash_into(&self, src: &File, geom: &Geometry, out: &File) -> Result<blake3::Hash, Error> {
        let n = geom.n_chunks();
        if n == 1 {
            let mut buf = vec![0; geom.chunk_len(0)];
            read_source(src, &mut buf, 0)?;
            self.hashed_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            return Ok(blake3::hash(&buf));
        }
        let chunks_per_read = (MIN_READ >> geom.chunk_log2).max(1);
        let mut buf = vec![0; (chunks_per_read << geom.chunk_log2).min(geom.size) as usize];
        let mut builder = TreeBuilder::new(n);
        let mut writer = TableWriter::new(out, n);
        let mut first = 0;
        while first < n {
            let last = (first + chunks_per_read).min(n);
            let start = geom.chunk_offset(first);
            let len =
                (geom.chunk_offset(last - 1) + geom.chunk_len(last - 1) as u64 - start) as usize;
            read_source(src, &mut buf[..len], start)?;
            self.hashed_bytes.fetch_add(len as u64, Ordering::Relaxed);
            for index in first..last {
                let at = (geom.chunk_offset(index) - start) as usize;
                let cv = chunk::chunk_cv(geom, index, &buf[at..at + geom.chunk_len(index)]);
                for (level, i, node) in builder.push(cv) {
                    writer.put(level, i, &node)?;
                }
            }
            first = last;
        }
        writer.flush()?;
        chunk::root(
            n,
            &mut Table {
                file: out,
                n_leaves: n,
            },
        )
        .map_err(|e| Error::from_io(&e))
    }
}

/// Fill `buf` from `offset`; a file that ends early changed under us.
fn read_source(src: &File, buf: &mut [u8], offset: u64) -> Result<(), Error> {
    src.read_exact_at(buf, offset).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => Error::Stale,
        _ => Error::from_io(&e),
    })
}

/// `Stale` unless the open file's size, mtime and ctime are those of `version`.
fn check_version(file: &File, version: &Version) -> Result<(), Error> {
    let now = version_of(&file.metadata().map_err(|e| Error::from_io(&e))?);
    let same = now.size == version.size
        && now.mtime_ns == version.mtime_ns
        && now.ctime_ns == version.ctime_ns;
    if same {
        Ok(())
    } else {
        Err(Error::Stale)
    }
}

fn version_of(m: &std::fs::Metadata) -> Version {
    Version {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec()),
        ctime_ns: m
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.ctime_nsec()),
    }
}

/// Whether version `a` of an inode came after `b` (ctime never goes back; mtime breaks ties).
fn later(a: &Version, b: &Version) -> bool {
    (a.ctime_ns, a.mtime_ns) > (b.ctime_ns, b.mtime_ns)
}

fn key_name((v, chunk_log2): &Key) -> String {
    let mut h = blake3::Hasher::new();
    h.update(&v.dev.to_le_bytes())
        .update(&v.ino.to_le_bytes())
        .update(&v.size.to_le_bytes())
        .update(&v.mtime_ns.to_le_bytes())
        .update(&v.ctime_ns.to_le_bytes())
        .update(&[*chunk_log2]);
    h.finalize().to_hex().to_string()
}

/// `NAME.tree` → `NAME.tree.PID.SEQ.tmp`, unique within and across processes.
fn temp_path(path: &Path) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{}.{seq}.tmp", std::process::id()));
    PathBuf::from(name)
}

/// Remove `*.tmp` files whose writing process no longer exists.
fn remove_dead_temp_files(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".tmp") else {
            continue;
        };
        let pid = stem.rsplit('.').nth(1).and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

struct RemoveOnDrop<'a>(&'a Path);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.0);
    }
}

/// Byte offset of level `level` in a tree file of `n_leaves` leaves.
fn level_offset(n_leaves: u64, level: u8) -> u64 {
    HEADER_LEN
        + 32 * (0..level)
            .map(|j| chunk::level_len(n_leaves, j))
            .sum::<u64>()
}

/// Length of a valid tree file.
fn tree_file_len(n_leaves: u64) -> u64 {
    if n_leaves < 2 {
        HEADER_LEN
    } else {
        level_offset(n_leaves, chunk::n_levels(n_leaves))
    }
}

/// Buffers table writes per level (each level is produced in index order).
struct TableWriter<'a> {
    out: &'a File,
    n_leaves: u64,
    /// Per level: index of the first buffered CV, and the buffered bytes.
    levels: Vec<(u64, Vec<u8>)>,
}

impl<'a> TableWriter<'a> {
    fn new(out: &'a File, n_leaves: u64) -> Self {
        let levels = (0..chunk::n_levels(n_leaves))
            .map(|_| (0, Vec::new()))
            .collect();
        TableWriter {
            out,
            n_leaves,
            levels,
        }
    }

    fn put(&mut self, level: u8, index: u64, cv: &Cv) -> Result<(), Error> {
        let (start, buf) = &mut self.levels[level as usize];
        debug_assert_eq!(*start + buf.len() as u64 / 32, index);
        buf.extend_from_slice(cv);
        if buf.len() >= WRITE_BATCH {
            self.flush_level(level)?;
        }
        Ok(())
    }

    fn flush_level(&mut self, level: u8) -> Result<(), Error> {
        let at = level_offset(self.n_leaves, level);
        let (start, buf) = &mut self.levels[level as usize];
        self.out
            .write_all_at(buf, at + 32 * *start)
            .map_err(|e| Error::from_io(&e))?;
        *start += buf.len() as u64 / 32;
        buf.clear();
        Ok(())
    }

    fn flush(&mut self) -> Result<(), Error> {
        (0..self.levels.len() as u8).try_for_each(|level| self.flush_level(level))
    }
}

/// The table of an open tree file as a [`NodeSource`].
struct Table<'a> {
    file: &'a File,
    n_leaves: u64,
}

impl NodeSource for Table<'_> {
    fn node(&mut self, level: u8, index: u64) -> io::Result<Cv> {
        if level >= chunk::n_levels(self.n_leaves)
            || index >= chunk::level_len(self.n_leaves, level)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tree node out of range",
            ));
        }
        let mut cv = [0; 32];
        self.file
            .read_exact_at(&mut cv, level_offset(self.n_leaves, level) + 32 * index)?;
        Ok(cv)
    }
}

enum Loaded {
    Tree(FileTree),
    Missing,
    Invalid,
}

/// Open and check a persisted tree for `key`.
fn load(path: &Path, (version, chunk_log2): &Key) -> Loaded {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Loaded::Missing,
        Err(_) => return Loaded::Invalid,
    };
    let Ok(geom) = Geometry::new(version.size, *chunk_log2) else {
        return Loaded::Invalid;
    };
    let n = geom.n_chunks();
    let mut raw = [0; HEADER_LEN as usize];
    let header = file
        .read_exact_at(&mut raw, 0)
        .ok()
        .and_then(|_| Header::decode(&raw));
    let expected =
        |h: &Header| h.version == *version && h.chunk_log2 == *chunk_log2 && h.n_leaves == n;
    let Some(header) = header.filter(expected) else {
        return Loaded::Invalid;
    };
    if file.metadata().map(|m| m.len()).ok() != Some(tree_file_len(n)) {
        return Loaded::Invalid;
    }
    let root = blake3::Hash::from(header.root);
    if n >= 2
        && chunk::root(
            n,
            &mut Table {
                file: &file,
                n_leaves: n,
            },
        )
        .ok()
            != Some(root)
    {
        return Loaded::Invalid;
    }
    Loaded::Tree(FileTree { file, geom, root })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    version: Version,
    chunk_log2: u8,
    n_leaves: u64,
    root: [u8; 32],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut b = [0; HEADER_LEN as usize];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.version.dev.to_le_bytes());
        b[20..28].copy_from_slice(&self.version.ino.to_le_bytes());
        b[28..36].copy_from_slice(&self.version.size.to_le_bytes());
        b[36..44].copy_from_slice(&self.version.mtime_ns.to_le_bytes());
        b[44..52].copy_from_slice(&self.version.ctime_ns.to_le_bytes());
        b[52] = self.chunk_log2;
        b[53..61].copy_from_slice(&self.n_leaves.to_le_bytes());
        b[61..93].copy_from_slice(&self.root);
        b
    }

    /// `None` for a foreign file, another format version or nonzero reserved bytes.
    fn decode(b: &[u8; HEADER_LEN as usize]) -> Option<Self> {
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let format = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if &b[0..8] != MAGIC || format != FORMAT_VERSION || b[93..96] != [0; 3] {
            return None;
        }
        Some(Header {
            version: Version {
                dev: u64_at(12),
                ino: u64_at(20),
                size: u64_at(28),
                mtime_ns: u64_at(36) as i64,
                ctime_ns: u64_at(44) as i64,
            },
            chunk_log2: b[52],
            n_leaves: u64_at(53),
            root: b[61..93].try_into().expect("32 bytes"),
        })
    }
}

impl FileTree {
    pub fn geometry(&self) -> Geometry {
        self.geom
    }

    pub fn root(&self) -> blake3::Hash {
        self.root
    }

    /// Leaf CVs `[first, first + count)`, clamped to `n_chunks`, read with `pread`. A single-chunk file has
    /// no leaf CVs (its chunk is checked against the root): the result is empty.
    pub fn leaves(&self, first: u64, count: u64) -> io::Result<Vec<Cv>> {
        let n = self.geom.n_chunks();
        let end = first.saturating_add(count).min(n);
        if n < 2 || first >= end {
            return Ok(Vec::new());
        }
        let mut raw = vec![0; ((end - first) * 32) as usize];
        self.file
            .read_exact_at(&mut raw, level_offset(n, 0) + 32 * first)?;
        Ok(raw
            .chunks_exact(32)
            .map(|c| c.try_into().expect("32 bytes"))
            .collect())
    }

    /// [`chunk::prove`] over the persisted table (empty for a single-chunk file's chunk 0).
    /// `InvalidInput` for an empty range or one past the end.
    pub fn prove(&self, first: u64, count: u64) -> io::Result<Vec<Cv>> {
        let n = self.geom.n_chunks();
        chunk::prove(
            n,
            first,
            count,
            &mut Table {
                file: &self.file,
                n_leaves: n,
            },
        )
    }
}

#[cfg(test)]
mod tests;
