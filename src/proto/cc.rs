//! RTT estimation (RFC 6298 style) and a byte-counted AIMD window for requests in flight.
//! The window starts small, grows while responses complete and halves (at most once per RTT) when a
//! response stalls with pieces missing, so the same code fits loopback, veth and a lossy WAN.

use std::time::{Duration, Instant};

pub const INITIAL_RTO: Duration = Duration::from_millis(300);
pub const MIN_RTO: Duration = Duration::from_millis(15);
pub const MAX_RTO: Duration = Duration::from_secs(2);

#[derive(Clone, Debug)]
pub struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
    min: Option<Duration>,
}

impl Default for Rtt {
    fn default() -> Self {
        Rtt { srtt: None, rttvar: Duration::ZERO, min: None }
    }
}

impl Rtt {
    pub fn sample(&mut self, r: Duration) {
        self.min = Some(self.min.map_or(r, |m| m.min(r)));
        match self.srtt {
            None => {
                self.srtt = Some(r);
                self.rttvar = r / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(r);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + r) / 8);
            }
        }
    }

    pub fn srtt(&self) -> Duration {
        self.srtt.unwrap_or(INITIAL_RTO / 3)
    }

    pub fn rto(&self) -> Duration {
        match self.srtt {
            None => INITIAL_RTO,
            Some(s) => (s + (self.rttvar * 4).max(Duration::from_millis(2))).clamp(MIN_RTO, MAX_RTO),
        }
    }
}

pub const MIN_WINDOW: u64 = 64 << 10;
pub const INITIAL_WINDOW: u64 = 1 << 20;
pub const MAX_WINDOW: u64 = 32 << 20;
const INCREMENT: u64 = 256 << 10;

#[derive(Clone, Debug)]
pub struct Window {
    cwnd: u64,
    ssthresh: u64,
    recovery_until: Option<Instant>,
    pub losses: u64,
}

impl Default for Window {
    fn default() -> Self {
        Window { cwnd: INITIAL_WINDOW, ssthresh: MAX_WINDOW, recovery_until: None, losses: 0 }
    }
}

impl Window {
    pub fn cwnd(&self) -> u64 {
        self.cwnd
    }

    /// `bytes` of response arrived complete.
    pub fn on_ack(&mut self, bytes: u64) {
        let b = bytes.max(1024);
        if self.cwnd < self.ssthresh {
            self.cwnd += b;
        } else {
            self.cwnd += (b * INCREMENT / self.cwnd).max(1);
        }
        self.cwnd = self.cwnd.min(MAX_WINDOW);
    }

    /// A response stalled with pieces missing: multiplicative decrease, once per round trip.
    pub fn on_loss(&mut self, now: Instant, srtt: Duration) {
        if let Some(t) = self.recovery_until {
            if now < t {
                return;
            }
        }
        self.losses += 1;
        self.cwnd = (self.cwnd / 2).max(MIN_WINDOW);
        self.ssthresh = self.cwnd;
        self.recovery_until = Some(now + srtt.max(Duration::from_millis(1)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rto_tracks_rtt() {
        let mut r = Rtt::default();
        assert_eq!(r.rto(), INITIAL_RTO);
        for _ in 0..20 {
            r.sample(Duration::from_millis(100));
        }
        assert!(r.rto() >= Duration::from_millis(100) && r.rto() < Duration::from_millis(150), "{:?}", r.rto());
        for _ in 0..200 {
            r.sample(Duration::from_micros(50));
        }
        assert_eq!(r.rto(), MIN_RTO);
    }

    #[test]
    fn window_aimd() {
        let mut w = Window::default();
        let t0 = Instant::now();
        for _ in 0..10 {
            w.on_ack(256 << 10);
        }
        let grown = w.cwnd();
        assert!(grown > INITIAL_WINDOW);
        w.on_loss(t0, Duration::from_millis(10));
        assert_eq!(w.cwnd(), grown / 2);
        w.on_loss(t0 + Duration::from_millis(5), Duration::from_millis(10)); // same RTT: ignored
        assert_eq!(w.cwnd(), grown / 2);
        for i in 0..100 {
            w.on_loss(t0 + Duration::from_secs(1 + i), Duration::from_millis(10));
        }
        assert_eq!(w.cwnd(), MIN_WINDOW);
    }
}
