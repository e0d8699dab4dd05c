//! In-memory rings that behave like the kernel's copy mode: bounded fill/rx/tx/completion rings
//! that take a batch whole or not at all (as libxdp's `xsk_ring_prod__reserve` does), a receive
//! that needs a fill entry (else the packet is dropped, as XDP does), and a transmit of at most
//! `per_kick` frames per kick. Tests run [`Receiver`] and [`Sender`] on them, alone and
//! as a pair joined by a wire, and check that every frame is always in exactly one place.

use std::collections::VecDeque;
use std::io;

use super::{PushError, Receiver, RxRing, Sender, Taken, TxRing};

/// A chunk of the fake UMEM: its id and its own bytes. Not `Clone`, like the real one.
#[derive(Debug)]
pub struct MemFrame {
    id: u32,
    buf: Box<[u8]>,
    len: usize,
}

fn frames(first_id: u32, n: usize, size: usize) -> Vec<MemFrame> {
    (0..n).map(|i| MemFrame { id: first_id + i as u32, buf: vec![0; size].into_boxed_slice(), len: 0 }).collect()
}

pub struct MemRx {
    fill: VecDeque<MemFrame>,
    rx: VecDeque<MemFrame>,
    fill_cap: usize,
    rx_cap: usize,
    pub dropped: u64,
}

impl MemRx {
    pub fn new(n: usize, size: usize, fill_cap: usize, rx_cap: usize) -> (Self, Vec<MemFrame>) {
        let r = MemRx { fill: VecDeque::new(), rx: VecDeque::new(), fill_cap, rx_cap, dropped: 0 };
        (r, frames(0, n, size))
    }

    /// The "kernel" receives `pkt`: it needs a fill entry and room on the rx ring.
    pub fn deliver(&mut self, pkt: &[u8]) -> bool {
        if self.rx.len() >= self.rx_cap {
            self.dropped += 1;
            return false;
        }
        let Some(mut f) = self.fill.pop_front() else {
            self.dropped += 1;
            return false;
        };
        let n = pkt.len().min(f.buf.len());
        f.buf[..n].copy_from_slice(&pkt[..n]);
        f.len = n;
        self.rx.push_back(f);
        true
    }
}

impl RxRing for MemRx {
    type Frame = MemFrame;
    fn fill(&mut self, frames: &mut Vec<MemFrame>) -> usize {
        if frames.len() > self.fill_cap - self.fill.len() {
            return 0;
        }
        let n = frames.len();
        let start = frames.len() - n;
        self.fill.extend(frames.drain(start..));
        n
    }
    fn recv(&mut self, out: &mut Vec<MemFrame>, max: usize) -> usize {
        let n = max.min(self.rx.len());
        out.extend(self.rx.drain(..n));
        n
    }
    fn data<'a>(&'a self, f: &'a MemFrame) -> &'a [u8] {
        &f.buf[..f.len]
    }
}

pub struct MemTx {
    tx: VecDeque<MemFrame>,
    comp: VecDeque<MemFrame>,
    tx_cap: usize,
    per_kick: usize,
    /// What went out, in order.
    pub wire: VecDeque<Vec<u8>>,
}

impl MemTx {
    pub fn new(n: usize, size: usize, tx_cap: usize, per_kick: usize) -> (Self, Vec<MemFrame>) {
        let t = MemTx { tx: VecDeque::new(), comp: VecDeque::new(), tx_cap, per_kick, wire: VecDeque::new() };
        (t, frames(1_000_000, n, size))
    }
}

impl TxRing for MemTx {
    type Frame = MemFrame;
    fn write(&self, f: &mut MemFrame, len: usize, write: impl FnOnce(&mut [u8])) -> bool {
        if len > f.buf.len() {
            return false;
        }
        f.len = len;
        write(&mut f.buf[..len]);
        true
    }
    fn send(&mut self, frames: &mut Vec<MemFrame>) -> usize {
        if frames.len() > self.tx_cap - self.tx.len() {
            return 0;
        }
        let n = frames.len();
        self.tx.extend(frames.drain(..n));
        n
    }
    fn completed(&mut self, out: &mut Vec<MemFrame>, max: usize) -> usize {
        let n = max.min(self.comp.len());
        out.extend(self.comp.drain(..n));
        n
    }
    fn pending(&mut self) -> usize {
        self.tx.len()
    }
    fn kick(&mut self) -> io::Result<()> {
        for _ in 0..self.per_kick {
            let Some(f) = self.tx.pop_front() else { break };
            self.wire.push_back(f.buf[..f.len].to_vec());
            self.comp.push_back(f);
        }
        Ok(())
    }
}

