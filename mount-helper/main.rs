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
  allow_other           let other users access the mount (implies default_permissions)
  default_permissions   let the kernel check permission bits
  uid=N, gid=N          show every file as owned by user/group N
  ro                    read-only (always the case)
  threads=N             FUSE worker threads (default 4)
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
mod tests {
    use super::*;

    fn opt(name: &str, value: Option<&str>) -> MountOpt {
        MountOpt {
            name: name.as_bytes().to_vec(),
            value: value.map(|v| v.as_bytes().to_vec()),
        }
    }

    fn parse(s: &str) -> Vec<MountOpt> {
        parse_options(s.as_bytes()).unwrap()
    }

    /// The rebuilt `-o` string wraith-mount would get, or the error.
    fn rebuilt(s: &str, sloppy: bool) -> Result<String, OptError> {
        let plan = plan(parse_options(s.as_bytes())?, sloppy)?;
        Ok(String::from_utf8(join_options(&plan.forward)).unwrap())
    }

    fn args(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn splits_names_and_values() {
        assert_eq!(
            parse("keyfile=/etc/k,hard,port=7447"),
            vec![
                opt("keyfile", Some("/etc/k")),
                opt("hard", None),
                opt("port", Some("7447"))
            ]
        );
        assert_eq!(parse(",,hard,"), vec![opt("hard", None)]);
        assert_eq!(parse("fsname="), vec![opt("fsname", Some(""))]);
        assert_eq!(parse("fsname=a=b"), vec![opt("fsname", Some("a=b"))]);
        assert_eq!(parse(""), vec![]);
    }

    #[test]
    fn escaped_comma_and_backslash() {
        assert_eq!(
            parse(r"keyfile=/k/a\,b,ro"),
            vec![opt("keyfile", Some("/k/a,b")), opt("ro", None)]
        );
        assert_eq!(parse(r"fsname=a\\b"), vec![opt("fsname", Some(r"a\b"))]);
        assert_eq!(
            parse(r"fsname=a\\,ro"),
            vec![opt("fsname", Some(r"a\")), opt("ro", None)]
        );
        // A backslash before anything else stays literal, like mount(8)'s unmangling.
        assert_eq!(parse(r"fsname=a\xb\"), vec![opt("fsname", Some(r"a\xb\"))]);
        assert_eq!(parse(r"fsname=a\=b"), vec![opt("fsname", Some("a=b"))]);
        assert_eq!(parse(r"a\=b=c"), vec![opt("a=b", Some("c"))]);
    }

    #[test]
    fn octal_escapes_and_spaces() {
        assert_eq!(
            parse(r"keyfile=/etc/my\040keys/k"),
            vec![opt("keyfile", Some("/etc/my keys/k"))]
        );
        assert_eq!(
            parse(r"fsname=a\011b\134c"),
            vec![opt("fsname", Some("a\tb\\c"))]
        );
        assert_eq!(parse(r"fsname=a\054b"), vec![opt("fsname", Some("a,b"))]);
        // Not three octal digits, or above 0377: not an escape.
        assert_eq!(parse(r"fsname=\08"), vec![opt("fsname", Some(r"\08"))]);
        assert_eq!(parse(r"fsname=\400"), vec![opt("fsname", Some(r"\400"))]);
        // A space that mount(8) already decoded from fstab arrives as a space.
        assert_eq!(
            parse("keyfile=/etc/my keys/k"),
            vec![opt("keyfile", Some("/etc/my keys/k"))]
        );
        // Octal escapes can produce bytes that are not UTF-8.
        assert_eq!(parse(r"fsname=\377").pop().unwrap().value, Some(vec![0xff]));
    }

    #[test]
    fn double_quotes() {
        assert_eq!(
            parse(r#"fsname="a,b c",ro"#),
            vec![opt("fsname", Some("a,b c")), opt("ro", None)]
        );
        assert_eq!(parse(r#"fsname="x=y""#), vec![opt("fsname", Some("x=y"))]);
        assert_eq!(
            parse(r#"keyfile=/k/"a b"/c"#),
            vec![opt("keyfile", Some("/k/a b/c"))]
        );
        assert_eq!(
            parse(r#"fsname="say \"hi\"""#),
            vec![opt("fsname", Some(r#"say "hi""#))]
        );
        assert_eq!(
            parse_options(br#"fsname="a,b"#),
            Err(OptError::UnterminatedQuote)
        );
        assert_eq!(parse_options(b"=x"), Err(OptError::EmptyName));
    }

    #[test]
    fn rebuilt_values_round_trip_through_escaping() {
        assert_eq!(
            rebuilt(r#"fsname="a,b\c""#, false).unwrap(),
            r"fsname=a\,b\\c"
        );
        assert_eq!(
            rebuilt(r"keyfile=/etc/my\040keys/k", false).unwrap(),
            "keyfile=/etc/my keys/k"
        );
        // Whatever comes out must split back into the same options.
        for input in [
            r"fsname=a\,b,keyfile=/x\\y,hard",
            r#"fsname="p,q,,r",uid=1000"#,
            "fsname=\\\\\\,",
        ] {
            let first = plan(parse(input), false).unwrap().forward;
            let again = parse(&rebuilt(input, false).unwrap());
            assert_eq!(first, again, "{input}");
        }
    }

    #[test]
    fn mount_and_systemd_options_are_dropped() {
        let line = "rw,_netdev,keyfile=/etc/wraith/share.key,nofail,x-systemd.automount,\
                    x-systemd.idle-timeout=600,x-systemd.requires=network-online.target,\
                    noauto,auto,user,users,nouser,owner,group,defaults,nosuid,nodev,exec,\
                    noatime,relatime,atime,strictatime,lazytime,nodiratime,sync,async,\
                    comment=backup,x-gvfs-show,hard";
        assert_eq!(
            rebuilt(line, false).unwrap(),
            "keyfile=/etc/wraith/share.key,hard"
        );
    }

    #[test]
    fn every_wraith_option_is_passed_on() {
        let line = "keyfile=/k,port=9,attr_timeout=2,timeout=5,hard,soft,mem_cache=1G,allow_other,\
                    default_permissions,uid=1000,gid=100,ro,threads=4,fsname=srv";
        assert_eq!(rebuilt(line, false).unwrap(), line);
    }

    #[test]
    fn unknown_options_are_rejected_by_name() {
        assert_eq!(
            rebuilt("ro,frobnicate=3", false),
            Err(OptError::Unknown("frobnicate".into()))
        );
        assert_eq!(
            OptError::Unknown("frobnicate".into()).to_string(),
            "unknown option 'frobnicate' (see mount.wraith --help)"
        );
        assert_eq!(
            rebuilt("Keyfile=/k", false),
            Err(OptError::Unknown("Keyfile".into()))
        );
    }

    #[test]
    fn sloppy_ignores_unknown_options() {
        assert_eq!(rebuilt("frobnicate=3,hard,vers=4", true).unwrap(), "hard");
        let p = plan(parse("transport=xdp,keyfile=/k"), true).unwrap();
        assert_eq!(
            String::from_utf8(join_options(&p.forward)).unwrap(),
            "transport=xdp,keyfile=/k"
        );
        // Sloppy does not turn a refusal into acceptance.
        assert!(matches!(rebuilt("suid", true), Err(OptError::Refused(_))));
    }

    #[test]
    fn cache_and_transport_options_are_passed_on() {
        assert_eq!(
            rebuilt("keyfile=/k,cache_size=20G,cache_dir=/var/cache/x,noexec", false).unwrap(),
            "keyfile=/k,cache_size=20G,cache_dir=/var/cache/x,noexec"
        );
        assert_eq!(
            rebuilt("transport=xdp,iface=eth1,xdp_mode=generic", false).unwrap(),
            "transport=xdp,iface=eth1,xdp_mode=generic"
        );
    }

    #[test]
    fn rw_is_dropped_and_setuid_or_devices_refused() {
        // mount(8) always puts rw or ro first; rw is its default, not a request for writes.
        assert_eq!(rebuilt("rw,keyfile=/k", false).unwrap(), "keyfile=/k");
        assert_eq!(rebuilt("ro,keyfile=/k", false).unwrap(), "ro,keyfile=/k");
        for bad in ["suid", "dev", "remount"] {
            let e = rebuilt(&format!("ro,{bad}"), false).unwrap_err();
            assert!(matches!(e, OptError::Refused(_)), "{bad}: {e:?}");
        }
        assert!(rebuilt("suid", false)
            .unwrap_err()
            .to_string()
            .contains("nosuid"));
    }

    #[test]
    fn noexec_is_passed_on() {
        // mount(8) adds noexec,nosuid,nodev for `user` entries; wraith-mount enforces noexec.
        let p = plan(parse("ro,noexec,nosuid,nodev,user"), false).unwrap();
        assert_eq!(p.forward, vec![opt("ro", None), opt("noexec", None)]);
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn value_shape_is_checked() {
        assert_eq!(
            rebuilt("hard=yes", false),
            Err(OptError::TakesNoValue("hard".into()))
        );
        assert!(matches!(
            rebuilt("keyfile", false),
            Err(OptError::NeedsValue("keyfile", _))
        ));
        assert!(matches!(
            rebuilt("keyfile=", false),
            Err(OptError::NeedsValue("keyfile", _))
        ));
        assert!(rebuilt("port", false)
            .unwrap_err()
            .to_string()
            .contains("port=N"));
    }

    #[test]
    fn command_line_as_mount_passes_it() {
        let got = parse_args(&args(&[
            "srv:/share",
            "/mnt/x",
            "-s",
            "-f",
            "-n",
            "-v",
            "-o",
            "rw,hard",
        ]))
        .unwrap();
        let want = Invocation {
            spec: "srv:/share".into(),
            dir: "/mnt/x".into(),
            options: b"rw,hard".to_vec(),
            sloppy: true,
            fake: true,
            verbose: true,
        };
        assert_eq!(got, Parsed::Mount(want));
    }

    #[test]
    fn command_line_clusters_and_attached_values() {
        let Parsed::Mount(inv) = parse_args(&args(&[
            "-fv",
            "-oro",
            "-o",
            "hard",
            "-t",
            "wraith",
            "h:/s",
            "/d",
            "-nokeyfile=/k",
        ]))
        .unwrap() else {
            panic!()
        };
        assert!(inv.fake && inv.verbose && !inv.sloppy);
        assert_eq!(inv.options, b"ro,hard,keyfile=/k".to_vec());
        assert_eq!(
            (inv.spec.as_os_str(), inv.dir.as_os_str()),
            ("h:/s".as_ref(), "/d".as_ref())
        );
        assert!(parse_args(&args(&["h:/s", "/d", "-tfuse.wraith"])).is_ok());
    }

    #[test]
    fn command_line_errors() {
        assert_eq!(parse_args(&args(&["--help"])), Ok(Parsed::Help));
        assert_eq!(parse_args(&args(&["h:/s", "-h"])), Ok(Parsed::Help));
        let e = parse_args(&args(&["h:/s", "/d", "-x"])).unwrap_err();
        assert!(e.contains("'-x'"), "{e}");
        assert!(parse_args(&args(&["h:/s", "/d", "--bogus"]))
            .unwrap_err()
            .contains("--bogus"));
        assert!(parse_args(&args(&["h:/s"]))
            .unwrap_err()
            .contains("expected SPEC and DIR"));
        assert!(parse_args(&args(&["a", "b", "c"])).is_err());
        assert!(parse_args(&args(&["h:/s", "/d", "-o"]))
            .unwrap_err()
            .contains("-o needs"));
        assert!(parse_args(&args(&["h:/s", "/d", "-t", "nfs"]))
            .unwrap_err()
            .contains("'nfs'"));
        assert!(parse_args(&args(&["h:/s", "/d", "-N", "/proc/1/ns/mnt"]))
            .unwrap_err()
            .contains("-N"));
        // After `--` everything is positional, even a leading dash.
        assert!(parse_args(&args(&["--", "h:/s", "-d"])).is_ok());
    }

    #[test]
    fn shell_quote_for_display() {
        assert_eq!(shell_quote("keyfile=/k,hard"), "keyfile=/k,hard");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
