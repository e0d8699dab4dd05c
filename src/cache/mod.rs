//! The persistent chunk cache on local disk.
//!
//! - [`layout`]: the on-disk format (journal records, data file names), pure.
//! - [`index`]: what is present, reserved and pinned, LRU eviction, pure.
//! - [`store`]: the directory: lock, replay and compaction at start, verified reads through the
//!   io_uring thread ([`crate::sys::uring`]), and the writer thread ([`writer`]) that writes
//!   admitted chunks and records them only after the write completed.
//!
//! The cache is a hint: anything read from it is verified with [`VerifiedChunk::verify`]; a
//! damaged, missing or foreign entry is a miss (dropped, logged) and the caller fetches again.
//!
//! [`VerifiedChunk::verify`]: crate::chunk::VerifiedChunk::verify

pub mod index;
pub mod layout;
pub mod meta;
mod prealloc;
pub mod store;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use store::{Pin, Store};

#[derive(Clone, Debug)]
pub struct CacheConfig {
    pub dir: PathBuf,
    /// Bytes of chunk data at most (0: no disk cache).
    pub size: u64,
    /// Use pread/pwrite even where io_uring works.
    pub force_sync: bool,
    /// Bytes of chunks the memory cache may hold: registered memory lent to chunk buffers grows
    /// up to this (plus what is in flight), so that chunks stay where they landed.
    pub lend_bytes: u64,
}

/// What a person reads in `wraith-mount --stats`.
#[derive(Default, Debug)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub bytes_from_cache: AtomicU64,
    /// Partial reads: a few pieces of a chunk, or blocks of a piece, read and verified alone.
    pub span_reads: AtomicU64,
    /// Of those, reads of a few 4 KiB blocks of a piece, verified against its block CVs.
    pub block_reads: AtomicU64,
    pub chunks_written: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Chunks not cached: no room, too many writes queued, or a write error (they streamed).
    pub not_admitted: AtomicU64,
    /// The most bytes ever queued for writing at once (how far the writer fell behind).
    pub write_queue_peak: AtomicU64,
    pub evictions: AtomicU64,
    pub verify_failures: AtomicU64,
    pub write_errors: AtomicU64,
    /// Runs of blocks allocated at once for a file filled in order (see `prealloc`).
    pub prealloc_groups: AtomicU64,
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Default cache directory for a mount identified by `id` (the server's resolved address and
/// the remote spec, e.g. "10.0.0.5:7447|server:/share"), named by the first 16 hex digits of its BLAKE3:
/// `/var/cache/wraith/<hash>` for root, `$XDG_CACHE_HOME/wraith/<hash>` (or `~/.cache/...`) else.
pub fn default_dir(id: &str, is_root: bool) -> PathBuf {
    let name = blake3::hash(id.as_bytes()).to_hex()[..16].to_string();
    let base = if is_root {
        PathBuf::from("/var/cache/wraith")
    } else if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        PathBuf::from(x).join("wraith")
    } else if let Some(h) = std::env::var_os("HOME") {
        PathBuf::from(h).join(".cache/wraith")
    } else {
        PathBuf::from("/tmp/wraith-cache")
    };
    base.join(name)
}

/// Default size: 10 GiB or 10 % of the free space where the cache lives, whichever is smaller.
pub fn default_size(dir: &Path) -> u64 {
    let mut p = dir;
    loop {
        if let Ok(f) = std::fs::File::open(p) {
            if let Ok(s) = crate::sys::fs::fstatvfs(std::os::fd::AsFd::as_fd(&f)) {
                return (s.bavail.saturating_mul(s.frsize) / 10).min(10 << 30);
            }
        }
        match p.parent() {
            Some(q) => p = q,
            None => return 1 << 30,
        }
    }
}
