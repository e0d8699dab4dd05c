//! The AF_XDP datagram path: wraith's UDP datagrams sent and received as raw Ethernet frames
//! through AF_XDP sockets (xsk-rs), with wraith's XDP filter steering only wraith's UDP port to
//! them. Packet-compatible with the UDP path: a peer on kernel UDP sockets sees ordinary UDP.
//!
//! What runs: one XDP program on the interface (`sys::xdp_prog`), one AF_XDP socket per bound
//! receive queue, each with its own UMEM split into a receive pool and a send pool (`rings`).
//! The UDP port is also bound by an ordinary kernel socket, the *kernel path*: it reserves the
//! port, receives what the filter leaves to the kernel (fragments, IPv6 with extension headers,
//! frames on a queue without an AF_XDP socket), and sends to peers this interface cannot reach
//! directly or whose Ethernet address is not known yet (the kernel routes and resolves them).
//!
//! One path may serve both IP families (an unspecified IPv6 bind address: the interface's first
//! IPv4 and first global IPv6 address), like a dual-stack UDP socket. With an unspecified bind
//! address the kernel path holds the wildcard and serves the machine's other addresses, each
//! answered from the address it was sent to.

pub mod blast;
pub mod neigh;
pub mod rings;
pub mod rtnl;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::packet::{self, Endpoints, Mac};
use super::{bounded_insert, udp, DatagramIo, RecvBufs, UdpIo};
use crate::proto::wire::{MAX_DATAGRAM, MIN_DATAGRAM};
use crate::sys::netdev::{self, NetDev};
use crate::sys::xdp_prog::{AttachError, Filter, XdpProgram, MAX_QUEUES};
use crate::sys::xsk::{self, Frame, XskConfig, XskRx, XskTx, XskView};
use rings::{PushError, Receiver, RxRing, Sender, Taken, TxRing};

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
    /// Datagrams sent through the kernel path (peer not on this link, or its Ethernet address
    /// not known yet).
    pub tx_kernel: AtomicU64,
    /// Datagrams received through the kernel path (what the filter left to the kernel).
    pub rx_kernel: AtomicU64,
}

struct Queue {
    rx: Mutex<Receiver<XskRx>>,
    /// Reads frames taken out of `rx` without its lock.
    view: XskView,
    tx: Mutex<Sender<XskTx>>,
}

/// How to reach a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hop {
    /// Straight out of this interface, to this Ethernet address.
    Link(Mac),
    /// Through the kernel's socket: the route leaves through another interface, or the
    /// Ethernet address is not known yet (the kernel resolves it; the answer teaches us).
    Kernel,
}

/// What the kernel's tables say about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The route leaves through another interface (or there is none).
    Elsewhere,
    /// Through this interface; the next hop's Ethernet address if the neighbour table has it.
    OnLink(Option<Mac>),
}

#[derive(Default)]
struct Neighbours {
    /// What the kernel's tables said for each peer (address and port: rules may match on
    /// ports), with when they were read.
    table: HashMap<SocketAddr, (Route, Instant)>,
    /// Source addresses of authentic datagrams that arrived over AF_XDP, used before the table
    /// (they are what answered last).
    learned: HashMap<IpAddr, Mac>,
}

