//! Keys and anti-replay. The pre-shared key (PSK) never authenticates data directly: it derives a
//! handshake key (HELLO / HELLO_ACK) and, with both sides' fresh nonces, per-direction session keys.

use super::wire::SessionKey;

/// Derived from the PSK; authenticates HELLO and HELLO_ACK only.
pub fn handshake_key(psk: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("wraith v1 handshake key");
    h.update(psk);
    *h.finalize().as_bytes()
}

/// Keys for one session, one per direction so a datagram can never be reflected back.
#[derive(Clone)]
pub struct SessionKeys {
    pub c2s: SessionKey,
    pub s2c: SessionKey,
}

impl SessionKeys {
    pub fn derive(psk: &[u8; 32], client_nonce: &[u8; 32], server_nonce: &[u8; 32], session: u64) -> Self {
        let dir = |label: &str| {
            let mut h = blake3::Hasher::new_derive_key(label);
            h.update(psk);
            h.update(client_nonce);
            h.update(server_nonce);
            h.update(&session.to_le_bytes());
            let mut k = [0u8; 16];
            k.copy_from_slice(&h.finalize().as_bytes()[..16]);
            SessionKey::new(k)
        };
        SessionKeys { c2s: dir("wraith v2 session client-to-server"), s2c: dir("wraith v2 session server-to-client") }
    }
}

/// Sliding replay window over packet numbers: accepts each number at most once, and nothing older
/// than `WINDOW` behind the highest seen.
pub struct ReplayWindow {
    highest: u64,
    bits: [u64; WORDS],
    any: bool,
}

const WORDS: usize = 64;
pub const WINDOW: u64 = (WORDS * 64) as u64;

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    pub fn new() -> Self {
        ReplayWindow { highest: 0, bits: [0; WORDS], any: false }
    }

    fn bit(&mut self, pn: u64) -> (usize, u64) {
        let i = (pn % WINDOW) as usize;
        (i / 64, 1u64 << (i % 64))
    }

    /// True if `pn` has not been seen and is inside the window (call only after the MAC checked).
    pub fn check(&self, pn: u64) -> bool {
        if !self.any || pn > self.highest {
            return true;
        }
        if self.highest - pn >= WINDOW {
            return false;
        }
        let i = (pn % WINDOW) as usize;
        self.bits[i / 64] & (1u64 << (i % 64)) == 0
    }

    /// Record `pn` as seen. Returns false (and records nothing) for a replay or a too-old number.
    pub fn accept(&mut self, pn: u64) -> bool {
        if !self.check(pn) {
            return false;
        }
        if !self.any {
            self.any = true;
            self.highest = pn;
        } else if pn > self.highest {
            let advance = pn - self.highest;
            if advance >= WINDOW {
                self.bits = [0; WORDS];
            } else {
                for p in self.highest + 1..=pn {
                    let (w, m) = self.bit(p);
                    self.bits[w] &= !m;
                }
            }
            self.highest = pn;
        }
        let (w, m) = self.bit(pn);
        self.bits[w] |= m;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::new();
        assert!(w.accept(5));
        assert!(!w.accept(5));
        assert!(w.accept(3));
        assert!(!w.accept(3));
        assert!(w.accept(5000));
        assert!(!w.accept(5)); // too old now
        assert!(w.accept(5000 - 10));
        assert!(!w.accept(5000 - 10));
        assert!(w.accept(5001));
        assert!(w.accept(100_000));
        assert!(!w.accept(100_000 - WINDOW));
        assert!(w.accept(100_000 - WINDOW + 1));
    }

    #[test]
    fn replay_window_model() {
        use std::collections::HashSet;
        let mut w = ReplayWindow::new();
        let mut seen = HashSet::new();
        let mut x: u64 = 12345;
        let mut hi = 0u64;
        for _ in 0..20_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let pn = (x >> 33) % 20_000;
            let fresh = !seen.contains(&pn) && (seen.is_empty() || pn > hi || hi - pn < WINDOW);
            assert_eq!(w.accept(pn), fresh, "pn {pn} hi {hi}");
            if fresh {
                seen.insert(pn);
                hi = hi.max(pn);
            }
        }
    }

    #[test]
    fn keys_differ_by_direction_and_nonce() {
        let k = SessionKeys::derive(&[1; 32], &[2; 32], &[3; 32], 7);
        assert_ne!(k.c2s, k.s2c);
        let k2 = SessionKeys::derive(&[1; 32], &[2; 32], &[4; 32], 7);
        assert_ne!(k.c2s, k2.c2s);
        assert_ne!(handshake_key(&[1; 32]), handshake_key(&[2; 32]));
    }
}
