//! Server side of the protocol, sans-IO: authenticates datagrams, keeps sessions, and frames
//! responses into pieces. Request handling itself (the filesystem) lives in `serve`.

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use rand::{rngs::StdRng, RngCore, SeedableRng};

use super::frame::{self, Missing, RESP_HDR};
use super::session::{handshake_key, ReplayWindow, SessionKeys};
use super::wire::{self, Header, Kind, HEADER_LEN, MAC_LEN, MAX_DATAGRAM, MIN_DATAGRAM};

/// At most this many sessions are remembered; the least recently used is forgotten first (its
/// client then gets STALE_SESSION and shakes hands again).
pub const MAX_SESSIONS: usize = 4096;
/// Sessions a HELLO made whose client has not yet sent an authentic request. A HELLO can be
/// replayed by anyone who saw one: kept apart, replays can only push out each other and
/// handshakes under way, never an established session.
pub const MAX_FRESH_SESSIONS: usize = 1024;

pub struct Session {
    pub id: u64,
    keys: SessionKeys,
    piece: usize,
    pn: AtomicU64,
    replay: Mutex<ReplayWindow>,
}

/// A run of datagrams of equal size `seg` (the last may be shorter) laid end to end, ready for one
/// segmentation-offload send.
pub struct Burst {
    pub buf: Vec<u8>,
    pub seg: usize,
}

/// Datagrams framed and sealed ahead of sending, at most. Packet numbers are taken as pieces are
/// sealed, so a burst sealed long before it is sent (another worker's burst going out first)
/// must stay well inside the receiver's replay window: workers × this ≤ the window.
pub const MAX_BURST: usize = 512;

impl Session {
    /// Frame `resp` as pieces (only the `missing` ranges when the client asked for a repair),
    /// one burst.
    pub fn encode_response(&self, req_id: u64, resp: &[u8], missing: &[Missing]) -> Burst {
        let mut out = Burst { buf: Vec::new(), seg: self.seg(resp.len()) };
        self.encode_response_each(req_id, resp, missing, usize::MAX, |b| {
            out.buf.extend_from_slice(&b.buf);
            true
        });
        out
    }

    /// The size of a full datagram of a `total`-byte response.
    fn seg(&self, total: usize) -> usize {
        HEADER_LEN + RESP_HDR + self.piece.min(total.max(1)) + MAC_LEN
    }

    /// Frame `resp` as pieces and hand them to `send` in bursts of at most `max` datagrams, each
    /// sealed just before it is handed over. `send` returning false (the peer is gone) stops it.
    pub fn encode_response_each(&self, req_id: u64, resp: &[u8], missing: &[Missing], max: usize, mut send: impl FnMut(&Burst) -> bool) {
        let total = resp.len();
        let count = total.div_ceil(self.piece).max(1);
        let seg = self.seg(total);
        let max = max.max(1);
        let mut b = Burst { buf: Vec::with_capacity(count.min(max).min(4096) * seg), seg };
        let mut n = 0;
        // False once `send` gave up: nothing more is sealed (no packet numbers spent on it).
        let mut emit = |i: usize, b: &mut Burst| -> bool {
            let off = i * self.piece;
            let end = (off + self.piece).min(total);
            let pn = self.pn.fetch_add(1, Ordering::Relaxed);
            let start = b.buf.len();
            Header { kind: Kind::Response, session: self.id, pn }.encode(&mut b.buf);
            frame::encode_piece_header(&mut b.buf, req_id, total as u32, self.piece as u16, i as u16);
            b.buf.extend_from_slice(&resp[off..end]);
            wire::seal_session(&self.keys.s2c, &mut b.buf, start);
            n += 1;
            if n < max {
                return true;
            }
            n = 0;
            let more = send(b);
            b.buf.clear();
            more
        };
        // Each piece at most once, whatever the request lists: one request naming the whole
        // response thousands of times must not make thousands of copies.
        let mut ranges: Vec<(usize, usize)> = if missing.is_empty() {
            vec![(0, count)]
        } else {
            missing
                .iter()
                .map(|m| (m.start as usize, (m.start as usize + m.len as usize).min(count)))
                .filter(|(s, e)| s < e)
                .collect()
        };
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        for (start, end) in merged {
            for i in start..end {
                if !emit(i, &mut b) {
                    return;
                }
            }
        }
        if !b.buf.is_empty() {
            send(&b);
        }
    }
}

/// What an incoming datagram asks of the application.
pub enum Input {
    /// An authenticated request.
    Request { session: Arc<Session>, id: u64, missing: Vec<Missing>, body: Vec<u8> },
    /// Send this datagram back to the sender (handshake answer, REJECT, STALE_SESSION).
    Reply(Vec<u8>),
}

pub struct Server {
    psk: [u8; 32],
    hs_key: [u8; 32],
    rng: StdRng,
    sessions: LruCache<u64, Arc<Session>>,
    /// Sessions not yet confirmed by an authentic request (see [`MAX_FRESH_SESSIONS`]).
    fresh: LruCache<u64, Arc<Session>>,
    /// Token bucket for unauthenticated answers (REJECT / STALE_SESSION).
    tokens: f64,
    last_refill: Option<Instant>,
    pub bad_mac: u64,
    pub replays: u64,
}

const UNAUTH_PER_SEC: f64 = 200.0;

