//! Process set-up: forking into the background before any thread exists.

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
