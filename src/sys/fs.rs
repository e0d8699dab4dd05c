//! Filesystem syscalls the server's path resolution needs (Linux only): `openat2`, `fstat`,
//! `fstatat(AT_SYMLINK_NOFOLLOW)`, `readlinkat` on an `O_PATH` fd, `fstatvfs` and `getdents64`.
//! Each returns owned values; reading file data is std's `FileExt::read_at`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// The kernel's `struct open_how` (linux/openat2.h, version 0, 24 bytes). Declared here because
/// libc's copy is `#[non_exhaustive]` and so cannot be built without zeroing it unsafely.
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// How many times a resolution the kernel could not prove safe (EAGAIN, a concurrent rename
/// under `RESOLVE_BENEATH`) is retried before the error goes to the caller.
const EAGAIN_RETRIES: u32 = 8;

/// `openat2(2)` relative to `dir`. `O_CLOEXEC` is always added. Returns `ENOSYS` on kernels
/// older than 5.6. Retries on `EINTR`, and a few times on `EAGAIN`.
pub fn openat2(dir: BorrowedFd<'_>, path: &CStr, flags: i32, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: u64::from((flags | libc::O_CLOEXEC) as u32),
        mode: 0,
        resolve,
    };
    let mut eagain = 0;
    loop {
        // SAFETY: `path` is a valid NUL-terminated string and `how` a live, correctly laid out
        // `open_how` whose size we pass; both outlive the call. `dir` is an open fd we borrow.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if ret >= 0 {
            // SAFETY: on success the kernel returned a new fd that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) if eagain < EAGAIN_RETRIES => eagain += 1,
            _ => return Err(err),
        }
    }
}

/// The fields of a `struct stat` the server uses, in plain integer types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    /// File type and permission bits (`st_mode`).
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub rdev: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub dev: u64,
    pub ino: u64,
}

fn ns(sec: i64, nsec: i64) -> i64 {
    sec.saturating_mul(1_000_000_000).saturating_add(nsec)
}

impl Stat {
    // Field types differ between architectures, hence the casts.
    #[allow(clippy::unnecessary_cast)]
    fn from_raw(st: &libc::stat) -> Self {
        Stat {
            mode: st.st_mode as u32,
            nlink: st.st_nlink as u64,
            uid: st.st_uid as u32,
            gid: st.st_gid as u32,
            size: (st.st_size as i64).max(0) as u64,
            blocks: (st.st_blocks as i64).max(0) as u64,
            rdev: st.st_rdev as u64,
            atime_ns: ns(st.st_atime as i64, st.st_atime_nsec as i64),
            mtime_ns: ns(st.st_mtime as i64, st.st_mtime_nsec as i64),
            ctime_ns: ns(st.st_ctime as i64, st.st_ctime_nsec as i64),
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
        }
    }
}

