//! The server: exports, safe path resolution (`export`), the persistent hash index (`index`), the
//! buffers chunks are read into (`bufs`), and the loop that feeds authenticated requests to a
//! pool of workers.

mod bufs;
pub mod export;
pub mod index;

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::chunk::pool::Slot;
use crate::chunk::{Buf, Geometry};
use crate::error::Error;
use crate::proto::frame::Missing;
use crate::proto::msg::{Request, Response};
use crate::proto::server::{Input, Server, Session, MAX_BURST};
use crate::transport::{DatagramIo, RecvBufs, UdpIo};
use crate::types::FileInfo;
use export::{ExportSpec, Exports};
use index::HashIndex;

/// Files up to this size are hashed on the spot and travel inline with the OPEN answer.
pub const INLINE_MAX: u64 = 64 << 10;
/// Leaf values per CVS answer at most.
pub const MAX_CVS: u32 = 4096;
/// How long an OPEN waits for hashing before answering BUSY (the client asks again).
const HASH_WAIT: Duration = Duration::from_millis(1500);

pub struct ServeConfig {
    pub exports: Vec<ExportSpec>,
    pub listen: SocketAddr,
    pub psk: [u8; 32],
    pub state_dir: PathBuf,
    pub workers: usize,
}

/// Open files kept between requests, so that chunk reads of one file reuse one descriptor (no
/// path walk per chunk, and the kernel's readahead state survives).
const OPEN_FILES: usize = 64;

type FileKey = (u32, Vec<u8>);

/// One open file version: a buffered descriptor, and an O_DIRECT one for data that is not in the
/// page cache (a buffered cold read costs ~5x the CPU of a direct one here: page allocation and
/// copying; measured with perf, 0.62 s vs 0.14 s per GiB).
struct OpenFile {
    buffered: Arc<std::fs::File>,
    direct: Option<std::fs::File>,
}

/// The filesystem side: answers decoded requests. No sockets here.
pub struct Handler {
    exports: Exports,
    index: HashIndex,
    files: Mutex<lru::LruCache<FileKey, Arc<OpenFile>>>,
}

fn version_of(f: &std::fs::File) -> Option<crate::types::Version> {
    use std::os::unix::fs::MetadataExt;
    let m = f.metadata().ok()?;
    Some(crate::types::Version {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        ctime_ns: m.ctime() * 1_000_000_000 + m.ctime_nsec(),
    })
}

