//! AF_XDP sockets and their UMEM through xsk-rs, behind a safe API whose unit is the owned
//! [`Frame`].
//!
//! A `Frame` names one UMEM chunk that user space owns right now. It is not `Clone`; the only
//! ways to get one are [`open`] (every chunk once) and taking it back from the kernel (rx or
//! completion ring); the only ways to hand one to the kernel (fill or tx ring) consume it. So a
//! chunk cannot be in two places, cannot be submitted twice, and its bytes are only reachable
//! through the one `Frame` value: `&Frame` reads, `&mut Frame` writes. That is the argument
//! behind every `SAFETY` comment below.
//!
//! Each socket has its own UMEM; frames carry the id of theirs and are checked against it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig, XdpFlags};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

use super::xdp_prog::XdpMode;

/// UMEM chunk size: a page, the usual choice, so a 1500-byte (or 3.5 KB) frame fits in one.
pub const FRAME_SIZE: u32 = 4096;

static NEXT_UMEM: AtomicU32 = AtomicU32::new(1);

/// One UMEM chunk owned by user space. See the module documentation.
#[derive(Debug)]
pub struct Frame {
    desc: FrameDesc,
    umem: u32,
}

impl Frame {
    /// Bytes of packet data in the frame.
    pub fn len(&self) -> usize {
        self.desc.lengths().data()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What [`open`] asks for.
#[derive(Clone, Copy, Debug)]
pub struct XskConfig {
    pub queue: u32,
    /// Frames for receiving (kept in the fill ring) and for sending; ring sizes follow.
    pub rx_frames: u32,
    pub tx_frames: u32,
    pub mode: XdpMode,
}

/// The receive half: fill ring and rx ring.
pub struct XskRx {
    /// The UMEM its frames live in.
    view: XskView,
    fill: FillQueue,
    rx: RxQueue,
    scratch: Vec<FrameDesc>,
}

/// Reads received frames of one UMEM (shared by the threads that receive from it).
#[derive(Clone)]
pub struct XskView {
    umem: Umem,
    umem_id: u32,
}

impl XskView {
    /// The received packet in `f`.
    pub fn data<'a>(&'a self, f: &'a Frame) -> &'a [u8] {
        assert_eq!(f.umem, self.umem_id, "frame of another UMEM");
        // SAFETY: `f` belongs to this UMEM and is owned by user space (taken from the rx ring,
        // not yet on the fill ring: the kernel does not write it), and `&Frame` rules out a
        // concurrent `&mut` to the same chunk.
        unsafe { self.umem.data(&f.desc) }.contents()
    }

    /// The received packet in `f`, to change in place (decrypt).
    pub fn data_mut<'a>(&'a self, f: &'a mut Frame) -> &'a mut [u8] {
        assert_eq!(f.umem, self.umem_id, "frame of another UMEM");
        // SAFETY: as for `data`; `&mut Frame` makes this the only reference to the frame's
        // chunk, and the kernel does not touch it until it is given back to the fill ring.
        let mut d = unsafe { self.umem.data_mut(&mut f.desc) };
        let len = d.contents().len();
        let p = d.contents_mut().as_mut_ptr();
        // SAFETY: `p..p+len` is the frame's packet in the UMEM mapping, which outlives `'a`
        // (self holds the Umem); `DataMut` is only a view, dropping it releases nothing.
        unsafe { std::slice::from_raw_parts_mut(p, len) }
    }
}

/// The send half: tx ring and completion ring.
pub struct XskTx {
    umem: Umem,
    umem_id: u32,
    tx: TxQueue,
    tx_size: u32,
    comp: CompQueue,
    scratch: Vec<FrameDesc>,
}

/// A bound AF_XDP socket, split into halves that can be locked separately, and every frame.
pub struct XskSocket {
    pub rx: XskRx,
    pub tx: XskTx,
    pub rx_frames: Vec<Frame>,
    pub tx_frames: Vec<Frame>,
    pub zero_copy: bool,
}

fn qsize(n: u32) -> io::Result<QueueSize> {
    QueueSize::new(n.next_power_of_two()).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))
}

fn create_err(what: &str, e: impl std::error::Error) -> io::Error {
    // xsk-rs puts the errno in the source; keep it so callers can tell EPERM from ENOTSUP.
    let os = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<io::Error>()).and_then(|s| s.raw_os_error());
    match os {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::other(format!("{what}: {e}")),
    }
}

