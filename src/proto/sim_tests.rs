//! The protocol over a seeded lossy, reordering, duplicating in-memory link in simulated time.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::client::{Client, Config, Event};
use super::server::{Input, Server};
use super::wire::MAX_DATAGRAM;
use crate::error::Error;

#[derive(Clone, Copy)]
struct LinkCfg {
    loss: f64,
    dup: f64,
    delay: Duration,
    jitter: Duration,
}

/// One direction of the link: datagrams keyed by delivery time (ties broken by sequence).
struct Link {
    cfg: LinkCfg,
    q: BTreeMap<(Instant, u64), Vec<u8>>,
    seq: u64,
}

impl Link {
    fn new(cfg: LinkCfg) -> Self {
        Link { cfg, q: BTreeMap::new(), seq: 0 }
    }
    fn send(&mut self, now: Instant, d: Vec<u8>, rng: &mut StdRng) {
        if rng.gen_bool(self.cfg.loss) {
            return;
        }
        let copies = if rng.gen_bool(self.cfg.dup) { 2 } else { 1 };
        for _ in 0..copies {
            let j = self.cfg.jitter.as_nanos() as u64;
            let extra = if j > 0 { Duration::from_nanos(rng.gen_range(0..j)) } else { Duration::ZERO };
            self.seq += 1;
            self.q.insert((now + self.cfg.delay + extra, self.seq), d.clone());
        }
    }
    fn next_time(&self) -> Option<Instant> {
        self.q.keys().next().map(|k| k.0)
    }
    fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        let k = *self.q.keys().next()?;
        if k.0 <= now {
            self.q.remove(&k)
        } else {
            None
        }
    }
}

/// Deterministic response content for a request asking for `n` bytes tagged `t`.
fn content(n: u32, t: u32) -> Vec<u8> {
    (0..n).map(|i| (i.wrapping_mul(31).wrapping_add(t * 7) % 251) as u8).collect()
}

fn req(n: u32, t: u32) -> Vec<u8> {
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(&t.to_le_bytes());
    v
}

struct Sim {
    now: Instant,
    rng: StdRng,
    client: Client,
    server: Option<Server>,
    up: Link,
    down: Link,
    done: HashMap<u64, Result<Vec<u8>, Error>>,
    events: Vec<Event>,
    server_in_bytes: u64,
    server_out_bytes_unauth: u64,
    /// What the server's side of the path carries (its `path_max`).
    server_path_max: usize,
    /// Largest datagram the server sent.
    server_out_max: usize,
}

impl Sim {
    fn new(seed: u64, cfg: LinkCfg, client_psk: [u8; 32], server_psk: [u8; 32], mtu: usize) -> Self {
        let now = Instant::now();
        Sim {
            now,
            rng: StdRng::seed_from_u64(seed),
            client: Client::new(Config { psk: client_psk, max_datagram: mtu, seed }, now),
            server: Some(Server::new(server_psk, seed ^ 0xabcdef)),
            up: Link::new(cfg),
            down: Link::new(cfg),
            done: HashMap::new(),
            events: Vec::new(),
            server_in_bytes: 0,
            server_out_bytes_unauth: 0,
            server_path_max: MAX_DATAGRAM,
            server_out_max: 0,
        }
    }

    fn pump(&mut self) {
        while let Some(d) = self.client.poll_transmit() {
            self.up.send(self.now, d, &mut self.rng);
        }
        while let Some(e) = self.client.poll_event() {
            match e {
                Event::Done { id, result } => {
                    self.done.insert(id, result.map(|b| b.into_vec()));
                }
                other => self.events.push(other),
            }
        }
    }