impl Handler {
    pub fn new(exports: Exports, index: HashIndex) -> Self {
        let files = Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(OPEN_FILES).unwrap()));
        Handler { exports, index, files }
    }

    /// At most half of `workers` wait for hashing at once (none of a single worker): the others
    /// answer BUSY at once and the client asks again 200 ms later.
    fn set_workers(&self, workers: usize) {
        self.index.set_max_waiters(workers / 2);
    }

    /// The file at `path` if it still is `version`: from the open-file cache when its descriptor
    /// still shows that version, else opened afresh (beneath the export). Stale otherwise.
    fn file_at_version(&self, share: u32, path: &[u8], version: crate::types::Version) -> Result<Arc<OpenFile>, Error> {
        let key = (share, path.to_vec());
        if let Some(f) = self.files.lock().unwrap().get(&key).cloned() {
            if version_of(&f.buffered) == Some(version) {
                return Ok(f);
            }
        }
        let (file, attr) = self.exports.open_file(share, path)?;
        if attr.version() != version {
            return Err(Error::Stale);
        }
        // The direct descriptor must name the same file; filesystems without O_DIRECT go buffered.
        let direct = self
            .exports
            .open_file_direct(share, path)
            .ok()
            .filter(|(_, a)| a.version() == version)
            .map(|(f, _)| f);
        let f = Arc::new(OpenFile { buffered: Arc::new(file), direct });
        self.files.lock().unwrap().put(key, f.clone());
        Ok(f)
    }

    /// `len` bytes at `off`: buffered when they are all in the page cache (cachestat, which starts
    /// no I/O), else straight from the disk with O_DIRECT (when aligned), else buffered. Into a
    /// recycled aligned buffer ([`bufs`]) with room for one more byte (the response's tag).
    fn read_chunk(f: &OpenFile, len: usize, off: u64) -> Result<Buf, Error> {
        use std::os::fd::AsFd;
        let mut buf = bufs::take(len + 1);
        let pages = (len as u64).div_ceil(4096);
        let cached = crate::sys::fs::cached_pages(f.buffered.as_fd(), off, len as u64).map_or(true, |n| n >= pages);
        if !cached {
            if let Some(d) = f.direct.as_ref().filter(|_| off % bufs::ALIGN as u64 == 0) {
                let span = len.next_multiple_of(bufs::ALIGN);
                let raw = buf.bytes_mut();
                let mut got = 0;
                while got < len {
                    match d.read_at(&mut raw[got..span], off + got as u64) {
                        Ok(0) => return Err(Error::Stale), // the file shrank under us
                        Ok(n) => got += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(_) => break, // e.g. EINVAL: alignment refused; fall back to buffered
                    }
                }
                if got >= len {
                    return Ok(buf.into_buf(len));
                }
            }
        }
        read_exact_at(&f.buffered, &mut buf.bytes_mut()[..len], off)?;
        Ok(buf.into_buf(len))
    }

    fn share(&self, name: &str) -> Result<u32, Error> {
        self.exports.share(name).ok_or(Error::NotFound)
    }

    pub fn handle(&self, req: Request) -> Response {
        match self.try_handle(req) {
            Ok(r) => r,
            Err(e) => Response::Error(e),
        }
    }

    fn try_handle(&self, req: Request) -> Result<Response, Error> {
        Ok(match req {
            Request::Attach { share } => {
                let s = self.share(&share)?;
                Response::Attached { root: self.exports.lstat(s, b"")? }
            }
            Request::Stat { share, path } => Response::Attr(self.exports.lstat(self.share(&share)?, &path)?),
            Request::ReadDir { share, path, cookie, max_bytes } => {
                let max = (max_bytes as usize).clamp(4096, 512 << 10);
                let (entries, next) = self.exports.readdir(self.share(&share)?, &path, cookie, max)?;
                Response::Dir { entries, next }
            }
            Request::ReadLink { share, path } => Response::Link(self.exports.readlink(self.share(&share)?, &path)?),
            Request::Open { share, path } => self.open(self.share(&share)?, &path)?,
            Request::Cvs { share, path, version, first, count } => {
                let s = self.share(&share)?;
                let file = self.file_at_version(s, &path, version)?;
                let tree = self.index.get(file.buffered.clone(), version, self.exports.chunk_log2(s), HASH_WAIT)?;
                let leaves = tree.leaves(first, count.min(MAX_CVS) as u64).map_err(|e| Error::from_io(&e))?;
                let proof = tree.prove(first, leaves.len() as u64).map_err(|e| Error::from_io(&e))?;
                Response::Cvs { leaves, proof }
            }
            Request::Read { share, path, version, index } => {
                let s = self.share(&share)?;
                let file = self.file_at_version(s, &path, version)?;
                let geom = Geometry::new(version.size, self.exports.chunk_log2(s)).map_err(|_| Error::Invalid)?;
                if index >= geom.n_chunks() {
                    return Err(Error::Invalid);
                }
                // (With one spare byte, so the response tag goes on without reallocating.)
                let buf = Self::read_chunk(&file, geom.chunk_len(index), geom.chunk_offset(index))?;
                // The bytes must belong to that version: a write during the read changes ctime.
                if version_of(&file.buffered) != Some(version) {
                    return Err(Error::Stale);
                }
                Response::Data(buf)
            }
            Request::StatFs { share } => Response::StatFs(self.exports.statfs(self.share(&share)?)?),
        })
    }

    fn open(&self, share: u32, path: &[u8]) -> Result<Response, Error> {
        let (file, attr) = self.exports.open_file(share, path)?;
        let chunk_log2 = self.exports.chunk_log2(share);
        let geom = Geometry::new(attr.size, chunk_log2).map_err(|_| Error::Invalid)?;
        if attr.size <= INLINE_MAX && geom.n_chunks() == 1 {
            // Small file: hashing is cheaper than any index lookup, and the bytes ride along.
            let mut data = vec![0u8; attr.size as usize];
            read_exact_at(&file, &mut data, 0)?;
            // The same descriptor's fstat: a write during the read changes mtime/ctime/size.
            if version_of(&file) != Some(attr.version()) {
                return Err(Error::Busy); // changed while we read it: the client asks again
            }
            let root = *blake3::hash(&data).as_bytes();
            return Ok(Response::Opened { info: FileInfo { attr, root, chunk_log2 }, inline: Some(data) });
        }
        let tree = self.index.get(Arc::new(file), attr.version(), chunk_log2, HASH_WAIT)?;
        Ok(Response::Opened { info: FileInfo { attr, root: *tree.root().as_bytes(), chunk_log2 }, inline: None })
    }
}

