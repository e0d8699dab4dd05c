//! wraith-mount: mount a wraith share through FUSE.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use wraith::cache::{self, CacheConfig, Store};
use wraith::cli::{self, parse_remote, split_options, RemoteSpec};
use wraith::error::Error;
use wraith::fs::{Fs, FsConfig};
use wraith::fuse::WraithFuse;
use wraith::sys::process::{self, Forked};
use wraith::transport::xdp::{XdpIo, XdpMode, XdpOptions};
use wraith::transport::ClientTransport;

#[derive(Parser)]
#[command(
    name = "wraith-mount",
    version,
    about = "Mount a wraith share (read-only, every byte BLAKE3-verified)",
    after_help = "Options for -o (comma-separated, '\\,' escapes a comma):\n  \
        keyfile=FILE       pre-shared key (default /etc/wraith/wraith.key)\n  \
        port=N             server UDP port (default 7447)\n  \
        transport=T        udp (default), xdp (AF_XDP, or fail) or auto (AF_XDP, else UDP)\n  \
        iface=IFACE        interface for AF_XDP (default: the one the route to the server uses)\n  \
        xdp_mode=M         auto (default), native or generic XDP\n  \
        attr_timeout=SECS  attribute/entry cache time (default 1)\n  \
        timeout=SECS       per-request deadline, then EIO (default 30)\n  \
        hard | soft        hard: retry forever, Ctrl-C interrupts (default soft)\n  \
        mem_cache=SIZE     in-memory chunk cache (default 256M)\n  \
        readahead=SIZE     the kernel's readahead for this mount (default 1M; 0 turns it off;\n                     \
        needs root, else the kernel's 128K stays)\n  \
        cache_dir=DIR      disk cache directory (default /var/cache/wraith/<id> for root,\n                     \
        $XDG_CACHE_HOME/wraith/<id> otherwise); one mount per directory\n  \
        cache_size=SIZE    disk cache size (default min(10G, 10% of free space); 0 disables)\n  \
        cache_io=uring|pread  disk cache I/O (default uring, pread where io_uring is unusable)\n  \
        passthrough | nopassthrough  kernel reads fully cached files directly (default on)\n  \
        allow_other        let other users in (implies default_permissions)\n  \
        default_permissions  kernel checks mode bits\n  \
        uid=N, gid=N       show every file as owned by N\n  \
        threads=N          FUSE worker threads (default 4)\n  \
        noexec             do not allow programs to be run from the mount\n  \
        fsname=NAME        source shown in /proc/mounts (default the remote spec)\n  \
        ro                 accepted (wraith is always read-only)"
)]
struct Args {
    /// HOST[:PORT]:/SHARE[/SUBDIR]
    #[arg(required_unless_present = "stats")]
    remote: Option<String>,
    /// Where to mount.
    #[arg(required_unless_present = "stats")]
    mountpoint: Option<PathBuf>,
    /// Print the counters of the wraith mount at MOUNTPOINT (hit ratio, bytes from network and
    /// from cache, evictions, verification failures) and exit.
    #[arg(long, value_name = "MOUNTPOINT", conflicts_with_all = ["remote", "mountpoint"])]
    stats: Option<PathBuf>,
    /// Mount options (see below); may be repeated.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Stay in the foreground (logs to stderr).
    #[arg(short, long)]
    foreground: bool,
    /// More logging (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Pre-shared key file (same as -o keyfile=).
    #[arg(long)]
    keyfile: Option<PathBuf>,
    /// Per-request deadline in seconds (same as -o timeout=).
    #[arg(long)]
    timeout: Option<String>,
    /// Attribute cache time in seconds (same as -o attr_timeout=).
    #[arg(long)]
    attr_timeout: Option<String>,
    /// Retry forever instead of failing at the deadline (same as -o hard).
    #[arg(long)]
    hard: bool,
    /// In-memory chunk cache size (same as -o mem_cache=).
    #[arg(long)]
    mem_cache: Option<String>,
}

