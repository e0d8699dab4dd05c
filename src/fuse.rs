//! The FUSE adapter: each handler opens a span, makes one call into the filesystem core and
//! replies, or goes through the one error path ([`err`]). No protocol or cache logic here.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{
    AccessFlags, BackingId, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyXattr, Request,
};

use crate::error::Error;
use crate::fs::{Ctx, Fs};
use crate::types::{Attr, FileKind};

const NEGATIVE: Attr = Attr {
    kind: FileKind::File,
    perm: 0,
    nlink: 0,
    uid: 0,
    gid: 0,
    size: 0,
    blocks: 0,
    rdev: 0,
    atime_ns: 0,
    mtime_ns: 0,
    ctime_ns: 0,
    dev: 0,
    ino: 0,
};

pub struct WraithFuse {
    fs: Arc<Fs>,
    /// The kernel granted FUSE_PASSTHROUGH and registering a backing file has not failed.
    passthrough: AtomicBool,
    io: Mutex<IoModes>,
}

/// How the open files of each inode are served. The kernel wants one backing file per inode for
/// all its passthrough opens, and refuses (EIO) to mix passthrough with page-cached opens of the
/// same inode; while an inode has passthrough opens, other opens use direct I/O.
#[derive(Default)]
struct IoModes {
    inodes: HashMap<u64, InodeIo>,
    /// fh -> (inode, mode)
    handles: HashMap<u64, (u64, OpenMode)>,
}

#[derive(Default)]
struct InodeIo {
    cached: usize,
    /// (backing id, file root it serves, passthrough opens)
    backing: Option<(Arc<BackingId>, [u8; 32], usize)>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OpenMode {
    Cached,
    Direct,
    Passthrough,
}

impl WraithFuse {
    pub fn new(fs: Arc<Fs>) -> Self {
        WraithFuse { fs, passthrough: AtomicBool::new(false), io: Mutex::new(IoModes::default()) }
    }

    /// Reply to an open of `ino` as `fh`: passthrough when the core offers a backing file and
    /// the inode's other opens allow it, else through wraith.
    fn reply_open(&self, ino: u64, fh: u64, keep: bool, reply: ReplyOpen) {
        let mut io = self.io.lock().unwrap();
        let io = &mut *io;
        let st = io.inodes.entry(ino).or_default();
        let cand = self.fs.passthrough_candidate(fh);
        let usable = self.passthrough.load(Ordering::Relaxed) && st.cached == 0;
        if let Some(h) = cand.as_ref().filter(|_| usable) {
            if st.backing.as_ref().is_some_and(|b| b.1 != h.info.root) {
                // Another version of this inode is open by passthrough: serve this one directly.
                self.fs.passthrough_result(fh, false);
            } else {
                if st.backing.is_none() {
                    match h.backing_fd().map(|fd| reply.open_backing(fd)) {
                        Some(Ok(id)) => st.backing = Some((Arc::new(id), h.info.root, 0)),
                        Some(Err(e)) => {
                            tracing::warn!("FUSE passthrough unavailable ({e}); reads of cached files go through wraith");
                            self.passthrough.store(false, Ordering::Relaxed);
                        }
                        None => {}
                    }
                }
                if let Some(b) = st.backing.as_mut() {
                    b.2 += 1;
                    let id = b.0.clone();
                    io.handles.insert(fh, (ino, OpenMode::Passthrough));
                    self.fs.passthrough_result(fh, true);
                    return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
                }
                self.fs.passthrough_result(fh, false);
            }
        } else if cand.is_some() {
            self.fs.passthrough_result(fh, false);
        }
        let (mode, flags) = if st.backing.is_some() {
            (OpenMode::Direct, FopenFlags::FOPEN_DIRECT_IO)
        } else {
            st.cached += 1;
            (OpenMode::Cached, if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() })
        };
        io.handles.insert(fh, (ino, mode));
        reply.opened(FileHandle(fh), flags)
    }

    fn released(&self, fh: u64) {
        let mut io = self.io.lock().unwrap();
        let Some((ino, mode)) = io.handles.remove(&fh) else { return };
        let Some(st) = io.inodes.get_mut(&ino) else { return };
        match mode {
            OpenMode::Cached => st.cached = st.cached.saturating_sub(1),
            OpenMode::Passthrough => {
                if let Some(b) = st.backing.as_mut() {
                    b.2 -= 1;
                    if b.2 == 0 {
                        st.backing = None; // closes the backing id
                    }
                }
            }
            OpenMode::Direct => {}
        }
        if st.cached == 0 && st.backing.is_none() {
            io.inodes.remove(&ino);
        }
    }
}

fn err(e: Error) -> Errno {
    Errno::from_i32(e.errno())
}

fn ctx(req: &Request) -> Ctx {
    Ctx { pid: req.pid() }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Socket => FileType::Socket,
    }
}

