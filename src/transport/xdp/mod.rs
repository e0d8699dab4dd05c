//! The AF_XDP datagram path: wraith's UDP datagrams sent and received as raw Ethernet frames
//! through AF_XDP sockets (xsk-rs), with wraith's XDP filter steering only wraith's UDP port to
//! them. Packet-compatible with the UDP path: a peer on kernel UDP sockets sees ordinary UDP.
//!
//! What runs: one XDP program on the interface (`sys::xdp_prog`), one AF_XDP socket per bound
//! receive queue, each with its own UMEM split into a receive pool and a send pool (`rings`).
//! The UDP port is also bound by an ordinary socket that is never read: it reserves the port,
//! so the kernel neither gives it to another program nor answers with ICMP port-unreachable
//! for datagrams that reach the stack anyway (fragments, queues without a socket).
//!
//! IPv4 only for now: next hops come from the kernel's IPv4 tables (`neigh`).

pub mod blast;
pub mod neigh;
pub mod rings;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::packet::{self, Endpoints, Mac};
use super::{DatagramIo, RecvBufs};
use crate::proto::wire::{MAX_DATAGRAM, MIN_DATAGRAM};
use crate::sys::netdev::{self, NetDev};
use crate::sys::xdp_prog::{AttachError, XdpProgram};
use crate::sys::xsk::{self, Frame, XskConfig, XskRx, XskTx, XskView};
use rings::{PushError, Receiver, RxRing, Sender, TxRing};

pub use crate::sys::xdp_prog::XdpMode;

/// Frames per queue for receiving and for sending (4 KiB each: 16 MiB + 16 MiB of UMEM).
const RX_FRAMES: u32 = 4096;
const TX_FRAMES: u32 = 4096;
/// Frames taken from a ring per operation.
const RX_BATCH: usize = 64;
const TX_BATCH: usize = 64;
/// Room for a packet in a frame: the chunk less the kernel's XDP headroom.
const FRAME_ROOM: usize = xsk::FRAME_SIZE as usize - 256;
/// How long a send waits for frames to come back before giving up.
const SEND_WAIT: Duration = Duration::from_secs(2);
/// How long to wait for another wraith process to let go of the interface.
const OWNER_WAIT: Duration = Duration::from_secs(5);
/// How long a neighbour-table answer is trusted.
const NEIGH_TTL: Duration = Duration::from_secs(30);

/// What to open.
#[derive(Clone, Debug, Default)]
pub struct XdpOptions {
    pub iface: String,
    /// Receive queues to bind; None: every queue of the interface.
    pub queues: Option<Vec<u32>>,
    /// None: native, else generic.
    pub mode: Option<XdpMode>,
}

/// Why AF_XDP cannot start, in one line a person can act on.
#[derive(Debug)]
pub struct XdpError(String);

impl fmt::Display for XdpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for XdpError {}

fn privilege(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
}

/// Counters (for logs and the benchmark).
#[derive(Debug, Default)]
pub struct XdpStats {
    pub rx_frames: AtomicU64,
    pub rx_ignored: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_kicks: AtomicU64,
    /// Datagrams sent through the kernel's UDP socket (IPv6 peer not resolved yet).
    pub tx_kernel: AtomicU64,
}

struct Queue {
    rx: Mutex<Receiver<XskRx>>,
    /// Reads frames taken out of `rx` without its lock.
    view: XskView,
    tx: Mutex<Sender<XskTx>>,
}

#[derive(Default)]
struct Neighbours {
    /// From the kernel's neighbour table, with when it was read.
    table: HashMap<IpAddr, (Mac, Instant)>,
    /// Source addresses of frames that arrived, used when the table has no entry (and for
    /// IPv6, whose neighbour table has no `/proc` file).
    learned: HashMap<IpAddr, Mac>,
}

/// An AF_XDP datagram path on one interface and UDP port.
pub struct XdpIo {
    queues: Vec<Queue>,
    /// Duplicates of the sockets' fds, for poll(2) without taking the receive locks.
    poll_fds: Vec<OwnedFd>,
    dev: NetDev,
    local: SocketAddr,
    zero_copy: bool,
    next_tx: AtomicUsize,
    neigh: Mutex<Neighbours>,
    stats: XdpStats,
    /// Holds the UDP port in the kernel; also sends to an IPv6 peer whose Ethernet address is
    /// not known yet (the kernel resolves it; its answer over AF_XDP teaches it to us).
    reserve: UdpSocket,
    prog: XdpProgram,
}

