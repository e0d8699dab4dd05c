//! wraith-serve: export directories by name over the wraith protocol.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use wraith::cli;
use wraith::serve::{self, export::parse_export_spec, ServeConfig};
use wraith::transport::xdp::{XdpIo, XdpMode, XdpOptions};

#[derive(Parser)]
#[command(name = "wraith-serve", version, about = "Export directories read-only over the wraith protocol")]
struct Args {
    /// NAME=PATH[,chunk=SIZE]: export PATH as share NAME (repeatable). chunk: power of two, 1K..16M, default 256K.
    #[arg(long = "export", short = 'e', required_unless_present_any = ["xdp_blast_send", "xdp_blast_recv"])]
    exports: Vec<String>,
    /// Address and UDP port to listen on.
    #[arg(long, default_value = "[::]:7447")]
    listen: SocketAddr,
    /// Pre-shared key file (64 hex chars); created with mode 0600 when missing.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Where file hashes are kept between runs.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Serve over AF_XDP on this interface (wraith's XDP filter takes only wraith's UDP port;
    /// everything else still reaches the kernel). Exits with a one-line reason if it cannot.
    #[arg(long, value_name = "IFACE")]
    xdp: Option<String>,
    /// With --xdp: receive queues to bind, e.g. 0,1 (default: every queue of the interface).
    #[arg(long, value_name = "Q,Q,...", value_delimiter = ',', requires = "xdp")]
    xdp_queues: Option<Vec<u32>>,
    /// With --xdp: where the XDP program runs: native (driver), generic (skb), or auto.
    #[arg(long, value_name = "MODE", default_value = "auto", requires = "xdp")]
    xdp_mode: String,
    /// Benchmark only: instead of serving, send raw datagrams to this IP:PORT (with --xdp:
    /// over AF_XDP, else over UDP) for --xdp-blast-secs.
    #[arg(long, hide = true, value_name = "IP:PORT")]
    xdp_blast_send: Option<SocketAddr>,
    /// Benchmark only: instead of serving, count raw datagrams arriving on --listen.
    #[arg(long, hide = true)]
    xdp_blast_recv: bool,
    #[arg(long, hide = true, default_value_t = 5)]
    xdp_blast_secs: u64,
    #[arg(long, hide = true, default_value_t = 1472)]
    xdp_blast_size: usize,
    /// Benchmark only: sender threads (an AF_XDP path spreads them over its queues).
    #[arg(long, hide = true, default_value_t = 1)]
    xdp_blast_threads: usize,
    /// Worker threads answering requests.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// More logging (-v, -vv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,
}

fn default_dir(system: &str, user_env: &str, user_sub: &str) -> PathBuf {
    if is_root() {
        PathBuf::from(system)
    } else if let Some(d) = std::env::var_os(user_env) {
        PathBuf::from(d).join("wraith")
    } else {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| ".".into())).join(user_sub).join("wraith")
    }
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

fn xdp_mode(m: &str) -> Result<Option<XdpMode>, String> {
    match m {
        "auto" => Ok(None),
        "native" => Ok(Some(XdpMode::Native)),
        "generic" => Ok(Some(XdpMode::Generic)),
        m => Err(format!("--xdp-mode {m}: expected auto, native or generic")),
    }
}

