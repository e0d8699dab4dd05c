//! Kernel UDP sockets: sends use UDP segmentation offload (one syscall for up to 64 equal
//! datagrams), receives use `recvmmsg` with GRO, both through `quinn-udp`. The socket is
//! non-blocking; readiness comes from poll(2), so a timer never waits behind a blocking receive.

use std::collections::HashMap;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};

use super::DatagramIo;
use crate::sys::net;

const RECV_BATCH: usize = 32;
const RECV_BUF: usize = 65536;
const SOCKET_BUFFER: usize = 32 << 20;
/// Route MTUs asked for (per handshake) are remembered this long (in a bounded map): a replayed
/// HELLO (authentic, so it gets this far) costs a map lookup, not five system calls.
const MTU_TTL: Duration = Duration::from_secs(60);

/// A non-blocking UDP socket with offloads.
pub struct UdpIo {
    sock: UdpSocket,
    state: UdpSocketState,
    /// By address and scope (a link-local address names a different peer on each interface).
    mtus: Mutex<HashMap<(IpAddr, u32), (usize, Instant)>>,
    /// Bound to a wildcard address: replies leave from the address the peer sent to.
    wildcard: bool,
    /// The local address each peer's last authentic datagram was sent to (bounded).
    reply_from: Mutex<HashMap<SocketAddr, IpAddr>>,
}

thread_local! {
    /// The datagram this thread is handing to `recv_now`'s callback: its sender and the local
    /// address it was sent to. A reply sent from inside the callback (a handshake's answer to a
    /// HELLO, which is not authentic and so teaches nothing) leaves from that address.
    static RECEIVING: std::cell::Cell<Option<(SocketAddr, IpAddr)>> = const { std::cell::Cell::new(None) };
}

impl UdpIo {
    pub fn new(sock: UdpSocket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let _ = net::set_recv_buffer(sock.as_fd(), SOCKET_BUFFER);
        let _ = net::set_send_buffer(sock.as_fd(), SOCKET_BUFFER);
        let wildcard = sock.local_addr()?.ip().is_unspecified();
        Ok(UdpIo { sock, state, mtus: Mutex::new(HashMap::new()), wildcard, reply_from: Mutex::new(HashMap::new()) })
    }