/// Bind an AF_XDP socket to `iface` queue `cfg.queue`. wraith's own program must be attached
/// already: libxdp's default program is never loaded.
pub fn open(iface: &str, cfg: XskConfig) -> io::Result<XskSocket> {
    let total = cfg.rx_frames + cfg.tx_frames;
    let umem_cfg = UmemConfig::builder()
        .frame_size(FrameSize::new(FRAME_SIZE).map_err(|e| io::Error::other(e.to_string()))?)
        .fill_queue_size(qsize(cfg.rx_frames)?)
        .comp_queue_size(qsize(cfg.tx_frames)?)
        .build()
        .map_err(|e| io::Error::other(e.to_string()))?;
    let count = std::num::NonZeroU32::new(total).ok_or_else(|| io::Error::other("no frames"))?;
    let (umem, mut descs) = Umem::new(umem_cfg, count, false).map_err(|e| create_err("UMEM", e))?;
    let bind = match cfg.mode {
        // Zero-copy where the driver offers it, copy otherwise; the kernel picks.
        XdpMode::Native => BindFlags::XDP_USE_NEED_WAKEUP,
        XdpMode::Generic => BindFlags::XDP_USE_NEED_WAKEUP | BindFlags::XDP_COPY,
    };
    let sock_cfg = SocketConfig::builder()
        .rx_queue_size(qsize(cfg.rx_frames)?)
        .tx_queue_size(qsize(cfg.tx_frames)?)
        .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
        .xdp_flags(match cfg.mode {
            XdpMode::Native => XdpFlags::XDP_FLAGS_DRV_MODE,
            XdpMode::Generic => XdpFlags::XDP_FLAGS_SKB_MODE,
        })
        .bind_flags(bind)
        .build();
    let ifname: Interface = iface.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
    // SAFETY: this UMEM is new and used by this one socket only, so no other socket of ours is
    // bound to (iface, queue) through it; the kernel refuses a second binding by anyone else.
    let (tx, rx, fq_cq) = unsafe { Socket::new(sock_cfg, &umem, &ifname, cfg.queue) }.map_err(|e| create_err("AF_XDP socket", e))?;
    let (fill, comp) = fq_cq.ok_or_else(|| io::Error::other("AF_XDP socket came without fill and completion rings"))?;
    let zero_copy = xdp_zero_copy(rx.fd().as_raw_fd());
    let umem_id = NEXT_UMEM.fetch_add(1, Ordering::Relaxed);
    let tx_descs = descs.split_off(cfg.rx_frames as usize);
    let wrap = |d: Vec<FrameDesc>| d.into_iter().map(|desc| Frame { desc, umem: umem_id }).collect::<Vec<_>>();
    let batch = |n: u32| vec![FrameDesc::default(); n.next_power_of_two() as usize];
    Ok(XskSocket {
        rx: XskRx { view: XskView { umem: umem.clone(), umem_id }, fill, rx, scratch: batch(cfg.rx_frames) },
        tx: XskTx { umem, umem_id, tx, tx_size: cfg.tx_frames.next_power_of_two(), comp, scratch: batch(cfg.tx_frames) },
        rx_frames: wrap(descs),
        tx_frames: wrap(tx_descs),
        zero_copy,
    })
}

/// XDP_OPTIONS: whether the kernel bound this socket in zero-copy mode.
fn xdp_zero_copy(fd: i32) -> bool {
    const SOL_XDP: i32 = 283;
    const XDP_OPTIONS: i32 = 8;
    const XDP_OPTIONS_ZEROCOPY: u32 = 1;
    let mut v: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writes and `len` holds the size of `v`.
    let r = unsafe { libc::getsockopt(fd, SOL_XDP, XDP_OPTIONS, (&mut v as *mut u32).cast(), &mut len) };
    r == 0 && v & XDP_OPTIONS_ZEROCOPY != 0
}

/// Move frames from the end of `frames` into a producer ring; returns how many moved.
fn take_tail(frames: &mut Vec<Frame>, umem_id: u32, scratch: &mut [FrameDesc], produce: impl FnOnce(&[FrameDesc]) -> usize) -> usize {
    let n = frames.len().min(scratch.len());
    let start = frames.len() - n;
    for (s, f) in scratch.iter_mut().zip(&frames[start..]) {
        assert_eq!(f.umem, umem_id, "frame of another UMEM");
        *s = f.desc;
    }
    let done = produce(&scratch[..n]);
    // The ring took the first `done` descriptors: exactly those frames leave user space.
    frames.drain(start..start + done);
    done
}

