//! Frame bookkeeping for AF_XDP, written against two small traits so that it runs the same on
//! the kernel's rings (`sys::xsk`) and on the in-memory rings of the tests below.
//!
//! Receive frames live in a closed loop: fill ring → rx ring → owned (the callback borrows the
//! bytes) → fill ring. Send frames live in another: free → written (owned) → tx ring →
//! completion ring → free. Two pools, so the receive and send halves never wait on each other's
//! lock. Frames are values that are moved, never copied: the traits take them by `&mut Vec`
//! and remove what the ring accepted.

use std::io;
use std::sync::{Mutex, PoisonError};

/// The kernel side of receiving: fill ring and rx ring.
pub trait RxRing {
    type Frame;
    /// Move frames from the end of `frames` onto the fill ring; returns how many moved.
    fn fill(&mut self, frames: &mut Vec<Self::Frame>) -> usize;
    /// Append up to `max` received frames to `out`; returns how many.
    fn recv(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// The packet a received frame holds.
    fn data<'a>(&'a self, f: &'a Self::Frame) -> &'a [u8];
}

/// The kernel side of sending: tx ring and completion ring.
pub trait TxRing {
    type Frame;
    /// Make the frame `len` bytes long and let `write` fill them; false if it cannot hold them.
    fn write(&self, f: &mut Self::Frame, len: usize, write: impl FnOnce(&mut [u8])) -> bool;
    /// Move frames from the front of `frames` onto the tx ring, in order; returns how many.
    fn send(&mut self, frames: &mut Vec<Self::Frame>) -> usize;
    /// Append up to `max` frames whose transmission completed to `out`; returns how many.
    fn completed(&mut self, out: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// Frames on the tx ring the kernel has not taken yet.
    fn pending(&mut self) -> usize;
    /// Ask the kernel to transmit.
    fn kick(&mut self) -> io::Result<()>;
}

/// Receiving: keeps every frame it does not hold on the fill ring.
pub struct Receiver<R: RxRing> {
    ring: R,
    spare: Vec<R::Frame>,
    /// Frames taken out by [`Receiver::take`] and not yet given back.
    lent: usize,
    total: usize,
}

impl<R: RxRing> Receiver<R> {
    pub fn new(ring: R, frames: Vec<R::Frame>) -> Self {
        let total = frames.len();
        let mut r = Receiver { ring, spare: frames, lent: 0, total };
        r.ring.fill(&mut r.spare);
        r
    }

    /// Take up to `max` received frames out (appended to `out`), so that their packets can be
    /// handled without holding whatever guards the receiver; they must come back through
    /// [`Receiver::give_back`]. Returns how many.
    pub fn take(&mut self, out: &mut Vec<R::Frame>, max: usize) -> usize {
        let n = self.ring.recv(out, max);
        self.lent += n;
        n
    }

    /// Return frames from [`Receiver::take`] (all of `frames`) and restock the fill ring.
    pub fn give_back(&mut self, frames: &mut Vec<R::Frame>) {
        assert!(frames.len() <= self.lent, "more frames given back than were taken");
        self.lent -= frames.len();
        self.spare.append(frames);
        self.ring.fill(&mut self.spare);
    }

    /// Frames on the fill or rx ring (the kernel's).
    pub fn in_kernel(&self) -> usize {
        self.total - self.spare.len() - self.lent
    }

    pub fn ring(&self) -> &R {
        &self.ring
    }
}

/// Frames taken out of a [`Receiver`] behind a mutex, for reading without its lock. They go
/// back ([`Receiver::give_back`]) when this drops: after the reading, and also while a panic in
/// whatever reads them unwinds; frames lost there would leave the fill ring short for good.
pub struct Taken<'a, R: RxRing> {
    rx: &'a Mutex<Receiver<R>>,
    pub frames: Vec<R::Frame>,
}

impl<'a, R: RxRing> Taken<'a, R> {
    /// `frames` is an empty vector whose memory is reused.
    pub fn new(rx: &'a Mutex<Receiver<R>>, frames: Vec<R::Frame>) -> Self {
        debug_assert!(frames.is_empty());
        Taken { rx, frames }
    }

    /// Take up to `max` more frames; returns how many.
    pub fn take(&mut self, max: usize) -> usize {
        self.rx.lock().unwrap_or_else(PoisonError::into_inner).take(&mut self.frames, max)
    }

    /// Give the frames held back now.
    pub fn give_back(&mut self) {
        if !self.frames.is_empty() {
            self.rx.lock().unwrap_or_else(PoisonError::into_inner).give_back(&mut self.frames);
        }
    }

    /// The (empty) vector, to be reused.
    pub fn into_vec(mut self) -> Vec<R::Frame> {
        self.give_back();
        std::mem::take(&mut self.frames)
    }
}

impl<R: RxRing> Drop for Taken<'_, R> {
    fn drop(&mut self) {
        self.give_back();
    }
}

/// Sending: free frames are written, queued, put on the tx ring, and come back on completion.
pub struct Sender<T: TxRing> {
    ring: T,
    free: Vec<T::Frame>,
    queued: Vec<T::Frame>,
    total: usize,
}

/// Why a packet could not be queued.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// Every frame is queued or with the kernel: flush and reclaim first.
    NoFrame,
    /// The packet is larger than a frame.
    TooBig,
}

impl<T: TxRing> Sender<T> {
    pub fn new(ring: T, frames: Vec<T::Frame>) -> Self {
        let total = frames.len();
        Sender { ring, free: frames, queued: Vec::with_capacity(total), total }
    }

    /// Take back frames whose transmission completed. Returns how many.
    pub fn reclaim(&mut self) -> usize {
        let n = self.ring.completed(&mut self.free, self.total);
        debug_assert!(self.free.len() + self.queued.len() <= self.total);
        n
    }

    /// Write one packet of `len` bytes with `write` into a free frame and queue it.
    pub fn push(&mut self, len: usize, write: impl FnOnce(&mut [u8])) -> Result<(), PushError> {
        let mut f = self.free.pop().ok_or(PushError::NoFrame)?;
        if !self.ring.write(&mut f, len, write) {
            self.free.push(f);
            return Err(PushError::TooBig);
        }
        self.queued.push(f);
        Ok(())
    }

    /// Put queued frames on the tx ring and kick the kernel once. Returns how many went on.
    pub fn submit(&mut self) -> io::Result<usize> {
        let n = if self.queued.is_empty() { 0 } else { self.ring.send(&mut self.queued) };
        self.ring.kick()?;
        Ok(n)
    }

    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Frames on the tx or completion ring (the kernel's).
    pub fn in_kernel(&self) -> usize {
        self.total - self.free.len() - self.queued.len()
    }

    /// Frames on the tx ring not yet taken by the kernel.
    pub fn pending(&mut self) -> usize {
        self.ring.pending()
    }

    /// Drop everything queued but not submitted (after an error), returning the frames.
    pub fn discard_queued(&mut self) {
        self.free.append(&mut self.queued);
    }

    pub fn ring(&self) -> &T {
        &self.ring
    }
}

#[cfg(test)]
pub(crate) mod mem;