impl Server {
    pub fn new(psk: [u8; 32], seed: u64) -> Self {
        Server {
            psk,
            hs_key: handshake_key(&psk),
            rng: StdRng::seed_from_u64(seed),
            sessions: LruCache::new(NonZeroUsize::new(MAX_SESSIONS).unwrap()),
            fresh: LruCache::new(NonZeroUsize::new(MAX_FRESH_SESSIONS).unwrap()),
            tokens: UNAUTH_PER_SEC,
            last_refill: None,
            bad_mac: 0,
            replays: 0,
        }
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    fn unauth_allowed(&mut self, now: Instant) -> bool {
        let dt = self.last_refill.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
        self.last_refill = Some(now);
        self.tokens = (self.tokens + dt.as_secs_f64() * UNAUTH_PER_SEC).min(UNAUTH_PER_SEC);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Take one datagram (decrypted in place when it is a session's). `path_max` says how large a
    /// datagram this server can send back to the datagram's sender (its own side of the path:
    /// interface MTU, route, AF_XDP frame); asked only for an authentic HELLO, whose session
    /// then uses the smaller of that and what the client says its side carries.
    pub fn handle(&mut self, now: Instant, d: &mut [u8], path_max: impl FnOnce() -> usize) -> Option<Input> {
        // No client sends more (a request's body is copied into the work queue: 4,096 of them
        // stay within 64 MiB).
        if d.len() > MAX_DATAGRAM {
            return None;
        }
        let Some(h) = Header::decode(d) else {
            // A HELLO of another protocol version: say which version we speak (rate-limited).
            let r = wire::version_reject(d)?;
            return self.unauth_allowed(now).then_some(Input::Reply(r));
        };
        match h.kind {
            Kind::Hello => self.on_hello(now, d, path_max),
            Kind::Request => {
                let known = match self.sessions.get(&h.session) {
                    Some(s) => Some((s.clone(), false)),
                    None => self.fresh.peek(&h.session).map(|s| (s.clone(), true)),
                };
                let Some((s, fresh)) = known else {
                    // Unknown session (we restarted, or forgot it): tell the client, with fewer
                    // bytes than it sent, so it shakes hands again.
                    if !self.unauth_allowed(now) {
                        return None;
                    }
                    let mut r = Vec::with_capacity(HEADER_LEN);
                    Header { kind: Kind::StaleSession, session: h.session, pn: 0 }.encode(&mut r);
                    return (r.len() <= d.len()).then_some(Input::Reply(r));
                };
                let Some(body) = wire::open_session(&s.keys.c2s, d) else {
                    self.bad_mac += 1;
                    return None;
                };
                if !s.replay.lock().unwrap().accept(h.pn) {
                    self.replays += 1;
                    return None;
                }
                if fresh {
                    // The client holds the session's keys: an established session from now on.
                    self.fresh.pop(&h.session);
                    self.sessions.put(h.session, s.clone());
                }
                let f = frame::decode_request(&body[HEADER_LEN..])?;
                Some(Input::Request { session: s, id: f.id, missing: f.missing, body: f.body.to_vec() })
            }
            _ => None,
        }
    }

    fn on_hello(&mut self, now: Instant, d: &[u8], path_max: impl FnOnce() -> usize) -> Option<Input> {
        if d.len() < MIN_DATAGRAM {
            return None;
        }
        let Some(body) = wire::open(&self.hs_key, d) else {
            self.bad_mac += 1;
            // Wrong key: say so (rate-limited, smaller than the HELLO, echoing its nonce) so the
            // client can print a clear message instead of timing out.
            if !self.unauth_allowed(now) {
                return None;
            }
            let mut r = Vec::with_capacity(HEADER_LEN + 32);
            Header { kind: Kind::Reject, session: 0, pn: 0 }.encode(&mut r);
            r.extend_from_slice(&d[HEADER_LEN..HEADER_LEN + 32]);
            return Some(Input::Reply(r));
        };
        let b = &body[HEADER_LEN..];
        let client_nonce: [u8; 32] = b[..32].try_into().ok()?;
        // A client on a path with a larger MTU than ours (jumbo frames on its side) must not make
        // us send datagrams our side cannot carry: they would be refused (EMSGSIZE, an AF_XDP
        // frame too small) or dropped, and every read would time out.
        let max_dgram = (u16::from_le_bytes([b[32], b[33]]) as usize).min(path_max()).clamp(MIN_DATAGRAM, MAX_DATAGRAM);
        let mut server_nonce = [0u8; 32];
        self.rng.fill_bytes(&mut server_nonce);
        let id = loop {
            let id = self.rng.next_u64();
            if id != 0 && !self.sessions.contains(&id) && !self.fresh.contains(&id) {
                break id;
            }
        };
        let keys = SessionKeys::derive(&self.psk, &client_nonce, &server_nonce, id);
        let piece = max_dgram - HEADER_LEN - RESP_HDR - MAC_LEN;
        self.fresh.put(
            id,
            Arc::new(Session { id, keys, piece, pn: AtomicU64::new(0), replay: Mutex::new(ReplayWindow::new()) }),
        );
        let mut r = Vec::with_capacity(HEADER_LEN + 64 + MAC_LEN);
        Header { kind: Kind::HelloAck, session: id, pn: 0 }.encode(&mut r);
        r.extend_from_slice(&client_nonce);
        r.extend_from_slice(&server_nonce);
        wire::seal(&self.hs_key, &mut r);
        Some(Input::Reply(r))
    }
}
