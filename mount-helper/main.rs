//! `mount.wraith`: the helper that mount(8) runs for filesystems of type `wraith`.
//!
//! mount(8) calls it as `mount.wraith SPEC DIR [-sfnv] [-o OPTS]`. It parses OPTS the way
//! mount(8) writes them, drops what belongs to mount(8) and systemd, refuses what wraith cannot
//! honour, and then replaces itself with `wraith-mount SPEC DIR -o REBUILT [-v]`, so the exit
//! status mount(8) sees is wraith-mount's own (0 only once the mount serves).
//!
//! It never reads `PATH` or `$HOME` (systemd provides neither): wraith-mount is looked for next
//! to this executable, then in a fixed list of system directories.
//!
//! Self-contained on purpose: the main crate builds it as a `[[bin]]`, but it uses std only.
#![forbid(unsafe_code)]

use std::ffi::OsString;
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

/// mount(8)'s convention: 1 is "incorrect invocation or permissions".
const EXIT_USAGE: u8 = 1;
/// mount(8)'s convention: 2 is "system error" (here: wraith-mount missing or not executable).
const EXIT_SYSTEM: u8 = 2;

/// Where wraith-mount is looked for after the directory of this executable, in this order.
const SYSTEM_DIRS: [&str; 4] = ["/usr/local/bin", "/usr/bin", "/sbin", "/usr/sbin"];

const HELP: &str = "\
mount.wraith - mount(8) helper for wraith network filesystems

Usage:
  mount.wraith HOST[:PORT]:/SHARE[/SUBDIR] DIR [-sfnv] [-o OPTIONS]
  mount -t wraith HOST:/SHARE DIR -o keyfile=FILE
  /etc/fstab:  HOST:/SHARE  DIR  wraith  _netdev,keyfile=FILE,nofail  0 0

Flags (as mount(8) passes them):
  -o OPTIONS  comma-separated options, see below (may be given more than once)
  -s          sloppy: ignore unknown options instead of failing
  -f          fake: check the options, then do nothing and exit 0
  -n          do not write /etc/mtab (accepted; nothing to do)
  -v          verbose: show what runs, and pass -v to wraith-mount
  -t TYPE     accepted when TYPE is wraith or fuse.wraith
  -h, --help  this text;  -V, --version  the version