/// `fstat(2)`; works on `O_PATH` fds, so a symlink opened with `O_PATH|O_NOFOLLOW` reports itself.
pub fn fstat(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `st` is writable memory of the right size for one `struct stat`; `fd` is open.
    let ret = unsafe { libc::fstat(fd.as_raw_fd(), st.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstat returned 0, so it filled the whole struct.
    Ok(Stat::from_raw(unsafe { st.assume_init_ref() }))
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`. `name` should be a single component: the kernel
/// would follow symlinks in intermediate components, so callers must not pass a '/'.
pub fn fstatat_nofollow(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Stat> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is NUL-terminated, `st` is writable memory for one `struct stat`, `dir` is open.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatat returned 0, so it filled the whole struct.
    Ok(Stat::from_raw(unsafe { st.assume_init_ref() }))
}

/// Longest symlink target we accept (Linux limits targets to PATH_MAX - 1 anyway).
const MAX_LINK: usize = 1 << 16;

/// `readlinkat(fd, "")`: the target of the symlink an `O_PATH|O_NOFOLLOW` fd refers to.
/// Fails with `ENOENT` (or `EINVAL`) when `fd` is not a symlink.
pub fn readlinkat_empty(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: `buf` is writable for `buf.len()` bytes; the path is the empty C string; `fd` is open.
        let n = unsafe {
            libc::readlinkat(
                fd.as_raw_fd(),
                c"".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        if n < buf.len() {
            buf.truncate(n);
            return Ok(buf);
        }
        // The target may have been truncated: retry with a larger buffer.
        if buf.len() >= MAX_LINK {
            return Err(io::Error::from_raw_os_error(libc::ENAMETOOLONG));
        }
        buf.resize(buf.len() * 4, 0);
    }
}

/// The fields of a `struct statvfs` the server reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FsStat {
    pub bsize: u64,
    pub frsize: u64,
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub namemax: u64,
}

/// `fstatvfs(3)`; works on `O_PATH` fds.
#[allow(clippy::unnecessary_cast)]
pub fn fstatvfs(fd: BorrowedFd<'_>) -> io::Result<FsStat> {
    let mut sv = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `sv` is writable memory for one `struct statvfs`; `fd` is open.
    let ret = unsafe { libc::fstatvfs(fd.as_raw_fd(), sv.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fstatvfs returned 0, so it filled the whole struct.
    let sv = unsafe { sv.assume_init_ref() };
    Ok(FsStat {
        bsize: sv.f_bsize as u64,
        frsize: sv.f_frsize as u64,
        blocks: sv.f_blocks as u64,
        bfree: sv.f_bfree as u64,
        bavail: sv.f_bavail as u64,
        files: sv.f_files as u64,
        ffree: sv.f_ffree as u64,
        namemax: sv.f_namemax as u64,
    })
}

/// Sets or clears `O_NONBLOCK` on an open file description.
pub fn set_nonblocking(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the fd's status flags.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new != flags {
        // SAFETY: F_SETFL takes an int of status flags; we pass the current ones with one bit changed.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, new) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One raw directory entry as `getdents64` reports it ("." and ".." included).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawDirEntry {
    pub name: Vec<u8>,
    /// `DT_*` value; `DT_UNKNOWN` on filesystems that do not fill it in.
    pub d_type: u8,
    pub ino: u64,
}

/// Size of the buffer `getdents64` fills per call.
const DIRENT_BUF: usize = 32 * 1024;
/// Offset of `d_name` in `struct linux_dirent64` (u64 ino, i64 off, u16 reclen, u8 type).
const DIRENT_NAME_OFF: usize = 19;

/// Iterates over the entries of a directory opened with `O_RDONLY|O_DIRECTORY`, from the fd's
/// current position, with `getdents64(2)`. Records are decoded from bytes, so no alignment
/// assumptions are made about the buffer.
pub struct DirReader {
    fd: OwnedFd,
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    done: bool,
}

impl DirReader {
    pub fn new(fd: OwnedFd) -> Self {
        DirReader {
            fd,
            buf: vec![0u8; DIRENT_BUF],
            pos: 0,
            end: 0,
            done: false,
        }
    }

    /// The directory fd, e.g. for [`fstatat_nofollow`] on the names read.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn fill(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: `buf` is writable for `buf.len()` bytes and the fd is an open directory we own.
            let n = unsafe {
                libc::syscall(
                    libc::SYS_getdents64,
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr(),
                    self.buf.len(),
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                return Err(err);
            }
            self.pos = 0;
            self.end = n as usize;
            self.done = n == 0;
            return Ok(());
        }
    }

    fn decode(&mut self) -> io::Result<RawDirEntry> {
        let rec = &self.buf[self.pos..self.end];
        let corrupt = || io::Error::new(io::ErrorKind::InvalidData, "malformed getdents64 record");
        if rec.len() < DIRENT_NAME_OFF {
            return Err(corrupt());
        }
        let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
        let reclen = usize::from(u16::from_ne_bytes(rec[16..18].try_into().expect("2 bytes")));
        if reclen < DIRENT_NAME_OFF || reclen > rec.len() {
            return Err(corrupt());
        }
        let d_type = rec[18];
        let name_field = &rec[DIRENT_NAME_OFF..reclen];
        let len = name_field
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(corrupt)?;
        self.pos += reclen;
        Ok(RawDirEntry {
            name: name_field[..len].to_vec(),
            d_type,
            ino,
        })
    }
}

impl Iterator for DirReader {
    type Item = io::Result<RawDirEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.end {
            if self.done {
                return None;
            }
            if let Err(e) = self.fill() {
                self.done = true;
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
        }
        let r = self.decode();
        if r.is_err() {
            // Stop after a malformed record rather than looping on it.
            self.done = true;
            self.end = 0;
        }
        Some(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;
    use std::fs::File;
    use std::os::unix::fs::symlink;

    const BENEATH: u64 =
        libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

    fn open_dir(p: &std::path::Path) -> File {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(p)
            .unwrap()
    }

    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    #[test]
    fn openat2_confines_and_refuses_symlinks() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("d")).unwrap();
        std::fs::write(t.path().join("d/f"), b"x").unwrap();
        symlink("d", t.path().join("ld")).unwrap();
        symlink("/etc/passwd", t.path().join("abs")).unwrap();
        let root = open_dir(t.path());
        let path_flags = libc::O_PATH | libc::O_NOFOLLOW;

        let f = openat2(
            root.as_fd(),
            &c("d/f"),
            libc::O_RDONLY | libc::O_NOFOLLOW,
            BENEATH,
        )
        .unwrap();
        assert_eq!(fstat(f.as_fd()).unwrap().size, 1);

        let e = openat2(root.as_fd(), &c("../x"), path_flags, BENEATH).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        let e = openat2(root.as_fd(), &c("/etc"), path_flags, BENEATH).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EXDEV));
        let e = openat2(root.as_fd(), &c("ld/f"), path_flags, BENEATH).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));
        let e = openat2(root.as_fd(), &c("abs"), libc::O_RDONLY, BENEATH).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ELOOP));

        // A trailing symlink with O_PATH|O_NOFOLLOW is the link itself.
        let l = openat2(root.as_fd(), &c("abs"), path_flags, BENEATH).unwrap();
        assert_eq!(fstat(l.as_fd()).unwrap().mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!(readlinkat_empty(l.as_fd()).unwrap(), b"/etc/passwd");
        let st = fstatat_nofollow(root.as_fd(), &c("ld")).unwrap();
        assert_eq!(st.mode & libc::S_IFMT, libc::S_IFLNK);
    }

    #[test]
    fn readlink_long_target() {
        let t = tempfile::tempdir().unwrap();
        let target = "a/".repeat(1500) + "end";
        symlink(&target, t.path().join("l")).unwrap();
        let root = open_dir(t.path());
        let l = openat2(
            root.as_fd(),
            &c("l"),
            libc::O_PATH | libc::O_NOFOLLOW,
            BENEATH,
        )
        .unwrap();
        assert_eq!(readlinkat_empty(l.as_fd()).unwrap(), target.as_bytes());
        // Not a symlink: an error, not an empty target.
        let d = openat2(root.as_fd(), &c("."), libc::O_PATH, BENEATH).unwrap();
        assert!(readlinkat_empty(d.as_fd()).is_err());
    }

    #[test]
    fn dir_reader_lists_everything() {
        let t = tempfile::tempdir().unwrap();
        let mut want: Vec<Vec<u8>> = vec![b".".to_vec(), b"..".to_vec()];
        for i in 0..600 {
            // Long names so the listing spans several getdents64 calls.
            let name = format!("{i:04}-{}", "n".repeat(200));
            std::fs::write(t.path().join(&name), b"").unwrap();
            want.push(name.into_bytes());
        }
        std::fs::create_dir(t.path().join("sub")).unwrap();
        want.push(b"sub".to_vec());
        let root = open_dir(t.path());
        let fd = openat2(
            root.as_fd(),
            &c("."),
            libc::O_RDONLY | libc::O_DIRECTORY,
            BENEATH,
        )
        .unwrap();
        let mut got = Vec::new();
        for e in DirReader::new(fd) {
            let e = e.unwrap();
            if e.name == b"sub" {
                assert!(e.d_type == libc::DT_DIR || e.d_type == libc::DT_UNKNOWN);
            }
            got.push(e.name);
        }
        got.sort();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn statvfs_and_nonblocking() {
        let t = tempfile::tempdir().unwrap();
        let root = open_dir(t.path());
        let p = openat2(root.as_fd(), &c("."), libc::O_PATH, BENEATH).unwrap();
        let sv = fstatvfs(p.as_fd()).unwrap();
        assert!(sv.bsize > 0 && sv.namemax > 0);
        std::fs::write(t.path().join("f"), b"x").unwrap();
        let f = openat2(
            root.as_fd(),
            &c("f"),
            libc::O_RDONLY | libc::O_NONBLOCK,
            BENEATH,
        )
        .unwrap();
        set_nonblocking(f.as_fd(), false).unwrap();
        // SAFETY: F_GETFL only reads the status flags of an fd we own.
        let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
    }
}

/// cachestat(2) (Linux 6.5): the same number on every architecture, from the unified table.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// How many pages of `[off, off+len)` are in the page cache, without touching them or starting
/// any I/O (cachestat). ENOSYS on kernels before 6.5.
pub fn cached_pages(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<u64> {
    let range = CachestatRange { off, len };
    let mut st = Cachestat::default();
    // SAFETY: `range` and `st` are live, correctly laid out (repr(C), as in the kernel's uapi) and
    // `st` is valid for writes; flags must be 0.
    let r = unsafe {
        libc::syscall(SYS_CACHESTAT, fd.as_raw_fd(), &range as *const CachestatRange, &mut st as *mut Cachestat, 0)
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.nr_cache)
}
