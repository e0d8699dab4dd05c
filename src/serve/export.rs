//! Exported directories and safe path resolution beneath them.
//!
//! Every path from a client is checked syntactically first (no leading '/', no empty, "." or
//! ".." components, no NUL, bounded length) and then resolved by the kernel with `openat2`
//! relative to the export's root fd under `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS`. The server never follows a symlink: a symlink is served as a symlink
//! (the client's kernel follows it via readlink), and a path that goes *through* one fails with
//! [`Error::Loop`]. Because the kernel checks every component of the walk itself, a concurrent
//! rename that swaps a directory for a symlink cannot lead a lookup outside the export.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::error::Error;
use crate::sys::fs as sys;
use crate::types::{Attr, DirEntry, FileKind, StatFs};

/// Chunk size when the spec names none: 256 KiB.
pub const DEFAULT_CHUNK_LOG2: u8 = 18;
/// Smallest chunk size accepted: 1 KiB.
pub const MIN_CHUNK_LOG2: u8 = 10;
/// Largest chunk size accepted: 16 MiB.
pub const MAX_CHUNK_LOG2: u8 = 24;
/// Longest path (bytes) a client may send.
pub const MAX_PATH: usize = 4096;
/// Longest single component (bytes), as on Linux filesystems.
pub const MAX_NAME: usize = 255;
/// Longest export name.
pub const MAX_EXPORT_NAME: usize = 64;
/// Estimated encoded size of a directory entry, excluding its name.
pub const DIRENT_OVERHEAD: usize = 64;

/// The only way the server resolves client paths.
const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// One `--export` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportSpec {
    pub name: String,
    pub path: PathBuf,
    pub chunk_log2: u8,
}

/// Parses "NAME=PATH" or "NAME=PATH,chunk=SIZE". NAME is 1..=64 of `[A-Za-z0-9._-]` (not "." or
/// ".."); SIZE is a power of two from 1K to 16M, written in bytes or with a K/M suffix. PATH may
/// not contain ','. Err is one line saying what is wrong.
pub fn parse_export_spec(s: &str) -> Result<ExportSpec, String> {
    let bad = |why: String| format!("export spec {s:?}: {why}");
    let (name, rest) = s
        .split_once('=')
        .ok_or_else(|| bad("expected NAME=PATH or NAME=PATH,chunk=SIZE".into()))?;
    check_export_name(name).map_err(bad)?;
    let mut parts = rest.split(',');
    let path = parts.next().unwrap_or("");
    if path.is_empty() {
        return Err(bad("empty PATH".into()));
    }
    let mut chunk_log2 = DEFAULT_CHUNK_LOG2;
    for opt in parts {
        match opt.split_once('=') {
            Some(("chunk", v)) => chunk_log2 = parse_chunk_size(v).map_err(bad)?,
            _ => {
                return Err(bad(format!(
                    "unknown option {opt:?} (the only option is chunk=SIZE)"
                )))
            }
        }
    }
    Ok(ExportSpec {
        name: name.to_string(),
        path: PathBuf::from(path),
        chunk_log2,
    })
}

