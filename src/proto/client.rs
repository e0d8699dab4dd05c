//! Client side of the protocol as a sans-IO state machine (quinn-proto style).
//!
//! Inputs: [`Client::start_request`], [`Client::handle_datagram`], [`Client::handle_timeout`], all
//! given `now`. Outputs: [`Client::poll_transmit`] (datagrams to send), [`Client::poll_event`]
//! (completed or failed requests) and [`Client::poll_timeout`] (when to call `handle_timeout`).
//! No sockets, no clock, no threads: the tests drive it over a simulated lossy link.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, RngCore, SeedableRng};

use super::cc::{Rtt, Window, MAX_RTO};
use super::frame::{self, Missing, RESP_HDR};
use super::session::{handshake_key, ReplayWindow, SessionKeys};
use super::wire::{self, Header, Kind, SessionKey, HEADER_LEN, MAC_LEN, MIN_DATAGRAM};
use crate::chunk::Buf;
use crate::error::Error;

#[derive(Clone)]
pub struct Config {
    pub psk: [u8; 32],
    /// Largest datagram the path carries without fragmentation (from the route MTU).
    pub max_datagram: usize,
    /// Seed for nonces; take it from the OS in production, fix it in tests.
    pub seed: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A request finished: its response body, or why it failed.
    Done { id: u64, result: Result<Buf, Error> },
    /// The server answered our HELLO with REJECT: the keys differ.
    AuthRejected,
    /// The server answered our HELLO in another protocol version (this one).
    WrongVersion(u8),
    /// A session is established (first time or after the server came back).
    Connected,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    pub dropped_bad_mac: u64,
    pub dropped_replay: u64,
    pub retransmits: u64,
    pub handshakes: u64,
}

enum State {
    Handshaking { nonce: [u8; 32], next_send: Instant, backoff: Duration },
    Up { session: u64, keys: SessionKeys },
}

struct Assembly {
    total: u32,
    piece: u16,
    count: u16,
    have: Vec<u64>,
    got: u16,
    buf: Buf,
}

impl Assembly {
    fn missing(&self, limit: usize) -> Vec<Missing> {
        let mut out = Vec::new();
        let mut i = 0u16;
        while i < self.count && out.len() < limit {
            if self.have[i as usize / 64] & (1 << (i % 64)) == 0 {
                let start = i;
                while i < self.count && self.have[i as usize / 64] & (1 << (i % 64)) == 0 {
                    i += 1;
                }
                out.push(Missing { start, len: i - start });
            } else {
                i += 1;
            }
        }
        out
    }
}

struct Req {
    body: Vec<u8>,
    expect: u64,
    deadline: Instant,
    /// When the current transmission was sent (None: waiting to be sent).
    sent_at: Option<Instant>,
    last_progress: Instant,
    retransmitted: bool,
    asm: Option<Assembly>,
}

pub struct Client {
    cfg: Config,
    hs_key: [u8; 32],
    rng: StdRng,
    state: State,
    send_pn: u64,
    replay: ReplayWindow,
    next_id: u64,
    reqs: BTreeMap<u64, Req>,
    waiting: VecDeque<u64>,
    in_flight: u64,
    rtt: Rtt,
    window: Window,
    last_rx: Option<Instant>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    pub stats: Stats,
}

/// Request framing overhead inside a REQUEST datagram: id(8) + missing count(2).
const REQ_HDR: usize = 10;

impl Client {
    pub fn new(cfg: Config, now: Instant) -> Self {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let mut nonce = [0u8; 32];
        rng.fill_bytes(&mut nonce);
        let hs_key = handshake_key(&cfg.psk);
        let mut c = Client {
            cfg,
            hs_key,
            rng,
            state: State::Handshaking { nonce, next_send: now, backoff: Duration::from_millis(200) },
            send_pn: 0,
            replay: ReplayWindow::new(),
            next_id: 1,
            reqs: BTreeMap::new(),
            waiting: VecDeque::new(),
            in_flight: 0,
            rtt: Rtt::default(),
            window: Window::default(),
            last_rx: None,
            out: VecDeque::new(),
            events: VecDeque::new(),
            stats: Stats::default(),
        };
        c.stats.handshakes = 1;
        c.handle_timeout(now);
        c
    }

    /// Largest request body that fits one datagram.
    pub fn max_request(&self) -> usize {
        self.cfg.max_datagram - HEADER_LEN - REQ_HDR - 2 - MAC_LEN
    }

    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    pub fn rtt(&self) -> Duration {
        self.rtt.srtt()
    }

    pub fn window(&self) -> u64 {
        self.window.cwnd()
    }

    pub fn losses(&self) -> u64 {
        self.window.losses
    }

