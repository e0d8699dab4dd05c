//! The filesystem core: inodes, handles, attribute caching, close-to-open consistency, the data
//! path with prefetch, and the one place where errors become errno ([`crate::error::Error::errno`]).
//! No fuser types here: the `fuse` adapter translates.

pub mod flight;
pub mod inodes;
mod offline;
mod read;

pub use read::ReadData;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::cache::{meta, Pin, Store};
use crate::chunk::{Geometry, VerifiedChunk};
use crate::error::{Error, Result};
use crate::proto::msg::{Request, Response};
use crate::transport::ClientTransport;
use crate::types::{Attr, FileInfo, FileKind, StatFs};
use flight::ChunkLru;
use inodes::{join, Inodes};
use offline::Remembered;

pub use inodes::ROOT;

pub const XATTR_BLAKE3: &str = "user.wraith.blake3";
/// Fraction of the file's chunks on local disk.
pub const XATTR_CACHED: &str = "user.wraith.cached";
/// Where the last read of the file was served from: network, cache or passthrough.
pub const XATTR_SOURCE: &str = "user.wraith.source";
/// On the mount's root: counters for a person (`wraith-mount --stats`).
pub const XATTR_STATS: &str = "user.wraith.stats";

/// After a request timed out, what is cached is served without asking the server (a stopped
/// server must not cost a full deadline per `stat`) until a probe this often gets an answer.
const PROBE_EVERY: Duration = Duration::from_secs(3);
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Where a read was served from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Network,
    /// Memory or the disk cache.
    Cache,
    /// The kernel read the disk cache's backing file directly.
    Passthrough,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Network => "network",
            Source::Cache => "cache",
            Source::Passthrough => "passthrough",
        }
    }
}

#[derive(Clone, Debug)]
pub struct FsConfig {
    pub share: String,
    /// Subdirectory of the share that is the mount's root ("" for the share root).
    pub subdir: Vec<u8>,
    pub attr_timeout: Duration,
    pub timeout: Duration,
    pub hard: bool,
    pub mem_cache: u64,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// Chunks fetched ahead of a sequential reader at most.
    pub max_prefetch: u64,
    /// Offer FUSE passthrough for complete, verified files in the disk cache.
    pub passthrough: bool,
    /// Where what the mount knows about names is saved for a later offline mount
    /// ([`crate::cache::meta`]); None: not saved.
    pub meta_file: Option<PathBuf>,
}

/// How often what the mount knows about names is saved (when it changed), besides at unmount.
const META_SAVE_EVERY: Duration = Duration::from_secs(30);

/// One `readdir` answer entry: (next offset, name, attributes; None for "." and "..").
pub type DirItem = (u64, Vec<u8>, Option<Attr>);

/// Who is asking (for interrupting hard-mount retries).
#[derive(Clone, Copy, Debug, Default)]
pub struct Ctx {
    pub pid: u32,
}

/// An open regular file: one version, pinned for the life of the handle.
pub struct Handle {
    pub ino: u64,
    pub path: Vec<u8>,
    pub info: FileInfo,
    pub geom: Geometry,
    seq: Mutex<read::SeqState>,
    /// The disk cache's data file, pinned, when this open may be served by passthrough.
    backing: Mutex<Option<Pin>>,
}

impl Handle {
    /// The backing file for a passthrough open (only while pinned).
    pub fn backing_fd(&self) -> Option<std::os::fd::OwnedFd> {
        let b = self.backing.lock().unwrap();
        b.as_ref().and_then(|p| p.file.try_clone().ok()).map(Into::into)
    }
}

#[derive(Default)]
pub struct Counters {
    pub bytes_read: AtomicU64,
    pub chunks_fetched: AtomicU64,
    pub chunk_hits: AtomicU64,
    pub bytes_fetched: AtomicU64,
    pub verify_failures: AtomicU64,
    pub passthrough_opens: AtomicU64,
    pub offline_opens: AtomicU64,
}