    /// Run until `until` (simulated) or until every started request finished.
    fn run(&mut self, until: Instant, expect: usize) {
        let mut steps = 0u64;
        loop {
            steps += 1;
            assert!(steps < 5_000_000, "simulation did not settle");
            self.pump();
            if self.done.len() >= expect || self.now >= until {
                return;
            }
            while let Some(mut d) = self.up.pop_due(self.now) {
                self.server_in_bytes += d.len() as u64;
                let Some(server) = self.server.as_mut() else { continue };
                let path_max = self.server_path_max;
                match server.handle(self.now, &mut d, || path_max) {
                    Some(Input::Reply(r)) => {
                        if r.len() > d.len() {
                            panic!("amplification: {} > {}", r.len(), d.len());
                        }
                        if super::wire::Header::decode(&r).unwrap().kind != super::wire::Kind::HelloAck {
                            self.server_out_bytes_unauth += r.len() as u64;
                        }
                        self.down.send(self.now, r, &mut self.rng);
                    }
                    Some(Input::Request { session, id, missing, body }) => {
                        let n = u32::from_le_bytes(body[..4].try_into().unwrap());
                        let t = u32::from_le_bytes(body[4..8].try_into().unwrap());
                        let b = session.encode_response(id, &content(n, t), &missing);
                        for d in b.buf.chunks(b.seg) {
                            self.server_out_max = self.server_out_max.max(d.len());
                            self.down.send(self.now, d.to_vec(), &mut self.rng);
                        }
                    }
                    None => {}
                }
            }
            while let Some(mut d) = self.down.pop_due(self.now) {
                self.client.handle_datagram(self.now, &mut d);
            }
            self.pump();
            if self.done.len() >= expect {
                return;
            }
            let mut next = until;
            for t in [self.up.next_time(), self.down.next_time(), self.client.poll_timeout()].into_iter().flatten() {
                next = next.min(t);
            }
            if next > self.now {
                self.now = next;
            }
            if self.client.poll_timeout().is_some_and(|t| t <= self.now) {
                self.client.handle_timeout(self.now);
            }
        }
    }
}

const PSK: [u8; 32] = [9; 32];

fn clean() -> LinkCfg {
    LinkCfg { loss: 0.0, dup: 0.0, delay: Duration::from_millis(1), jitter: Duration::ZERO }
}

/// A simulation on a clean link whose session is up (one small request went through).
fn connected(seed: u64) -> Sim {
    let mut s = Sim::new(seed, clean(), PSK, PSK, 1472);
    let t0 = s.now;
    let id = s.client.start_request(t0, req(5000, 1), 5000, t0 + Duration::from_secs(5));
    s.run(t0 + Duration::from_secs(5), 1);
    assert!(s.done[&id].is_ok(), "the session is up");
    s
}

fn lossy() -> LinkCfg {
    LinkCfg { loss: 0.05, dup: 0.03, delay: Duration::from_millis(10), jitter: Duration::from_millis(4) }
}

#[test]
fn transfers_complete_and_exact_over_lossy_link() {
    for seed in 0..6u64 {
        let mut s = Sim::new(seed, lossy(), PSK, PSK, 1472);
        let mut ids = Vec::new();
        let t0 = s.now;
        for t in 0..40u32 {
            let n = [0u32, 1, 1000, 262_144, 262_145, 70_000][t as usize % 6];
            ids.push((s.client.start_request(t0, req(n, t), n as u64, t0 + Duration::from_secs(60)), n, t));
        }
        s.run(t0 + Duration::from_secs(120), ids.len());
        for (id, n, t) in ids {
            let got = s.done.get(&id).unwrap_or_else(|| panic!("seed {seed}: request {id} never finished"));
            assert_eq!(got.as_ref().unwrap(), &content(n, t), "seed {seed} req {id}");
        }
        assert!(s.client.stats.retransmits > 0, "a 5% lossy link must cause repairs");
        assert!(s.now - t0 < Duration::from_secs(60), "took {:?}", s.now - t0);
    }
}

#[test]
fn heavy_loss_still_completes() {
    let cfg = LinkCfg { loss: 0.3, dup: 0.1, delay: Duration::from_millis(5), jitter: Duration::from_millis(5) };
    let mut s = Sim::new(77, cfg, PSK, PSK, 1200);
    let t0 = s.now;
    let ids: Vec<u64> = (0..8u32)
        .map(|t| s.client.start_request(t0, req(100_000, t), 100_000, t0 + Duration::from_secs(300)))
        .collect();
    s.run(t0 + Duration::from_secs(300), ids.len());
    for (t, id) in ids.iter().enumerate() {
        assert_eq!(s.done[id].as_ref().unwrap(), &content(100_000, t as u32));
    }
}