/// An AF_XDP datagram path on one interface and UDP port.
pub struct XdpIo {
    queues: Vec<Queue>,
    /// Duplicates of the sockets' fds (and the kernel path's), for poll(2) without taking the
    /// receive locks.
    poll_fds: Vec<OwnedFd>,
    dev: NetDev,
    /// The addresses served, at least one of them.
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    port: u16,
    zero_copy: bool,
    next_tx: AtomicUsize,
    neigh: Mutex<Neighbours>,
    stats: XdpStats,
    /// The kernel path (see the module documentation); non-blocking. On a wildcard bind
    /// address it also serves the machine's other addresses, answering from the one sent to.
    reserve: UdpIo,
    /// The kernel path is a dual-stack socket: IPv4 peers are v4-mapped IPv6 addresses to it.
    reserve_v6: bool,
    /// A wait saw the kernel path readable: the next receive reads it (it is rarely used, so
    /// it is not read on every call).
    kernel_ready: AtomicBool,
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
        let (v4, v6) = local_addresses(iface, &dev, bind.ip())?;
        // The kernel path holds the port: on the one address asked for, or, for a wildcard bind
        // address, on the wildcard (dual-stack for `::`), as a UDP server would. Then datagrams
        // to the machine's other addresses (which the filter leaves to the kernel) are served
        // through it, answered from the address they were sent to; what it sends for the
        // AF_XDP path's own peers leaves from the address served.
        let reserve_at: SocketAddr = match (bind.ip().is_unspecified(), v4, v6) {
            (true, ..) => bind,
            (false, Some(a), None) => (a, bind.port()).into(),
            (false, None, Some(a)) => (a, bind.port()).into(),
            (false, ..) => (Ipv6Addr::UNSPECIFIED, bind.port()).into(),
        };
        let reserve = reserve_socket(reserve_at)
            .and_then(UdpIo::new)
            .map_err(|e| err(format!("cannot bind UDP {reserve_at}: {e}")))?;
        let port = reserve.socket().local_addr().map_err(|e| err(e.to_string()))?.port();
        let reserve_v6 = reserve_at.is_ipv6();
        // A wraith process that is exiting (say, the mount just unmounted) still holds the
        // program for a moment: wait for it, bounded, before calling the interface taken.
        let deadline = Instant::now() + OWNER_WAIT;
        let attached = loop {
            match XdpProgram::attach(dev.index, Filter { port, v4, v6 }, opts.mode) {
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
        if let Some(q) = ids.iter().find(|&&q| q >= MAX_QUEUES) {
            return Err(err(format!("queue {q} of {iface}: wraith binds queues 0 to {} (choose some with --xdp-queues)", MAX_QUEUES - 1)));
        }
        let mut queues = Vec::new();
        let mut poll_fds = Vec::new();
        let mut zero_copy = true;
        for &q in &ids {
            let cfg = XskConfig { queue: q, rx_frames: RX_FRAMES, tx_frames: TX_FRAMES, mode };
            let s = xsk::open(iface, cfg).map_err(|e| {
                if privilege(&e) {
                    err("no privilege to open AF_XDP sockets (run as root, or with CAP_NET_RAW)".into())
                } else if e.raw_os_error() == Some(libc::ENOBUFS) || e.raw_os_error() == Some(libc::ENOMEM) {
                    err(format!(
                        "cannot lock the {} MiB of AF_XDP frame memory for {iface} queue {q}: the memory lock limit is too low (run with CAP_IPC_LOCK, or raise RLIMIT_MEMLOCK / LimitMEMLOCK=)",
                        ((RX_FRAMES + TX_FRAMES) as u64 * xsk::FRAME_SIZE as u64) >> 20
                    ))
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
        poll_fds.push(reserve.socket().try_clone().map_err(|e| err(format!("dup: {e}")))?.into());
        Ok(XdpIo {
            queues,
            poll_fds,
            dev,
            v4,
            v6,
            port,
            zero_copy,
            next_tx: AtomicUsize::new(0),
            neigh: Mutex::new(Neighbours::default()),
            stats: XdpStats::default(),
            reserve,
            reserve_v6,
            kernel_ready: AtomicBool::new(false),
            prog,
        })
    }

    /// One line saying what runs, for the log and the user.
    pub fn describe(&self) -> String {
        let addrs: Vec<String> = self.v4.map(IpAddr::from).into_iter().chain(self.v6.map(IpAddr::from)).map(|a| a.to_string()).collect();
        format!(
            "AF_XDP on {} ({} queue(s), {} mode, {}), address {}, MTU {}, XDP filter on udp port {}",
            self.dev.name,
            self.queues.len(),
            self.prog.mode().name(),
            if self.zero_copy { "zero-copy" } else { "copy" },
            addrs.join(" and "),
            self.dev.mtu,
            self.port
        )
    }

    /// The address served (the IPv4 one when both families are).
    pub fn local_addr(&self) -> SocketAddr {
        let ip: IpAddr = self.v4.map(IpAddr::from).or(self.v6.map(IpAddr::from)).expect("an address is served");
        SocketAddr::new(ip, self.port)
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        match ip {
            IpAddr::V4(a) => self.v4 == Some(a),
            IpAddr::V6(a) => self.v6 == Some(a),
        }
    }

    /// The source address for datagrams to `dest`, None when its family is not served.
    fn source_for(&self, dest: SocketAddr) -> Option<SocketAddr> {
        let ip: IpAddr = match dest {
            SocketAddr::V4(_) => self.v4?.into(),
            SocketAddr::V6(_) => self.v6?.into(),
        };
        Some(SocketAddr::new(ip, self.port))
    }

    pub fn stats(&self) -> &XdpStats {
        &self.stats
    }

    /// Largest wraith datagram this path carries without fragmentation (for the larger IP
    /// header when both families are served).
    pub fn max_datagram(&self) -> usize {
        let ip_udp = packet::header_len(self.v6.is_some()) - packet::ETH_LEN;
        (self.dev.mtu as usize).min(FRAME_ROOM - packet::ETH_LEN).saturating_sub(ip_udp).clamp(MIN_DATAGRAM, MAX_DATAGRAM)
    }

    /// A client's path to `peer`: on `opts.iface`, or (empty) on the interface the kernel's
    /// route to `peer` uses; an ephemeral port; the next hop resolved before returning.
    pub fn open_client(opts: &XdpOptions, peer: SocketAddr) -> Result<XdpIo, XdpError> {
        let mut opts = opts.clone();
        // The source address the kernel would pick for `peer` (its rules: scope, longest
        // matching prefix, no deprecated or tentative addresses), so that both paths agree.
        let src = super::connected_socket(peer)
            .and_then(|s| s.local_addr())
            .map_err(|e| XdpError(format!("no source address for {peer}: {e}")))?;
        if opts.iface.is_empty() {
            // Our port is not known yet: rules on the source port are followed from the first send.
            let (_, oif) = neigh::next_hop(peer, Some(SocketAddr::new(src.ip(), 0)), None).map_err(|e| XdpError(e.to_string()))?;
            opts.iface = netdev::ifname(oif).map_err(|e| XdpError(format!("the route to {peer} leaves through interface #{oif}: {e}")))?;
        }
        let io = XdpIo::open(&opts, SocketAddr::new(src.ip(), 0))?;
        io.resolve_peer(peer, Duration::from_secs(3))?;
        Ok(io)
    }

    /// Resolve `peer`'s next hop now (a client does this before its first datagram), so that a
    /// missing route or neighbour shows up as an error at start rather than as silence.
    pub fn resolve_peer(&self, peer: SocketAddr, wait: Duration) -> Result<(), XdpError> {
        let Some(src) = self.source_for(peer) else {
            return Err(XdpError(format!("{peer} is of an IP version this AF_XDP socket ({}) does not serve", self.local_addr().ip())));
        };
        let (hop, _) = neigh::next_hop(peer, Some(src), Some(self.dev.index)).map_err(|e| XdpError(e.to_string()))?;
        let mac = neigh::resolve(hop, Some(src.ip()), self.dev.index, wait).map_err(|e| XdpError(e.to_string()))?;
        let mut n = self.neigh.lock().unwrap();
        bounded_insert(&mut n.table, peer, (Route::OnLink(Some(mac)), Instant::now()));
        Ok(())
    }

    /// How to send to `peer`. The kernel's tables are read at most every [`NEIGH_TTL`] per peer,
    /// without holding the lock (the senders and the receive path's `learn` take it; the kernel
    /// may be slow to answer); meanwhile other senders use the last answer. The source address
    /// of authentic frames from the peer's address comes first (it is what answered last).
    fn hop_for(&self, peer: SocketAddr) -> Hop {
        let ip = peer.ip();
        let cached = {
            let mut n = self.neigh.lock().unwrap();
            let cached = n.table.get(&peer).copied();
            match cached {
                Some((r, t)) if t.elapsed() < NEIGH_TTL => return Self::hop(&n, ip, r),
                // This sender asks the kernel; the others keep the last answer until it has.
                Some((r, _)) => bounded_insert(&mut n.table, peer, (r, Instant::now())),
                None => {}
            }
            cached
        };
        let dev = self.dev.index;
        let mut r = match neigh::next_hop(peer, self.source_for(peer), Some(dev)) {
            Ok((hop, _)) => Route::OnLink(neigh::cached_mac(hop, dev).ok().flatten()),
            Err(neigh::NeighError::NoRoute { .. }) => Route::Elsewhere,
            Err(_) => Route::OnLink(None),
        };
        // The kernel dropped its entry (our frames bypass it, so it is not refreshed): the last
        // answer is still the best.
        if let (Route::OnLink(None), Some((Route::OnLink(Some(m)), _))) = (r, cached) {
            r = Route::OnLink(Some(m));
        }
        let mut n = self.neigh.lock().unwrap();
        bounded_insert(&mut n.table, peer, (r, Instant::now()));
        Self::hop(&n, ip, r)
    }

    fn hop(n: &Neighbours, ip: IpAddr, route: Route) -> Hop {
        match route {
            Route::Elsewhere => Hop::Kernel,
            Route::OnLink(mac) => n.learned.get(&ip).copied().or(mac).map_or(Hop::Kernel, Hop::Link),
        }
    }

    /// Remember where an authentic datagram from `ip` came from.
    fn learn(&self, ip: IpAddr, mac: Mac) {
        let mut n = self.neigh.lock().unwrap();
        if n.learned.get(&ip) != Some(&mac) {
            bounded_insert(&mut n.learned, ip, mac);
        }
    }

    /// Wait on the sockets of `queues` and on the kernel path's socket.
    fn wait_on(&self, queues: &[usize], timeout: Duration) -> io::Result<bool> {
        // poll(2) on an AF_XDP socket is also the fill ring's wake-up. The fds are duplicates,
        // so waiting takes no lock and another thread can receive meanwhile.
        let mut fds: Vec<_> = queues.iter().map(|&q| self.poll_fds[q].as_fd()).collect();
        // The kernel path's fd is the last one.
        fds.push(self.poll_fds[self.queues.len()].as_fd());
        let (any, kernel) = netdev::poll_readable_last(&fds, timeout)?;
        if kernel {
            self.kernel_ready.store(true, Ordering::Relaxed);
        }
        Ok(any)
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
        let seg = seg.max(1);
        // A peer that sent to another address of this machine is answered through the kernel,
        // from that address.
        if let Some(ip) = self.reserve.source_for(self.kernel_addr(dest)) {
            if !self.is_local(ip.to_canonical()) {
                return self.send_through_kernel(dest, buf, seg, ip);
            }
        }
        let Some(src) = self.source_for(dest) else {
            return Err(io::Error::new(io::ErrorKind::Unsupported, format!("{dest} is of an IP version this AF_XDP path does not serve")));
        };
        let dst_mac = match self.hop_for(dest) {
            Hop::Link(m) => m,
            Hop::Kernel => return self.send_through_kernel(dest, buf, seg, src.ip()),
        };
        let ep = Endpoints { src_mac: self.dev.mac, dst_mac, src, dst: dest };
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
                            // Nothing came back from the kernel: wait a little, as below,
                            // rather than spin on a core for the whole deadline.
                            std::thread::sleep(Duration::from_micros(50));
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
        // When a call moves nothing (the link is down, the driver's queue is full), wait a
        // little before the next instead of spinning.
        loop {
            tx.submit()?;
            kicks += 1;
            let back = tx.reclaim();
            if tx.queued() == 0 && (self.zero_copy || tx.pending() == 0) {
                break;
            }
            if Instant::now() >= deadline {
                // Frames the tx ring did not take are dropped here; those already on the ring
                // go out with a later kick.
                tx.discard_queued();
                return Err(io::Error::new(io::ErrorKind::WouldBlock, "AF_XDP send ring did not drain (is the link up?)"));
            }
            if back == 0 {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        self.stats.tx_frames.fetch_add(sent, Ordering::Relaxed);
        self.stats.tx_kicks.fetch_add(kicks, Ordering::Relaxed);
        Ok(())
    }

    /// `addr` as the kernel path's socket names it: v4-mapped on a dual-stack socket.
    fn kernel_addr(&self, addr: SocketAddr) -> SocketAddr {
        match addr {
            SocketAddr::V4(a) if self.reserve_v6 => SocketAddr::new(a.ip().to_ipv6_mapped().into(), a.port()),
            a => a,
        }
    }

    /// Send through the kernel path (it routes and resolves the next hop itself), from `src`.
    fn send_through_kernel(&self, dest: SocketAddr, buf: &[u8], seg: usize, src: IpAddr) -> io::Result<()> {
        let src = match src {
            IpAddr::V4(a) if self.reserve_v6 => IpAddr::V6(a.to_ipv6_mapped()),
            a => a,
        };
        self.reserve.send_burst_from(self.kernel_addr(dest), buf, seg, Some(src))?;
        self.stats.tx_kernel.fetch_add(buf.len().div_ceil(seg) as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Frames are taken out of the rx ring under its lock and handed to `f` (which checks each
    /// datagram's MAC, the costly part) without it, so that every receiving thread works on its
    /// own batch at once; then they go back to the fill ring. The sender's Ethernet address is
    /// learned from frames `f` found authentic. Then what the kernel path holds.
    fn recv_impl(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
        let mut total = 0;
        let mut ignored = 0u64;
        let mut last_src: Option<(SocketAddr, Mac)> = None;
        let mut frames = TAKEN.with(|t| std::mem::take(&mut *t.borrow_mut()));
        for q in &self.queues {
            // Given back after each batch, and by the guard if `f` panics.
            let mut taken = Taken::new(&q.rx, frames);
            for _ in 0..16 {
                let got = taken.take(RX_BATCH);
                for fr in taken.frames.iter_mut() {
                    let (src, dst, src_mac, at) = match packet::parse(q.view.data(fr)) {
                        Ok(d) if d.dst.port() == self.port && self.is_local(d.dst.ip()) => {
                            let start = d.payload.as_ptr() as usize - q.view.data(fr).as_ptr() as usize;
                            (sender_name(d.src, self.dev.index), d.dst.ip(), d.src_mac, start..start + d.payload.len())
                        }
                        _ => {
                            ignored += 1;
                            continue;
                        }
                    };
                    // Decrypted where it lies, in the frame this thread holds. A reply sent
                    // from inside `f` (a handshake's) leaves from the address served.
                    let (ksrc, kdst) = (self.kernel_addr(src), self.kernel_addr(SocketAddr::new(dst, 0)).ip());
                    let data = &mut q.view.data_mut(fr)[at];
                    let authentic = udp::receiving(ksrc, kdst, || receiving_frame(src, src_mac, || f(src, data)));
                    if authentic && last_src != Some((src, src_mac)) {
                        self.learn(src.ip(), src_mac);
                        // Replies go back over AF_XDP, also if this peer had sent to another
                        // address of the machine before.
                        self.reserve.learn_source(ksrc, kdst);
                        last_src = Some((src, src_mac));
                    }
                }
                taken.give_back();
                total += got;
                if got < RX_BATCH {
                    break;
                }
            }
            frames = taken.into_vec();
        }
        TAKEN.with(|t| *t.borrow_mut() = frames);
        let kernel = if self.kernel_ready.swap(false, Ordering::Relaxed) { self.recv_kernel(bufs, f)? } else { 0 };
        self.stats.rx_frames.fetch_add(total as u64, Ordering::Relaxed);
        if ignored > 0 {
            self.stats.rx_ignored.fetch_add(ignored, Ordering::Relaxed);
        }
        Ok(total + kernel)
    }

    /// Datagrams the filter left to the kernel (fragments, IPv6 extension headers, queues
    /// without an AF_XDP socket, other addresses of the machine on a wildcard bind), read from
    /// the kernel path.
    fn recv_kernel(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
        let r = self.reserve.recv_now(bufs, &mut |from, d| f(super::canonical(from), d));
        let n = match r {
            Ok(n) => n,
            // An ICMP error queued on the socket (port unreachable from an earlier send).
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => 0,
            Err(e) => return Err(e),
        };
        if n > 0 {
            self.stats.rx_kernel.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

/// Run `f` as the handling of an AF_XDP frame from `src`, sent by Ethernet address `mac` (what
/// [`DatagramIo::authentic`] learns).
fn receiving_frame<R>(src: SocketAddr, mac: Mac, f: impl FnOnce() -> R) -> R {
    let _outer = udp::Restore(&RECEIVING_FRAME, RECEIVING_FRAME.replace(Some((src, mac))));
    f()
}

/// The name of a frame's sender: a link-local IPv6 address with the interface it arrived on as
/// its scope, as the kernel path names it (and as a reply through the kernel needs it).
fn sender_name(src: SocketAddr, ifindex: u32) -> SocketAddr {
    match src {
        SocketAddr::V6(a) => SocketAddr::V6(std::net::SocketAddrV6::new(*a.ip(), a.port(), 0, neigh::scope(*a.ip(), ifindex))),
        a => a,
    }
}

thread_local! {
    /// The AF_XDP frame this thread is handing to `recv_now`'s callback: its sender and the
    /// sender's Ethernet address.
    static RECEIVING_FRAME: std::cell::Cell<Option<(SocketAddr, Mac)>> = const { std::cell::Cell::new(None) };
    /// Each receiving thread's batch of frames taken out of an rx ring (kept to reuse its memory).
    static TAKEN: std::cell::RefCell<Vec<Frame>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The queues (of `n`) receiving thread `lane` of `lanes` sleeps on: every `lanes`-th from its
/// own, so that each queue has exactly one thread; all of them when there are fewer queues than
/// threads (then a thread without a queue of its own would never wake).
fn lane_queues(lane: usize, lanes: usize, n: usize) -> Vec<usize> {
    if lanes <= 1 || n < lanes {
        return (0..n).collect();
    }
    (lane % lanes..n).step_by(lanes).collect()
}

/// The addresses an AF_XDP path on `iface` serves for `bind`: that address; for `0.0.0.0` the
/// interface's first IPv4 address; for `::` its first IPv4 and first global IPv6 address
/// (whichever it has), as a dual-stack socket would.
fn local_addresses(iface: &str, dev: &NetDev, bind: IpAddr) -> Result<(Option<Ipv4Addr>, Option<Ipv6Addr>), XdpError> {
    let err = |m: String| XdpError(m);
    let v6_addrs = || neigh::ipv6_addrs(iface).map_err(|e| err(format!("cannot read the IPv6 addresses of {iface}: {e}")));
    match bind {
        IpAddr::V4(a) if a.is_unspecified() => {
            let a = *dev.ipv4.first().ok_or_else(|| err(format!("interface {iface} has no IPv4 address")))?;
            Ok((Some(a), None))
        }
        IpAddr::V4(a) if dev.ipv4.contains(&a) => Ok((Some(a), None)),
        IpAddr::V4(a) => Err(err(format!("address {a} is not on interface {iface}"))),
        IpAddr::V6(a) if a.is_unspecified() => {
            let (v4, v6) = (dev.ipv4.first().copied(), v6_addrs()?.first().copied());
            if v4.is_none() && v6.is_none() {
                return Err(err(format!("interface {iface} has neither an IPv4 nor a global IPv6 address")));
            }
            Ok((v4, v6))
        }
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(m) if dev.ipv4.contains(&m) => Ok((Some(m), None)),
            _ if v6_addrs()?.contains(&a) => Ok((None, Some(a))),
            _ => Err(err(format!("address {a} is not a global address of interface {iface}"))),
        },
    }
}

/// The kernel path's socket: non-blocking; dual-stack when bound to `::`.
fn reserve_socket(at: SocketAddr) -> io::Result<UdpSocket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(at), socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if at.is_ipv6() {
        s.set_only_v6(!at.ip().is_unspecified())?;
    }
    s.bind(&at.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

impl DatagramIo for XdpIo {
    /// What one frame on this interface carries, and no more than the kernel's route to `peer`
    /// allows: the kernel path (for a peer that sent to another address of this machine, a
    /// next hop not known yet, a route through another interface) sends with "don't fragment",
    /// and a larger datagram would be lost.
    fn max_datagram_to(&self, peer: SocketAddr) -> usize {
        self.max_datagram().min(self.reserve.max_datagram_to(peer))
    }
    fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
        self.send_impl(dest, buf, seg)
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        self.wait_readable_lane(0, 1, timeout)
    }
    /// Each thread sleeps on its own queues: with every thread on every socket, each arrival
    /// woke them all (measured, 2 queues and 2 threads, 1 GiB: 36-38 k context switches of the
    /// receive threads and 0.69-0.74 s of their system time; 18-19 k and 0.36-0.50 s so).
    fn wait_readable_lane(&self, lane: usize, lanes: usize, timeout: Duration) -> io::Result<bool> {
        self.wait_on(&lane_queues(lane, lanes, self.queues.len()), timeout)
    }
    /// Frames are received in the UMEM and handed to `f` from there; `bufs` are for the
    /// kernel path.
    fn recv_now(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
        self.recv_impl(bufs, f)
    }
    fn authentic(&self, from: SocketAddr) {
        if let Some((src, mac)) = RECEIVING_FRAME.get() {
            if src == from {
                self.learn(src.ip(), mac);
            }
        }
        self.reserve.authentic(self.kernel_addr(from));
    }
    fn describe_stats(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let s = &self.stats;
        format!(
            "xdp_rx_frames {}\nxdp_rx_ignored {}\nxdp_rx_through_kernel {}\nxdp_tx_frames {}\nxdp_tx_kicks {}\nxdp_tx_through_kernel {}\n",
            g(&s.rx_frames),
            g(&s.rx_ignored),
            g(&s.rx_kernel),
            g(&s.tx_frames),
            g(&s.tx_kicks),
            g(&s.tx_kernel)
        )
    }
}

#[cfg(test)]
mod lane_tests {
    use super::{lane_queues, sender_name};

    /// A link-local sender is named with the interface as its scope, as the kernel path names
    /// it: one client, one session, whichever path its datagrams take.
    #[test]
    fn a_link_local_sender_is_named_with_its_interface() {
        let a = |s: &str| s.parse::<std::net::SocketAddr>().unwrap();
        assert_eq!(sender_name(a("[fe80::2]:40000"), 7), a("[fe80::2%7]:40000"));
        assert_eq!(sender_name(a("[fd00::2]:40000"), 7), a("[fd00::2]:40000"));
        assert_eq!(sender_name(a("10.0.0.2:40000"), 7), a("10.0.0.2:40000"));
    }

    #[test]
    fn every_queue_has_exactly_one_thread_when_there_are_enough() {
        for lanes in 1..=4 {
            for n in lanes..=9 {
                let mut all: Vec<usize> = (0..lanes).flat_map(|l| lane_queues(l, lanes, n)).collect();
                assert!((0..lanes).all(|l| !lane_queues(l, lanes, n).is_empty()), "{lanes} lanes, {n} queues");
                all.sort();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "{lanes} lanes, {n} queues");
            }
        }
        assert_eq!(lane_queues(1, 2, 4), [1, 3]);
    }

    #[test]
    fn fewer_queues_than_threads_means_every_thread_on_all() {
        assert_eq!(lane_queues(0, 2, 1), [0]);
        assert_eq!(lane_queues(1, 2, 1), [0]);
        assert_eq!(lane_queues(2, 4, 3), [0, 1, 2]);
    }
}