    /// The source address for a datagram to `dest`, on a socket bound to a wildcard address:
    /// the local address `dest` last sent to. Left to the kernel, the source follows the route
    /// back, and a peer that had sent to another address of this machine (a second address on
    /// an interface, a VIP, 127.0.0.2) drops the reply as coming from a stranger.
    pub(super) fn source_for(&self, dest: SocketAddr) -> Option<IpAddr> {
        if !self.wildcard {
            return None;
        }
        if let Some((from, to)) = RECEIVING.get() {
            if from == dest {
                return Some(to);
            }
        }
        self.reply_from.lock().unwrap().get(&dest).copied()
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Waits (bounded) when the socket buffer is full rather than dropping.
    /// [`DatagramIo::send_burst`] from the local address `src_ip` (None: the kernel's choice).
    pub(super) fn send_burst_from(&self, dest: SocketAddr, buf: &[u8], seg: usize, src_ip: Option<IpAddr>) -> io::Result<()> {
        let max_segs = self.state.max_gso_segments().max(1).min(65000 / seg.max(1)).max(1);
        for part in buf.chunks(seg * max_segs) {
            let t = Transmit {
                destination: dest,
                ecn: None,
                contents: part,
                segment_size: (part.len() > seg).then_some(seg),
                src_ip,
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

    fn recv_now_impl(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
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
                let data = &mut bufs.bufs[i][..m.len];
                let stride = m.stride.max(1);
                let to = m.dst_ip.filter(|_| self.wildcard);
                for d in data.chunks_mut(stride) {
                    let authentic = match to {
                        Some(to) => receiving(m.addr, to, || f(m.addr, d)),
                        None => f(m.addr, d),
                    };
                    // Learned only from authentic datagrams: a forged one must not turn the
                    // replies of a real peer to an address it does not listen to.
                    if let (true, Some(to)) = (authentic, to) {
                        self.learn_source(m.addr, to);
                    }
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

/// Run `f` as the handling of a datagram from `from` to the local address `to`: what it sends
/// back to `from` leaves from `to` (see `RECEIVING`).
pub(super) fn receiving<R>(from: SocketAddr, to: IpAddr, f: impl FnOnce() -> R) -> R {
    let _outer = Restore(&RECEIVING, RECEIVING.replace(Some((from, to))));
    f()
}

/// Puts a thread-local cell back to its outer value when dropped, also when what ran inside
/// panicked.
pub(super) struct Restore<T: Copy + 'static>(pub &'static std::thread::LocalKey<std::cell::Cell<T>>, pub T);

impl<T: Copy + 'static> Drop for Restore<T> {
    fn drop(&mut self) {
        self.0.set(self.1);
    }
}

impl UdpIo {
    /// Replies to `peer` leave from `to` (an authentic datagram from it was sent there).
    pub(super) fn learn_source(&self, peer: SocketAddr, to: IpAddr) {
        if !self.wildcard {
            return;
        }
        let mut m = self.reply_from.lock().unwrap();
        if m.get(&peer) != Some(&to) {
            super::bounded_insert(&mut m, peer, to);
        }
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

impl DatagramIo for UdpIo {
    fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
        self.send_burst_from(dest, buf, seg, self.source_for(dest))
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        net::poll_readable(self.sock.as_fd(), timeout)
    }
    fn recv_now(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
        self.recv_now_impl(bufs, f)
    }
    fn authentic(&self, from: SocketAddr) {
        if let Some((sender, to)) = RECEIVING.get() {
            if sender == from {
                self.learn_source(from, to);
            }
        }
    }
    /// The route's MTU to `peer`, asked of a throwaway socket connected to it (the serving
    /// socket is not connected) and remembered for a minute. The socket sends with "don't
    /// fragment" (quinn-udp), so a datagram above this fails with EMSGSIZE. When the kernel
    /// cannot say: the smallest.
    fn max_datagram_to(&self, peer: SocketAddr) -> usize {
        // A v4-mapped peer of a dual-stack socket is asked about as IPv4 (its real route).
        let peer = super::canonical(peer);
        let now = Instant::now();
        let key = (peer.ip(), if let SocketAddr::V6(a) = peer { a.scope_id() } else { 0 });
        if let Some(&(m, at)) = self.mtus.lock().unwrap().get(&key) {
            if now.duration_since(at) < MTU_TTL {
                return m;
            }
        }
        let m = match super::connected_socket(peer) {
            Ok(s) => super::path_max_datagram(&s, peer),
            Err(_) => crate::proto::wire::MIN_DATAGRAM,
        };
        super::bounded_insert(&mut self.mtus.lock().unwrap(), key, (m, now));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::MAX_DATAGRAM;
    use std::net::Ipv4Addr;

    /// What `client` receives within a second, and from where.
    fn reply(client: &UdpSocket) -> Option<(Vec<u8>, SocketAddr)> {
        client.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut b = [0u8; 64];
        client.recv_from(&mut b).ok().map(|(n, from)| (b[..n].to_vec(), from))
    }

    /// Hand what `io` has to a callback that answers from inside it (as the handshake does)
    /// and calls it authentic when it starts with `a`.
    fn serve_once(io: &UdpIo) {
        assert!(io.wait_readable(Duration::from_secs(1)).unwrap());
        let mut bufs = RecvBufs::default();
        io.recv_now(&mut bufs, &mut |from, d| {
            io.send_burst(from, b"hello", 5).unwrap();
            d.first() == Some(&b'a')
        })
        .unwrap();
    }

    /// A server bound to a wildcard address answers from the address the peer sent to, also
    /// for a reply sent from inside the receive callback (the handshake's), and later replies
    /// (sent by other threads) from the address its last authentic datagram went to; a
    /// datagram not found authentic changes nothing. Every 127.0.0.0/8 address is this
    /// machine's: left to the kernel, the source of a reply to 127.0.0.1 is 127.0.0.1.
    #[test]
    fn a_wildcard_server_answers_from_the_address_it_was_sent_to() {
        for bind in ["0.0.0.0:0", "[::]:0"] {
            let io = UdpIo::new(UdpSocket::bind(bind).unwrap()).unwrap();
            let port = io.socket().local_addr().unwrap().port();
            let client = UdpSocket::bind("127.0.0.1:0").unwrap();
            let at = |ip: &str| SocketAddr::new(ip.parse().unwrap(), port);
            client.send_to(b"a", at("127.0.0.2")).unwrap();
            serve_once(&io);
            let (d, from) = reply(&client).expect("the handshake's reply");
            assert_eq!((d.as_slice(), from), (&b"hello"[..], at("127.0.0.2")), "bound to {bind}");
            // A forged datagram to another address changes nothing for later replies...
            client.send_to(b"x", at("127.0.0.3")).unwrap();
            serve_once(&io);
            assert_eq!(reply(&client).unwrap().1, at("127.0.0.3"), "the in-callback reply goes back the way it came");
            let peer = if bind.starts_with('[') {
                SocketAddr::new(IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped()), client.local_addr().unwrap().port())
            } else {
                client.local_addr().unwrap()
            };
            io.send_burst(peer, b"data", 4).unwrap();
            assert_eq!(reply(&client).unwrap().1, at("127.0.0.2"), "bound to {bind}: replies follow the last authentic datagram");
            // ...an authentic one does.
            client.send_to(b"a", at("127.0.0.4")).unwrap();
            serve_once(&io);
            reply(&client).unwrap();
            io.send_burst(peer, b"data", 4).unwrap();
            assert_eq!(reply(&client).unwrap().1, at("127.0.0.4"), "bound to {bind}");
        }
    }

    /// A datagram found authentic inside the callback teaches its reply address before the
    /// callback returns: a reply another thread sends meanwhile (a server's worker, given the
    /// request from inside the callback) leaves from the address the peer sent to.
    #[test]
    fn a_reply_from_another_thread_during_the_callback_leaves_from_the_address_sent_to() {
        let io = UdpIo::new(UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap();
        let port = io.socket().local_addr().unwrap().port();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"a", SocketAddr::new(Ipv4Addr::new(127, 0, 0, 5).into(), port)).unwrap();
        assert!(io.wait_readable(Duration::from_secs(1)).unwrap());
        let mut bufs = RecvBufs::default();
        io.recv_now(&mut bufs, &mut |from, _| {
            io.authentic(from);
            std::thread::scope(|s| {
                s.spawn(|| io.send_burst(from, b"data", 4).unwrap());
            });
            true
        })
        .unwrap();
        assert_eq!(reply(&client).unwrap().1, SocketAddr::new(Ipv4Addr::new(127, 0, 0, 5).into(), port));
    }

    /// The cell is put back also when the callback panics: a later datagram is not answered
    /// from the address an earlier one was sent to.
    #[test]
    fn the_datagram_being_handled_is_forgotten_when_its_handling_panics() {
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let r = std::panic::catch_unwind(|| receiving(peer, "127.0.0.7".parse().unwrap(), || panic!("a callback panics")));
        assert!(r.is_err());
        assert_eq!(RECEIVING.get(), None);
    }

    #[test]
    fn max_datagram_to_asks_the_route_and_remembers_it() {
        let io = UdpIo::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        // Loopback's MTU (64 KiB) is above what wraith ever builds.
        assert_eq!(io.max_datagram_to("127.0.0.1:9".parse().unwrap()), MAX_DATAGRAM);
        // A v4-mapped peer (a dual-stack server) is the same IPv4 peer.
        assert_eq!(io.max_datagram_to("[::ffff:127.0.0.1]:9".parse().unwrap()), MAX_DATAGRAM);
        assert_eq!(io.mtus.lock().unwrap().len(), 1);
        // Remembered: a changed entry is what comes back within the minute.
        io.mtus.lock().unwrap().get_mut(&("127.0.0.1".parse::<IpAddr>().unwrap(), 0)).unwrap().0 = 1400;
        assert_eq!(io.max_datagram_to("127.0.0.1:10".parse().unwrap()), 1400);
        // A link-local address on two interfaces is two peers.
        let _ = io.max_datagram_to("[fe80::1%1]:9".parse().unwrap());
        let _ = io.max_datagram_to("[fe80::1%2]:9".parse().unwrap());
        assert_eq!(io.mtus.lock().unwrap().len(), 3);
    }
}