fn check_export_name(name: &str) -> Result<(), String> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if name.is_empty() || name.len() > MAX_EXPORT_NAME {
        return Err(format!("NAME must be 1 to {MAX_EXPORT_NAME} characters"));
    }
    if name == "." || name == ".." || !name.chars().all(ok_char) {
        return Err(format!(
            "NAME {name:?} may only use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// "256K", "1M", "65536" → log2 of the size.
fn parse_chunk_size(v: &str) -> Result<u8, String> {
    let (digits, mult) = match v.as_bytes().last() {
        Some(b'K' | b'k') => (&v[..v.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&v[..v.len() - 1], 1u64 << 20),
        _ => (v, 1),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("chunk size {v:?} is not a number like 256K, 1M or 65536"))?;
    if !bytes.is_power_of_two() {
        return Err(format!("chunk size {v:?} is not a power of two"));
    }
    let log2 = bytes.trailing_zeros() as u8;
    if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&log2) {
        return Err(format!("chunk size {v:?} is outside 1K..16M"));
    }
    Ok(log2)
}

#[derive(Debug)]
struct Export {
    name: String,
    /// `O_PATH|O_DIRECTORY` fd of the export root; every lookup starts here.
    root: OwnedFd,
    chunk_log2: u8,
}

/// The server's exports, addressed by share id (the index in the spec list).
#[derive(Debug)]
pub struct Exports {
    list: Vec<Export>,
    /// Sorted names of directories listed recently, by the directory's identity and change time,
    /// so that paging through a big directory reads and sorts it once, not once per page.
    listings: Mutex<Listings>,
}

/// A directory as of one change: device, inode, mtime, ctime (any entry added, removed or renamed
/// changes mtime and ctime).
type DirKey = (u64, u64, i64, i64);

/// Listings kept, bounded by the bytes of their names.
struct Listings {
    lru: LruCache<DirKey, Arc<Vec<Vec<u8>>>>,
    bytes: usize,
}

/// Bytes of names kept in listings (plus a fixed cost per name).
const LISTING_BYTES: usize = 32 << 20;
const NAME_COST: usize = 32;
/// What a listing costs besides its names (key, LRU entry, the vector), so that empty
/// directories count too: listed by the million, they grew the cache without end.
const LISTING_COST: usize = 128;
/// A directory changed this recently is not kept: two changes within one timestamp tick would
/// leave the same mtime, so the listing could miss the second.
const RACY: std::time::Duration = std::time::Duration::from_secs(2);

#[cfg(test)]
#[test]
fn empty_listings_count_toward_the_bound() {
    let mut l = Listings { lru: LruCache::unbounded(), bytes: 0 };
    for i in 0..1_000_000u64 {
        l.put((1, i, 0, 0), Arc::new(Vec::new()));
    }
    assert!(l.bytes <= LISTING_BYTES);
    assert!(l.lru.len() <= LISTING_BYTES / LISTING_COST, "{} listings kept", l.lru.len());
}

impl std::fmt::Debug for Listings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listings({} directories, {} bytes)", self.lru.len(), self.bytes)
    }
}

impl Listings {
    fn get(&mut self, k: &DirKey) -> Option<Arc<Vec<Vec<u8>>>> {
        self.lru.get(k).cloned()
    }

    fn put(&mut self, k: DirKey, names: Arc<Vec<Vec<u8>>>) {
        let cost = |v: &Vec<Vec<u8>>| LISTING_COST + v.iter().map(|n| n.len() + NAME_COST).sum::<usize>();
        let c = cost(&names);
        if c > LISTING_BYTES / 2 {
            return;
        }
        if let Some(old) = self.lru.put(k, names) {
            self.bytes -= cost(&old);
        }
        self.bytes += c;
        while self.bytes > LISTING_BYTES {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= cost(&old),
                None => break,
            }
        }
    }
}

