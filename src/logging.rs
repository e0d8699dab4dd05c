//! Logging set-up shared by the binaries: `tracing` to stderr, `-v` for more, `RUST_LOG` wins.
//! A daemonized mount switches to syslog (journald) once its stderr is detached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tracing_subscriber::EnvFilter;

use crate::daemon::Syslog;

static TO_SYSLOG: AtomicBool = AtomicBool::new(false);
static SYSLOG: OnceLock<Syslog> = OnceLock::new();

struct Switch;

pub enum Sink<'a> {
    Stderr(std::io::Stderr),
    Syslog(crate::daemon::SyslogLine<'a>),
}

impl std::io::Write for Sink<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            Sink::Stderr(s) => s.write(b),
            Sink::Syslog(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stderr(s) => s.flush(),
            Sink::Syslog(s) => s.flush(),
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Switch {
    type Writer = Sink<'a>;
    fn make_writer(&'a self) -> Self::Writer {
        if TO_SYSLOG.load(Ordering::Relaxed) {
            if let Some(s) = SYSLOG.get() {
                return Sink::Syslog(s.make_writer());
            }
        }
        Sink::Stderr(std::io::stderr())
    }
}

pub fn init(verbose: u8, quiet_default: bool) {
    let default = match (verbose, quiet_default) {
        (0, true) => "warn",
        (0, false) => "info",
        (1, _) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(format!("wraith={default},warn")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Switch)
        .with_target(false)
        .with_ansi(false)
        .try_init();
}

/// From now on, log lines go to syslog as `ident` (stderr is about to be closed).
pub fn switch_to_syslog(ident: &str) {
    let _ = SYSLOG.set(Syslog::new(ident));
    TO_SYSLOG.store(true, Ordering::Relaxed);
}