fn read_exact_at(f: &std::fs::File, buf: &mut [u8], off: u64) -> Result<(), Error> {
    let mut done = 0;
    while done < buf.len() {
        match f.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => return Err(Error::Stale), // file shrank under us
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::from_io(&e)),
        }
    }
    Ok(())
}

struct Job {
    session: Arc<Session>,
    peer: SocketAddr,
    id: u64,
    missing: Vec<Missing>,
    body: Vec<u8>,
}

/// Run the server until `stop` is set. Binds, then serves.
pub fn run(cfg: ServeConfig, stop: Arc<AtomicBool>) -> io::Result<()> {
    let exports = Exports::new(cfg.exports).map_err(io::Error::other)?;
    let index = HashIndex::open_and_collect(&cfg.state_dir)
        .map_err(|e| io::Error::other(format!("state directory {}: {e}", cfg.state_dir.display())))?;
    let sock = UdpSocket::bind(cfg.listen)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {}: {e}", cfg.listen)))?;
    serve_socket(sock, Handler::new(exports, index), cfg.psk, cfg.workers, stop)
}

/// The exports and hash index of `cfg`, ready to answer requests over any datagram path
/// (`serve_io`; the AF_XDP server builds its path itself).
pub fn handler(cfg: &ServeConfig) -> io::Result<Handler> {
    let exports = Exports::new(cfg.exports.clone()).map_err(io::Error::other)?;
    let index = HashIndex::open_and_collect(&cfg.state_dir)
        .map_err(|e| io::Error::other(format!("state directory {}: {e}", cfg.state_dir.display())))?;
    Ok(Handler::new(exports, index))
}

pub fn serve_socket(sock: UdpSocket, handler: Handler, psk: [u8; 32], workers: usize, stop: Arc<AtomicBool>) -> io::Result<()> {
    serve_io(Arc::new(UdpIo::new(sock)?), handler, psk, workers, stop)
}

/// Serve over any datagram path (UDP socket, AF_XDP).
pub fn serve_io(io: Arc<dyn DatagramIo>, handler: Handler, psk: [u8; 32], workers: usize, stop: Arc<AtomicBool>) -> io::Result<()> {
    handler.set_workers(workers.max(1));
    let handler = Arc::new(handler);
    let (tx, rx): (SyncSender<Job>, Receiver<Job>) = sync_channel(4096);
    let rx = Arc::new(Mutex::new(rx));
    let mut pool = Vec::new();
    // Every worker may hold one sealed burst not yet sent: together well inside the client's
    // replay window.
    let burst = (crate::proto::session::WINDOW as usize / (2 * workers.max(1))).clamp(64, MAX_BURST);
    for i in 0..workers.max(1) {
        let (rx, io, handler) = (rx.clone(), io.clone(), handler.clone());
        pool.push(thread::Builder::new().name(format!("wraith-worker-{i}")).spawn(move || loop {
            let job = match rx.lock().unwrap().recv() {
                Ok(j) => j,
                Err(_) => return,
            };
            work(&*io, &handler, job, burst);
        })?);
    }
    let mut proto = Server::new(psk, rand::random());
    let mut bufs = RecvBufs::default();
    let mut dropped = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if !io.wait_readable(Duration::from_millis(200))? {
            continue;
        }
        let now = Instant::now();
        // Only a request accepted by a session counts as authentic (a HELLO can be replayed).
        let r = io.recv_now(&mut bufs, &mut |from, d| match proto.handle(now, d, || io.max_datagram_to(from)) {
            Some(Input::Reply(r)) => {
                let _ = io.send_burst(from, &r, r.len());
                false
            }
            Some(Input::Request { session, id, missing, body }) => {
                // Before a worker can answer.
                io.authentic(from);
                match tx.try_send(Job { session, peer: from, id, missing, body }) {
                    Ok(()) => {}
                    Err(TrySendError::Full(_)) => dropped += 1, // the client will ask again
                    Err(TrySendError::Disconnected(_)) => {}
                }
                true
            }
            None => false,
        });
        if let Err(e) = r {
            tracing::debug!(error = %e, "recv failed");
        }
        if dropped > 0 && dropped % 1000 == 1 {
            tracing::warn!(dropped, "request queue full; requests dropped (clients retry)");
        }
    }
    drop(tx);
    for t in pool {
        let _ = t.join();
    }
    Ok(())
}