    pub fn outstanding(&self) -> usize {
        self.reqs.len()
    }

    /// Queue a request. `expect` is the expected response size (for the window); the request fails
    /// with [`Error::RemoteTimeout`] at `deadline`.
    pub fn start_request(&mut self, now: Instant, body: Vec<u8>, expect: u64, deadline: Instant) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        if body.len() > self.max_request() {
            self.events.push_back(Event::Done { id, result: Err(Error::NameTooLong) });
            return id;
        }
        self.reqs.insert(
            id,
            Req { body, expect: expect.max(512), deadline, sent_at: None, last_progress: now, retransmitted: false, asm: None },
        );
        self.waiting.push_back(id);
        self.flush(now);
        id
    }

    /// Give up on a request (the caller stopped waiting).
    pub fn cancel(&mut self, id: u64) {
        if let Some(r) = self.reqs.remove(&id) {
            if r.sent_at.is_some() {
                self.in_flight = self.in_flight.saturating_sub(r.expect);
            }
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut min = |x: Instant| t = Some(t.map_or(x, |y| y.min(x)));
        if let State::Handshaking { next_send, .. } = &self.state {
            if !self.reqs.is_empty() {
                min(*next_send);
            }
        }
        let rto = self.rtt.rto();
        for r in self.reqs.values() {
            min(r.deadline);
            if r.sent_at.is_some() {
                min(r.last_progress + rto);
            }
        }
        t
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        // Deadlines first.
        let expired: Vec<u64> = self.reqs.iter().filter(|(_, r)| now >= r.deadline).map(|(id, _)| *id).collect();
        for id in expired {
            self.fail(id, Error::RemoteTimeout);
        }
        match &mut self.state {
            State::Handshaking { nonce, next_send, backoff } => {
                if now >= *next_send && !self.reqs.is_empty() {
                    let nonce = *nonce;
                    *next_send = now + *backoff;
                    *backoff = (*backoff * 2).min(MAX_RTO);
                    self.send_hello(nonce);
                }
            }
            State::Up { .. } => {
                let rto = self.rtt.rto();
                // A silent server with work outstanding: it may have restarted and lost our session
                // (and its STALE answer may be lost too). Start a new handshake.
                if let Some(last) = self.last_rx {
                    let quiet = (rto * 8).max(Duration::from_secs(1));
                    let sent_any = self.reqs.values().any(|r| r.sent_at.is_some_and(|s| now >= s + quiet));
                    if sent_any && now >= last + quiet {
                        self.rehandshake(now);
                        return;
                    }
                }
                let stalled: Vec<u64> = self
                    .reqs
                    .iter()
                    .filter(|(_, r)| r.sent_at.is_some() && now >= r.last_progress + rto)
                    .map(|(id, _)| *id)
                    .collect();
                if !stalled.is_empty() {
                    self.window.on_loss(now, self.rtt.srtt());
                }
                for id in stalled {
                    self.stats.retransmits += 1;
                    self.transmit(id, now, true);
                }
            }
        }
        self.flush(now);
    }

    /// Take one datagram (a RESPONSE is decrypted in place).
    pub fn handle_datagram(&mut self, now: Instant, d: &mut [u8]) {
        self.stats.datagrams_in += 1;
        let Some(h) = Header::decode(d) else {
            if let (Some((v, echo)), State::Handshaking { nonce, .. }) = (wire::other_version_reject(d), &self.state) {
                if echo == &nonce[..] {
                    self.events.push_back(Event::WrongVersion(v));
                    let ids: Vec<u64> = self.reqs.keys().copied().collect();
                    for id in ids {
                        self.fail(id, Error::WrongVersion(v));
                    }
                }
            }
            return;
        };
        match h.kind {
            Kind::HelloAck => self.on_hello_ack(now, h, &*d),
            Kind::Reject => {
                if let State::Handshaking { nonce, .. } = &self.state {
                    if d.len() >= HEADER_LEN + 32 && d[HEADER_LEN..HEADER_LEN + 32] == nonce[..] {
                        self.events.push_back(Event::AuthRejected);
                        let ids: Vec<u64> = self.reqs.keys().copied().collect();
                        for id in ids {
                            self.fail(id, Error::AuthFailed);
                        }
                    }
                }
            }
            Kind::StaleSession => {
                if let State::Up { session, .. } = &self.state {
                    if h.session == *session {
                        self.rehandshake(now);
                    }
                }
            }
            Kind::Response => self.on_response(now, d),
            Kind::Hello | Kind::Request => {}
        }
    }

    fn rehandshake(&mut self, now: Instant) {
        let mut nonce = [0u8; 32];
        self.rng.fill_bytes(&mut nonce);
        self.state = State::Handshaking { nonce, next_send: now, backoff: Duration::from_millis(200) };
        self.stats.handshakes += 1;
        self.last_rx = None;
        // Everything sent goes back to the queue, keeping the pieces already received.
        let mut resend: Vec<u64> = Vec::new();
        for (id, r) in self.reqs.iter_mut() {
            if r.sent_at.take().is_some() {
                resend.push(*id);
            }
        }
        for id in resend.into_iter().rev() {
            self.waiting.push_front(id);
        }
        self.in_flight = 0;
        self.handle_timeout(now);
    }

    fn send_hello(&mut self, nonce: [u8; 32]) {
        let mut d = Vec::with_capacity(MIN_DATAGRAM);
        Header { kind: Kind::Hello, session: 0, pn: 0 }.encode(&mut d);
        d.extend_from_slice(&nonce);
        d.extend_from_slice(&(self.cfg.max_datagram as u16).to_le_bytes());
        // Pad so that the server never answers with more bytes than it received.
        d.resize(MIN_DATAGRAM - MAC_LEN, 0);
        wire::seal(&self.hs_key, &mut d);
        self.stats.datagrams_out += 1;
        self.out.push_back(d);
    }

    fn on_hello_ack(&mut self, now: Instant, h: Header, d: &[u8]) {
        let State::Handshaking { nonce, .. } = &self.state else { return };
        let Some(body) = wire::open(&self.hs_key, d) else {
            self.stats.dropped_bad_mac += 1;
            return;
        };
        let b = &body[HEADER_LEN..];
        if b.len() < 64 || b[..32] != nonce[..] {
            return;
        }
        let server_nonce: [u8; 32] = b[32..64].try_into().unwrap();
        let keys = SessionKeys::derive(&self.cfg.psk, nonce, &server_nonce, h.session);
        self.state = State::Up { session: h.session, keys };
        self.replay = ReplayWindow::new();
        self.last_rx = Some(now);
        self.events.push_back(Event::Connected);
        self.flush(now);
    }

    /// The key that authenticates RESPONSE datagrams of the current session, so that other threads
    /// can check MACs in parallel before taking the lock (see [`ResponseKey::authenticate`]).
    pub fn response_key(&self) -> Option<ResponseKey> {
        match &self.state {
            State::Up { session, keys } => Some(ResponseKey { session: *session, key: keys.s2c.clone() }),
            State::Handshaking { .. } => None,
        }
    }

    fn on_response(&mut self, now: Instant, d: &mut [u8]) {
        let Some(key) = self.response_key() else { return };
        match key.authenticate(d) {
            Some(a) => {
                self.on_authentic(now, a);
            }
            None => self.stats.dropped_bad_mac += 1,
        }
    }

    /// Count a datagram that claimed to be a RESPONSE of the current session and failed
    /// authentication on another thread (it is garbage now: not to be handed in again).
    pub fn note_bad_response(&mut self) {
        self.stats.datagrams_in += 1;
        self.stats.dropped_bad_mac += 1;
    }

    /// Take a RESPONSE whose MAC was already checked (possibly on another thread). A datagram of a
    /// session that has since been replaced is ignored.
    /// Take a response datagram authenticated outside the lock. True when it belongs to this
    /// session and is new (not a replay): the path may trust where it came from.
    pub fn handle_authentic(&mut self, now: Instant, a: Authentic<'_>) -> bool {
        self.stats.datagrams_in += 1;
        self.on_authentic(now, a)
    }

    fn on_authentic(&mut self, now: Instant, a: Authentic<'_>) -> bool {
        let Authentic { h, body } = a;
        let State::Up { session, .. } = &self.state else { return false };
        if h.session != *session {
            return false;
        }
        if !self.replay.accept(h.pn) {
            self.stats.dropped_replay += 1;
            return false;
        }
        self.last_rx = Some(now);
        let Some(p) = frame::decode_piece(&body[HEADER_LEN..]) else { return true };
        let Some(r) = self.reqs.get_mut(&p.req_id) else { return true };
        let Some(sent_at) = r.sent_at else { return true };
        let asm = match &mut r.asm {
            Some(a) => a,
            None => {
                if p.total as usize > super::msg::MAX_RESPONSE || p.piece_size == 0 {
                    return true;
                }
                let count = (p.total as usize).div_ceil(p.piece_size as usize).max(1);
                if count > u16::MAX as usize {
                    return true;
                }
                if !r.retransmitted {
                    self.rtt.sample(now.saturating_duration_since(sent_at));
                }
                r.asm = Some(Assembly {
                    total: p.total,
                    piece: p.piece_size,
                    count: count as u16,
                    have: vec![0; count.div_ceil(64)],
                    got: 0,
                    buf: crate::chunk::pool::take(p.total as usize),
                });
                r.asm.as_mut().unwrap()
            }
        };
        if p.total != asm.total || p.piece_size != asm.piece || p.index >= asm.count {
            return true;
        }
        let off = p.index as usize * asm.piece as usize;
        let want = (asm.total as usize - off).min(asm.piece as usize);
        if p.data.len() != want {
            return true;
        }
        let (w, m) = (p.index as usize / 64, 1u64 << (p.index % 64));
        if asm.have[w] & m != 0 {
            return true;
        }
        asm.have[w] |= m;
        asm.got += 1;
        asm.buf[off..off + want].copy_from_slice(p.data);
        r.last_progress = now;
        if asm.got == asm.count {
            let r = self.reqs.remove(&p.req_id).unwrap();
            self.in_flight = self.in_flight.saturating_sub(r.expect);
            let asm = r.asm.unwrap();
            self.window.on_ack(asm.total as u64);
            self.events.push_back(Event::Done { id: p.req_id, result: Ok(asm.buf) });
            self.flush(now);
        }
        true
    }

    fn fail(&mut self, id: u64, e: Error) {
        if let Some(r) = self.reqs.remove(&id) {
            if r.sent_at.is_some() {
                self.in_flight = self.in_flight.saturating_sub(r.expect);
            }
            self.events.push_back(Event::Done { id, result: Err(e) });
        }
    }

    /// Send queued requests while the window allows.
    fn flush(&mut self, now: Instant) {
        if !self.is_connected() {
            if let State::Handshaking { next_send, .. } = &self.state {
                if now >= *next_send && !self.reqs.is_empty() {
                    self.handle_timeout(now);
                }
            }
            return;
        }
        while let Some(&id) = self.waiting.front() {
            let Some(r) = self.reqs.get(&id) else {
                self.waiting.pop_front();
                continue;
            };
            if self.in_flight > 0 && self.in_flight + r.expect > self.window.cwnd() {
                break;
            }
            self.waiting.pop_front();
            self.in_flight += r.expect;
            self.transmit(id, now, false);
        }
    }

    fn transmit(&mut self, id: u64, now: Instant, retransmit: bool) {
        let State::Up { session, keys } = &self.state else { return };
        let Some(r) = self.reqs.get_mut(&id) else { return };
        let room = (self.cfg.max_datagram - HEADER_LEN - REQ_HDR - MAC_LEN - r.body.len()) / 4;
        let missing = match (&r.asm, retransmit) {
            (Some(a), true) => a.missing(room.min(256)),
            _ => Vec::new(),
        };
        let pn = self.send_pn;
        self.send_pn += 1;
        let mut d = Vec::with_capacity(HEADER_LEN + REQ_HDR + r.body.len() + MAC_LEN + missing.len() * 4);
        Header { kind: Kind::Request, session: *session, pn }.encode(&mut d);
        frame::encode_request(&mut d, id, &missing, &r.body);
        wire::seal_session(&keys.c2s, &mut d, 0);
        r.sent_at = Some(now);
        r.last_progress = now;
        r.retransmitted |= retransmit;
        self.stats.datagrams_out += 1;
        self.out.push_back(d);
    }
}