fn time(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn fattr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: kind(a.kind),
        // Read-only: never advertise write permission.
        perm: a.perm & !0o222,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for WraithFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO);
        if self.fs.config().passthrough && self.fs.disk_cache().is_some() {
            let ok = config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH).is_ok() && config.set_max_stack_depth(1).is_ok();
            if !ok {
                tracing::info!("kernel offers no FUSE passthrough (needs Linux 6.9+); cached files are read through wraith");
            }
            self.passthrough.store(ok, Ordering::Relaxed);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let _s = tracing::debug_span!("lookup", parent = parent.0, name = ?name).entered();
        match self.fs.lookup(ctx(req), parent.0, name.as_bytes()) {
            Ok((ino, a)) => reply.entry(&self.fs.attr_ttl(), &fattr(ino, &a), Generation(0)),
            // A negative entry (inode 0): the kernel remembers "no such name" for attr_timeout,
            // so repeated probes (PATH, python imports) do not each cost a round trip.
            Err(Error::NotFound) => {
                let mut a = fattr(0, &NEGATIVE);
                a.ino = INodeNo(0);
                reply.entry(&self.fs.attr_ttl(), &a, Generation(0))
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _s = tracing::debug_span!("getattr", ino = ino.0).entered();
        match self.fs.getattr(ctx(req), ino.0) {
            Ok(a) => reply.attr(&self.fs.attr_ttl(), &fattr(ino.0, &a)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _s = tracing::debug_span!("readlink", ino = ino.0).entered();
        match self.fs.readlink(ctx(req), ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(err(e)),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _s = tracing::debug_span!("open", ino = ino.0).entered();
        if flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(err(Error::ReadOnly));
        }
        match self.fs.open(ctx(req), ino.0) {
            Ok((fh, keep)) => self.reply_open(ino.0, fh, keep, reply),
            Err(e) => reply.error(err(e)),
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _s = tracing::debug_span!("read", fh = fh.0, offset, size).entered();
        match self.fs.read(ctx(req), fh.0, offset, size) {
            Ok(d) => reply.data(d.bytes()),
            Err(e) => reply.error(err(e)),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok(); // nothing is ever dirty: read-only
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.released(fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.kind_of(ino.0) {
            Some(FileKind::Dir) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(err(Error::NotDir)),
            None => reply.error(err(Error::Stale)),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let _s = tracing::debug_span!("readdir", ino = ino.0, offset).entered();
        match self.fs.readdir(ctx(req), ino.0, offset, 64 << 10) {
            Ok(entries) => {
                for (off, name, attr) in entries {
                    let (eino, k) = match &attr {
                        Some(a) => (a.ino.max(1), kind(a.kind)),
                        None => (ino.0, FileType::Directory),
                    };
                    if reply.add(INodeNo(eino), off, k, OsStr::from_bytes(&name)) {
                        break;
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(err(e)),
        }
    }

    fn readdirplus(&self, req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let _s = tracing::debug_span!("readdirplus", ino = ino.0, offset).entered();
        let entries = match self.fs.readdir(ctx(req), ino.0, offset, 64 << 10) {
            Ok(e) => e,
            Err(e) => return reply.error(err(e)),
        };
        let ttl = self.fs.attr_ttl();
        for (off, name, attr) in entries {
            let full = match attr {
                Some(a) => {
                    let Ok(eino) = self.fs.remember_child(ino.0, &name, a) else { continue };
                    let full = reply.add(INodeNo(eino), off, OsStr::from_bytes(&name), &ttl, &fattr(eino, &a), Generation(0));
                    if full {
                        self.fs.forget(eino, 1); // not handed to the kernel after all
                    }
                    full
                }
                None => {
                    // "." and "..": the kernel takes no lookup count for these names whatever the
                    // node id, and shows the inode number to readdir(3) — which skips entries
                    // numbered 0, so they carry this directory's number (as plain readdir does).
                    let Ok(a) = self.fs.getattr(ctx(req), ino.0) else { continue };
                    let fa = fattr(ino.0, &a);
                    reply.add(ino, off, OsStr::from_bytes(&name), &Duration::ZERO, &fa, Generation(0))
                }
            };
            if full {
                break;
            }
        }
        reply.ok()
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.fs.statfs(ctx(req)) {
            Ok(s) => reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize),
            Err(e) => reply.error(err(e)),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _s = tracing::debug_span!("getxattr", ino = ino.0, name = ?name).entered();
        match self.fs.getxattr(ctx(req), ino.0, name.as_bytes()) {
            Ok(v) if size == 0 => reply.size(v.len() as u32),
            Ok(v) if v.len() <= size as usize => reply.data(&v),
            Ok(_) => reply.error(err(Error::Range)),
            Err(e) => reply.error(err(e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let v = self.fs.listxattr(ino.0);
        if size == 0 {
            reply.size(v.len() as u32)
        } else if v.len() <= size as usize {
            reply.data(&v)
        } else {
            reply.error(err(Error::Range))
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.fs.access(ctx(req), ino.0, mask.bits(), req.uid(), req.gid()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(err(e)),
        }
    }
}