impl XskRx {
    /// Give frames to the kernel to receive into (from the end of `frames`); returns how many.
    pub fn fill(&mut self, frames: &mut Vec<Frame>) -> usize {
        let fill = &mut self.fill;
        // SAFETY: each descriptor comes from a Frame we own (see module doc) of this UMEM, and
        // the Frame value is dropped from `frames` as the ring takes it, so it cannot be used or
        // submitted again until the kernel returns the chunk on the rx ring.
        take_tail(frames, self.view.umem_id, &mut self.scratch, |d| unsafe { fill.produce(d) })
    }

    /// Take up to `max` received frames; returns how many were appended to `out`.
    pub fn recv(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.scratch.len());
        // SAFETY: the descriptors are written by the rx ring; each names a chunk the kernel hands
        // back to us, for which no Frame exists (it was consumed by `fill`).
        let got = unsafe { self.rx.consume(&mut self.scratch[..n]) };
        let umem = self.view.umem_id;
        out.extend(self.scratch[..got].iter().map(|&desc| Frame { desc, umem }));
        got
    }

    /// The received packet in `f`.
    pub fn data<'a>(&'a self, f: &'a Frame) -> &'a [u8] {
        self.view.data(f)
    }

    /// A read-only view of this socket's UMEM, for reading frames taken out of the rx ring
    /// without holding the ring.
    pub fn view(&self) -> XskView {
        self.view.clone()
    }

    /// Whether the kernel wants a wake-up to use new fill entries.
    pub fn needs_wakeup(&self) -> bool {
        self.fill.needs_wakeup()
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to the socket, which lives as long as `self.rx`.
        unsafe { BorrowedFd::borrow_raw(self.rx.fd().as_raw_fd()) }
    }
}

impl XskTx {
    /// Set the frame's length to `len` and let `write` fill those bytes. False (and nothing
    /// written) if a frame cannot hold `len` bytes.
    pub fn write(&self, f: &mut Frame, len: usize, write: impl FnOnce(&mut [u8])) -> bool {
        assert_eq!(f.umem, self.umem_id, "frame of another UMEM");
        // SAFETY: `f` belongs to this UMEM, user space owns its chunk, and `&mut Frame` is the
        // only way to reach that chunk, so this is the only reference to it.
        let mut data = unsafe { self.umem.data_mut(&mut f.desc) };
        let mut cur = data.cursor();
        if len > cur.buf_len() {
            return false;
        }
        cur.set_pos(len);
        write(data.contents_mut());
        true
    }

    /// Put frames (from the front of `frames`, in order) on the tx ring; returns how many.
    pub fn send(&mut self, frames: &mut Vec<Frame>) -> usize {
        let n = frames.len().min(self.scratch.len());
        for (s, f) in self.scratch.iter_mut().zip(&frames[..n]) {
            assert_eq!(f.umem, self.umem_id, "frame of another UMEM");
            *s = f.desc;
        }
        // SAFETY: as in `XskRx::fill`: owned frames of this UMEM, removed as the ring takes them.
        let done = unsafe { self.tx.produce(&self.scratch[..n]) };
        frames.drain(..done);
        done
    }

    /// Take back up to `max` frames the kernel finished sending.
    pub fn completed(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.scratch.len());
        // SAFETY: the completion ring hands back chunks we submitted; no Frame exists for them.
        let got = unsafe { self.comp.consume(&mut self.scratch[..n]) };
        out.extend(self.scratch[..got].iter().map(|&desc| Frame { desc, umem: self.umem_id }));
        got
    }

    /// Frames on the tx ring that the kernel has not taken yet.
    pub fn pending(&mut self) -> usize {
        self.tx_size.saturating_sub(self.tx.nb_free_exact()) as usize
    }

    /// Tell the kernel to transmit what is on the tx ring (a `sendto` when it asks for one).
    pub fn kick(&self) -> io::Result<()> {
        if self.tx.needs_wakeup() {
            self.tx.wakeup()?;
        }
        Ok(())
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the fd belongs to the socket, which lives as long as `self.tx`.
        unsafe { BorrowedFd::borrow_raw(self.tx.fd().as_raw_fd()) }
    }
}