fn work(io: &dyn DatagramIo, handler: &Handler, job: Job, burst: usize) {
    let req = match Request::decode(&job.body) {
        Ok(r) => r,
        Err(e) => {
            let b = job.session.encode_response(job.id, &Response::Error(e).encode(), &[]);
            let _ = io.send_burst(job.peer, &b.buf, b.seg);
            return;
        }
    };
    let span = tracing::debug_span!("request", id = job.id, session = job.session.id);
    let _g = span.enter();
    let resp = handler.handle(req).into_bytes();
    // In bursts sealed just before they go, so that packet numbers reach the client in about
    // the order they were taken, whatever the other workers do (see MAX_BURST).
    job.session.encode_response_each(job.id, &resp, &job.missing, burst, |b| match io.send_burst(job.peer, &b.buf, b.seg) {
        Ok(()) => true,
        Err(e) => {
            // The rest would likely fail too; the client asks again for what it misses.
            tracing::debug!(error = %e, peer = %job.peer, "send failed");
            false
        }
    });
}


#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::verify_leaves;

    fn handler(dir: &std::path::Path, chunk: &str) -> Handler {
        let spec = export::parse_export_spec(&format!("s={},chunk={chunk}", dir.join("data").display())).unwrap();
        let index = HashIndex::open(&dir.join("state")).unwrap();
        Handler::new(Exports::new(vec![spec]).unwrap(), index)
    }

    fn open(h: &Handler, name: &str) -> FileInfo {
        loop {
            match h.handle(Request::Open { share: "s".into(), path: name.as_bytes().to_vec() }) {
                Response::Opened { info, .. } => return info,
                Response::Error(Error::Busy) => std::thread::sleep(Duration::from_millis(50)),
                other => panic!("{other:?}"),
            }
        }
    }

    /// Bytes the client needs before it can verify the first chunk: the first leaf block and its
    /// proof. It must not grow with the file (only the proof grows, logarithmically).
    fn first_byte_cost(h: &Handler, name: &str) -> (usize, usize) {
        let info = open(h, name);
        let n = info.attr.size.div_ceil(1 << info.chunk_log2);
        let resp = h.handle(Request::Cvs {
            share: "s".into(),
            path: name.as_bytes().to_vec(),
            version: info.attr.version(),
            first: 0,
            count: 1024,
        });
        let bytes = resp.encode().len();
        let Response::Cvs { leaves, proof } = resp else { panic!() };
        verify_leaves(n, 0, &leaves, &proof, &blake3::Hash::from_bytes(info.root)).unwrap();
        (bytes, proof.len())
    }

    #[test]
    fn first_byte_does_not_fetch_all_leaf_values() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("data")).unwrap();
        // 1 KiB chunks: a 64 MiB file has 65,536 chunks, like a 16 GiB file at 256 KiB.
        let big = std::fs::File::create(d.path().join("data/big")).unwrap();
        big.set_len(64 << 20).unwrap();
        std::fs::write(d.path().join("data/small"), vec![7u8; 1 << 20]).unwrap();
        let h = handler(d.path(), "1K");
        let (small_bytes, small_proof) = first_byte_cost(&h, "small");
        let (big_bytes, big_proof) = first_byte_cost(&h, "big");
        assert_eq!(small_proof, 0, "1024 chunks: the first block is the whole tree");
        assert!(big_proof <= 7, "proof of one block in 65,536 leaves: {big_proof} values");
        // 64× more chunks cost at most a few hundred bytes more before the first byte.
        assert!(big_bytes <= small_bytes + 7 * 32 + 16, "{big_bytes} vs {small_bytes}");
        // All 65,536 values would be 2 MiB.
        assert!(big_bytes < 40 << 10);
    }

    /// Half of the workers may wait for hashing (`HashIndex::set_max_waiters`, tested there);
    /// a single worker never waits.
    #[test]
    fn only_half_the_workers_wait_for_hashing() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("data")).unwrap();
        let h = handler(d.path(), "256K");
        h.set_workers(4);
        assert_eq!(h.index.max_waiters(), 2);
        h.set_workers(1);
        assert_eq!(h.index.max_waiters(), 0);
    }

    /// A path that holds the receive callback's return, once it found a request authentic,
    /// until a worker has answered (at most 2 s): what is learned only after the callback then
    /// comes too late for that answer.
    struct WorkerFirst {
        inner: UdpIo,
        sent: Mutex<u64>,
        cv: std::sync::Condvar,
    }

    impl DatagramIo for WorkerFirst {
        fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
            let r = self.inner.send_burst(dest, buf, seg);
            *self.sent.lock().unwrap() += 1;
            self.cv.notify_all();
            r
        }
        fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
            self.inner.wait_readable(timeout)
        }
        fn recv_now(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
            self.inner.recv_now(bufs, &mut |from, d| {
                let before = *self.sent.lock().unwrap();
                let authentic = f(from, d);
                if authentic {
                    let g = self.sent.lock().unwrap();
                    let _ = self.cv.wait_timeout_while(g, Duration::from_secs(2), |n| *n == before);
                }
                authentic
            })
        }
        fn authentic(&self, from: SocketAddr) {
            self.inner.authentic(from)
        }
        fn max_datagram_to(&self, peer: SocketAddr) -> usize {
            self.inner.max_datagram_to(peer)
        }
    }

    /// A client's path that remembers where every datagram came from.
    struct Sources {
        inner: UdpIo,
        from: Mutex<Vec<SocketAddr>>,
    }

    impl DatagramIo for Sources {
        fn send_burst(&self, dest: SocketAddr, buf: &[u8], seg: usize) -> io::Result<()> {
            self.inner.send_burst(dest, buf, seg)
        }
        fn wait_readable(&self, timeout: Duration) -> io::Result<bool> {
            self.inner.wait_readable(timeout)
        }
        fn recv_now(&self, bufs: &mut RecvBufs, f: &mut dyn FnMut(SocketAddr, &mut [u8]) -> bool) -> io::Result<usize> {
            self.inner.recv_now(bufs, &mut |from, d| {
                self.from.lock().unwrap().push(from);
                f(from, d)
            })
        }
        fn max_datagram_to(&self, peer: SocketAddr) -> usize {
            self.inner.max_datagram_to(peer)
        }
    }

    /// A server on a wildcard address answers a client of another local address (127.0.0.2)
    /// from that address, also the first request of a session and also when a worker answers
    /// before the receive loop is done with the request: the reply address is learned before
    /// the request is queued.
    #[test]
    fn a_workers_first_answer_leaves_from_the_address_the_client_sent_to() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("data")).unwrap();
        let io = Arc::new(WorkerFirst {
            inner: UdpIo::new(UdpSocket::bind("0.0.0.0:0").unwrap()).unwrap(),
            sent: Mutex::new(0),
            cv: std::sync::Condvar::new(),
        });
        let server: SocketAddr = SocketAddr::new("127.0.0.2".parse().unwrap(), io.inner.socket().local_addr().unwrap().port());
        let psk = [9u8; 32];
        let stop = Arc::new(AtomicBool::new(false));
        let serving = {
            let (io, h, stop) = (io.clone(), handler(d.path(), "64K"), stop.clone());
            std::thread::spawn(move || serve_io(io, h, psk, 1, stop))
        };
        let client_io = Arc::new(Sources { inner: UdpIo::new(UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap(), from: Mutex::new(Vec::new()) });
        let client = crate::transport::ClientTransport::with_io(client_io.clone(), server, psk, 1400).unwrap();
        let r = client.call(&Request::Attach { share: "s".into() }, 4096, Duration::from_secs(10));
        drop(client);
        stop.store(true, Ordering::Relaxed);
        serving.join().unwrap().unwrap();
        assert!(matches!(r, Ok(Response::Attached { .. })), "{r:?}");
        let from = client_io.from.lock().unwrap().clone();
        assert!(from.len() >= 2, "the handshake's answer and the request's: {from:?}");
        assert!(from.iter().all(|&f| f == server), "every answer from {server}: {from:?}");
    }

    #[test]
    fn read_of_a_changed_file_is_stale() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("data")).unwrap();
        std::fs::write(d.path().join("data/f"), vec![1u8; 300 << 10]).unwrap();
        let h = handler(d.path(), "64K");
        let info = open(&h, "f");
        let read = |h: &Handler| {
            h.handle(Request::Read { share: "s".into(), path: b"f".to_vec(), version: info.attr.version(), index: 1 })
        };
        assert!(matches!(read(&h), Response::Data(d) if d.len() == 64 << 10));
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(d.path().join("data/f"), vec![2u8; 200 << 10]).unwrap();
        assert_eq!(read(&h), Response::Error(Error::Stale));
        assert_eq!(
            h.handle(Request::Attach { share: "nope".into() }),
            Response::Error(Error::NotFound)
        );
    }
}