/// Every frame id, wherever it is (`lent`: taken out and not given back yet), for checking that
/// none is lost or duplicated.
fn rx_ids(r: &Receiver<MemRx>, lent: &[MemFrame]) -> Vec<u32> {
    let ring = &r.ring;
    let mut ids: Vec<u32> =
        r.spare.iter().chain(&ring.fill).chain(&ring.rx).chain(lent).map(|f| f.id).collect();
    ids.sort_unstable();
    ids
}

fn tx_ids(s: &Sender<MemTx>) -> Vec<u32> {
    let ring = &s.ring;
    let mut ids: Vec<u32> = s.free.iter().chain(&s.queued).chain(&ring.tx).chain(&ring.comp).map(|f| f.id).collect();
    ids.sort_unstable();
    ids
}

fn packet(seq: u32, len: usize) -> Vec<u8> {
    let mut p = vec![(seq % 251) as u8; len.max(4)];
    p[..4].copy_from_slice(&seq.to_le_bytes());
    p
}

/// Take up to `max` packets and give their frames straight back; returns the packets' first
/// four bytes (their sequence numbers).
fn take_all(r: &mut Receiver<MemRx>, max: usize) -> Vec<u32> {
    let mut out = Vec::new();
    r.take(&mut out, max);
    let seen = out.iter().map(|f| u32::from_le_bytes(f.buf[..4].try_into().unwrap())).collect();
    r.give_back(&mut out);
    seen
}

#[test]
fn receiver_keeps_the_fill_ring_stocked() {
    let (ring, fr) = MemRx::new(64, 256, 64, 64);
    let mut r = Receiver::new(ring, fr);
    assert_eq!(r.in_kernel(), 64, "every frame starts on the fill ring");
    for i in 0..40 {
        assert!(r.ring.deliver(&packet(i, 100)));
    }
    assert_eq!(take_all(&mut r, 32), (0..32).collect::<Vec<_>>());
    assert_eq!(r.in_kernel(), 64, "frames go straight back to the fill ring");
    assert_eq!(r.ring.fill.len(), 64 - 8);
    take_all(&mut r, 32);
    assert_eq!(r.ring.fill.len(), 64);
    assert_eq!(rx_ids(&r, &[]), (0..64).collect::<Vec<_>>());
}

#[test]
fn receive_without_fill_entries_drops_like_xdp() {
    let (ring, fr) = MemRx::new(4, 256, 4, 64);
    let mut r = Receiver::new(ring, fr);
    for i in 0..6 {
        r.ring.deliver(&packet(i, 10));
    }
    assert_eq!(r.ring.dropped, 2);
    assert_eq!(take_all(&mut r, 64).len(), 4);
    assert!(r.ring.deliver(&packet(9, 10)), "frames are back on the fill ring");
}

#[test]
fn taken_frames_are_read_outside_and_come_back() {
    let (ring, fr) = MemRx::new(16, 256, 16, 16);
    let mut r = Receiver::new(ring, fr);
    for i in 0..10 {
        assert!(r.ring.deliver(&packet(i, 50)));
    }
    let mut out = Vec::new();
    assert_eq!(r.take(&mut out, 8), 8);
    assert_eq!(r.in_kernel(), 8, "lent frames are neither the kernel's nor spare");
    let seen: Vec<u32> = out.iter().map(|f| u32::from_le_bytes(f.buf[..4].try_into().unwrap())).collect();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    r.give_back(&mut out);
    assert!(out.is_empty());
    assert_eq!(r.in_kernel(), 16);
    assert_eq!(rx_ids(&r, &[]), (0..16).collect::<Vec<_>>());
}