/// Authenticates RESPONSE datagrams of one session; cheap to clone, usable on any thread.
#[derive(Clone)]
pub struct ResponseKey {
    session: u64,
    key: SessionKey,
}

/// A RESPONSE datagram that authenticated (and was decrypted in place). Only [`ResponseKey::authenticate`] makes one.
pub struct Authentic<'a> {
    h: Header,
    body: &'a [u8],
}

impl ResponseKey {
    pub fn session(&self) -> u64 {
        self.session
    }

    /// Whether `d` says it is a RESPONSE of this session (what [`Self::authenticate`] takes on).
    pub fn claims(&self, d: &[u8]) -> bool {
        Header::decode(d).is_some_and(|h| h.kind == Kind::Response && h.session == self.session)
    }

    /// Authenticate and decrypt `d` in place. None leaves a datagram of another kind or session
    /// untouched (one that fails authentication is garbage afterwards).
    pub fn authenticate<'a>(&self, d: &'a mut [u8]) -> Option<Authentic<'a>> {
        let h = Header::decode(d)?;
        if h.kind != Kind::Response || h.session != self.session {
            return None;
        }
        let body = wire::open_session(&self.key, d)?;
        Some(Authentic { h, body })
    }
}

/// Bytes of response payload per datagram for a path that carries `max_datagram`.
pub fn piece_size(max_datagram: usize) -> usize {
    max_datagram - HEADER_LEN - RESP_HDR - MAC_LEN
}
