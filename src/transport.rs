//! UDP datagram I/O and the threads that drive the sans-IO protocol with the real clock.
//!
//! Sends use UDP segmentation offload (one syscall for up to 64 equal datagrams) and receives use
//! `recvmmsg` with GRO, both through `quinn-udp`. The socket is non-blocking; readiness comes from
//! poll(2), so a timer never waits behind a blocking receive.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use crate::error::Error;
use crate::proto::client::{Client, Config, Event};
use crate::proto::msg::{Request, Response};
use crate::proto::wire::{MAX_DATAGRAM, MIN_DATAGRAM};
use crate::sys::net;

const RECV_BATCH: usize = 32;
const RECV_BUF: usize = 65536;
const SOCKET_BUFFER: usize = 32 << 20;

/// A non-blocking UDP socket with offloads.
pub struct UdpIo {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl UdpIo {
    pub fn new(sock: UdpSocket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let _ = net::set_recv_buffer(sock.as_fd(), SOCKET_BUFFER);
        let _ = net::set_send_buffer(sock.as_fd(), SOCKET_BUFFER);
        Ok(UdpIo { sock, state })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Send `buf`, a run of datagrams of `seg` bytes each (the last may be shorter), to `dest`.
    /// Waits (bounded) when the socket buffer is full rather than dropping.
    pub fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
        let max_segs = self.state.max_gso_segments().max(1).min(65000 / seg.max(1)).max(1);
        for part in buf.chunks(seg * max_segs) {
            let t = Transmit {
                destination: dest,
                ecn: None,
                contents: part,
                segment_size: (part.len() > seg).then_some(seg),
                src_ip: None,
            };
            let give_up = Instant::now() + Duration::from_secs(2);
            loop {
                match self.state.send(UdpSockRef::from(&self.sock), &t) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if Instant::now() >= give_up {
                            return Err(e);
                        }
                        net::poll_writable(self.sock.as_fd(), Duration::from_millis(50))?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Wait up to `timeout` for the socket to become readable.
    pub fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        net::poll_readable(self.sock.as_fd(), timeout)
    }

    /// Hand every datagram queued now to `f` (GRO batches are split), without blocking.
    pub fn recv_now(&self, bufs: &mut RecvBufs, mut f: impl FnMut(SocketAddr, &[u8])) -> io::Result<usize> {
        let mut total = 0;
        // Drain what is queued now, in a bounded number of batches.
        for _ in 0..8 {
            let mut slices: Vec<IoSliceMut> = bufs.bufs.iter_mut().map(|b| IoSliceMut::new(&mut b[..])).collect();
            let n = match self.state.recv(UdpSockRef::from(&self.sock), &mut slices, &mut bufs.meta) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            drop(slices);
            for i in 0..n {
                let m = &bufs.meta[i];
                let data = &bufs.bufs[i][..m.len];
                let stride = m.stride.max(1);
                for d in data.chunks(stride) {
                    f(m.addr, d);
                    total += 1;
                }
            }
            if n < RECV_BATCH {
                break;
            }
        }
        Ok(total)
    }
}

pub struct RecvBufs {
    bufs: Vec<Box<[u8]>>,
    meta: Vec<RecvMeta>,
}

impl Default for RecvBufs {
    fn default() -> Self {
        RecvBufs {
            bufs: (0..RECV_BATCH).map(|_| vec![0u8; RECV_BUF].into_boxed_slice()).collect(),
            meta: vec![RecvMeta::default(); RECV_BATCH],
        }
    }
}

/// Largest datagram for the path to `peer` without IP fragmentation.
pub fn path_max_datagram(sock: &UdpSocket, peer: SocketAddr) -> usize {
    let ipv6 = peer.is_ipv6();
    let overhead = if ipv6 { 48 } else { 28 };
    match net::route_mtu(sock.as_fd(), ipv6) {
        Ok(mtu) if mtu > overhead => (mtu - overhead).clamp(MIN_DATAGRAM, MAX_DATAGRAM),
        _ => MIN_DATAGRAM,
    }
}

type Waiter = SyncSender<Result<Vec<u8>, Error>>;

struct Shared {
    client: Client,
    waiters: HashMap<u64, Waiter>,
    rejected: bool,
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

/// The client's connection: one receive thread drives the protocol; any thread may issue requests.
pub struct ClientTransport {
    io: Arc<UdpIo>,
    peer: SocketAddr,
    shared: Arc<Mutex<Shared>>,
}

/// A request in flight; wait for it with [`Pending::wait`].
pub struct Pending {
    rx: Receiver<Result<Vec<u8>, Error>>,
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

    fn finish(r: Result<Vec<u8>, Error>) -> Result<Response, Error> {
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
        let bind: SocketAddr = if peer.is_ipv6() { "[::]:0".parse().unwrap() } else { "0.0.0.0:0".parse().unwrap() };
        let sock = UdpSocket::bind(bind)?;
        sock.connect(peer)?;
        let max_datagram = path_max_datagram(&sock, peer);
        tracing::debug!(%peer, max_datagram, "client socket ready");
        let io = Arc::new(UdpIo::new(sock)?);
        let seed = rand::random::<u64>();
        let client = Client::new(Config { psk, max_datagram, seed }, Instant::now());
        let shared = Arc::new(Mutex::new(Shared { client, waiters: HashMap::new(), rejected: false }));
        let t = ClientTransport { io, peer, shared };
        let (io, shared, peer) = (t.io.clone(), t.shared.clone(), t.peer);
        thread::Builder::new().name("wraith-net".into()).spawn(move || recv_loop(io, shared, peer))?;
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
        drive(&self.io, self.peer, &mut s);
        drop(s);
        Pending { rx, deadline, id, shared: self.shared.clone() }
    }

    pub fn call(&self, req: &Request, expect: u64, timeout: Duration) -> Result<Response, Error> {
        self.submit(req, expect, timeout).wait()
    }

    /// True once the server has answered a HELLO with REJECT (the keys differ).
    pub fn rejected(&self) -> bool {
        self.shared.lock().unwrap().rejected
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

/// Flush datagrams and deliver events. Called with the lock held.
fn drive(io: &UdpIo, peer: SocketAddr, s: &mut Shared) {
    while let Some(d) = s.client.poll_transmit() {
        if let Err(e) = io.send_burst(peer, &d, d.len()) {
            tracing::debug!(error = %e, "send failed");
        }
    }
    while let Some(e) = s.client.poll_event() {
        match e {
            Event::Done { id, result } => {
                if let Some(w) = s.waiters.remove(&id) {
                    let _ = w.try_send(result);
                }
            }
            Event::AuthRejected => {
                if !s.rejected {
                    tracing::error!("server {peer} rejected our key: check that -o keyfile= matches the server's --key");
                }
                s.rejected = true;
            }
            Event::Connected => {
                s.rejected = false;
                tracing::info!(%peer, "session established");
            }
        }
    }
}

fn recv_loop(io: Arc<UdpIo>, shared: Arc<Mutex<Shared>>, peer: SocketAddr) {
    let mut bufs = RecvBufs::default();
    loop {
        if Arc::strong_count(&shared) == 1 {
            return; // the transport was dropped
        }
        let wait = {
            let s = shared.lock().unwrap();
            let now = Instant::now();
            s.client.poll_timeout().map_or(Duration::from_millis(100), |t| t.saturating_duration_since(now))
        }
        .min(Duration::from_millis(100));
        let readable = io.wait_readable(wait).unwrap_or(false);
        let mut s = shared.lock().unwrap();
        let now = Instant::now();
        if readable {
            let client = &mut s.client;
            let r = io.recv_now(&mut bufs, |from, d| {
                if from.ip().to_canonical() == peer.ip().to_canonical() && from.port() == peer.port() {
                    client.handle_datagram(now, d);
                }
            });
            if let Err(e) = r {
                // ECONNREFUSED from an ICMP port-unreachable: the server is down; timers handle it.
                if e.raw_os_error() != Some(libc::ECONNREFUSED) {
                    tracing::debug!(error = %e, "recv failed");
                }
                drop(s);
                thread::sleep(Duration::from_millis(5));
                s = shared.lock().unwrap();
            }
        }
        if s.client.poll_timeout().is_some_and(|t| t <= now) {
            s.client.handle_timeout(now);
        }
        drive(&io, peer, &mut s);
    }
}
