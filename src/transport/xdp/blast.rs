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

/// Send `size`-byte datagrams to `dest` for `dur`.
pub fn send(io: &dyn DatagramIo, dest: SocketAddr, size: usize, dur: Duration) -> io::Result<BlastReport> {
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
