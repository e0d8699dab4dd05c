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

/// `major:minor` of the filesystem mounted last at `target` (an absolute path without symlinks),
/// from `/proc/self/mountinfo`: found without asking the filesystem itself, which for our own
/// FUSE mount would be a request to ourselves.
pub fn dev_of_mount(target: &Path) -> io::Result<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    dev_in_mountinfo(&text, target.as_os_str().as_bytes())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{} is not in /proc/self/mountinfo", target.display())))
}

/// The `major:minor` field of the last line of `mountinfo` whose mount point is `target`.
pub fn dev_in_mountinfo(mountinfo: &str, target: &[u8]) -> Option<String> {
    mountinfo.lines().rev().find_map(|l| {
        let mut f = l.split(' ');
        let (_, _, dev, _, mp) = (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
        (unescape_octal(mp) == target).then(|| dev.to_string())
    })
}

/// Undo mountinfo's escapes: `\040` (space), `\011` (tab), `\012` (newline), `\134` (backslash).
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b.get(i + 1..i + 4).filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match oct {
            Some(d) => {
                out.push(d.iter().fold(0u8, |v, c| v.wrapping_mul(8).wrapping_add(c - b'0')));
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// The kernel's readahead for one mounted filesystem: `/sys/class/bdi/<major:minor>/read_ahead_kb`.
pub struct ReadAhead(std::path::PathBuf);

impl ReadAhead {
    /// That of the filesystem mounted at `target` (absolute, no symlinks).
    pub fn of(target: &Path) -> io::Result<ReadAhead> {
        Ok(ReadAhead(format!("/sys/class/bdi/{}/read_ahead_kb", dev_of_mount(target)?).into()))
    }

    /// Set it to `bytes`, rounded up to KiB. Needs root.
    pub fn set(&self, bytes: u64) -> io::Result<()> {
        std::fs::write(&self.0, format!("{}\n", bytes.div_ceil(1024)))
    }

    /// What it is, in bytes.
    pub fn get(&self) -> io::Result<u64> {
        let kb = std::fs::read_to_string(&self.0)?;
        kb.trim().parse::<u64>().map(|k| k * 1024).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_in_mountinfo_with_their_escapes() {
        let text = "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n\
                    97 22 0:52 / /mnt/my\\040share rw,nosuid shared:50 - fuse.wraith h:/s rw,user_id=0\n\
                    98 22 0:53 / /mnt/x rw shared:51 - fuse.wraith h:/a rw\n\
                    99 98 0:54 / /mnt/x rw shared:52 - fuse.wraith h:/b rw\n\
                    100 22 0:55 / /mnt/back\\134slash rw - tmpfs t rw\n";
        assert_eq!(dev_in_mountinfo(text, b"/mnt/my share").as_deref(), Some("0:52"));
        assert_eq!(dev_in_mountinfo(text, b"/mnt/x").as_deref(), Some("0:54"), "the last mount on a path is the visible one");
        assert_eq!(dev_in_mountinfo(text, b"/mnt/back\\slash").as_deref(), Some("0:55"));
        assert_eq!(dev_in_mountinfo(text, b"/").as_deref(), Some("252:1"));
        assert_eq!(dev_in_mountinfo(text, b"/mnt"), None);
        assert_eq!(dev_in_mountinfo("garbage\n\n1 2", b"/"), None);
    }

    #[test]
    fn the_root_filesystem_has_a_device() {
        let dev = dev_of_mount(Path::new("/")).unwrap();
        assert!(dev.split_once(':').is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok()), "{dev}");
    }
}
