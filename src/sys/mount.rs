//! Mounting a FUSE filesystem ourselves, so that the type shows as `fuse.wraith` and the source
//! as the remote spec (the crate's own direct mount always says `fuse`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

pub struct FuseMount<'a> {
    pub source: &'a str,
    pub target: &'a Path,
    /// e.g. "fuse.wraith"
    pub fstype: &'a str,
    pub read_only: bool,
    pub noexec: bool,
    pub allow_other: bool,
    pub default_permissions: bool,
}

fn cstr(s: &[u8]) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in mount argument"))
}

/// Open /dev/fuse and mount it at `target`. Needs CAP_SYS_ADMIN (EPERM otherwise: the caller
/// then goes through fusermount3). Always nosuid and nodev.
pub fn mount_fuse(m: &FuseMount<'_>) -> io::Result<OwnedFd> {
    let dev = std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse")?;
    let fd: OwnedFd = dev.into();
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!("fd={},rootmode=40000,user_id={uid},group_id={gid}", fd.as_raw_fd());
    if m.default_permissions {
        data.push_str(",default_permissions");
    }
    if m.allow_other {
        data.push_str(",allow_other");
    }
    let mut flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOATIME;
    if m.read_only {
        flags |= libc::MS_RDONLY;
    }
    if m.noexec {
        flags |= libc::MS_NOEXEC;
    }
    let source = cstr(m.source.as_bytes())?;
    let target = cstr(m.target.as_os_str().as_bytes())?;
    let fstype = cstr(m.fstype.as_bytes())?;
    let data = cstr(data.as_bytes())?;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives the call.
    let r = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Unmount `target`; `lazy` detaches it even while busy (umount -l).
pub fn unmount(target: &Path, lazy: bool) -> io::Result<()> {
    let t = cstr(target.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `t` is a valid NUL-terminated path.
    if unsafe { libc::umount2(t.as_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