impl Args {
    fn remote(&self) -> &str {
        self.remote.as_deref().unwrap_or("")
    }
    fn mp(&self) -> &Path {
        self.mountpoint.as_deref().unwrap_or(Path::new(""))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Xdp,
    Auto,
}

struct Opts {
    transport: Transport,
    xdp: XdpOptions,
    keyfile: PathBuf,
    port: u16,
    fs: FsConfig,
    allow_other: bool,
    default_permissions: bool,
    threads: usize,
    fsname: Option<String>,
    noexec: bool,
    cache_dir: Option<PathBuf>,
    cache_size: Option<u64>,
    cache_sync: bool,
    /// The kernel's readahead for the mount, in bytes, and whether the user asked for it.
    readahead: (u64, bool),
}

/// Default readahead: the kernel's own default for a FUSE mount is 128 KiB, which makes a
/// sequential reader wait on one FUSE request at a time (see docs/ARCHITECTURE.md, readahead).
const READAHEAD: u64 = 1 << 20;
/// Largest readahead accepted.
const READAHEAD_MAX: u64 = 256 << 20;

fn parse_opts(args: &Args, spec: &RemoteSpec) -> Result<Opts, String> {
    let mut o = Opts {
        transport: Transport::Udp,
        xdp: XdpOptions::default(),
        keyfile: PathBuf::from("/etc/wraith/wraith.key"),
        port: cli::DEFAULT_PORT,
        fs: FsConfig {
            share: spec.share.clone(),
            subdir: spec.subdir.as_bytes().to_vec(),
            attr_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            hard: false,
            mem_cache: 256 << 20,
            uid: None,
            gid: None,
            max_prefetch: 32,
            passthrough: true,
            meta_file: None,
        },
        allow_other: false,
        default_permissions: false,
        threads: 4,
        fsname: None,
        noexec: false,
        cache_dir: None,
        cache_size: None,
        cache_sync: false,
        readahead: (READAHEAD, false),
    };
    let mut all: Vec<String> = args.options.iter().flat_map(|s| split_options(s)).collect();
    if let Some(k) = &args.keyfile {
        all.push(format!("keyfile={}", k.display()));
    }
    if let Some(t) = &args.timeout {
        all.push(format!("timeout={t}"));
    }
    if let Some(t) = &args.attr_timeout {
        all.push(format!("attr_timeout={t}"));
    }
    if args.hard {
        all.push("hard".into());
    }
    if let Some(m) = &args.mem_cache {
        all.push(format!("mem_cache={m}"));
    }
    for opt in all {
        let (k, v) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        let need = |v: Option<&'_ str>| -> Result<String, String> {
            v.map(str::to_string).ok_or_else(|| format!("option '{k}' needs a value ({k}=...)"))
        };
        let num = |v: Option<&str>| -> Result<u32, String> {
            need(v)?.parse().map_err(|_| format!("option '{k}' needs a number"))
        };
        match k {
            "keyfile" => o.keyfile = PathBuf::from(need(v)?),
            "transport" => {
                o.transport = match need(v)?.as_str() {
                    "udp" => Transport::Udp,
                    "xdp" => Transport::Xdp,
                    "auto" => Transport::Auto,
                    t => return Err(format!("transport={t}: expected udp, xdp or auto")),
                }
            }
            "iface" => o.xdp.iface = need(v)?,
            "xdp_mode" => {
                o.xdp.mode = match need(v)?.as_str() {
                    "auto" => None,
                    "native" => Some(XdpMode::Native),
                    "generic" => Some(XdpMode::Generic),
                    m => return Err(format!("xdp_mode={m}: expected auto, native or generic")),
                }
            }
            "port" => o.port = num(v)?.try_into().map_err(|_| "port must be 1..65535".to_string())?,
            "attr_timeout" => o.fs.attr_timeout = cli::parse_secs(&need(v)?)?,
            "timeout" => {
                o.fs.timeout = cli::parse_secs(&need(v)?)?;
                if o.fs.timeout < Duration::from_millis(100) {
                    return Err("timeout must be at least 0.1 seconds".into());
                }
            }
            "hard" => o.fs.hard = true,
            "soft" => o.fs.hard = false,
            "mem_cache" => o.fs.mem_cache = cli::parse_size(&need(v)?)?,
            "readahead" => {
                let b = cli::parse_size(&need(v)?)?;
                if b > READAHEAD_MAX {
                    return Err(format!("readahead={}: at most {}M", v.unwrap_or_default(), READAHEAD_MAX >> 20));
                }
                o.readahead = (b, true);
            }
            "allow_other" => o.allow_other = true,
            "default_permissions" => o.default_permissions = true,
            "uid" => o.fs.uid = Some(num(v)?),
            "gid" => o.fs.gid = Some(num(v)?),
            "threads" => o.threads = (num(v)? as usize).clamp(1, 64),
            "fsname" => o.fsname = Some(need(v)?),
            "ro" | "nosuid" | "nodev" | "exec" => {}
            "noexec" => o.noexec = true,
            "cache_dir" => o.cache_dir = Some(PathBuf::from(need(v)?)),
            "cache_size" => o.cache_size = Some(cli::parse_size(&need(v)?)?),
            "cache_io" => {
                o.cache_sync = match need(v)?.as_str() {
                    "uring" => false,
                    "pread" => true,
                    other => return Err(format!("cache_io={other}: use uring or pread")),
                }
            }
            "passthrough" => o.fs.passthrough = true,
            "nopassthrough" => o.fs.passthrough = false,
            "rw" => return Err("option 'rw': wraith is read-only; remove 'rw'".into()),
            _ => return Err(format!("unknown option '{opt}' (see wraith-mount --help)")),
        }
    }
    if o.allow_other {
        o.default_permissions = true; // never one without the other
    }
    Ok(o)
}

