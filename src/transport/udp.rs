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
    mtus: Mutex<HashMap<IpAddr, (usize, Instant)>>,
}

impl UdpIo {
    pub fn new(sock: UdpSocket) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        let state = UdpSocketState::new(UdpSockRef::from(&sock))?;
        let _ = net::set_recv_buffer(sock.as_fd(), SOCKET_BUFFER);
        let _ = net::set_send_buffer(sock.as_fd(), SOCKET_BUFFER);
        Ok(UdpIo { sock, state, mtus: Mutex::new(HashMap::new()) })
    }

    pub fn socket(&self) -> &UdpSocket {
        &self.sock
    }

    /// Waits (bounded) when the socket buffer is full rather than dropping.
    fn send_burst_impl(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
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
                for d in data.chunks_mut(stride) {
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

impl DatagramIo for UdpIo {
    fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
        self.send_burst_impl(dest, buf, seg)
    }
    fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
        net::poll_readable(self.sock.as_fd(), timeout)
    }
    fn recv_now(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
        self.recv_now_impl(bufs, f)
    }
    /// The route's MTU to `peer`, asked of a throwaway socket connected to it (the serving
    /// socket is not connected) and remembered for a minute. The socket sends with "don't
    /// fragment" (quinn-udp), so a datagram above this fails with EMSGSIZE. When the kernel
    /// cannot say: the smallest.
    fn max_datagram_to(&self, peer: SocketAddr) -> usize {
        // A v4-mapped peer of a dual-stack socket is asked about as IPv4 (its real route); any
        // other keeps its scope (a link-local peer needs its interface to connect).
        let peer = match peer {
            SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::new(IpAddr::V4(v4), v6.port()),
                None => SocketAddr::V6(v6),
            },
            v4 => v4,
        };
        let now = Instant::now();
        if let Some(&(m, at)) = self.mtus.lock().unwrap().get(&peer.ip()) {
            if now.duration_since(at) < MTU_TTL {
                return m;
            }
        }
        let m = match super::connected_socket(peer) {
            Ok(s) => super::path_max_datagram(&s, peer),
            Err(_) => crate::proto::wire::MIN_DATAGRAM,
        };
        super::bounded_insert(&mut self.mtus.lock().unwrap(), peer.ip(), (m, now));
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::wire::MAX_DATAGRAM;

    #[test]
    fn max_datagram_to_asks_the_route_and_remembers_it() {
        let io = UdpIo::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        // Loopback's MTU (64 KiB) is above what wraith ever builds.
        assert_eq!(io.max_datagram_to("127.0.0.1:9".parse().unwrap()), MAX_DATAGRAM);
        // A v4-mapped peer (a dual-stack server) is the same IPv4 peer.
        assert_eq!(io.max_datagram_to("[::ffff:127.0.0.1]:9".parse().unwrap()), MAX_DATAGRAM);
        assert_eq!(io.mtus.lock().unwrap().len(), 1);
        // Remembered: a changed entry is what comes back within the minute.
        io.mtus.lock().unwrap().get_mut(&"127.0.0.1".parse::<IpAddr>().unwrap()).unwrap().0 = 1400;
        assert_eq!(io.max_datagram_to("127.0.0.1:10".parse().unwrap()), 1400);
    }
}
