//! Datagram I/O and the threads that drive the sans-IO protocol with the real clock.
//!
//! [`DatagramIo`] is what the protocol drivers need from a network path; `udp` implements it with
//! kernel UDP sockets (GSO/GRO/recvmmsg via quinn-udp), `xdp` with AF_XDP sockets and raw
//! Ethernet frames built by `packet`.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::chunk::Buf;
use crate::error::Error;
use crate::proto::client::{Client, Config, Event};
use crate::proto::msg::{Request, Response};
use crate::proto::wire::{MAX_DATAGRAM, MIN_DATAGRAM};
use crate::sys::net;

pub mod packet;
pub mod udp;
pub mod xdp;
pub use udp::{RecvBufs, UdpIo};

/// A datagram path: what the client and server loops need, whatever carries the bytes.
pub trait DatagramIo: Send + Sync {
    /// Send `buf`, a run of datagrams of `seg` bytes each (the last may be shorter), to `dest`.
    fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()>;
    /// Wait up to `timeout` until datagrams may be read.
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool>;
    /// [`wait_readable`](Self::wait_readable) for receiving thread `lane` of `lanes`: a path
    /// with several receive queues wakes each thread for its own share of them (one wake-up per
    /// arrival, not one per thread); a thread still receives from every queue once awake.
    fn wait_readable_lane(&self, lane: usize, lanes: usize, timeout: Duration) -> io::Result<bool> {
        let _ = (lane, lanes);
        self.wait_readable(timeout)
    }
    /// Hand every datagram queued now to `f`, without blocking. `f` says whether the datagram
    /// was authentic and new (accepted by a session): only then may the path learn from it
    /// (AF_XDP: the sender's Ethernet address). `bufs` are the UDP path's receive buffers, one
    /// set per receiving thread; AF_XDP receives into its UMEM and ignores them.
    fn recv_now(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize>;
    /// Called from inside `recv_now`'s callback once the datagram from `from` it is handling
    /// is found authentic, before anything it leads to goes to another thread: what a reply to
    /// `from` needs (the local address it was sent to, AF_XDP: the sender's Ethernet address)
    /// is learned now, so that no reply sent by another thread (a server's worker) leaves
    /// without it. Returning true from the callback learns the same, after it.
    fn authentic(&self, from: SocketAddr) {
        let _ = from;
    }
    /// Counters of the path for a person, `name value` lines (empty when it has none).
    fn describe_stats(&self) -> String {
        String::new()
    }
    /// Largest datagram this side can send to `peer` (a server asks once per handshake).
    fn max_datagram_to(&self, peer: SocketAddr) -> usize;
}

/// A UDP socket on an ephemeral port of `peer`'s family, connected to `peer`: the kernel has
/// chosen its route and source address (and so can say the route's MTU).
pub fn connected_socket(peer: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = match peer {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(any)?;
    sock.connect(peer)?;
    Ok(sock)
}

/// `addr` with a v4-mapped IPv6 address (a dual-stack socket's name for an IPv4 peer) as the
/// IPv4 address it is; any other keeps its scope (a link-local peer needs its interface).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(std::net::IpAddr::V4(v4), v6.port()),
            None => SocketAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Peers a per-peer map remembers at most.
const MAX_PEERS: usize = 4096;

/// Insert into a bounded per-peer map: when full, forget everything (rebuilt from the kernel and
/// the next datagrams) rather than grow without end under spoofed sources.
fn bounded_insert<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, k: K, v: V) {
    if m.len() >= MAX_PEERS && !m.contains_key(&k) {
        m.clear();
    }
    m.insert(k, v);
}

/// Largest datagram for the path to `peer` without IP fragmentation (`sock` is connected to it).
pub fn path_max_datagram(sock: &UdpSocket, peer: SocketAddr) -> usize {
    let ipv6 = peer.is_ipv6();
    let overhead = if ipv6 { 48 } else { 28 };
    match net::route_mtu(sock.as_fd(), ipv6) {
        Ok(mtu) if mtu > overhead => (mtu - overhead).clamp(MIN_DATAGRAM, MAX_DATAGRAM),
        _ => MIN_DATAGRAM,
    }
}

const RECV_THREADS: usize = 2;

type Waiter = SyncSender<Result<Buf, Error>>;

struct Shared {
    client: Client,
    waiters: HashMap<u64, Waiter>,
    rejected: bool,
    connected_once: bool,
    /// Set when the [`ClientTransport`] is dropped: the receive threads stop at their next turn
    /// (within 100 ms), whoever else still holds the shared state ([`Pending`], [`ContactProbe`]).
    closed: bool,
}

/// Counters a person can read (`--stats`, logs).
#[derive(Clone, Debug, Default)]
pub struct TransportStats {
    pub rtt: Duration,
    pub window: u64,
    pub losses: u64,
    pub retransmits: u64,
    pub handshakes: u64,
    pub datagrams_in: u64,
    pub datagrams_out: u64,
}

/// The client's connection: two receive threads drive the protocol; any thread may issue requests.
pub struct ClientTransport {
    io: Arc<dyn DatagramIo>,
    peer: SocketAddr,
    shared: Arc<Mutex<Shared>>,
}

/// A request in flight; wait for it with [`Pending::wait`].
pub struct Pending {
    rx: Receiver<Result<Buf, Error>>,
    deadline: Instant,
    id: u64,
    shared: Arc<Mutex<Shared>>,
}

impl Pending {
    /// Wait, checking `interrupted` twice a second; if it says so, give up with EINTR.
    pub fn wait_interruptible(self, interrupted: impl Fn() -> bool) -> Result<Response, Error> {
        loop {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left > Duration::from_millis(500) {
                match self.rx.recv_timeout(Duration::from_millis(500)) {
                    Ok(r) => return Self::finish(r),
                    Err(RecvTimeoutError::Timeout) => {
                        if interrupted() {
                            self.abandon();
                            return Err(Error::Interrupted);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.abandon();
                        return Err(Error::RemoteTimeout);
                    }
                }
            }
            return self.wait();
        }
    }

    fn finish(r: Result<Buf, Error>) -> Result<Response, Error> {
        match Response::decode(r?)? {
            Response::Error(e) => Err(e),
            r => Ok(r),
        }
    }

    fn abandon(&self) {
        let mut s = self.shared.lock().unwrap();
        s.waiters.remove(&self.id);
        s.client.cancel(self.id);
    }

    pub fn wait(self) -> Result<Response, Error> {
        // The protocol fails the request at its deadline; the margin only covers a stuck thread.
        let left = self.deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
        match self.rx.recv_timeout(left) {
            Ok(r) => Self::finish(r),
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {
                self.abandon();
                Err(Error::RemoteTimeout)
            }
        }
    }
}

impl ClientTransport {
    pub fn connect(peer: SocketAddr, psk: [u8; 32]) -> io::Result<Self> {
        let sock = connected_socket(peer)?;
        let max_datagram = path_max_datagram(&sock, peer);
        tracing::debug!(%peer, max_datagram, "client socket ready");
        let io: Arc<dyn DatagramIo> = Arc::new(UdpIo::new(sock)?);
        Self::with_io(io, peer, psk, max_datagram)
    }