/// The hidden raw-throughput mode used by scripts/bench-xdp.
fn blast(args: &Args) -> ExitCode {
    use wraith::transport::{xdp::blast, DatagramIo, UdpIo};
    let fail = |msg: String| {
        eprintln!("wraith-serve: {msg}");
        ExitCode::from(1)
    };
    let io: Box<dyn DatagramIo> = match &args.xdp {
        Some(iface) => {
            let mode = match xdp_mode(&args.xdp_mode) {
                Ok(m) => m,
                Err(m) => return fail(m),
            };
            let opts = XdpOptions { iface: iface.clone(), queues: args.xdp_queues.clone(), mode };
            let io = match XdpIo::open(&opts, args.listen) {
                Ok(io) => io,
                Err(e) => return fail(format!("AF_XDP unavailable: {e}")),
            };
            if let Some(d) = args.xdp_blast_send {
                if let Err(e) = io.resolve_peer(d, std::time::Duration::from_secs(3)) {
                    return fail(e.to_string());
                }
            }
            eprintln!("wraith-serve: blast over {}", io.describe());
            Box::new(io)
        }
        None => match std::net::UdpSocket::bind(args.listen).and_then(UdpIo::new) {
            Ok(io) => Box::new(io),
            Err(e) => return fail(format!("cannot bind {}: {e}", args.listen)),
        },
    };
    let secs = std::time::Duration::from_secs(args.xdp_blast_secs);
    let r = match args.xdp_blast_send {
        Some(d) => blast::send(&*io, d, args.xdp_blast_size, secs, args.xdp_blast_threads),
        None => blast::receive(&*io, std::time::Duration::from_secs(1), secs + std::time::Duration::from_secs(30)),
    };
    match r {
        Ok(r) => {
            println!("{} datagrams {} bytes {:.3} s {:.0} MB/s", r.datagrams, r.bytes, r.secs, r.mb_per_s());
            ExitCode::SUCCESS
        }
        Err(e) => fail(format!("blast: {e}")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    wraith::logging::init(args.verbose, false);
    let fail = |msg: String| {
        eprintln!("wraith-serve: {msg}");
        ExitCode::from(1)
    };
    if args.xdp_blast_send.is_some() || args.xdp_blast_recv {
        return blast(&args);
    }
    let mut exports = Vec::new();
    for e in &args.exports {
        match parse_export_spec(e) {
            Ok(s) => exports.push(s),
            Err(m) => return fail(m),
        }
    }
    let key_path = args.key.unwrap_or_else(|| default_dir("/etc/wraith", "XDG_CONFIG_HOME", ".config").join("wraith.key"));
    let psk = match cli::load_or_create_key(&key_path) {
        Ok((k, created)) => {
            if created {
                eprintln!("wraith-serve: created key file {} (copy it to each client, mode 0600)", key_path.display());
            } else {
                eprintln!("wraith-serve: using key file {}", key_path.display());
            }
            k
        }
        Err(m) => return fail(m),
    };
    let state_dir = args.state_dir.unwrap_or_else(|| default_dir("/var/lib/wraith", "XDG_STATE_HOME", ".local/state"));
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
            return fail(format!("cannot install signal handler: {e}"));
        }
    }
    let names: Vec<String> = exports.iter().map(|e| format!("{}={}", e.name, e.path.display())).collect();
    let cfg = ServeConfig { exports, listen: args.listen, psk, state_dir, workers: args.workers };
    let result = match &args.xdp {
        None => {
            tracing::info!(listen = %args.listen, exports = ?names, "serving");
            eprintln!("wraith-serve: listening on udp {} exporting {}", args.listen, names.join(", "));
            serve::run(cfg, stop)
        }
        Some(iface) => {
            let mode = match xdp_mode(&args.xdp_mode) {
                Ok(m) => m,
                Err(m) => return fail(m),
            };
            let handler = match serve::handler(&cfg) {
                Ok(h) => h,
                Err(e) => return fail(e.to_string()),
            };
            let opts = XdpOptions { iface: iface.clone(), queues: args.xdp_queues.clone(), mode };
            let io = match XdpIo::open(&opts, args.listen) {
                Ok(io) => io,
                Err(e) => return fail(format!("AF_XDP unavailable: {e}")),
            };
            tracing::info!(listen = %io.local_addr(), exports = ?names, what = %io.describe(), "serving");
            eprintln!("wraith-serve: {}; exporting {}", io.describe(), names.join(", "));
            let io = std::sync::Arc::new(io);
            let r = serve::serve_io(io.clone(), handler, cfg.psk, cfg.workers, stop);
            let st = io.stats();
            use std::sync::atomic::Ordering::Relaxed;
            tracing::info!(
                rx = st.rx_frames.load(Relaxed),
                rx_ignored = st.rx_ignored.load(Relaxed),
                tx = st.tx_frames.load(Relaxed),
                kicks = st.tx_kicks.load(Relaxed),
                tx_through_kernel = st.tx_kernel.load(Relaxed),
                "AF_XDP totals"
            );
            drop(io); // detaches the XDP program
            r
        }
    };
    match result {
        Ok(()) => {
            eprintln!("wraith-serve: stopped");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.to_string()),
    }
}