#[test]
fn window_grows_on_clean_link_and_shrinks_on_loss() {
    let mut s = Sim::new(1, clean(), PSK, PSK, 1472);
    let t0 = s.now;
    let ids: Vec<u64> =
        (0..200u32).map(|t| s.client.start_request(t0, req(262_144, t), 262_144, t0 + Duration::from_secs(60))).collect();
    s.run(t0 + Duration::from_secs(60), ids.len());
    assert_eq!(s.done.len(), 200);
    let grown = s.client.window();
    assert!(grown > super::cc::INITIAL_WINDOW * 4, "window {grown}");
    assert_eq!(s.client.losses(), 0);
    // 200 chunks of 256 KiB over a 1 ms link: the window must keep many in flight.
    assert!(s.now - t0 < Duration::from_millis(400), "took {:?}", s.now - t0);

    let mut s = Sim::new(2, lossy(), PSK, PSK, 1472);
    let t0 = s.now;
    let ids: Vec<u64> =
        (0..100u32).map(|t| s.client.start_request(t0, req(262_144, t), 262_144, t0 + Duration::from_secs(120))).collect();
    s.run(t0 + Duration::from_secs(120), ids.len());
    assert_eq!(s.done.len(), 100);
    assert!(s.client.losses() > 0);
    assert!(s.client.window() < grown, "loss must keep the window below the clean-link one");
}

#[test]
fn wrong_key_is_rejected_quickly_and_clearly() {
    let mut s = Sim::new(3, lossy(), [1; 32], [2; 32], 1472);
    let t0 = s.now;
    let id = s.client.start_request(t0, req(10, 0), 10, t0 + Duration::from_secs(30));
    s.run(t0 + Duration::from_secs(30), 1);
    assert_eq!(s.done[&id], Err(Error::AuthFailed));
    assert!(s.events.contains(&Event::AuthRejected));
    assert!(s.now - t0 < Duration::from_secs(5));
    assert!(s.server_out_bytes_unauth <= s.server_in_bytes);
}

/// A HELLO of another protocol version gets a small REJECT in ours (echoing its nonce), and a
/// client that gets such an answer fails its requests with the server's version at once.
#[test]
fn another_protocol_version_is_named_not_timed_out() {
    let mut s = Sim::new(4, lossy(), [1; 32], [1; 32], 1472);
    let t0 = s.now;
    let id = s.client.start_request(t0, req(10, 0), 10, t0 + Duration::from_secs(30));
    let hello = s.client.poll_transmit().expect("a HELLO");
    assert_eq!(hello.len(), super::wire::MIN_DATAGRAM);
    let server = s.server.as_mut().unwrap();
    // As from a client of version 1: answered, smaller, in our version, with its nonce.
    let mut old = hello.clone();
    old[2] = 1;
    let Some(Input::Reply(r)) = server.handle(t0, &mut old, || MAX_DATAGRAM) else { panic!("no answer to another version's HELLO") };
    assert!(r.len() < old.len());
    assert_eq!((r[2], r[3]), (super::wire::VERSION, super::wire::Kind::Reject as u8));
    assert_eq!(r[20..52], hello[20..52]);
    // Not for other datagram types or short ones.
    let mut req_like = old.clone();
    req_like[3] = super::wire::Kind::Request as u8;
    assert!(server.handle(t0, &mut req_like, || MAX_DATAGRAM).is_none());
    assert!(server.handle(t0, &mut old[..600].to_vec(), || MAX_DATAGRAM).is_none());
    // The client, told by a "version 3" server: its request fails with that version.
    let mut from_v3 = r.clone();
    from_v3[2] = 3;
    s.client.handle_datagram(t0, &mut from_v3);
    s.pump();
    assert_eq!(s.done[&id], Err(Error::WrongVersion(3)));
    assert!(s.events.contains(&Event::WrongVersion(3)));
    // A stranger's answer with someone else's nonce changes nothing.
    let id2 = s.client.start_request(t0, req(10, 0), 10, t0 + Duration::from_secs(30));
    let mut forged = from_v3.clone();
    forged[20] ^= 1;
    s.client.handle_datagram(t0, &mut forged);
    s.pump();
    assert!(!s.done.contains_key(&id2));
}

