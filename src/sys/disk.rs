//! Local-disk syscalls the chunk cache needs: `O_DIRECT` alignment (`statx` `STATX_DIOALIGN`),
//! an exclusive `flock`, hole punching, and `getxattr` on a path (for `wraith-mount --stats`).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Alignment that `O_DIRECT` needs for a regular file: the larger of the memory and offset
/// alignment `statx(STATX_DIOALIGN)` reports (Linux 6.1+). `None` when the filesystem reports
/// no direct-I/O support or the kernel does not know the field.
pub fn dio_align(file: &File) -> Option<usize> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    let empty = c"";
    // SAFETY: `empty` is a valid C string, `stx` writable memory for one struct statx, and the fd
    // is open for the duration of the call.
    let ret = unsafe {
        libc::statx(file.as_raw_fd(), empty.as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, stx.as_mut_ptr())
    };
    if ret != 0 {
        return None;
    }
    // SAFETY: statx returned 0 and the struct was zero-initialised, so every field is initialised.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some(stx.stx_dio_mem_align.max(stx.stx_dio_offset_align) as usize)
}

/// `flock(LOCK_EX | LOCK_NB)`: Ok(false) when another open file description holds the lock.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock takes an open fd and flags, no memory.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if ret == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Deallocate `[offset, offset + len)` keeping the file size (`FALLOC_FL_PUNCH_HOLE`).
pub fn punch_hole(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes an open fd and integers, no memory.
    let ret = unsafe {
        libc::fallocate(
            file.as_fd().as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Allocate the blocks of `offset..offset+len` without changing the file's size (their bytes
/// read as zeros until written).
pub fn allocate(file: &impl AsFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: fallocate takes an open fd and integers, no memory.
    let ret = unsafe { libc::fallocate(file.as_fd().as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `getxattr(2)` on a path, following symlinks.
pub fn getxattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let p = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let n = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut buf = vec![0u8; 64 << 10];
    // SAFETY: both strings are NUL-terminated and live; buf is writable for buf.len() bytes.
    let ret = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(ret as usize);
    Ok(buf)
}