impl RxRing for XskRx {
    type Frame = Frame;
    fn fill(&mut self, frames: &mut Vec<Frame>) -> usize {
        XskRx::fill(self, frames)
    }
    fn recv(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        XskRx::recv(self, out, max)
    }
    fn data<'a>(&'a self, f: &'a Frame) -> &'a [u8] {
        XskRx::data(self, f)
    }
}

impl TxRing for XskTx {
    type Frame = Frame;
    fn write(&self, f: &mut Frame, len: usize, write: impl FnOnce(&mut [u8])) -> bool {
        XskTx::write(self, f, len, write)
    }
    fn send(&mut self, frames: &mut Vec<Frame>) -> usize {
        XskTx::send(self, frames)
    }
    fn completed(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        XskTx::completed(self, out, max)
    }
    fn pending(&mut self) -> usize {
        XskTx::pending(self)
    }
    fn kick(&mut self) -> io::Result<()> {
        XskTx::kick(self)
    }
}

impl XdpIo {
    /// Open AF_XDP on `opts.iface` for UDP `bind` (port 0: pick one). An unspecified address
    /// answers on the interface's first IPv4 address (`0.0.0.0`) or first global IPv6 address
    /// (`::`).
    pub fn open(opts: &XdpOptions, bind: SocketAddr) -> Result<XdpIo, XdpError> {
        let iface = opts.iface.as_str();
        let err = |m: String| XdpError(m);
        let dev = netdev::netdev(iface).map_err(|e| match e.raw_os_error() {
            Some(libc::ENODEV) | Some(libc::ENXIO) => err(format!("interface {iface} does not exist in this network namespace")),
            _ => err(format!("cannot query interface {iface}: {e}")),
        })?;
        if !dev.up || !dev.running {
            return Err(err(format!("interface {iface} is down")));
        }
        if dev.mtu as usize + packet::ETH_LEN > FRAME_ROOM {
            return Err(err(format!(
                "interface {iface} has MTU {}; AF_XDP frames hold at most {} (lower the MTU)",
                dev.mtu,
                FRAME_ROOM - packet::ETH_LEN
            )));
        }
        let ip: IpAddr = match bind.ip() {
            IpAddr::V4(a) if a.is_unspecified() => {
                (*dev.ipv4.first().ok_or_else(|| err(format!("interface {iface} has no IPv4 address")))?).into()
            }
            IpAddr::V4(a) => {
                if !dev.ipv4.contains(&a) {
                    return Err(err(format!("address {a} is not on interface {iface}")));
                }
                a.into()
            }
            IpAddr::V6(a) => {
                let have = neigh::ipv6_addrs(iface).map_err(|e| err(format!("cannot read the IPv6 addresses of {iface}: {e}")))?;
                if a.is_unspecified() {
                    (*have.first().ok_or_else(|| err(format!("interface {iface} has no global IPv6 address")))?).into()
                } else if have.contains(&a) {
                    a.into()
                } else {
                    return Err(err(format!("address {a} is not a global address of interface {iface}")));
                }
            }
        };
        // Bound to the chosen address: what it sends (an IPv6 peer not resolved yet) leaves from
        // the address the AF_XDP socket answers on.
        let reserve_at = SocketAddr::new(ip, bind.port());
        let reserve = UdpSocket::bind(reserve_at).map_err(|e| err(format!("cannot reserve UDP {reserve_at}: {e}")))?;
        let port = reserve.local_addr().map_err(|e| err(e.to_string()))?.port();
        // A wraith process that is exiting (say, the mount just unmounted) still holds the
        // program for a moment: wait for it, bounded, before calling the interface taken.
        let deadline = Instant::now() + OWNER_WAIT;
        let attached = loop {
            match XdpProgram::attach(dev.index, port, opts.mode) {
                Err(AttachError::InUse { live_wraith: true, .. }) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => break r,
            }
        };
        let prog = attached.map_err(|e| match e {
            AttachError::Load(e) if privilege(&e) => {
                err("no privilege to load XDP programs (run as root, or with CAP_BPF and CAP_NET_ADMIN)".into())
            }
            AttachError::Load(e) => err(format!("the kernel refused wraith's XDP program: {e}")),
            AttachError::InUse { prog_id, name, live_wraith: true } => err(format!(
                "interface {iface} already runs wraith's XDP program (id {prog_id}, '{name}') for another running process"
            )),
            AttachError::InUse { prog_id, name, .. } => err(format!(
                "interface {iface} already has XDP program '{name}' (id {prog_id}); wraith will not replace it"
            )),
            AttachError::Attach { mode, err: e } => {
                err(format!("the driver of {iface} refused XDP in {} mode: {e}", mode.name()))
            }
        })?;
        let mode = prog.mode();
        if let Some(id) = prog.replaced_stale() {
            tracing::warn!(iface, prog_id = id, "replaced a stale wraith XDP program left by an earlier run");
        }
        let ids: Vec<u32> = opts.queues.clone().unwrap_or_else(|| (0..dev.rx_queues).collect());
        let mut queues = Vec::new();
        let mut poll_fds = Vec::new();
        let mut zero_copy = true;
        for &q in &ids {
            let cfg = XskConfig { queue: q, rx_frames: RX_FRAMES, tx_frames: TX_FRAMES, mode };
            let s = xsk::open(iface, cfg).map_err(|e| {
                if privilege(&e) {
                    err("no privilege to open AF_XDP sockets (run as root, or with CAP_NET_RAW)".into())
                } else {
                    err(format!("cannot bind an AF_XDP socket to {iface} queue {q}: {e}"))
                }
            })?;
            prog.register_socket(q, s.rx.fd()).map_err(|e| err(format!("cannot register the AF_XDP socket: {e}")))?;
            zero_copy &= s.zero_copy;
            poll_fds.push(s.rx.fd().try_clone_to_owned().map_err(|e| err(format!("dup: {e}")))?);
            queues.push(Queue {
                view: s.rx.view(),
                rx: Mutex::new(Receiver::new(s.rx, s.rx_frames)),
                tx: Mutex::new(Sender::new(s.tx, s.tx_frames)),
            });
        }
        if queues.is_empty() {
            return Err(err("no queue to bind".into()));
        }
        Ok(XdpIo {
            queues,
            poll_fds,
            dev,
            local: SocketAddr::new(ip, port),
            zero_copy,
            next_tx: AtomicUsize::new(0),
            neigh: Mutex::new(Neighbours::default()),
            stats: XdpStats::default(),
            reserve,
            prog,
        })
    }