pub struct Fs {
    cfg: FsConfig,
    net: ClientTransport,
    inodes: Mutex<Inodes>,
    /// Last known file info per local inode (for keeping the page cache across opens).
    infos: Mutex<HashMap<u64, FileInfo>>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    chunks: ChunkLru,
    chunk_flight: flight::SingleFlight<flight::ChunkKey, (VerifiedChunk, Source)>,
    cvs: read::CvCache,
    prefetch: read::Prefetcher,
    pub counters: Counters,
    disk: Option<Arc<Store>>,
    /// Where the last read of each inode came from (`user.wraith.source`).
    sources: Mutex<HashMap<u64, Source>>,
    /// A request timed out and the server has not answered since (the background probe or any
    /// answer clears it).
    offline: AtomicBool,
    /// The daemon is unmounting (a signal): hard mounts stop retrying and waits end, so that
    /// every FUSE thread returns and the session can end.
    stopping: AtomicBool,
    /// What the server last said about names, kept after the kernel forgets the inode, so that
    /// cached files stay reachable while the server does not answer (saved to `meta_file`).
    known: Mutex<Remembered>,
    /// Attached from a saved snapshot because the server did not answer at mount time.
    started_offline: bool,
    /// Held while a snapshot is written (the periodic saver and the unmount may both save).
    saving: Mutex<()>,
}

impl Fs {
    /// Attach to the share: checks the key, the share and the subdirectory, with clear errors.
    pub fn attach(cfg: FsConfig, net: ClientTransport) -> Result<Arc<Self>> {
        Self::attach_with_cache(cfg, net, None)
    }

    /// [`Fs::attach`] with a disk cache between memory and the network.
    ///
    /// When the server does not answer and `cfg.meta_file` holds what an earlier mount knew, the
    /// mount starts from that (see [`Fs::started_offline`]): files whose chunks are all in the
    /// disk cache are readable, the rest fail at the deadline until the server answers again.
    pub fn attach_with_cache(cfg: FsConfig, net: ClientTransport, disk: Option<Arc<Store>>) -> Result<Arc<Self>> {
        let now = Instant::now();
        let mut known = Remembered::default();
        let saved = cfg.meta_file.as_deref().and_then(meta::load);
        let (root, started_offline) = match Self::ask_root(&cfg, &net) {
            Ok(root) => {
                if let Some(s) = saved {
                    known.restore(s);
                }
                (root, false)
            }
            Err(Error::RemoteTimeout) => match saved {
                Some(s) if s.root.is_some() => {
                    let root = s.root.unwrap();
                    known.restore(s);
                    (root, true)
                }
                _ => return Err(Error::RemoteTimeout),
            },
            Err(e) => return Err(e),
        };
        let fs = Arc::new(Fs {
            inodes: Mutex::new(Inodes::new(cfg.subdir.clone(), root, now)),
            infos: Mutex::new(HashMap::new()),
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            chunks: ChunkLru::new(cfg.mem_cache),
            chunk_flight: Default::default(),
            cvs: read::CvCache::new(),
            prefetch: read::Prefetcher::default(),
            counters: Counters::default(),
            disk,
            sources: Mutex::new(HashMap::new()),
            offline: AtomicBool::new(started_offline),
            stopping: AtomicBool::new(false),
            known: Mutex::new(known),
            started_offline,
            saving: Mutex::new(()),
            cfg,
            net,
        });
        read::Prefetcher::start(&fs);
        Self::start_background(Arc::downgrade(&fs));
        Ok(fs)
    }

    /// The mount root's attributes (the share's, or its subdirectory's).
    fn ask_root(cfg: &FsConfig, net: &ClientTransport) -> Result<Attr> {
        let r = net.call(&Request::Attach { share: cfg.share.clone() }, 4096, cfg.timeout)?;
        let Response::Attached { root } = r else { return Err(Error::Invalid) };
        if cfg.subdir.is_empty() {
            return Ok(root);
        }
        match net.call(&Request::Stat { share: cfg.share.clone(), path: cfg.subdir.clone() }, 4096, cfg.timeout)? {
            Response::Attr(a) if a.kind == FileKind::Dir => Ok(a),
            Response::Attr(_) => Err(Error::NotDir),
            _ => Err(Error::Invalid),
        }
    }

    /// The server did not answer at mount time: the mount started from a saved snapshot.
    pub fn started_offline(&self) -> bool {
        self.started_offline
    }