fn explain(e: &Error, spec: &str, addr: &str, o: &Opts) -> String {
    match e {
        Error::AuthFailed => format!(
            "server {addr} rejected our key: {} does not match the server's --key file; copy the server's key here",
            o.keyfile.display()
        ),
        Error::WrongVersion(v) => format!(
            "server {addr} speaks wraith protocol version {v}, this wraith-mount speaks version {}: install the same wraith version on both machines",
            wraith::proto::wire::VERSION
        ),
        Error::RemoteTimeout => format!(
            "server {addr} did not answer within {:.0?}: unreachable, or wraith-serve is not running there (check host, port and firewall)",
            o.fs.timeout.min(Duration::from_secs(15))
        ),
        Error::NotFound if o.fs.subdir.is_empty() => {
            format!("server {addr} has no share '{}': check the NAME in the server's --export NAME=PATH", o.fs.share)
        }
        Error::NotFound => format!("'{spec}': subdirectory not found in the share"),
        Error::NotDir => format!("'{spec}': the subdirectory is not a directory"),
        other => format!("cannot mount '{spec}': {other}"),
    }
}

/// The disk cache, or None (disabled, or it cannot be used: said once, the mount goes on).
fn open_cache(o: &Opts, remote: &str, addr: &std::net::SocketAddr) -> Option<Arc<Store>> {
    use std::os::unix::fs::MetadataExt;
    if o.cache_size == Some(0) {
        return None;
    }
    let is_root = std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false);
    let dir = o.cache_dir.clone().unwrap_or_else(|| cache::default_dir(&format!("{addr}|{remote}"), is_root));
    let size = o.cache_size.unwrap_or_else(|| {
        let _ = std::fs::create_dir_all(&dir);
        cache::default_size(&dir)
    });
    match Store::open(&CacheConfig { dir, size, force_sync: o.cache_sync, lend_bytes: o.fs.mem_cache }) {
        Ok(s) => Some(Arc::new(s)),
        Err(m) => {
            tracing::warn!("no disk cache: {m}");
            None
        }
    }
}

fn setup(args: &Args) -> Result<(Arc<Fs>, Opts), String> {
    let (remote, mountpoint) = (args.remote(), args.mp().to_path_buf());
    let spec = parse_remote(remote)?;
    let o = parse_opts(args, &spec)?;
    check_mountpoint(&mountpoint)?;
    let addr = spec.resolve(o.port)?;
    let psk = cli::load_key(&o.keyfile)?;
    let udp = || ClientTransport::connect(addr, psk).map_err(|e| format!("cannot open a UDP socket to {addr}: {e}"));
    let net = match o.transport {
        Transport::Udp => udp()?,
        Transport::Xdp | Transport::Auto => match XdpIo::open_client(&o.xdp, addr) {
            Ok(io) => {
                tracing::info!(what = %io.describe(), "AF_XDP path");
                if args.verbose > 0 || args.foreground {
                    eprintln!("wraith-mount: {}", io.describe());
                }
                let max = io.max_datagram();
                ClientTransport::with_io(Arc::new(io), addr, psk, max).map_err(|e| format!("cannot start the AF_XDP transport: {e}"))?
            }
            Err(e) if o.transport == Transport::Auto => {
                eprintln!("wraith-mount: AF_XDP unavailable ({e}); using UDP");
                udp()?
            }
            Err(e) => return Err(format!("AF_XDP unavailable: {e}")),
        },
    };
    // The first contact gets a shorter deadline: a wrong host should not keep mount(8) waiting.
    let mut attach_cfg = o.fs.clone();
    attach_cfg.timeout = o.fs.timeout.min(Duration::from_secs(15));
    let disk = open_cache(&o, remote, &addr);
    // What this mount learns about names is kept beside the chunks, for a mount made offline.
    attach_cfg.meta_file = disk.as_ref().map(|d| cache::meta::path_for(d.dir(), &format!("{addr}|{remote}")));
    let probe = net.contact_probe();
    let fs = Fs::attach_with_cache(attach_cfg, net, disk).map_err(|e| match e {
        Error::RemoteTimeout => format!("{} [{}]", explain(&e, remote, &addr.to_string(), &o), probe.describe()),
        e => explain(&e, remote, &addr.to_string(), &o),
    })?;
    drop(probe);
    if fs.started_offline() {
        let msg = format!(
            "server {addr} did not answer within {:.0?}; mounted from the disk cache's last known state: \
             fully cached files are readable, the rest fail until the server answers (it reconnects by itself)",
            o.fs.timeout.min(Duration::from_secs(15))
        );
        tracing::warn!("{msg}");
    }
    Ok((fs, o))
}