    /// One line saying what runs, for the log and the user.
    pub fn describe(&self) -> String {
        format!(
            "AF_XDP on {} ({} queue(s), {} mode, {}), address {}, MTU {}, XDP filter on udp port {}",
            self.dev.name,
            self.queues.len(),
            self.prog.mode().name(),
            if self.zero_copy { "zero-copy" } else { "copy" },
            self.local.ip(),
            self.dev.mtu,
            self.local.port()
        )
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn stats(&self) -> &XdpStats {
        &self.stats
    }

    /// Largest wraith datagram this path carries without fragmentation.
    pub fn max_datagram(&self) -> usize {
        let ip_udp = packet::header_len(self.local.is_ipv6()) - packet::ETH_LEN;
        (self.dev.mtu as usize).min(FRAME_ROOM - packet::ETH_LEN).saturating_sub(ip_udp).clamp(MIN_DATAGRAM, MAX_DATAGRAM)
    }

    /// A client's path to `peer`: on `opts.iface`, or (empty) on the interface the kernel's
    /// route to `peer` uses; an ephemeral port; the next hop resolved before returning.
    pub fn open_client(opts: &XdpOptions, peer: SocketAddr) -> Result<XdpIo, XdpError> {
        let mut opts = opts.clone();
        let any: SocketAddr = match peer {
            SocketAddr::V4(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
        };
        // The source address the kernel would pick for `peer` (its rules: scope, longest
        // matching prefix, no deprecated or tentative addresses), so that both paths agree.
        let src = UdpSocket::bind(any)
            .and_then(|s| s.connect(peer).and_then(|()| s.local_addr()))
            .map_err(|e| XdpError(format!("no source address for {peer}: {e}")))?;
        if opts.iface.is_empty() {
            opts.iface = match peer.ip() {
                IpAddr::V4(a) => neigh::next_hop(a, None).map(|h| h.1),
                IpAddr::V6(a) => neigh::next_hop6(a, None).map(|h| h.1),
            }
            .map_err(|e| XdpError(e.to_string()))?;
        }
        let io = XdpIo::open(&opts, SocketAddr::new(src.ip(), 0))?;
        io.resolve_peer(peer, Duration::from_secs(3))?;
        Ok(io)
    }

    /// Resolve `peer`'s next hop now (a client does this before its first datagram), so that a
    /// missing route or neighbour shows up as an error at start rather than as silence.
    pub fn resolve_peer(&self, peer: SocketAddr, wait: Duration) -> Result<(), XdpError> {
        if peer.is_ipv6() != self.local.is_ipv6() {
            return Err(XdpError(format!("{peer} and this AF_XDP socket's address {} are of different IP versions", self.local.ip())));
        }
        match peer.ip() {
            IpAddr::V4(p) => {
                let (hop, _) = neigh::next_hop(p, Some(&self.dev.name)).map_err(|e| XdpError(e.to_string()))?;
                let mac = neigh::resolve(hop, &self.dev.name, wait).map_err(|e| XdpError(e.to_string()))?;
                self.neigh.lock().unwrap().table.insert(peer.ip(), (mac, Instant::now()));
            }
            // No neighbour table to read: check the route; the first datagrams go through the
            // kernel, which resolves the next hop, and the answer teaches us its address.
            IpAddr::V6(p) => {
                neigh::next_hop6(p, Some(&self.dev.name)).map_err(|e| XdpError(e.to_string()))?;
            }
        }
        Ok(())
    }

    /// The Ethernet address to send to `ip` with; None: not known (IPv6), send through the kernel.
    fn mac_for(&self, ip: IpAddr) -> io::Result<Option<Mac>> {
        let mut n = self.neigh.lock().unwrap();
        if let Some((m, t)) = n.table.get(&ip) {
            if t.elapsed() < NEIGH_TTL {
                return Ok(Some(*m));
            }
        }
        let IpAddr::V4(v4) = ip else {
            return Ok(n.learned.get(&ip).copied());
        };
        let hop = neigh::next_hop(v4, Some(&self.dev.name)).map(|(h, _)| h).unwrap_or(v4);
        if let Ok(Some(m)) = neigh::cached_mac(hop, &self.dev.name) {
            n.table.insert(ip, (m, Instant::now()));
            return Ok(Some(m));
        }
        if let Some((m, _)) = n.table.get(&ip) {
            return Ok(Some(*m)); // the kernel dropped the entry; the last answer is still our best
        }
        n.learned.get(&ip).copied().map(Some).ok_or_else(|| {
            io::Error::new(io::ErrorKind::HostUnreachable, format!("no Ethernet address known for {ip}"))
        })
    }

    fn learn(&self, ip: IpAddr, mac: Mac) {
        let mut n = self.neigh.lock().unwrap();
        if n.learned.get(&ip) != Some(&mac) {
            n.learned.insert(ip, mac);
        }
    }

    fn lock_tx(&self) -> MutexGuard<'_, Sender<XskTx>> {
        let n = self.queues.len();
        let start = self.next_tx.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            if let Ok(g) = self.queues[(start + i) % n].tx.try_lock() {
                return g;
            }
        }
        self.queues[start].tx.lock().unwrap()
    }