    /// Saves the metadata snapshot now and then; while the server does not answer, probes it
    /// (a statfs with a short deadline) and ends offline mode when it answers.
    fn start_background(weak: Weak<Fs>) {
        let _ = std::thread::Builder::new().name("wraith-meta".into()).spawn(move || {
            let (mut saved, mut probed) = (Instant::now(), Instant::now());
            loop {
                std::thread::sleep(Duration::from_millis(500));
                let Some(fs) = weak.upgrade() else { return };
                if saved.elapsed() >= META_SAVE_EVERY {
                    fs.save_meta();
                    saved = Instant::now();
                }
                if fs.offline() && probed.elapsed() >= PROBE_EVERY {
                    probed = Instant::now();
                    if fs.net.call(&Request::StatFs { share: fs.share() }, 1024, PROBE_TIMEOUT).is_ok() {
                        fs.offline.store(false, Ordering::Relaxed);
                        tracing::info!("server answers again");
                    }
                }
            }
        });
    }

    /// Save what the mount knows about names (if it changed) for a later offline mount. Errors
    /// are logged: the snapshot only helps offline, the mount goes on without it.
    pub fn save_meta(&self) {
        let Some(path) = &self.cfg.meta_file else { return };
        let root = self.inodes.lock().unwrap().get(ROOT).map(|n| n.attr);
        let Some(root) = root else { return };
        let _one_at_a_time = self.saving.lock().unwrap();
        let snap = self.known.lock().unwrap().snapshot_if_dirty(root);
        if let Some(snap) = snap {
            if let Err(e) = meta::save(path, &snap) {
                tracing::warn!(file = %path.display(), "cannot save the metadata snapshot: {e}");
                self.known.lock().unwrap().mark_dirty();
            }
        }
    }

    /// The daemon is unmounting: from now on nothing waits for the server past one deadline,
    /// and what waits gives up (`EINTR`).
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// The caller of `ctx` gave up (a fatal signal is pending for it), or the mount is stopping.
    pub(crate) fn gave_up(&self, ctx: Ctx) -> bool {
        self.stopping.load(Ordering::Relaxed) || (ctx.pid != 0 && signal_pending(ctx.pid))
    }

    pub fn config(&self) -> &FsConfig {
        &self.cfg
    }

    pub fn transport(&self) -> &ClientTransport {
        &self.net
    }