    /// Drive the protocol over any datagram path.
    pub fn with_io(io: Arc<dyn DatagramIo>, peer: SocketAddr, psk: [u8; 32], max_datagram: usize) -> io::Result<Self> {
        let seed = rand::random::<u64>();
        let client = Client::new(Config { psk, max_datagram, seed }, Instant::now());
        let shared =
            Arc::new(Mutex::new(Shared { client, waiters: HashMap::new(), rejected: false, connected_once: false, closed: false }));
        let t = ClientTransport { io, peer, shared };
        // Two receive threads: AES-GCM opening (~0.23 µs per 1.4 KB datagram) runs in parallel, outside
        // the protocol lock; only the bookkeeping is serialized. They run until the transport is
        // dropped (`Shared::closed`), however they are scheduled.
        for i in 0..RECV_THREADS {
            let (io, shared, peer) = (t.io.clone(), t.shared.clone(), t.peer);
            let spawned = thread::Builder::new().name(format!("wraith-net{i}")).spawn(move || recv_loop(io, shared, peer, i));
            if let Err(e) = spawned {
                drop(t); // stops the threads already running
                return Err(e);
            }
            // Tests: let each thread run before the next is made, as a busy machine may.
            #[cfg(test)]
            thread::sleep(Duration::from_millis(2));
        }
        Ok(t)
    }