fn check_mountpoint(p: &Path) -> Result<(), String> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(format!("mount point {} is not a directory", p.display())),
        Err(e) => Err(format!("mount point {}: {e}", p.display())),
    }
}

/// A running mount: the FUSE session and whether we must unmount it ourselves.
struct Mounted {
    session: fuser::BackgroundSession,
    /// Mounted with mount(2) directly (as root): unmount with umount2; otherwise fuser owns it.
    direct: bool,
}

fn mount(args: &Args, fs: Arc<Fs>, o: &Opts) -> Result<Mounted, String> {
    use fuser::MountOption as M;
    let source = o.fsname.clone().unwrap_or_else(|| args.remote().to_string());
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![M::FSName(source.clone()), M::Subtype("wraith".into()), M::RO, M::NoSuid, M::NoDev, M::NoAtime];
    if o.noexec {
        cfg.mount_options.push(M::NoExec);
    }
    if o.default_permissions {
        cfg.mount_options.push(M::DefaultPermissions);
    }
    if o.allow_other {
        cfg.acl = fuser::SessionACL::All;
    }
    cfg.n_threads = Some(o.threads);
    cfg.clone_fd = true;
    // As root, mount(2) ourselves so /proc/mounts says fuse.wraith; otherwise fusermount3 (which
    // also sets the subtype).
    let direct = wraith::sys::mount::mount_fuse(&wraith::sys::mount::FuseMount {
        source: &source,
        target: args.mp(),
        fstype: "fuse.wraith",
        read_only: true,
        noexec: o.noexec,
        allow_other: o.allow_other,
        default_permissions: o.default_permissions,
    });
    let cannot = |e: std::io::Error| format!("cannot mount on {}: {e}", args.mp().display());
    match direct {
        Ok(fd) => {
            let acl = cfg.acl;
            let session = fuser::Session::from_fd(WraithFuse::new(fs), fd, acl, cfg).and_then(|s| s.spawn());
            match session {
                Ok(session) => Ok(Mounted { session, direct: true }),
                Err(e) => {
                    let _ = wraith::sys::mount::unmount(args.mp(), true);
                    Err(cannot(e))
                }
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => fuser::spawn_mount(WraithFuse::new(fs), args.mp(), &cfg)
            .map(|session| Mounted { session, direct: false })
            .map_err(cannot),
        Err(e) => Err(cannot(e)),
    }
}

impl Mounted {
    fn finished(&self) -> bool {
        self.session.guard.is_finished()
    }

    /// Unmount (lazily if busy) and wait for the session to end.
    fn unmount(self, mountpoint: &Path) -> std::io::Result<()> {
        if self.direct {
            if let Err(e) = wraith::sys::mount::unmount(mountpoint, false) {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    wraith::sys::mount::unmount(mountpoint, true)?;
                } else if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            self.session.join()
        } else {
            self.session.umount_and_join()
        }
    }
}

fn report(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let mut f = std::fs::File::from(fd);
        let _ = f.write_all(msg.as_bytes());
    }
}

fn run(args: Args, mut ready: Option<OwnedFd>) -> ExitCode {
    let fail = |ready: &mut Option<OwnedFd>, msg: String| {
        if ready.is_some() {
            report(ready, &format!("ERR {msg}"));
        } else {
            eprintln!("wraith-mount: {msg}");
        }
        ExitCode::from(1)
    };
    let (fs, o) = match setup(&args) {
        Ok(x) => x,
        Err(m) => return fail(&mut ready, m),
    };
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        let _ = signal_hook::flag::register(sig, stop.clone());
    }
    // The mount point's own path, taken while it is a plain directory: looked up in mountinfo
    // once mounted, without asking the mount.
    let mp_abs = std::fs::canonicalize(args.mp()).unwrap_or_else(|_| args.mp().to_path_buf());
    let mounted = match mount(&args, fs.clone(), &o) {
        Ok(s) => s,
        Err(m) => return fail(&mut ready, m),
    };
    // The mount serves once the kernel can stat its root through us. Asked on a thread without
    // /dev/fuse in its file table: one with it, waiting on our own mount, would keep a SIGKILLed
    // daemon from ever exiting.
    match process::stat_on_own_files(args.mp(), o.fs.timeout + Duration::from_secs(5)) {
        Ok(Some(Ok(()))) => {}
        Ok(Some(Err(e))) | Err(e) => {
            let _ = mounted.unmount(args.mp());
            return fail(&mut ready, format!("mounted, but the mount does not answer: {e}"));
        }
        Ok(None) => {
            let _ = wraith::sys::mount::unmount(args.mp(), true);
            return fail(&mut ready, "mounted, but the mount did not answer in time".into());
        }
    }
    tracing::info!(remote = %args.remote(), mountpoint = %args.mp().display(), "mounted");
    set_readahead(&mp_abs, o.readahead);
    wraith::daemon::notify_ready();
    if ready.is_some() {
        // From here on nobody reads our stderr: log to syslog/journald and let go of the caller's
        // terminal and pipes (a caller doing `out=$(mount ...)` must not wait for us).
        wraith::logging::switch_to_syslog("wraith-mount");
        let _ = process::detach_stdio(true);
        report(&mut ready, "OK");
    }
    loop {
        if mounted.finished() {
            tracing::info!("unmounted; exiting");
            let _ = mounted.session.join();
            fs.save_meta();
            return ExitCode::SUCCESS;
        }
        if stop.load(Ordering::Relaxed) {
            tracing::info!("signal received; unmounting");
            // A hard mount whose server is gone would otherwise keep its FUSE threads retrying,
            // and the session would never end.
            fs.stop();
            fs.save_meta();
            return match mounted.unmount(args.mp()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("unmount failed: {e} (try umount -l {})", args.mp().display());
                    ExitCode::from(1)
                }
            };
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Set the kernel's readahead for the new mount. Only root may: for anyone else the kernel's
/// default stays, said in the log (as a warning when the user asked for a size).
fn set_readahead(mp: &Path, (bytes, asked): (u64, bool)) {
    let (e, was) = match wraith::sys::mount::ReadAhead::of(mp) {
        Ok(ra) => match ra.set(bytes) {
            Ok(()) => return tracing::debug!(kib = bytes.div_ceil(1024), "readahead set"),
            Err(e) => (e, ra.get().ok()),
        },
        Err(e) => (e, None),
    };
    let was = was.map_or_else(|| "unchanged".to_string(), |b| format!("{} KiB", b >> 10));
    if asked {
        tracing::warn!("readahead={} KiB not set ({e}; it needs root and a writable /sys); the kernel's readahead stays {was}", bytes.div_ceil(1024));
    } else {
        tracing::info!("readahead not raised ({e}); the kernel's stays {was}");
    }
}

/// `--stats MOUNTPOINT`: the counters the mount publishes as an xattr of its root.
fn print_stats(mp: &Path) -> ExitCode {
    match wraith::sys::disk::getxattr(mp, wraith::fs::XATTR_STATS) {
        Ok(v) => {
            print!("{}", String::from_utf8_lossy(&v));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("wraith-mount: {}: no wraith statistics ({e}); is it a wraith mount?", mp.display());
            ExitCode::from(1)
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(mp) = &args.stats {
        return print_stats(mp);
    }
    // Check what can be checked before forking, so simple mistakes print right here.
    if let Err(m) = parse_remote(args.remote()).and_then(|s| parse_opts(&args, &s).map(|_| ())) {
        eprintln!("wraith-mount: {m}");
        return ExitCode::from(2);
    }
    wraith::logging::init(args.verbose, !args.foreground);
    if args.foreground {
        return run(args, None);
    }
    // Fork while single-threaded; the parent exits only once the child reports the mount serves.
    match process::fork_with_pipe() {
        Err(e) => {
            eprintln!("wraith-mount: cannot fork: {e}");
            ExitCode::from(1)
        }
        Ok(Forked::Child { ready }) => {
            let _ = process::setsid();
            run(args, Some(ready))
        }
        Ok(Forked::Parent { child, ready }) => {
            let mut msg = String::new();
            let _ = std::fs::File::from(ready).read_to_string(&mut msg);
            if msg == "OK" {
                return ExitCode::SUCCESS;
            }
            if let Some(m) = msg.strip_prefix("ERR ") {
                eprintln!("wraith-mount: {m}");
                let _ = process::wait_child(child);
                return ExitCode::from(1);
            }
            let status = process::wait_child(child).unwrap_or(-1);
            eprintln!("wraith-mount: the mount process exited before the mount was ready (status {status}); run with -f -v to see why");
            ExitCode::from(1)
        }
    }
}