#[test]
fn sender_reuses_completed_frames_and_keeps_order() {
    let (ring, fr) = MemTx::new(8, 256, 8, 3);
    let mut s = Sender::new(ring, fr);
    let mut seq = 0u32;
    let mut got = Vec::new();
    for _round in 0..20 {
        // Push until out of frames, then drain the ring with kicks.
        loop {
            let p = packet(seq, 50);
            match s.push(p.len(), |b| b.copy_from_slice(&p)) {
                Ok(()) => seq += 1,
                Err(PushError::NoFrame) => break,
                Err(e) => panic!("{e:?}"),
            }
        }
        while s.queued() > 0 || s.pending() > 0 {
            s.submit().unwrap();
        }
        s.reclaim();
        assert_eq!(s.free(), 8, "every frame came back");
        got.extend(s.ring.wire.drain(..).map(|p| u32::from_le_bytes(p[..4].try_into().unwrap())));
    }
    assert_eq!(got, (0..seq).collect::<Vec<_>>());
    assert_eq!(s.push(257, |_| {}), Err(PushError::TooBig));
    assert_eq!(tx_ids(&s).len(), 8);
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug)]
    enum Op {
        Push(usize),
        Submit,
        Reclaim,
        Wire(usize),
        /// Take up to this many received frames out (as a receiving thread does).
        Take(usize),
        /// Give back the frames taken out so far.
        GiveBack,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1usize..300).prop_map(Op::Push),
            2 => Just(Op::Submit),
            1 => Just(Op::Reclaim),
            2 => (0usize..20).prop_map(Op::Wire),
            2 => (1usize..40).prop_map(Op::Take),
            2 => Just(Op::GiveBack),
        ]
    }

    proptest! {
        /// A sender and a receiver joined by a wire, driven by random operations: no frame is
        /// ever lost or in two places, and what arrives is what was sent, in order.
        #[test]
        fn ring_pair_conserves_frames_and_order(ops in proptest::collection::vec(op(), 1..300)) {
            // Ring sizes equal to the frame counts, as in production (`sys::xsk`): a batch always fits.
            let (txr, txf) = MemTx::new(16, 256, 16, 4);
            let (rxr, rxf) = MemRx::new(16, 256, 16, 8);
            let mut s = Sender::new(txr, txf);
            let mut r = Receiver::new(rxr, rxf);
            let (mut next, mut sent) = (0u32, Vec::new());
            let (mut wired, mut delivered) = (0usize, VecDeque::new());
            let mut lent: Vec<MemFrame> = Vec::new();
            for op in ops {
                match op {
                    Op::Push(len) => {
                        let p = packet(next, len);
                        match s.push(p.len(), |b| b.copy_from_slice(&p)) {
                            Ok(()) => { sent.push(p); next += 1; }
                            Err(PushError::NoFrame) => {}
                            Err(PushError::TooBig) => prop_assert!(p.len() > 256),
                        }
                    }
                    Op::Submit => { s.submit().unwrap(); }
                    Op::Reclaim => { s.reclaim(); }
                    Op::Wire(n) => {
                        for _ in 0..n {
                            let Some(p) = s.ring.wire.pop_front() else { break };
                            // The wire carries what was pushed, in order, intact.
                            prop_assert_eq!(&p, &sent[wired]);
                            wired += 1;
                            if r.ring.deliver(&p) { delivered.push_back(p); }
                        }
                    }
                    Op::Take(max) => {
                        let at = lent.len();
                        r.take(&mut lent, max);
                        for f in &lent[at..] {
                            prop_assert_eq!(Some(r.ring.data(f).to_vec()), delivered.pop_front());
                        }
                    }
                    Op::GiveBack => r.give_back(&mut lent),
                }
                prop_assert_eq!(tx_ids(&s), (1_000_000..1_000_016).collect::<Vec<_>>());
                prop_assert_eq!(rx_ids(&r, &lent), (0..16).collect::<Vec<_>>());
                prop_assert_eq!(s.in_kernel(), s.ring.tx.len() + s.ring.comp.len());
                prop_assert_eq!(r.in_kernel(), r.ring.fill.len() + r.ring.rx.len());
                // Whatever is not lent out is the kernel's: the fill ring stays stocked.
                prop_assert_eq!(r.in_kernel() + lent.len(), 16);
            }
            // Nothing is stuck: submitting until the ring is empty puts every pushed packet on
            // the wire, and every send frame comes back.
            for _ in 0..64 {
                if s.queued() == 0 && s.pending() == 0 { break; }
                s.submit().unwrap();
            }
            s.reclaim();
            prop_assert_eq!(s.free(), 16);
            prop_assert_eq!(wired + s.ring.wire.len(), sent.len());
        }
    }
}

/// A receiver of `n` frames behind a mutex (as `XdpIo` keeps it), `delivered` packets waiting.
fn shared_receiver(n: usize, delivered: u32) -> std::sync::Mutex<Receiver<MemRx>> {
    let (ring, fr) = MemRx::new(n, 256, n, n);
    let mut r = Receiver::new(ring, fr);
    for i in 0..delivered {
        assert!(r.ring.deliver(&packet(i, 50)));
    }
    std::sync::Mutex::new(r)
}

#[test]
fn taken_frames_come_back_when_the_reader_panics() {
    let rx = shared_receiver(16, 10);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut t = Taken::new(&rx, Vec::new());
        assert_eq!(t.take(8), 8);
        assert_eq!(rx.lock().unwrap().in_kernel(), 8);
        for f in &t.frames {
            if u32::from_le_bytes(f.buf[..4].try_into().unwrap()) == 3 {
                panic!("the reader fails on packet 3");
            }
        }
    }));
    assert!(r.is_err());
    let r = rx.lock().unwrap();
    assert_eq!(r.in_kernel(), 16, "the 8 frames went back to the fill ring while unwinding");
    assert_eq!(r.lent, 0);
}

#[test]
fn taken_frames_come_back_and_the_vector_is_reused() {
    let rx = shared_receiver(16, 5);
    let mut t = Taken::new(&rx, Vec::with_capacity(32));
    assert_eq!(t.take(32), 5);
    let v = t.into_vec();
    assert!(v.is_empty() && v.capacity() >= 32);
    assert_eq!(rx.lock().unwrap().in_kernel(), 16);
}
