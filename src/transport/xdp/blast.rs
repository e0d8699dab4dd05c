//! Raw throughput of a datagram path, without the protocol: one side sends equal datagrams as
//! fast as the path takes them, the other counts what arrives. Used by scripts/bench-xdp to
//! measure the AF_XDP ceiling of a link (hidden `wraith-serve --xdp-blast-*` options).

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::transport::{DatagramIo, RecvBufs};

/// Datagrams per `send_burst`, as a wraith response burst would be.
const BURST: usize = 64;

#[derive(Clone, Copy, Debug, Default)]
pub struct BlastReport {
    pub datagrams: u64,
    pub bytes: u64,
    pub secs: f64,
}

impl BlastReport {
    pub fn mb_per_s(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / self.secs / 1e6
        } else {
            0.0
        }
    }
}

/// Send `size`-byte datagrams to `dest` for `dur` from `threads` threads at once (an AF_XDP
/// path spreads their bursts over its queues); the sums, over the longest thread's time.
pub fn send(io: &dyn DatagramIo, dest: SocketAddr, size: usize, dur: Duration, threads: usize) -> io::Result<BlastReport> {
    let reports: Vec<io::Result<BlastReport>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads.max(1)).map(|_| s.spawn(|| send_one(io, dest, size, dur))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(io::Error::other("a sender thread panicked")))).collect()
    });
    let mut total = BlastReport::default();
    for r in reports {
        let r = r?;
        total.datagrams += r.datagrams;
        total.bytes += r.bytes;
        total.secs = total.secs.max(r.secs);
    }
    Ok(total)
}

fn send_one(io: &dyn DatagramIo, dest: SocketAddr, size: usize, dur: Duration) -> io::Result<BlastReport> {
    let mut buf = vec![0u8; size * BURST];
    for (i, b) in buf.iter_mut().enumerate() {
        *b = i as u8;
    }
    let start = Instant::now();
    let mut r = BlastReport::default();
    while start.elapsed() < dur {
        io.send_burst(dest, &buf, size)?;
        r.datagrams += BURST as u64;
        r.bytes += buf.len() as u64;
    }
    r.secs = start.elapsed().as_secs_f64();
    Ok(r)
}

/// Count datagrams until `idle` passes without one (after the first), or `limit` in all.
/// The time runs from the first datagram to the last.
pub fn receive(io: &dyn DatagramIo, idle: Duration, limit: Duration) -> io::Result<BlastReport> {
    let begin = Instant::now();
    let (mut first, mut last) = (None::<Instant>, Instant::now());
    let mut r = BlastReport::default();
    let mut bufs = RecvBufs::default();
    while begin.elapsed() < limit {
        if !io.wait_readable(Duration::from_millis(100))? {
            if first.is_some() && last.elapsed() >= idle {
                break;
            }
            continue;
        }
        let (mut n, mut b) = (0u64, 0u64);
        io.recv_now(&mut bufs, &mut |_, d| {
            n += 1;
            b += d.len() as u64;
            true
        })?;
        if n > 0 {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            r.datagrams += n;
            r.bytes += b;
        }
    }
    r.secs = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::UdpIo;
    use std::net::UdpSocket;

    #[test]
    fn senders_add_up_and_the_receiver_counts_what_came() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = sock.local_addr().unwrap();
        let rx = UdpIo::new(sock).unwrap();
        let tx = UdpIo::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let got = std::thread::scope(|s| {
            let r = s.spawn(|| receive(&rx, Duration::from_millis(300), Duration::from_secs(10)).unwrap());
            let sent = send(&tx, dest, 1000, Duration::from_millis(200), 2).unwrap();
            assert!(sent.datagrams > 0 && sent.datagrams % BURST as u64 == 0, "whole bursts: {sent:?}");
            assert_eq!(sent.bytes, sent.datagrams * 1000);
            assert!(sent.secs >= 0.2 && sent.secs < 5.0, "{sent:?}");
            (sent, r.join().unwrap())
        });
        let (sent, recv) = got;
        // Loopback may drop datagrams when the receiver falls behind, never invent them.
        assert!(recv.datagrams > 0 && recv.datagrams <= sent.datagrams, "{recv:?} of {sent:?}");
        assert_eq!(recv.bytes, recv.datagrams * 1000);
    }
}
