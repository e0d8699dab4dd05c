//! What a background mount needs from its environment: syslog for logs once stderr is gone, and
//! systemd's readiness notification. Neither reads `$HOME` nor needs `PATH`.

use std::io::{self, Write};
use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;

/// A log sink that sends each line to the local syslog socket (/dev/log), which journald also
/// serves. Lines are dropped silently when there is no syslog.
pub struct Syslog {
    sock: Option<Mutex<UnixDatagram>>,
    ident: String,
}

impl Syslog {
    pub fn new(ident: &str) -> Self {
        let sock = UnixDatagram::unbound().ok().filter(|s| s.connect("/dev/log").is_ok()).map(Mutex::new);
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
