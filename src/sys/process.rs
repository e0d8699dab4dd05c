//! Process set-up: forking into the background before any thread exists, and a check run on a
//! thread with a file table of its own.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

pub enum Forked {
    /// In the parent: the child's pid and the read end of the readiness pipe.
    Parent { child: i32, ready: OwnedFd },
    /// In the child: the write end of the readiness pipe.
    Child { ready: OwnedFd },
}

/// fork(2) with a pipe for the child to report readiness. Must be called while the process has a
/// single thread (before any runtime, logger thread or socket thread starts).
pub fn fork_with_pipe() -> io::Result<Forked> {
    let mut fds = [0i32; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are open and owned by us alone.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: the caller guarantees the process is single-threaded, so the child may keep running
    // arbitrary Rust code after fork.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        0 => {
            drop(r);
            Ok(Forked::Child { ready: w })
        }
        child => {
            drop(w);
            Ok(Forked::Parent { child, ready: r })
        }
    }
}

/// Start a new session (detach from the controlling terminal).
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid has no memory-safety preconditions.
    if unsafe { libc::setsid() } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Point stdin and stdout (and stderr when `stderr` is true) at /dev/null.
pub fn detach_stdio(stderr: bool) -> io::Result<()> {
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null")?;
    use std::os::fd::AsRawFd;
    let targets: &[i32] = if stderr { &[0, 1, 2] } else { &[0, 1] };
    for &t in targets {
        // SAFETY: both descriptors are open; dup2 atomically replaces `t`.
        if unsafe { libc::dup2(null.as_raw_fd(), t) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Wait for a child and return its exit status code (or 128+signal).
pub fn wait_child(pid: i32) -> io::Result<i32> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid int for waitpid to write.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else {
        Ok(128 + libc::WTERMSIG(status))
    }
}

/// stat(2) `path` on a thread with a file table of its own, holding no descriptor but stdio,
/// and say how it went, or None when it did not finish within `timeout`.
///
/// For a FUSE daemon checking that its own mount answers: a thread that stats the mount waits
/// uninterruptibly once the daemon has taken the request, and if it shared the process's file
/// table, a SIGKILL would leave the process unable to finish exiting, its mount dead, for good:
/// /dev/fuse closes (which fails the request) only when the last thread holding it exits. With
/// its own table this thread does not hold /dev/fuse, so once the other threads are gone the
/// request fails and the thread ends too.
pub fn stat_on_own_files(path: &std::path::Path, timeout: std::time::Duration) -> io::Result<Option<io::Result<()>>> {
    let path = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new().name("wraith-mountchk".into()).spawn(move || {
        // SAFETY: unshare(CLONE_FILES) gives this thread a private copy of the file table;
        // close_range then closes descriptors in that copy only, which nothing on this thread
        // uses (stat takes a path). The process's own table is untouched.
        let own = unsafe {
            if libc::unshare(libc::CLONE_FILES) != 0 {
                Err(io::Error::last_os_error())
            } else {
                if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                    for fd in 3..65536 {
                        libc::close(fd);
                    }
                }
                Ok(())
            }
        };
        let _ = tx.send(own.and_then(|()| std::fs::metadata(&path).map(|_| ())));
    })?;
    match rx.recv_timeout(timeout) {
        Ok(r) => Ok(Some(r)),
        Err(_) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stat_on_own_files_says_how_it_went_and_leaves_our_files_open() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(matches!(stat_on_own_files(std::path::Path::new("/"), Duration::from_secs(10)), Ok(Some(Ok(())))));
        match stat_on_own_files(std::path::Path::new("/no/such/wraith/path"), Duration::from_secs(10)) {
            Ok(Some(Err(e))) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT)),
            other => panic!("expected ENOENT, got {other:?}"),
        }
        // The thread closed descriptors in its own copy of the table only.
        use std::io::Read;
        let mut s = String::new();
        (&f).read_to_string(&mut s).unwrap();
        assert!(s.contains("Threads:"));
    }
}
