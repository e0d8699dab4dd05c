//! What a background mount needs from its environment: syslog for logs once stderr is gone, and
//! systemd's readiness notification. Neither reads `$HOME` nor needs `PATH`.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

/// A log sink that sends each line to the local syslog socket (/dev/log), which journald also
/// serves. Lines are dropped silently when there is no syslog, and when its queue is full: the
/// socket does not block, since some lines are logged under the client's protocol lock, and a
/// stalled journald must not stall the mount.
pub struct Syslog {
    sock: Option<Mutex<UnixDatagram>>,
    ident: String,
}

impl Syslog {
    pub fn new(ident: &str) -> Self {
        Self::at(std::path::Path::new("/dev/log"), ident)
    }

    fn at(path: &std::path::Path, ident: &str) -> Self {
        let sock = UnixDatagram::unbound()
            .ok()
            .filter(|s| s.connect(path).is_ok() && s.set_nonblocking(true).is_ok())
            .map(Mutex::new);
        Syslog { sock, ident: ident.to_string() }
    }
}

pub struct SyslogLine<'a> {
    s: &'a Syslog,
    buf: Vec<u8>,
}

impl Write for SyslogLine<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SyslogLine<'_> {
    fn drop(&mut self) {
        let Some(sock) = &self.s.sock else { return };
        let text = String::from_utf8_lossy(&self.buf);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        // Facility daemon (3), severity from the level word tracing printed.
        let sev = if text.contains("ERROR") {
            3
        } else if text.contains("WARN") {
            4
        } else if text.contains("INFO") {
            6
        } else {
            7
        };
        let msg = format!("<{}>{}[{}]: {}", 3 * 8 + sev, self.s.ident, std::process::id(), text);
        let _ = sock.lock().unwrap().send(msg.as_bytes());
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Syslog {
    type Writer = SyslogLine<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        SyslogLine { s: self, buf: Vec::new() }
    }
}

/// Tell systemd we are ready, when started by it (`Type=notify` / mount units): NOTIFY_SOCKET.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", std::path::Path::new(&path))
    };
    if let Err(e) = r {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::fmt::MakeWriter;

    /// A syslog that reads nothing (its queue full) costs the logger nothing: lines are
    /// dropped, not waited for.
    #[test]
    fn a_full_syslog_queue_drops_lines_instead_of_blocking() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("log");
        let _reader = UnixDatagram::bind(&path).unwrap();
        let log = std::sync::Arc::new(Syslog::at(&path, "test"));
        assert!(log.sock.is_some());
        let (done, wait) = std::sync::mpsc::channel();
        let l = log.clone();
        std::thread::spawn(move || {
            for i in 0..5000 {
                let mut w = l.make_writer();
                let _ = writeln!(w, "INFO line {i}");
            }
            let _ = done.send(());
        });
        assert!(wait.recv_timeout(std::time::Duration::from_secs(10)).is_ok(), "the logger blocked on a full queue");
    }
}