/// A response goes out in bursts of at most the asked size, each sealed just before it is
/// handed over, and the client puts them together exactly.
#[test]
fn responses_go_out_in_bounded_bursts() {
    let mut s = connected(5);
    let now = s.now;
    let id2 = s.client.start_request(now, req(200_000, 1), 200_000, now + Duration::from_secs(5));
    let mut d = s.client.poll_transmit().unwrap();
    let Some(Input::Request { session, id: rid, missing, .. }) = s.server.as_mut().unwrap().handle(now, &mut d, || MAX_DATAGRAM) else {
        panic!("the request was not taken")
    };
    let resp = content(200_000, 1);
    let (mut bursts, mut dgrams) = (Vec::new(), Vec::new());
    session.encode_response_each(rid, &resp, &missing, 7, |b| {
        bursts.push(b.buf.len().div_ceil(b.seg));
        dgrams.extend(b.buf.chunks(b.seg).map(|c| c.to_vec()));
        true
    });
    // A sender that gives up after the first burst stops the sealing there.
    let mut calls = 0;
    session.encode_response_each(rid, &resp, &missing, 7, |_| {
        calls += 1;
        false
    });
    assert_eq!(calls, 1);
    // A repair of pieces past the end sends nothing and still has a datagram size.
    let none = session.encode_response(rid, &resp, &[super::frame::Missing { start: 60_000, len: 5 }]);
    assert!(none.buf.is_empty() && none.seg > 0);
    assert!(bursts.len() > 10 && bursts.iter().all(|&n| (1..=7).contains(&n)), "{bursts:?}");
    for mut g in dgrams {
        s.client.handle_datagram(now, &mut g);
    }
    s.pump();
    assert_eq!(s.done[&id2], Ok(resp));
}

#[test]
fn lost_server_times_out_at_deadline() {
    let mut s = Sim::new(4, lossy(), PSK, PSK, 1472);
    s.server = None;
    let t0 = s.now;
    let id = s.client.start_request(t0, req(10, 0), 10, t0 + Duration::from_secs(3));
    s.run(t0 + Duration::from_secs(60), 1);
    assert_eq!(s.done[&id], Err(Error::RemoteTimeout));
    let took = s.now - t0;
    assert!(took >= Duration::from_secs(3) && took < Duration::from_millis(3100), "{took:?}");
}

#[test]
fn server_restart_mid_transfer_recovers() {
    let mut s = Sim::new(5, lossy(), PSK, PSK, 1472);
    let t0 = s.now;
    let ids: Vec<u64> =
        (0..30u32).map(|t| s.client.start_request(t0, req(262_144, t), 262_144, t0 + Duration::from_secs(120))).collect();
    s.run(t0 + Duration::from_millis(60), usize::MAX);
    assert!(s.done.len() < 30, "restart must happen mid-transfer");
    // The server process dies (all sessions lost) and a new one starts 2 s later.
    s.server = None;
    s.run(t0 + Duration::from_secs(2), usize::MAX);
    s.server = Some(Server::new(PSK, 999));
    s.run(t0 + Duration::from_secs(120), ids.len());
    for (t, id) in ids.iter().enumerate() {
        assert_eq!(s.done[id].as_ref().unwrap(), &content(262_144, t as u32), "req {id}");
    }
    assert!(s.client.stats.handshakes >= 2);
}

#[test]
fn strangers_get_nothing_and_replays_are_dropped() {
    let mut s = connected(6);
    // Replay a fresh request datagram twice: the second copy is dropped.
    let now = s.now;
    s.client.start_request(now, req(10, 2), 10, now + Duration::from_secs(5));
    let d = s.client.poll_transmit().unwrap();
    let server = s.server.as_mut().unwrap();
    assert!(matches!(server.handle(now, &mut d.clone(), || MAX_DATAGRAM), Some(Input::Request { .. })));
    assert!(server.handle(now, &mut d.clone(), || MAX_DATAGRAM).is_none());
    assert_eq!(server.replays, 1);
    // Random garbage and truncated packets: no answer, no panic.
    let mut rng = StdRng::seed_from_u64(8);
    for len in 0..2000usize {
        let mut g: Vec<u8> = (0..len % 1500).map(|_| rng.gen()).collect();
        if len % 3 == 0 && g.len() >= 20 {
            g[0] = 0x52;
            g[1] = 0x57;
            g[2] = 1;
            g[3] = (len % 7) as u8;
        }
        if let Some(Input::Reply(r)) = server.handle(now, &mut g, || MAX_DATAGRAM) {
            assert!(r.len() <= g.len());
        }
    }
    // A flipped bit anywhere in an authenticated request, header included: dropped. The body
    // travels encrypted: the request's bytes do not appear in the datagram.
    let now = s.now;
    let body = req(10, 3);
    s.client.start_request(now, body.clone(), 10, now + Duration::from_secs(5));
    let d = s.client.poll_transmit().unwrap();
    assert!(!d.windows(body.len()).any(|w| w == &body[..]), "request body sent in clear");
    for i in 0..d.len() {
        let mut c = d.clone();
        c[i] ^= 0x10;
        assert!(!matches!(server.handle(now, &mut c, || MAX_DATAGRAM), Some(Input::Request { .. })), "flip at {i} accepted");
    }
    assert!(matches!(server.handle(now, &mut d.clone(), || MAX_DATAGRAM), Some(Input::Request { .. })), "the unflipped one is taken");
}