    /// One request with the mount's deadline policy: soft mounts fail with EIO at the deadline;
    /// hard mounts retry until the server answers or the caller gets a fatal signal. A server
    /// that is still hashing (BUSY) is asked again; that counts as an answer, not a timeout.
    pub(crate) fn call(&self, ctx: Ctx, req: &Request, expect: u64) -> Result<Response> {
        let start = Instant::now();
        let mut warned = false;
        loop {
            let pending = self.net.submit(req, expect, self.cfg.timeout);
            let r = match pending.wait_interruptible(|| self.gave_up(ctx)) {
                // Asked again for up to an hour (the server hashes a big file), but the caller
                // may give up: a BUSY answer comes at once, so the wait above never sees it.
                Err(Error::Busy) if start.elapsed() < Duration::from_secs(3600) => {
                    if self.gave_up(ctx) {
                        return Err(Error::Interrupted);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(Error::RemoteTimeout) if self.cfg.hard && !self.stopping.load(Ordering::Relaxed) => {
                    if !warned {
                        tracing::warn!("server not responding, still trying (hard mount; Ctrl-C interrupts)");
                        warned = true;
                    }
                    continue;
                }
                r => r,
            };
            if warned && r.is_ok() {
                tracing::info!("server OK again");
            }
            match &r {
                Err(Error::RemoteTimeout) => {
                    if !self.offline.swap(true, Ordering::Relaxed) {
                        tracing::warn!("server not answering; serving what is cached until it does");
                    }
                }
                // The caller gave up (Ctrl-C): says nothing about the server.
                Err(Error::Interrupted) => {}
                _ => self.offline.store(false, Ordering::Relaxed),
            }
            return r;
        }
    }

    /// A request timed out and the server has not answered since: serve what is cached without
    /// asking again (the background probe ends this).
    fn offline(&self) -> bool {
        self.offline.load(Ordering::Relaxed)
    }

    /// The server's answer to `req`, taken by `take`; while the server does not answer, `cached`
    /// (what it said last) if there is one.
    fn ask_or_cached<T>(&self, ctx: Ctx, req: &Request, expect: u64, cached: Option<T>, take: impl FnOnce(Response) -> Result<T>) -> Result<T> {
        match self.call_unless_offline(ctx, req, expect, cached.is_some()) {
            Ok(r) => take(r),
            Err(Error::RemoteTimeout) if cached.is_some() => Ok(cached.unwrap()),
            Err(e) => Err(e),
        }
    }

    /// `req`, or `Err(RemoteTimeout)` at once while offline when the caller has a cached answer.
    fn call_unless_offline(&self, ctx: Ctx, req: &Request, expect: u64, have_cached: bool) -> Result<Response> {
        if have_cached && self.offline() {
            return Err(Error::RemoteTimeout);
        }
        self.call(ctx, req, expect)
    }

    fn learn(&self, path: &[u8], attr: Attr, info: Option<FileInfo>) {
        self.known.lock().unwrap().learn(path, attr, info);
    }

    pub fn disk_cache(&self) -> Option<&Arc<Store>> {
        self.disk.as_ref()
    }

    pub(crate) fn note_source(&self, h: &Handle, src: Source) {
        let mut m = self.sources.lock().unwrap();
        if m.get(&h.ino) != Some(&src) {
            m.insert(h.ino, src);
        }
    }

    fn share(&self) -> String {
        self.cfg.share.clone()
    }

    fn present(&self, mut a: Attr) -> Attr {
        if let Some(u) = self.cfg.uid {
            a.uid = u;
        }
        if let Some(g) = self.cfg.gid {
            a.gid = g;
        }
        a
    }

    fn node_path(&self, ino: u64) -> Result<Vec<u8>> {
        self.inodes.lock().unwrap().path(ino).ok_or(Error::Stale)
    }

    pub fn attr_ttl(&self) -> Duration {
        self.cfg.attr_timeout
    }

    pub fn lookup(&self, ctx: Ctx, parent: u64, name: &[u8]) -> Result<(u64, Attr)> {
        if name.contains(&b'/') || name == b"." || name == b".." {
            return Err(Error::Invalid);
        }
        let path = join(&self.node_path(parent)?, name);
        let cached = self.inodes.lock().unwrap().find(&path);
        let cached = cached.or_else(|| {
            let mut k = self.known.lock().unwrap();
            k.known(&path).map(|k| k.0).or_else(|| k.listed(&path))
        });
        // Server unreachable: what we knew about the name (it stays readable if cached).
        let attr = self.ask_or_cached(ctx, &Request::Stat { share: self.share(), path: path.clone() }, 1024, cached, |r| match r {
            Response::Attr(a) => {
                self.learn(&path, a, None);
                Ok(a)
            }
            _ => Err(Error::Invalid),
        })?;
        Ok((self.remember(path, attr), self.present(attr)))
    }

    /// Count one kernel lookup of `path` (readdirplus entries go through here too).
    pub fn remember(&self, path: Vec<u8>, attr: Attr) -> u64 {
        self.inodes.lock().unwrap().remember(path, attr, Instant::now())
    }

    pub fn remember_child(&self, parent: u64, name: &[u8], attr: Attr) -> Result<u64> {
        let path = join(&self.node_path(parent)?, name);
        Ok(self.remember(path, attr))
    }

    pub fn forget(&self, ino: u64, n: u64) {
        let gone = {
            let mut t = self.inodes.lock().unwrap();
            t.forget(ino, n);
            t.get(ino).is_none()
        };
        // Drop what we remembered about a forgotten file's content.
        if gone {
            self.infos.lock().unwrap().remove(&ino);
            self.sources.lock().unwrap().remove(&ino);
        }
    }

    pub fn getattr(&self, ctx: Ctx, ino: u64) -> Result<Attr> {
        let (path, cached) = {
            let t = self.inodes.lock().unwrap();
            let n = t.get(ino).ok_or(Error::Stale)?;
            let fresh = n.attr_at.elapsed() < self.cfg.attr_timeout;
            (n.path.clone(), fresh.then_some(n.attr))
        };
        if let Some(a) = cached {
            return Ok(self.present(a));
        }
        let attr = match self.call_unless_offline(ctx, &Request::Stat { share: self.share(), path: path.clone() }, 1024, true) {
            Ok(Response::Attr(a)) => {
                self.learn(&path, a, None);
                a
            }
            Ok(_) => return Err(Error::Invalid),
            Err(Error::RemoteTimeout) => {
                let t = self.inodes.lock().unwrap();
                return t.get(ino).map(|n| self.present(n.attr)).ok_or(Error::RemoteTimeout);
            }
            Err(e) => return Err(e),
        };
        self.inodes.lock().unwrap().update_attr(ino, attr, Instant::now());
        Ok(self.present(attr))
    }

    pub fn readlink(&self, ctx: Ctx, ino: u64) -> Result<Vec<u8>> {
        let path = self.node_path(ino)?;
        let cached = self.known.lock().unwrap().link(&path);
        self.ask_or_cached(ctx, &Request::ReadLink { share: self.share(), path: path.clone() }, 4096, cached, |r| match r {
            Response::Link(t) => {
                self.known.lock().unwrap().put_link(&path, &t);
                Ok(t)
            }
            _ => Err(Error::Invalid),
        })
    }

    /// Directory entries after FUSE offset `offset`: (next offset, name, attr). Offsets 1 and 2 are
    /// "." and ".."; entry k of the server's sorted listing has offset k + 3.
    pub fn readdir(&self, ctx: Ctx, ino: u64, offset: u64, max_bytes: u32) -> Result<Vec<DirItem>> {
        let path = self.node_path(ino)?;
        let mut out = Vec::new();
        if offset == 0 {
            out.push((1, b".".to_vec(), None));
        }
        if offset <= 1 {
            out.push((2, b"..".to_vec(), None));
        }
        let cookie = offset.saturating_sub(2);
        let have = self.known.lock().unwrap().has_page(&path, cookie);
        let req = Request::ReadDir { share: self.share(), path: path.clone(), cookie, max_bytes: max_bytes.max(4096) };
        let entries = match self.call_unless_offline(ctx, &req, max_bytes as u64, have) {
            Ok(Response::Dir { entries, next }) => {
                self.known.lock().unwrap().put_page(&path, cookie, entries.clone(), next);
                entries
            }
            Ok(_) => return Err(Error::Invalid),
            // Server unreachable: the page as it was last listed (None if evicted since).
            Err(Error::RemoteTimeout) if have => {
                self.known.lock().unwrap().page(&path, cookie).ok_or(Error::RemoteTimeout)?.0
            }
            Err(e) => return Err(e),
        };
        for (i, e) in entries.into_iter().enumerate() {
            out.push((cookie + i as u64 + 3, e.name, Some(self.present(e.attr))));
        }
        Ok(out)
    }

    pub fn kind_of(&self, ino: u64) -> Option<FileKind> {
        self.inodes.lock().unwrap().get(ino).map(|n| n.attr.kind)
    }

    /// Open a regular file: revalidate with the server (close-to-open), pin the version.
    /// Returns the handle and whether the kernel may keep its page cache for this file.
    ///
    /// While the server does not answer, a file opened before keeps its last known version: if
    /// the disk cache holds all of it, it stays readable.
    pub fn open(&self, ctx: Ctx, ino: u64) -> Result<(u64, bool)> {
        let path = self.node_path(ino)?;
        let cached = self.infos.lock().unwrap().get(&ino).copied();
        let cached = cached.or_else(|| self.known.lock().unwrap().known(&path).and_then(|k| k.1));
        let req = Request::Open { share: self.share(), path: path.clone() };
        let (info, inline) = match self.call_unless_offline(ctx, &req, 70 << 10, cached.is_some()) {
            Ok(Response::Opened { info, inline }) => {
                self.learn(&path, info.attr, Some(info));
                (info, inline)
            }
            Ok(_) => return Err(Error::Invalid),
            Err(Error::RemoteTimeout) if cached.is_some() => {
                self.counters.offline_opens.fetch_add(1, Ordering::Relaxed);
                tracing::info!(file = %String::from_utf8_lossy(&path), "server not answering; opening the last known version");
                (cached.unwrap(), None)
            }
            Err(e) => return Err(e),
        };
        let geom = Geometry::new(info.attr.size, info.chunk_log2).map_err(|_| Error::Invalid)?;
        if let Some(data) = inline {
            let root = blake3::Hash::from_bytes(info.root);
            match VerifiedChunk::verify(&geom, &root, 0, None, data) {
                Ok(c) => {
                    if let Some(d) = &self.disk {
                        d.admit(&info.root, &geom, None, &c);
                    }
                    self.chunks.insert((info.root, info.chunk_log2, 0), c, Source::Network)
                }
                Err(_) => {
                    self.counters.verify_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(file = %String::from_utf8_lossy(&path), "inline data failed verification; will refetch");
                }
            }
        }
        self.inodes.lock().unwrap().update_attr(ino, info.attr, Instant::now());
        let keep = {
            let mut infos = self.infos.lock().unwrap();
            let same = infos.get(&ino).is_some_and(|old| old.root == info.root && old.attr.version() == info.attr.version());
            infos.insert(ino, info);
            same
        };
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        // Passthrough pays for big files; for a one-chunk file the backing-id set-up costs more
        // than serving its bytes from memory (warm `tar` over 10,000 small files: measured).
        let backing = match &self.disk {
            Some(d) if self.cfg.passthrough && geom.n_chunks() > 1 => d.pin_complete(&info.root, &geom),
            _ => None,
        };
        let h = Arc::new(Handle { ino, path, info, geom, seq: Mutex::new(Default::default()), backing: Mutex::new(backing) });
        self.handles.lock().unwrap().insert(fh, h);
        Ok((fh, keep))
    }

    /// The open handle `fh` may be served by passthrough: its backing file, pinned.
    pub fn passthrough_candidate(&self, fh: u64) -> Option<Arc<Handle>> {
        let h = self.handle(fh).ok()?;
        let has = h.backing.lock().unwrap().is_some();
        has.then_some(h)
    }

    /// The adapter served `fh` by passthrough (`true`), or could not (`false`: unpin).
    pub fn passthrough_result(&self, fh: u64, used: bool) {
        let Ok(h) = self.handle(fh) else { return };
        if used {
            self.counters.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            self.note_source(&h, Source::Passthrough);
        } else {
            h.backing.lock().unwrap().take();
        }
    }

    pub fn release(&self, fh: u64) {
        self.handles.lock().unwrap().remove(&fh);
    }

    pub fn handle(&self, fh: u64) -> Result<Arc<Handle>> {
        self.handles.lock().unwrap().get(&fh).cloned().ok_or(Error::Invalid)
    }

    pub fn read(&self, ctx: Ctx, fh: u64, offset: u64, size: u32) -> Result<ReadData> {
        let h = self.handle(fh)?;
        read::read(self, ctx, &h, offset, size)
    }

    pub fn statfs(&self, ctx: Ctx) -> Result<StatFs> {
        let cached = self.known.lock().unwrap().statfs();
        self.ask_or_cached(ctx, &Request::StatFs { share: self.share() }, 1024, cached, |r| match r {
            Response::StatFs(s) => {
                self.known.lock().unwrap().put_statfs(s);
                Ok(s)
            }
            _ => Err(Error::Invalid),
        })
    }

    /// `user.wraith.blake3`: the BLAKE3 root of a regular file, as b3sum prints it (revalidates
    /// with the server); `user.wraith.cached`: the fraction of its chunks on local disk;
    /// `user.wraith.source`: where its last read came from; `user.wraith.stats` on the root.
    pub fn getxattr(&self, ctx: Ctx, ino: u64, name: &[u8]) -> Result<Vec<u8>> {
        if ino == ROOT && name == XATTR_STATS.as_bytes() {
            return Ok(self.stats_text().into_bytes());
        }
        if self.kind_of(ino) != Some(FileKind::File) {
            return Err(Error::NoXattr);
        }
        if name == XATTR_SOURCE.as_bytes() {
            let m = self.sources.lock().unwrap();
            return m.get(&ino).map(|s| s.name().as_bytes().to_vec()).ok_or(Error::NoXattr);
        }
        if name != XATTR_BLAKE3.as_bytes() && name != XATTR_CACHED.as_bytes() {
            return Err(Error::NoXattr);
        }
        let (fh, _) = self.open(ctx, ino)?;
        let h = self.handle(fh)?;
        self.release(fh);
        if name == XATTR_CACHED.as_bytes() {
            let f = self.disk.as_ref().map_or(0.0, |d| d.fraction(&h.info.root, &h.geom));
            return Ok(format!("{f:.4}").into_bytes());
        }
        Ok(blake3::Hash::from_bytes(h.info.root).to_hex().as_bytes().to_vec())
    }

    pub fn listxattr(&self, ino: u64) -> Vec<u8> {
        let names: &[&str] = match self.kind_of(ino) {
            Some(FileKind::File) => &[XATTR_BLAKE3, XATTR_CACHED, XATTR_SOURCE],
            _ if ino == ROOT => &[XATTR_STATS],
            _ => &[],
        };
        let mut v = Vec::new();
        for n in names {
            v.extend_from_slice(n.as_bytes());
            v.push(0);
        }
        v
    }

    /// Counters for a person, one `name value` per line.
    pub fn stats_text(&self) -> String {
        use std::fmt::Write;
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut s = String::new();
        let (mem, net) = (g(&c.chunk_hits), g(&c.chunks_fetched));
        let _ = writeln!(s, "bytes_read {}", g(&c.bytes_read));
        let _ = writeln!(s, "chunks_from_memory {mem}");
        let _ = writeln!(s, "chunks_from_network {net}");
        let _ = writeln!(s, "bytes_from_network {}", g(&c.bytes_fetched));
        let _ = writeln!(s, "network_verify_failures {}", g(&c.verify_failures));
        let _ = writeln!(s, "passthrough_opens {}", g(&c.passthrough_opens));
        let _ = writeln!(s, "offline_opens {}", g(&c.offline_opens));
        let _ = writeln!(s, "memory_cache_bytes {}", self.chunks.bytes());
        let _ = write!(s, "{}", self.net.io_stats_text());
        let disk_hits = match &self.disk {
            Some(d) => {
                let st = d.stats();
                let _ = write!(s, "{}", d.describe());
                let (h, m) = (g(&st.hits), g(&st.misses));
                let _ = writeln!(s, "chunks_from_cache {h}");
                let _ = writeln!(s, "cache_misses {m}");
                let _ = writeln!(s, "bytes_from_cache {}", g(&st.bytes_from_cache));
                let _ = writeln!(s, "cache_span_reads {}", g(&st.span_reads));
                let _ = writeln!(s, "cache_block_reads {}", g(&st.block_reads));
                let _ = writeln!(s, "cache_chunks_written {}", g(&st.chunks_written));
                let _ = writeln!(s, "cache_bytes_written {}", g(&st.bytes_written));
                let _ = writeln!(s, "cache_not_admitted {}", g(&st.not_admitted));
                let _ = writeln!(s, "cache_write_queue_peak_bytes {}", g(&st.write_queue_peak));
                let _ = writeln!(s, "cache_evictions {}", g(&st.evictions));
                let _ = writeln!(s, "cache_verify_failures {}", g(&st.verify_failures));
                let _ = writeln!(s, "cache_write_errors {}", g(&st.write_errors));
                let _ = writeln!(s, "cache_prealloc_groups {}", g(&st.prealloc_groups));
                let io = d.io_stats();
                let _ = writeln!(s, "cache_uring_sqes {}", io.sqes);
                let _ = writeln!(s, "cache_uring_enters {}", io.enters);
                let _ = writeln!(s, "cache_uring_max_batch {}", io.max_batch);
                let _ = writeln!(s, "cache_uring_slots {}", io.slots);
                let _ = writeln!(s, "cache_zero_copy_writes {}", io.zero_copy_writes);
                let _ = writeln!(s, "cache_zero_copy_reads {}", io.zero_copy_reads);
                let _ = writeln!(s, "cache_thread_ring_reads {}", io.here_reads);
                h
            }
            None => {
                let _ = writeln!(s, "cache_dir none");
                0
            }
        };
        let all = mem + disk_hits + net;
        let ratio = if all == 0 { 0.0 } else { (mem + disk_hits) as f64 / all as f64 };
        let _ = writeln!(s, "hit_ratio {ratio:.4}");
        s
    }

    /// access(2): writes are refused (read-only); the rest follows the mode bits.
    pub fn access(&self, ctx: Ctx, ino: u64, mask: i32, uid: u32, gid: u32) -> Result<()> {
        if mask & libc::W_OK != 0 {
            return Err(Error::ReadOnly);
        }
        let a = self.getattr(ctx, ino)?;
        if uid == 0 {
            if mask & libc::X_OK != 0 && a.kind != FileKind::Dir && a.perm & 0o111 == 0 {
                return Err(Error::Denied);
            }
            return Ok(());
        }
        let bits = if a.uid == uid {
            (a.perm >> 6) & 7
        } else if a.gid == gid {
            (a.perm >> 3) & 7
        } else {
            a.perm & 7
        } as i32;
        let want = mask & 7;
        if bits & want == want {
            Ok(())
        } else {
            Err(Error::Denied)
        }
    }
}

/// True if process `pid` has a fatal-by-default signal pending (SIGHUP, SIGINT, SIGQUIT, SIGKILL,
/// SIGTERM): the user pressed Ctrl-C while the process waits on us.
pub fn signal_pending(pid: u32) -> bool {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return false };
    let fatal: u64 = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGKILL, libc::SIGTERM]
        .iter()
        .fold(0, |m, s| m | 1u64 << (*s - 1));
    s.lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .any(|m| m & fatal != 0)
}