    fn send_impl(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
        if dest.is_ipv6() != self.local.is_ipv6() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("{dest} is not of this AF_XDP socket's IP version")));
        }
        let seg = seg.max(1);
        let Some(dst_mac) = self.mac_for(dest.ip())? else {
            for d in buf.chunks(seg) {
                self.reserve.send_to(d, dest)?;
            }
            self.stats.tx_kernel.fetch_add(buf.len().div_ceil(seg) as u64, Ordering::Relaxed);
            return Ok(());
        };
        let ep = Endpoints { src_mac: self.dev.mac, dst_mac, src: self.local, dst: dest };
        let hl = packet::header_len(dest.is_ipv6());
        let mut tx = self.lock_tx();
        tx.reclaim();
        let deadline = Instant::now() + SEND_WAIT;
        let mut kicks = 0u64;
        let mut sent = 0u64;
        for d in buf.chunks(seg) {
            loop {
                let r = tx.push(hl + d.len(), |b| {
                    b[hl..].copy_from_slice(d);
                    let w = packet::write_headers(b, &ep, d.len());
                    debug_assert_eq!(w, Ok(b.len()));
                });
                match r {
                    Ok(()) => break,
                    Err(PushError::TooBig) => {
                        return Err(io::Error::new(io::ErrorKind::InvalidInput, "datagram larger than an AF_XDP frame"));
                    }
                    Err(PushError::NoFrame) => {
                        tx.submit()?;
                        kicks += 1;
                        if tx.reclaim() == 0 {
                            if Instant::now() >= deadline {
                                tx.discard_queued();
                                return Err(io::Error::new(io::ErrorKind::WouldBlock, "AF_XDP send ring stuck"));
                            }
                            std::thread::yield_now();
                        }
                    }
                }
            }
            sent += 1;
            if tx.queued() >= TX_BATCH {
                tx.submit()?;
                kicks += 1;
            }
        }
        // In copy mode the kernel transmits only inside the wake-up call, a bounded number of
        // frames per call: keep calling until the ring is empty. Zero-copy drivers drain it.
        loop {
            tx.submit()?;
            kicks += 1;
            tx.reclaim();
            if tx.queued() == 0 && (self.zero_copy || tx.pending() == 0) {
                break;
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "AF_XDP send ring did not drain"));
            }
        }
        self.stats.tx_frames.fetch_add(sent, Ordering::Relaxed);
        self.stats.tx_kicks.fetch_add(kicks, Ordering::Relaxed);
        Ok(())
    }

    /// Frames are taken out of the rx ring under its lock and handed to `f` (which checks each
    /// datagram's MAC, the costly part) without it, so that every receiving thread works on its
    /// own batch at once; then they go back to the fill ring.
    fn recv_impl(&self, f: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        let mut total = 0;
        let mut ignored = 0u64;
        let mut last_src: Option<(IpAddr, Mac)> = None;
        let mut frames = TAKEN.with(|t| std::mem::take(&mut *t.borrow_mut()));
        for q in &self.queues {
            for _ in 0..16 {
                let got = q.rx.lock().unwrap().take(&mut frames, RX_BATCH);
                for fr in frames.iter_mut() {
                    let (src, at) = match packet::parse(q.view.data(fr)) {
                        Ok(d) if d.dst.port() == self.local.port() && d.dst.ip() == self.local.ip() => {
                            if last_src != Some((d.src.ip(), d.src_mac)) {
                                self.learn(d.src.ip(), d.src_mac);
                                last_src = Some((d.src.ip(), d.src_mac));
                            }
                            let start = d.payload.as_ptr() as usize - q.view.data(fr).as_ptr() as usize;
                            (d.src, start..start + d.payload.len())
                        }
                        _ => {
                            ignored += 1;
                            continue;
                        }
                    };
                    // Decrypted where it lies, in the frame this thread holds.
                    f(src, &mut q.view.data_mut(fr)[at]);
                }
                if got > 0 {
                    q.rx.lock().unwrap().give_back(&mut frames);
                }
                total += got;
                if got < RX_BATCH {
                    break;
                }
            }
        }
        TAKEN.with(|t| *t.borrow_mut() = frames);
        self.stats.rx_frames.fetch_add(total as u64, Ordering::Relaxed);
        if ignored > 0 {
            self.stats.rx_ignored.fetch_add(ignored, Ordering::Relaxed);
        }
        Ok(total)
    }
}

thread_local! {
    /// Each receiving thread's batch of frames taken out of an rx ring (kept to reuse its memory).
    static TAKEN: std::cell::RefCell<Vec<Frame>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl DatagramIo for XdpIo {
    fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
        self.send_impl(dest, buf, seg)
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        // poll(2) on an AF_XDP socket is also the fill ring's wake-up. The fds are duplicates,
        // so waiting takes no lock and another thread can receive meanwhile.
        let fds: Vec<_> = self.poll_fds.iter().map(|f| f.as_fd()).collect();
        netdev::poll_any_readable(&fds, timeout)
    }
    /// `_bufs` is unused: frames are received in the UMEM and handed to `f` from there.
    fn recv_now(&self, _bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8])) -> io::Result<usize> {
        self.recv_impl(f)
    }
    fn describe_stats(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        format!(
            "xdp_rx_frames {}\nxdp_rx_ignored {}\nxdp_tx_frames {}\nxdp_tx_kicks {}\nxdp_tx_through_kernel {}\n",
            g(&s.rx_frames),
            g(&s.rx_ignored),
            g(&s.tx_frames),
            g(&s.tx_kicks),
            g(&s.tx_kernel)
        )
    }
}