    /// Start a request; `expect` is the expected response size, `timeout` its deadline.
    pub fn submit(&self, req: &Request, expect: u64, timeout: Duration) -> Pending {
        let (tx, rx) = sync_channel(1);
        let now = Instant::now();
        let deadline = now + timeout;
        let mut s = self.shared.lock().unwrap();
        let id = s.client.start_request(now, req.encode(), expect, deadline);
        s.waiters.insert(id, tx);
        let out = drive(self.peer, &mut s);
        drop(s);
        send_all(&*self.io, self.peer, out);
        Pending { rx, deadline, id, shared: self.shared.clone() }
    }

    pub fn call(&self, req: &Request, expect: u64, timeout: Duration) -> Result<Response, Error> {
        self.submit(req, expect, timeout).wait()
    }

    /// The datagram path's own counters (`DatagramIo::describe_stats`).
    pub fn io_stats_text(&self) -> String {
        self.io.describe_stats()
    }

    /// What came back from the server so far, readable after the transport is gone (for the
    /// message of a failed first contact).
    pub fn contact_probe(&self) -> ContactProbe {
        ContactProbe(self.shared.clone())
    }

    pub fn stats(&self) -> TransportStats {
        let s = self.shared.lock().unwrap();
        let c = &s.client;
        TransportStats {
            rtt: c.rtt(),
            window: c.window(),
            losses: c.losses(),
            retransmits: c.stats.retransmits,
            handshakes: c.stats.handshakes,
            datagrams_in: c.stats.datagrams_in,
            datagrams_out: c.stats.datagrams_out,
        }
    }
}

impl Drop for ClientTransport {
    /// Stop the receive threads, and fail what still waits at once instead of at its deadline.
    fn drop(&mut self) {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.closed = true;
        s.waiters.clear(); // a waiter sees its sender gone: RemoteTimeout
    }
}

/// See [`ClientTransport::contact_probe`].
pub struct ContactProbe(Arc<Mutex<Shared>>);

impl ContactProbe {
    /// How far the first contact got, for a person.
    pub fn describe(&self) -> String {
        let s = self.0.lock().unwrap();
        let st = &s.client.stats;
        if s.connected_once {
            format!("the handshake succeeded ({} datagrams came back), then the request went unanswered", st.datagrams_in)
        } else if st.datagrams_in == 0 {
            format!("{} datagrams sent, nothing came back", st.datagrams_out)
        } else {
            format!("{} datagrams sent, {} came back, none completed the handshake", st.datagrams_out, st.datagrams_in)
        }
    }
}

/// Flush datagrams and deliver events. Called with the lock held.
/// Send what [`drive`] took out, after the protocol lock is let go: a send may wait (a full
/// socket buffer; an AF_XDP ring that does not drain, up to 2 s), and meanwhile other requests,
/// received datagrams and timers must not wait for it.
fn send_all(io: &dyn DatagramIo, peer: SocketAddr, out: Vec<Vec<u8>>) {
    for d in out {
        if let Err(e) = io.send_burst(peer, &d, d.len()) {
            tracing::debug!(error = %e, "send failed");
        }
    }
}

/// Under the protocol lock: take the datagrams the protocol wants sent (for [`send_all`]) and
/// hand out its events.
fn drive(peer: SocketAddr, s: &mut Shared) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(d) = s.client.poll_transmit() {
        out.push(d);
    }
    while let Some(e) = s.client.poll_event() {
        match e {
            Event::Done { id, result } => {
                if let Some(w) = s.waiters.remove(&id) {
                    let _ = w.try_send(result);
                }
            }
            Event::AuthRejected => {
                // Before the first session the caller explains it; later it means the key changed.
                if !s.rejected && s.connected_once {
                    tracing::error!("server {peer} rejected our key: check that -o keyfile= matches the server's --key");
                }
                s.rejected = true;
            }
            Event::WrongVersion(v) => {
                if !s.rejected && s.connected_once {
                    tracing::error!(
                        "server {peer} now speaks wraith protocol version {v}, this program version {}: run the same wraith version on both ends",
                        crate::proto::wire::VERSION
                    );
                }
                s.rejected = true;
            }
            Event::Connected => {
                s.rejected = false;
                if s.connected_once {
                    tracing::info!(%peer, "session re-established");
                }
                s.connected_once = true;
            }
        }
    }
    out
}

fn recv_loop(io: Arc<dyn DatagramIo>, shared: Arc<Mutex<Shared>>, peer: SocketAddr, lane: usize) {
    let reporter = lane == 0;
    let mut bufs = RecvBufs::default();
    let mut last_report = Instant::now();
    loop {
        if reporter && last_report.elapsed() >= Duration::from_secs(5) && tracing::enabled!(tracing::Level::DEBUG) {
            last_report = Instant::now();
            let s = shared.lock().unwrap();
            let c = &s.client;
            tracing::debug!(
                rtt_us = c.rtt().as_micros() as u64,
                window = c.window(),
                losses = c.losses(),
                retransmits = c.stats.retransmits,
                handshakes = c.stats.handshakes,
                datagrams_in = c.stats.datagrams_in,
                outstanding = c.outstanding(),
                "transport"
            );
        }
        let (wait, key) = {
            let s = shared.lock().unwrap();
            if s.closed {
                return;
            }
            let now = Instant::now();
            let wait = s.client.poll_timeout().map_or(Duration::from_millis(100), |t| t.saturating_duration_since(now));
            (wait.min(Duration::from_millis(100)), s.client.response_key())
        };
        let readable = io.wait_readable_lane(lane, RECV_THREADS, wait).unwrap_or(false);
        if readable {
            // The clock is read once per 16 datagrams (it costs as much as parsing one here):
            // some microseconds stale at most, against a 15 ms least RTO.
            let (mut now, mut seen) = (Instant::now(), 0u32);
            let r = io.recv_now(&mut bufs, &mut |from, d| {
                if from.ip().to_canonical() != peer.ip().to_canonical() || from.port() != peer.port() {
                    return false;
                }
                seen += 1;
                if seen % 16 == 0 {
                    now = Instant::now();
                }
                // Authenticate (decrypt) responses before taking the lock; everything else goes
                // the slow way. A response that fails is dropped here: its bytes are garbage now.
                // What the datagrams make the client send or finish is driven once for the whole
                // batch, below, not per datagram under the lock.
                match key.as_ref().filter(|k| k.claims(d)) {
                    Some(k) => {
                        let auth = k.authenticate(d);
                        let mut s = shared.lock().unwrap();
                        match auth {
                            Some(a) => s.client.handle_authentic(now, a),
                            None => {
                                s.client.note_bad_response();
                                false
                            }
                        }
                    }
                    None => {
                        shared.lock().unwrap().client.handle_datagram(now, d);
                        false
                    }
                }
            });
            if let Err(e) = r {
                // ECONNREFUSED from an ICMP port-unreachable: the server is down; timers handle it.
                if e.raw_os_error() != Some(libc::ECONNREFUSED) {
                    tracing::debug!(error = %e, "recv failed");
                }
                thread::sleep(Duration::from_millis(5));
            }
        }
        let mut s = shared.lock().unwrap();
        let now = Instant::now();
        if s.client.poll_timeout().is_some_and(|t| t <= now) {
            s.client.handle_timeout(now);
        }
        let out = drive(peer, &mut s);
        drop(s);
        send_all(&*io, peer, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A v4-mapped address becomes IPv4; a link-local IPv6 peer keeps its interface (without
    /// it, replies to the peer cannot be sent and its datagrams match no session).
    #[test]
    fn canonical_maps_v4_mapped_addresses_and_keeps_scopes() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(canonical(a("[::ffff:10.1.2.3]:7447")), a("10.1.2.3:7447"));
        let ll = a("[fe80::1%3]:7447");
        assert_eq!(canonical(ll), ll);
        match canonical(ll) {
            SocketAddr::V6(v6) => assert_eq!(v6.scope_id(), 3),
            other => panic!("{other}"),
        }
        assert_eq!(canonical(a("10.1.2.3:1")), a("10.1.2.3:1"));
    }

    /// A path that never receives anything and counts what it sends; with `slow`, its first
    /// send takes 600 ms (a full socket buffer, an AF_XDP ring that does not drain).
    struct SilentIo {
        slow: AtomicBool,
        sent: std::sync::atomic::AtomicUsize,
    }

    impl SilentIo {
        fn new(slow: bool) -> Arc<Self> {
            Arc::new(SilentIo { slow: AtomicBool::new(slow), sent: Default::default() })
        }
    }

    impl DatagramIo for SilentIo {
        fn send_burst(&self, _: SocketAddr, _: &[u8], _: usize) -> io::Result<()> {
            if self.slow.swap(false, Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(600));
            }
            self.sent.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
            thread::sleep(timeout.min(Duration::from_millis(20)));
            Ok(false)
        }
        fn recv_now(&self, _: &mut RecvBufs, _: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
            Ok(0)
        }
        fn max_datagram_to(&self, _: SocketAddr) -> usize {
            MIN_DATAGRAM
        }
    }

    /// A new transport's receive threads keep running however they are scheduled (under test,
    /// each runs before the next is made): a silent server gets its HELLO again after 200 ms,
    /// not once.
    #[test]
    fn a_new_transport_resends_its_hello() {
        for round in 0..5 {
            let io = SilentIo::new(false);
            let t = ClientTransport::with_io(io.clone(), "127.0.0.1:9".parse().unwrap(), [1; 32], 1472).unwrap();
            let _p = t.submit(&Request::Attach { share: "s".into() }, 0, Duration::from_secs(5));
            let t0 = Instant::now();
            while io.sent.load(Ordering::SeqCst) < 2 && t0.elapsed() < Duration::from_secs(2) {
                thread::sleep(Duration::from_millis(10));
            }
            assert!(io.sent.load(Ordering::SeqCst) >= 2, "round {round}: the HELLO was never sent again");
        }
    }

    /// Dropping the transport stops its receive threads (they hold the path: its count falls
    /// back to ours) although a request and a probe still hold the shared state, and the
    /// request fails at once, not at its deadline.
    #[test]
    fn dropping_the_transport_stops_its_threads_and_fails_what_waits() {
        let io = SilentIo::new(false);
        let t = ClientTransport::with_io(io.clone(), "127.0.0.1:9".parse().unwrap(), [1; 32], 1472).unwrap();
        let pending = t.submit(&Request::Attach { share: "s".into() }, 0, Duration::from_secs(30));
        let probe = t.contact_probe();
        drop(t);
        let t0 = Instant::now();
        assert!(matches!(pending.wait(), Err(Error::RemoteTimeout)));
        assert!(t0.elapsed() < Duration::from_secs(1), "the request waited {:?} after the drop", t0.elapsed());
        while Arc::strong_count(&io) > 1 && t0.elapsed() < Duration::from_secs(2) {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(Arc::strong_count(&io), 1, "a receive thread still runs");
        assert!(probe.describe().contains("nothing came back"));
    }

    #[test]
    fn a_slow_send_does_not_hold_the_protocol_lock() {
        let io = SilentIo::new(true);
        let t = Arc::new(ClientTransport::with_io(io.clone(), "127.0.0.1:9".parse().unwrap(), [1; 32], 1472).unwrap());
        let t2 = t.clone();
        let sender = thread::spawn(move || {
            // Its HELLO is sent by whichever thread drives first: the slow send.
            let _p = t2.submit(&Request::Attach { share: "s".into() }, 0, Duration::from_secs(5));
        });
        let t0 = Instant::now();
        while io.slow.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(1));
        }
        assert!(!io.slow.load(Ordering::SeqCst), "nothing was sent");
        thread::sleep(Duration::from_millis(50)); // well inside the 600 ms send
        let start = Instant::now();
        let _ = t.stats();
        let waited = start.elapsed();
        sender.join().unwrap();
        assert!(waited < Duration::from_millis(300), "the protocol lock was held for {waited:?} during a send");
    }
}