wraith options (passed on to wraith-mount):
  keyfile=FILE          pre-shared key (default /etc/wraith/wraith.key)
  port=N                server UDP port (default 7447, or the one in SPEC)
  attr_timeout=SECS     attribute and entry cache time (default 1)
  timeout=SECS          per-request deadline, then EIO (default 30)
  hard | soft           hard: retry past the deadline, interruptible (default soft)
  mem_cache=SIZE        in-memory chunk cache, e.g. 512M, 2G (default 256M)
  readahead=SIZE        the kernel's readahead for the mount (default 1M; 0 off)
  allow_other           let other users access the mount (implies default_permissions)
  default_permissions   let the kernel check permission bits
  uid=N, gid=N          show every file as owned by user/group N
  ro                    read-only (always the case)
  threads=N             FUSE worker threads (default 4)
  noexec                do not allow programs to be run from the mount
  transport=T           udp (default), xdp (AF_XDP, or fail) or auto (AF_XDP, else UDP)
  iface=IFACE           interface for AF_XDP (default: the route's to the server)
  xdp_mode=M            auto (default), native or generic XDP
  cache_dir=DIR         disk cache directory (default /var/cache/wraith/<id> for
                        root, $XDG_CACHE_HOME/wraith/<id> otherwise)
  cache_size=SIZE       disk cache size (default min(10G, 10% of free space); 0 off)
  cache_io=uring|pread  disk cache I/O (default uring)
  passthrough | nopassthrough  kernel reads fully cached files itself (default on)
  fsname=NAME           source shown in /proc/mounts (default: SPEC)

Accepted and dropped (they belong to mount(8) or systemd):
  _netdev nofail auto noauto user users nouser owner group defaults rw
  nosuid nodev exec atime noatime relatime strictatime lazytime
  diratime nodiratime sync async dirsync silent loud x-* comment=*
  rw is what mount(8) adds by default; the mount is read-only all the same.

Refused: suid and dev (a wraith mount is always nosuid,nodev), remount.

Escapes in OPTIONS: \\, is a comma, \\\\ a backslash, \\NNN an octal byte
(\\040 is a space), and a double-quoted part may hold commas: fsname=\"a,b\".
In /etc/fstab prefer double quotes: mount(8) itself splits on every comma.

Exit status: 0 mounted (or -f); 1 bad invocation or option; 2 wraith-mount
not found; otherwise wraith-mount's own status (non-zero with one line on
stderr when the mount failed). See wraith-mount(8) and docs/OPERATIONS.md.
";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let inv = match parse_args(&args) {
        Ok(Parsed::Help) => {
            print!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Version) => {
            println!("mount.wraith {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Ok(Parsed::Mount(inv)) => inv,
        Err(e) => {
            eprintln!("mount.wraith: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };

    let plan = match parse_options(&inv.options).and_then(|opts| plan(opts, inv.sloppy)) {
        Ok(plan) => plan,
        Err(e) => {
            eprintln!("mount.wraith: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    for warning in &plan.warnings {
        eprintln!("mount.wraith: warning: {warning}");
    }
    if inv.verbose {
        for note in &plan.dropped {
            eprintln!("mount.wraith: dropped {note}");
        }
    }

    let rebuilt = join_options(&plan.forward);
    let mut tail: Vec<OsString> = Vec::new();
    if !rebuilt.is_empty() {
        tail.push("-o".into());
        tail.push(OsString::from_vec(rebuilt));
    }
    if inv.verbose {
        tail.push("-v".into());
    }

    let program = match find_wraith_mount() {
        Ok(p) => p,
        Err(e) if inv.fake => {
            if inv.verbose {
                eprintln!("mount.wraith: -f: options are valid; {e}");
            }
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("mount.wraith: {e}");
            return ExitCode::from(EXIT_SYSTEM);
        }
    };
    let mut cmd = Command::new(&program);
    cmd.arg(&inv.spec).arg(&inv.dir).args(&tail);
    if inv.verbose {
        let shown: Vec<String> = std::iter::once(program.as_os_str())
            .chain([inv.spec.as_os_str(), inv.dir.as_os_str()])
            .chain(tail.iter().map(OsString::as_os_str))
            .map(|s| shell_quote(&s.to_string_lossy()))
            .collect();
        let verb = if inv.fake { "would run" } else { "running" };
        eprintln!("mount.wraith: {verb} {}", shown.join(" "));
    }
    if inv.fake {
        return ExitCode::SUCCESS;
    }
    let err = cmd.exec();
    eprintln!("mount.wraith: cannot run {}: {err}", program.display());
    ExitCode::from(EXIT_SYSTEM)
}

// ---------------------------------------------------------------------------------------------
// Command line

#[derive(Debug, PartialEq)]
enum Parsed {
    Help,
    Version,
    Mount(Invocation),
}

#[derive(Debug, Default, PartialEq)]
struct Invocation {
    spec: OsString,
    dir: OsString,
    /// Every `-o` argument, joined with commas, still escaped.
    options: Vec<u8>,
    sloppy: bool,
    fake: bool,
    verbose: bool,
}

fn parse_args(args: &[OsString]) -> Result<Parsed, String> {
    let mut inv = Invocation::default();
    let mut positional: Vec<OsString> = Vec::new();
    let mut it = args.iter();
    let mut only_positional = false;
    while let Some(arg) = it.next() {
        let bytes = arg.as_bytes();
        if only_positional || bytes.len() < 2 || bytes[0] != b'-' {
            positional.push(arg.clone());
            continue;
        }
        match bytes {
            b"--" => {
                only_positional = true;
                continue;
            }
            b"--help" => return Ok(Parsed::Help),
            b"--version" => return Ok(Parsed::Version),
            _ if bytes.starts_with(b"--") => {
                return Err(format!(
                    "unknown flag '{}' (see mount.wraith --help)",
                    arg.to_string_lossy()
                ))
            }
            _ => {}
        }
        // A cluster of short flags, e.g. `-sfnv`; `-o` and `-t` take the rest or the next word.
        let mut i = 1;
        while i < bytes.len() {
            let flag = bytes[i];
            i += 1;
            match flag {
                b's' => inv.sloppy = true,
                b'f' => inv.fake = true,
                b'n' => {}
                b'v' => inv.verbose = true,
                b'h' => return Ok(Parsed::Help),
                b'V' => return Ok(Parsed::Version),
                b'o' | b't' | b'N' => {
                    let value: Vec<u8> = if i < bytes.len() {
                        bytes[i..].to_vec()
                    } else {
                        match it.next() {
                            Some(v) => v.as_bytes().to_vec(),
                            None => return Err(format!("-{} needs an argument", flag as char)),
                        }
                    };
                    i = bytes.len();
                    match flag {
                        b'o' => {
                            if !inv.options.is_empty() && !value.is_empty() {
                                inv.options.push(b',');
                            }
                            inv.options.extend_from_slice(&value);
                        }
                        b't' => {
                            if value != b"wraith" && value != b"fuse.wraith" {
                                return Err(format!(
                                    "this helper mounts type wraith, not '{}'",
                                    String::from_utf8_lossy(&value)
                                ));
                            }
                        }
                        _ => {
                            return Err("-N (mount --namespace) is not supported; run mount \
                                 inside the target namespace instead (nsenter -m)"
                                .to_string())
                        }
                    }
                }
                other => {
                    return Err(format!(
                        "unknown flag '-{}' (see mount.wraith --help)",
                        String::from_utf8_lossy(&[other])
                    ))
                }
            }
        }
    }
    match <[OsString; 2]>::try_from(positional) {
        Ok([spec, dir]) => {
            inv.spec = spec;
            inv.dir = dir;
            Ok(Parsed::Mount(inv))
        }
        Err(p) => Err(format!(
            "expected SPEC and DIR, got {} argument(s) (usage: mount.wraith \
             HOST:/SHARE DIR [-sfnv] [-o OPTIONS]; see --help)",
            p.len()
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Options: splitting and unescaping

/// One option as the user meant it: escapes and quotes removed.
#[derive(Debug, Clone, PartialEq)]
struct MountOpt {
    name: Vec<u8>,
    value: Option<Vec<u8>>,
}

impl MountOpt {
    fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

#[derive(Debug, PartialEq)]
enum OptError {
    UnterminatedQuote,
    EmptyName,
    Unknown(String),
    NeedsValue(&'static str, &'static str),
    TakesNoValue(String),
    Refused(String),
}

impl fmt::Display for OptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OptError::UnterminatedQuote => write!(f, "unterminated double quote in options"),
            OptError::EmptyName => write!(f, "an option has a value but no name ('=...')"),
            OptError::Unknown(n) => write!(f, "unknown option '{n}' (see mount.wraith --help)"),
            OptError::NeedsValue(n, form) => write!(f, "option '{n}' needs a value: {form}"),
            OptError::TakesNoValue(n) => write!(f, "option '{n}' takes no value"),
            OptError::Refused(msg) => write!(f, "{msg}"),
        }
    }
}

/// Splits a mount(8)-style option string into options.
///
/// Items are separated by commas outside double quotes. Double quotes are removed and protect
/// commas and `=` inside them. A backslash escapes: `\NNN` (three octal digits, at most 0377)
/// is that byte, `\,` `\\` `\"` `\=` are the character itself; any other backslash is kept
/// as a literal backslash. The first unquoted, unescaped `=` separates name from value.
/// Empty items (`a,,b`, a trailing comma) are skipped.
fn parse_options(s: &[u8]) -> Result<Vec<MountOpt>, OptError> {
    let mut out = Vec::new();
    let mut name: Vec<u8> = Vec::new();
    let mut value: Option<Vec<u8>> = None;
    let mut quoted = false;
    let mut i = 0;

    while i < s.len() {
        let c = s[i];
        i += 1;
        let literal = match c {
            b'"' => {
                quoted = !quoted;
                continue;
            }
            b',' if !quoted => {
                finish_item(&mut out, &mut name, &mut value)?;
                continue;
            }
            b'=' if !quoted && value.is_none() => {
                value = Some(Vec::new());
                continue;
            }
            b'\\' => match s.get(i..i + 3).and_then(octal_byte) {
                Some(byte) => {
                    i += 3;
                    byte
                }
                None => match s.get(i) {
                    Some(&next @ (b',' | b'\\' | b'"' | b'=')) => {
                        i += 1;
                        next
                    }
                    _ => b'\\',
                },
            },
            other => other,
        };
        match &mut value {
            Some(v) => v.push(literal),
            None => name.push(literal),
        }
    }
    if quoted {
        return Err(OptError::UnterminatedQuote);
    }
    finish_item(&mut out, &mut name, &mut value)?;
    Ok(out)
}

/// Ends the item being parsed: pushes it, skips it when empty, refuses `=value` without a name.
fn finish_item(
    out: &mut Vec<MountOpt>,
    name: &mut Vec<u8>,
    value: &mut Option<Vec<u8>>,
) -> Result<(), OptError> {
    let (n, v) = (std::mem::take(name), value.take());
    match (n.is_empty(), &v) {
        (true, None) => Ok(()),
        (true, Some(_)) => Err(OptError::EmptyName),
        (false, _) => {
            out.push(MountOpt { name: n, value: v });
            Ok(())
        }
    }
}

/// `\NNN` as mount(8) and /proc/mounts write it: exactly three octal digits, at most 0377.
fn octal_byte(d: &[u8]) -> Option<u8> {
    if d.len() != 3 || !d.iter().all(|c| (b'0'..=b'7').contains(c)) {
        return None;
    }
    let v = d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
    u8::try_from(v).ok()
}

/// Rebuilds an option string for wraith-mount, whose parser splits on unescaped commas and
/// reads `\,` as a comma and `\\` as a backslash. Names are plain ASCII from our own table.
fn join_options(opts: &[MountOpt]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, opt) in opts.iter().enumerate() {
        if k > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&opt.name);
        if let Some(v) = &opt.value {
            out.push(b'=');
            for &c in v {
                if c == b',' || c == b'\\' {
                    out.push(b'\\');
                }
                out.push(c);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Options: what each one means here

#[derive(Debug, Clone, Copy, PartialEq)]
enum Class {
    /// wraith-mount understands it; passed on.
    Flag,
    /// wraith-mount understands it and it needs a value; the str shows the form.
    Valued(&'static str),
    /// Belongs to mount(8) or systemd, or is already the case; dropped.
    Drop,
    /// Accepted but not honoured; dropped with this warning.
    /// Cannot be honoured; the mount fails with this message.
    Refuse(&'static str),
    /// Planned for wraith but not implemented; refused (dropped with a warning under `-s`).
    Unknown,
}

fn classify(name: &str) -> Class {
    match name {
        "keyfile" => Class::Valued("keyfile=FILE"),
        "port" => Class::Valued("port=N"),
        "attr_timeout" => Class::Valued("attr_timeout=SECS"),
        "timeout" => Class::Valued("timeout=SECS"),
        "mem_cache" => Class::Valued("mem_cache=SIZE"),
        "readahead" => Class::Valued("readahead=SIZE"),
        "uid" => Class::Valued("uid=N"),
        "gid" => Class::Valued("gid=N"),
        "threads" => Class::Valued("threads=N"),
        "fsname" => Class::Valued("fsname=NAME"),
        "cache_dir" => Class::Valued("cache_dir=DIR"),
        "cache_size" => Class::Valued("cache_size=SIZE"),
        "cache_io" => Class::Valued("cache_io=uring|pread"),
        "transport" => Class::Valued("transport=udp|xdp|auto"),
        "iface" => Class::Valued("iface=IFACE"),
        "xdp_mode" => Class::Valued("xdp_mode=auto|native|generic"),
        "hard" | "soft" | "allow_other" | "default_permissions" | "ro" | "noexec" | "passthrough"
        | "nopassthrough" => Class::Flag,

        // mount(8) passes `rw` unless `ro` was asked for, so it cannot mean the user wants writes.
        "rw" => Class::Drop,
        "_netdev" | "nofail" | "auto" | "noauto" | "user" | "users" | "nouser" | "owner"
        | "group" | "defaults" | "nosuid" | "nodev" | "exec" | "atime" | "noatime" | "relatime"
        | "norelatime" | "strictatime" | "nostrictatime" | "lazytime" | "nolazytime"
        | "diratime" | "nodiratime" | "sync" | "async" | "dirsync" | "silent" | "loud"
        | "comment" | "helper" | "uhelper" => Class::Drop,
        _ if name.starts_with("x-") => Class::Drop,

        "suid" => Class::Refuse("'suid' is not allowed: wraith mounts are always nosuid"),
        "dev" => Class::Refuse("'dev' is not allowed: wraith mounts are always nodev"),
        "remount" => {
            Class::Refuse("remount is not supported: umount the directory and mount it again")
        }
        _ => Class::Unknown,
    }
}

#[derive(Debug, Default, PartialEq)]
struct Plan {
    forward: Vec<MountOpt>,
    /// What was dropped, for `-v`.
    dropped: Vec<String>,
    warnings: Vec<String>,
}

fn plan(opts: Vec<MountOpt>, sloppy: bool) -> Result<Plan, OptError> {
    let mut plan = Plan::default();
    for opt in opts {
        let name = opt.name_lossy();
        let class = match std::str::from_utf8(&opt.name) {
            Ok(n) => classify(n),
            Err(_) => Class::Unknown,
        };
        match class {
            Class::Flag => {
                if opt.value.is_some() {
                    return Err(OptError::TakesNoValue(name));
                }
                plan.forward.push(opt);
            }
            Class::Valued(form) => match &opt.value {
                Some(v) if !v.is_empty() => plan.forward.push(opt),
                _ => {
                    return Err(OptError::NeedsValue(
                        form.split('=').next().unwrap_or(form),
                        form,
                    ))
                }
            },
            Class::Drop => plan
                .dropped
                .push(format!("'{name}' (handled by mount/systemd)")),
            Class::Refuse(msg) => return Err(OptError::Refused(msg.to_string())),
            Class::Unknown if sloppy => plan.dropped.push(format!("unknown '{name}' (-s)")),
            Class::Unknown => return Err(OptError::Unknown(name)),
        }
    }
    Ok(plan)
}

// ---------------------------------------------------------------------------------------------
// Finding wraith-mount without PATH

fn find_wraith_mount() -> Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::current_exe()
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        candidates.push(dir.join("wraith-mount"));
    }
    candidates.extend(
        SYSTEM_DIRS
            .iter()
            .map(|d| Path::new(d).join("wraith-mount")),
    );
    for c in &candidates {
        if is_executable_file(c) {
            return Ok(c.clone());
        }
    }
    let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
    Err(format!(
        "wraith-mount not found (looked in {}); install it with scripts/install",
        looked.join(", ")
    ))
}

fn is_executable_file(p: &Path) -> bool {
    match std::fs::metadata(p) {
        Ok(m) => m.is_file() && m.permissions().mode() & 0o111 != 0,
        Err(_) => false,
    }
}

/// Quotes a word for display in a shell-like way (only for `-v` output).
fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@%+\\[]".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests;