impl Exports {
    /// Opens each root (`O_PATH|O_DIRECTORY|O_CLOEXEC`) and checks that `openat2` works on it.
    /// Err: one line naming the export and the reason.
    pub fn new(specs: Vec<ExportSpec>) -> Result<Self, String> {
        if specs.is_empty() {
            return Err("no exports given: at least one NAME=PATH is needed".into());
        }
        let mut list: Vec<Export> = Vec::with_capacity(specs.len());
        for spec in specs {
            let name = &spec.name;
            check_export_name(name).map_err(|e| format!("export {name:?}: {e}"))?;
            if list.iter().any(|e| e.name == *name) {
                return Err(format!("export {name:?} is given twice"));
            }
            if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&spec.chunk_log2) {
                return Err(format!(
                    "export {name:?}: chunk size 2^{} is outside 1K..16M",
                    spec.chunk_log2
                ));
            }
            let root: OwnedFd = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
                .open(&spec.path)
                .map_err(|e| {
                    format!(
                        "export {name:?}: cannot open directory {}: {e}",
                        spec.path.display()
                    )
                })?
                .into();
            match sys::openat2(root.as_fd(), c".", libc::O_PATH, RESOLVE) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    return Err(format!(
                        "export {name:?}: openat2(2) is unavailable; wraith-serve needs Linux 5.6 or newer"
                    ));
                }
                Err(e) => {
                    return Err(format!(
                        "export {name:?}: cannot resolve paths beneath {}: {e}",
                        spec.path.display()
                    ))
                }
            }
            list.push(Export {
                name: spec.name,
                root,
                chunk_log2: spec.chunk_log2,
            });
        }
        Ok(Exports { list, listings: Mutex::new(Listings { lru: LruCache::unbounded(), bytes: 0 }) })
    }

    /// Share id of the export called `name`.
    pub fn share(&self, name: &str) -> Option<u32> {
        self.list
            .iter()
            .position(|e| e.name == name)
            .map(|i| i as u32)
    }

    /// Export names in share-id order.
    pub fn names(&self) -> Vec<String> {
        self.list.iter().map(|e| e.name.clone()).collect()
    }

    /// Chunk size (log2) of a share; [`DEFAULT_CHUNK_LOG2`] for an unknown share id (every
    /// other call reports [`Error::NotFound`] for it).
    pub fn chunk_log2(&self, share: u32) -> u8 {
        self.list
            .get(share as usize)
            .map_or(DEFAULT_CHUNK_LOG2, |e| e.chunk_log2)
    }

    /// Attributes of the object at `path`, never following a final symlink.
    pub fn lstat(&self, share: u32, path: &[u8]) -> Result<Attr, Error> {
        let fd = self.resolve(share, path, libc::O_PATH | libc::O_NOFOLLOW)?;
        attr_of(sys::fstat(fd.as_fd()).map_err(|e| Error::from_io(&e))?)
    }

    /// Entries sorted by name (bytewise), excluding "." and "..", starting at index `cookie`,
    /// until adding the next would exceed `max_bytes` (each entry counts
    /// [`DIRENT_OVERHEAD`] + name length). Returns the entries and the next cookie, or None at
    /// the end. Entries that vanish before they are stat'ed are skipped. If not even the first
    /// remaining entry fits, the result is [`Error::Range`] (an empty page would never advance).
    /// Attributes come from `fstatat(dirfd, name, AT_SYMLINK_NOFOLLOW)`: one component, never
    /// followed. A symlink at `path` is not listed: [`Error::NotDir`] (or [`Error::Loop`] on
    /// kernels that check `O_NOFOLLOW` before `O_DIRECTORY`).
    pub fn readdir(
        &self,
        share: u32,
        path: &[u8],
        cookie: u64,
        max_bytes: usize,
    ) -> Result<(Vec<DirEntry>, Option<u64>), Error> {
        let fd = self.resolve(
            share,
            path,
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        )?;
        let da = attr_of(sys::fstat(fd.as_fd()).map_err(|e| Error::from_io(&e))?)?;
        let key: DirKey = (da.dev, da.ino, da.mtime_ns, da.ctime_ns);
        let cached = self.listings.lock().unwrap().get(&key);
        let mut dir = sys::DirReader::new(fd);
        let names = match cached {
            Some(n) => n,
            None => {
                let mut names = Vec::new();
                for e in dir.by_ref() {
                    let e = e.map_err(|e| Error::from_io(&e))?;
                    if e.name != b"." && e.name != b".." {
                        names.push(e.name);
                    }
                }
                names.sort_unstable();
                let names = Arc::new(names);
                if !changed_lately(da.mtime_ns.max(da.ctime_ns)) {
                    self.listings.lock().unwrap().put(key, names.clone());
                }
                names
            }
        };

        let start = usize::try_from(cookie).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut used = 0usize;
        let mut i = start;
        while i < names.len() {
            let cost = DIRENT_OVERHEAD + names[i].len();
            if used.saturating_add(cost) > max_bytes {
                break;
            }
            // getdents64 names never contain NUL.
            let cname = CString::new(names[i].as_slice()).map_err(|_| Error::Io(libc::EIO))?;
            match sys::fstatat_nofollow(dir.as_fd(), &cname) {
                Ok(st) => {
                    out.push(DirEntry {
                        name: names[i].clone(),
                        attr: attr_of(st)?,
                    });
                    used += cost;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(Error::from_io(&e)),
            }
            i += 1;
        }
        if i == start && i < names.len() {
            return Err(Error::Range);
        }
        let next = (i < names.len()).then_some(i as u64);
        Ok((out, next))
    }

    /// Target of the symlink at `path`; [`Error::Invalid`] if it is not a symlink.
    pub fn readlink(&self, share: u32, path: &[u8]) -> Result<Vec<u8>, Error> {
        let fd = self.resolve(share, path, libc::O_PATH | libc::O_NOFOLLOW)?;
        let st = sys::fstat(fd.as_fd()).map_err(|e| Error::from_io(&e))?;
        if attr_of(st)?.kind != FileKind::Symlink {
            return Err(Error::Invalid);
        }
        sys::readlinkat_empty(fd.as_fd()).map_err(|e| Error::from_io(&e))
    }

    /// Opens a regular file for reading (`O_RDONLY|O_NOFOLLOW|O_CLOEXEC`) with its attributes.
    /// [`Error::IsDir`] for a directory, [`Error::Invalid`] for any other kind. The kind is
    /// checked on an `O_PATH` fd first, so FIFOs and device nodes are never opened; should the
    /// object be swapped in between, the real open is non-blocking and checked again.
    pub fn open_file(&self, share: u32, path: &[u8]) -> Result<(File, Attr), Error> {
        self.open_file_flags(share, path, 0)
    }

    /// Like [`Exports::open_file`], but the descriptor bypasses the page cache (O_DIRECT), for
    /// reading data nobody has cached without paying for the page cache.
    pub fn open_file_direct(&self, share: u32, path: &[u8]) -> Result<(File, Attr), Error> {
        self.open_file_flags(share, path, libc::O_DIRECT)
    }

    fn open_file_flags(&self, share: u32, path: &[u8], extra: i32) -> Result<(File, Attr), Error> {
        let probe = self.resolve(share, path, libc::O_PATH | libc::O_NOFOLLOW)?;
        check_regular(attr_of(sys::fstat(probe.as_fd()).map_err(|e| Error::from_io(&e))?)?.kind)?;
        drop(probe);
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | extra;
        let fd = self.resolve(share, path, flags)?;
        let attr = attr_of(sys::fstat(fd.as_fd()).map_err(|e| Error::from_io(&e))?)?;
        check_regular(attr.kind)?;
        sys::set_nonblocking(fd.as_fd(), false).map_err(|e| Error::from_io(&e))?;
        Ok((File::from(fd), attr))
    }

    /// Statistics of the filesystem holding the export root.
    pub fn statfs(&self, share: u32) -> Result<StatFs, Error> {
        let ex = self.export(share)?;
        let sv = sys::fstatvfs(ex.root.as_fd()).map_err(|e| Error::from_io(&e))?;
        let u32_of = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        Ok(StatFs {
            blocks: sv.blocks,
            bfree: sv.bfree,
            bavail: sv.bavail,
            files: sv.files,
            ffree: sv.ffree,
            bsize: u32_of(sv.bsize),
            namelen: u32_of(sv.namemax),
            frsize: u32_of(sv.frsize),
        })
    }

    fn export(&self, share: u32) -> Result<&Export, Error> {
        self.list.get(share as usize).ok_or(Error::NotFound)
    }

    /// Checks `path` and opens it beneath the share's root with `flags`, never following a symlink.
    fn resolve(&self, share: u32, path: &[u8], flags: i32) -> Result<OwnedFd, Error> {
        let ex = self.export(share)?;
        let cpath = check_path(path)?;
        sys::openat2(ex.root.as_fd(), &cpath, flags, RESOLVE).map_err(|e| match e.raw_os_error() {
            // Exports::new probed openat2, so this means a seccomp filter or similar refused it.
            Some(libc::ENOSYS) => Error::NotSupported,
            _ => Error::from_io(&e),
        })
    }
}