/// A request that lists the same missing pieces many times gets each piece once: one datagram
/// cannot make the server send the response thousands of times.
#[test]
fn repeated_missing_ranges_send_each_piece_once() {
    let mut s = connected(12);
    let now = s.now;
    s.client.start_request(now, req(10, 5), 10, now + Duration::from_secs(5));
    let mut d = s.client.poll_transmit().unwrap();
    let Some(Input::Request { session, id, .. }) = s.server.as_mut().unwrap().handle(now, &mut d, || MAX_DATAGRAM) else {
        panic!("a request")
    };
    let resp = content(100_000, 1);
    let all = session.encode_response(id, &resp, &[]);
    let pieces = all.buf.len().div_ceil(all.seg);
    let twice = [super::frame::Missing { start: 0, len: u16::MAX }; 3000];
    let mut over = twice.to_vec();
    over.push(super::frame::Missing { start: 2, len: 3 });
    over.push(super::frame::Missing { start: 60_000, len: 10 });
    let b = session.encode_response(id, &resp, &over);
    assert_eq!(b.buf.len().div_ceil(b.seg), pieces, "each piece once");
    let some = session.encode_response(id, &resp, &[super::frame::Missing { start: 3, len: 2 }, super::frame::Missing { start: 1, len: 3 }]);
    assert_eq!(some.buf.len().div_ceil(some.seg), 4, "pieces 1 to 4");
}

/// Replayed HELLOs (anyone who saw one can send it again, as often as they like) make sessions
/// that are never confirmed: they cannot push out an established one, whose client goes on
/// without shaking hands again.
#[test]
fn replayed_hellos_do_not_push_out_established_sessions() {
    let mut s = connected(11);
    let handshakes = s.client.stats.handshakes;
    let mut other = Client::new(Config { psk: PSK, max_datagram: 1472, seed: 99 }, s.now);
    other.start_request(s.now, req(10, 1), 10, s.now + Duration::from_secs(5));
    let hello = other.poll_transmit().expect("a HELLO");
    let server = s.server.as_mut().unwrap();
    for _ in 0..2 * super::server::MAX_SESSIONS {
        assert!(matches!(server.handle(s.now, &mut hello.clone(), || MAX_DATAGRAM), Some(Input::Reply(_))));
    }
    let t0 = s.now;
    let id = s.client.start_request(t0, req(5000, 4), 5000, t0 + Duration::from_secs(5));
    s.run(t0 + Duration::from_secs(5), 2);
    assert_eq!(s.done[&id].as_ref().unwrap(), &content(5000, 4));
    assert_eq!(s.client.stats.handshakes, handshakes, "the session survived the replays");
}

/// A client whose side carries larger datagrams than the server's (jumbo frames on its side):
/// the session uses the server's limit, and reads complete.
#[test]
fn server_sends_no_larger_than_its_side_of_the_path() {
    let mut s = Sim::new(7, clean(), PSK, PSK, 8972);
    s.server_path_max = 1472;
    let t0 = s.now;
    let id = s.client.start_request(t0, req(200_000, 3), 200_000, t0 + Duration::from_secs(10));
    s.run(t0 + Duration::from_secs(10), 1);
    assert_eq!(s.done.get(&id).unwrap().as_ref().unwrap(), &content(200_000, 3));
    assert!(s.server_out_max <= 1472, "server sent a {}-byte datagram", s.server_out_max);
    assert!(s.server_out_max > 1400, "pieces as large as the server's side allows: {}", s.server_out_max);
}