/// Syntactic check of a client path, before any syscall. "" is the export root (".").
fn check_path(path: &[u8]) -> Result<CString, Error> {
    if path.len() > MAX_PATH {
        return Err(Error::NameTooLong);
    }
    if path.is_empty() {
        return Ok(CStr::to_owned(c"."));
    }
    if path[0] == b'/' {
        return Err(Error::Invalid);
    }
    for comp in path.split(|&b| b == b'/') {
        if comp.is_empty() || comp == b"." || comp == b".." {
            return Err(Error::Invalid);
        }
        if comp.len() > MAX_NAME {
            return Err(Error::NameTooLong);
        }
    }
    CString::new(path).map_err(|_| Error::Invalid)
}

fn check_regular(kind: FileKind) -> Result<(), Error> {
    match kind {
        FileKind::File => Ok(()),
        FileKind::Dir => Err(Error::IsDir),
        _ => Err(Error::Invalid),
    }
}

/// True if `ns` (a timestamp, ns since the epoch) is within [`RACY`] of now, or in the future.
fn changed_lately(ns: i64) -> bool {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(i64::MAX, |d| d.as_nanos() as i64);
    now.saturating_sub(ns) < RACY.as_nanos() as i64
}

fn attr_of(st: sys::Stat) -> Result<Attr, Error> {
    Ok(Attr {
        kind: FileKind::from_mode(st.mode).ok_or(Error::Io(libc::EIO))?,
        perm: (st.mode & 0o7777) as u16,
        nlink: u32::try_from(st.nlink).unwrap_or(u32::MAX),
        uid: st.uid,
        gid: st.gid,
        size: st.size,
        blocks: st.blocks,
        rdev: st.rdev,
        atime_ns: st.atime_ns,
        mtime_ns: st.mtime_ns,
        ctime_ns: st.ctime_ns,
        dev: st.dev,
        ino: st.ino,
    })
}

#[cfg(test)]
mod tests;
