//! Small concurrency building blocks for the filesystem core: a single-flight map (one fetch per
//! key however many readers wait) and a byte-bounded LRU of verified chunks.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};

use lru::LruCache;

use super::Source;
use crate::chunk::{BlockCvs, PieceCvs, VerifiedChunk};
use crate::error::Error;

enum State<V> {
    Pending,
    Done(Result<V, Error>),
    /// The leader let go without a result: whoever waits asks again.
    Abandoned,
}

struct Slot<V> {
    state: Mutex<State<V>>,
    ready: Condvar,
}

/// How often a thread waiting for another's fetch asks whether its caller was interrupted.
pub const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Deduplicates concurrent fetches of the same key.
pub struct SingleFlight<K, V> {
    inflight: Mutex<HashMap<K, Arc<Slot<V>>>>,
}

impl<K: Eq + Hash + Clone, V: Clone> Default for SingleFlight<K, V> {
    fn default() -> Self {
        SingleFlight { inflight: Mutex::new(HashMap::new()) }
    }
}

/// The lead of one key's fetch: whoever asks for the key meanwhile waits for [`Lead::finish`].
/// Dropped without a result (the leader gave up, or panicked), the waiters ask again and one of
/// them leads.
pub struct Lead<'a, K: Eq + Hash + Clone, V: Clone> {
    flight: &'a SingleFlight<K, V>,
    key: K,
    slot: Arc<Slot<V>>,
    done: bool,
}

impl<K: Eq + Hash + Clone, V: Clone> Lead<'_, K, V> {
    pub fn key(&self) -> &K {
        &self.key
    }

    pub fn finish(mut self, r: Result<V, Error>) {
        self.complete(State::Done(r));
    }

    fn complete(&mut self, st: State<V>) {
        self.done = true;
        // Out of the map first: a latecomer starts afresh (after looking in the caches the
        // result went into) rather than finding a slot that is being emptied.
        self.flight.inflight.lock().unwrap().remove(&self.key);
        *self.slot.state.lock().unwrap() = st;
        self.slot.ready.notify_all();
    }
}

impl<K: Eq + Hash + Clone, V: Clone> Drop for Lead<'_, K, V> {
    fn drop(&mut self) {
        if !self.done {
            self.complete(State::Abandoned);
        }
    }
}

impl<K: Eq + Hash + Clone, V: Clone> SingleFlight<K, V> {
    /// The lead of `key`'s fetch if nobody is fetching it (then in the map), else the slot of
    /// whoever is. `m` is the locked map.
    fn join<'a>(&'a self, m: &mut HashMap<K, Arc<Slot<V>>>, key: K) -> Result<Lead<'a, K, V>, Arc<Slot<V>>> {
        if let Some(s) = m.get(&key) {
            return Err(s.clone());
        }
        let slot = Arc::new(Slot { state: Mutex::new(State::Pending), ready: Condvar::new() });
        m.insert(key.clone(), slot.clone());
        Ok(Lead { flight: self, key, slot, done: false })
    }

    /// Run `fetch` for `key` unless another thread already is; then everyone gets its result.
    /// A waiter asks `interrupted` every [`WAIT_POLL`] and gives up with `Interrupted` when it
    /// says so (the lead may be a prefetch on a hard mount, retrying until the server is back).
    /// A lead that was itself interrupted lets go instead of handing its `Interrupted` to the
    /// waiters, who were not: one of them leads next.
    pub fn run(&self, key: K, interrupted: impl Fn() -> bool, fetch: impl FnOnce() -> Result<V, Error>) -> Result<V, Error> {
        let mut fetch = Some(fetch);
        loop {
            let joined = self.join(&mut self.inflight.lock().unwrap(), key.clone());
            let slot = match joined {
                Ok(lead) => {
                    let r = (fetch.take().expect("fetched once"))();
                    if !matches!(r, Err(Error::Interrupted)) {
                        lead.finish(r.clone());
                    }
                    return r;
                }
                Err(slot) => slot,
            };
            let mut st = slot.state.lock().unwrap();
            while matches!(*st, State::Pending) {
                st = slot.ready.wait_timeout(st, WAIT_POLL).unwrap().0;
                if matches!(*st, State::Pending) && interrupted() {
                    return Err(Error::Interrupted);
                }
            }
            if let State::Done(r) = &*st {
                return r.clone();
            }
        }
    }

    /// Take the lead for each of `keys` that nobody is fetching (in their order); the others
    /// are left out.
    pub fn lead(&self, keys: impl IntoIterator<Item = K>) -> Vec<Lead<'_, K, V>> {
        // The caller's iterator runs before the lock is taken, and `out` is declared before the
        // guard: were anything to panic in here, the guard is released before the leads are
        // dropped (a lead's drop takes the same lock).
        let keys: Vec<K> = keys.into_iter().collect();
        let mut out = Vec::new();
        let mut m = self.inflight.lock().unwrap();
        for key in keys {
            if let Ok(lead) = self.join(&mut m, key) {
                out.push(lead);
            }
        }
        out
    }

    pub fn is_inflight(&self, key: &K) -> bool {
        self.inflight.lock().unwrap().contains_key(key)
    }
}

/// Key of a chunk in memory: the file's BLAKE3 root, its chunk size (log2) and the chunk index.
/// Identical files share; the same bytes served at another chunk size (an export's `chunk=`
/// changed while a mount stays up) are other chunks.
pub type ChunkKey = ([u8; 32], u8, u64);

/// A chunk in memory and where it came from.
type Tagged = (VerifiedChunk, Source);

/// An LRU bounded by the bytes `cost` says its values take: past the bound the least recently
/// used go first, and a value larger than the whole bound is not kept.
struct ByteLru<K: Hash + Eq, V> {
    lru: LruCache<K, V>,
    bytes: u64,
    limit: u64,
    cost: fn(&V) -> u64,
}

impl<K: Hash + Eq, V> ByteLru<K, V> {
    fn new(limit: u64, cost: fn(&V) -> u64) -> Self {
        ByteLru { lru: LruCache::unbounded(), bytes: 0, limit, cost }
    }

    fn put(&mut self, k: K, v: V) {
        let n = (self.cost)(&v);
        if n > self.limit {
            return;
        }
        self.bytes += n;
        if let Some(old) = self.lru.put(k, v) {
            self.bytes -= (self.cost)(&old);
        }
        while self.bytes > self.limit {
            match self.lru.pop_lru() {
                Some((_, old)) => self.bytes -= (self.cost)(&old),
                None => break,
            }
        }
    }

    fn pop(&mut self, k: &K) {
        if let Some(old) = self.lru.pop(k) {
            self.bytes -= (self.cost)(&old);
        }
    }
}

/// Verified chunks in memory (with where they came from), bounded in bytes, least recently used
/// evicted first.
pub struct ChunkLru {
    inner: Mutex<ByteLru<ChunkKey, Tagged>>,
    /// The piece CVs of chunks verified before, kept after their bytes leave memory, so that a
    /// small read of one from the disk cache can be verified without reading the whole chunk.
    pieces: Mutex<ByteLru<ChunkKey, PieceCvs>>,
    /// The block CVs of pieces read alone before, so that a read of one 4 KiB block of them
    /// reads and verifies only that block.
    blocks: Mutex<ByteLru<(ChunkKey, usize), BlockCvs>>,
}

/// Bytes of piece CVs remembered: 65,536 chunks at 256 KiB (16 GiB of file data), 1,024 at
/// 16 MiB. Counted in bytes, not entries: a 16 MiB chunk has 1,024 pieces, and 65,536 entries
/// of those would have been 2 GiB.
const PIECE_BYTES: u64 = 32 << 20;
/// What an entry costs besides its values (key, LRU links, the shared allocation's header).
const PIECE_ENTRY_COST: u64 = 96;

/// Bytes of block CVs remembered: 32 MiB, ~123,000 pieces (1.9 GiB of file read at random).
const BLOCK_BYTES: u64 = 32 << 20;
/// What an entry costs: the key and four values (208 bytes), the LRU's links, the allocation's
/// rounding and the hash table's slot.
const BLOCK_ENTRY_COST: u64 = 272;

impl ChunkLru {
    pub fn new(limit: u64) -> Self {
        ChunkLru {
            inner: Mutex::new(ByteLru::new(limit, |t: &Tagged| t.0.mem_cost() as u64)),
            pieces: Mutex::new(ByteLru::new(PIECE_BYTES, |p: &PieceCvs| p.len() as u64 * 32 + PIECE_ENTRY_COST)),
            blocks: Mutex::new(ByteLru::new(BLOCK_BYTES, |_| BLOCK_ENTRY_COST)),
        }
    }

    /// The block CVs of piece `piece` of chunk `k`, if it was read alone recently.
    pub fn blocks(&self, k: &ChunkKey, piece: usize) -> Option<BlockCvs> {
        self.blocks.lock().unwrap().lru.get(&(*k, piece)).copied()
    }

    /// Remember the block CVs a span was verified through.
    pub fn put_blocks(&self, k: ChunkKey, b: &[BlockCvs]) {
        let mut g = self.blocks.lock().unwrap();
        for b in b {
            g.put((k, b.piece()), *b);
        }
    }

    /// The piece CVs of chunk `k`, if it was verified (and cut into pieces) recently.
    pub fn pieces(&self, k: &ChunkKey) -> Option<PieceCvs> {
        self.pieces.lock().unwrap().lru.get(k).cloned()
    }

    /// Remember piece CVs that were checked some other way (stored ones, against a proven leaf).
    pub fn put_pieces(&self, k: ChunkKey, p: PieceCvs) {
        self.pieces.lock().unwrap().put(k, p);
    }

    pub fn get(&self, k: &ChunkKey) -> Option<(VerifiedChunk, Source)> {
        self.inner.lock().unwrap().lru.get(k).cloned()
    }

    pub fn contains(&self, k: &ChunkKey) -> bool {
        self.inner.lock().unwrap().lru.contains(k)
    }

    pub fn insert(&self, k: ChunkKey, c: VerifiedChunk, src: Source) {
        if let Some(p) = c.pieces() {
            self.pieces.lock().unwrap().put(k, p.clone());
        }
        self.inner.lock().unwrap().put(k, (c, src));
    }

    /// Let go of chunks `idxs` of the file with root `root` cut at `chunk_log2` (a stream has
    /// passed them); their piece values are kept.
    pub fn forget(&self, root: [u8; 32], chunk_log2: u8, idxs: std::ops::Range<u64>) {
        if idxs.is_empty() {
            return;
        }
        let mut g = self.inner.lock().unwrap();
        for i in idxs {
            g.pop(&(root, chunk_log2, i));
        }
    }

    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Geometry;

    fn chunk(n: usize, fill: u8) -> VerifiedChunk {
        let data = vec![fill; n];
        let g = Geometry::new(n as u64, 18).unwrap();
        let root = blake3::hash(&data);
        VerifiedChunk::verify(&g, &root, 0, None, data).unwrap()
    }

    #[test]
    fn lru_stays_within_bytes() {
        let c = ChunkLru::new(10_000);
        for i in 0..100u64 {
            c.insert(([i as u8; 32], 18, i), chunk(1000, i as u8), Source::Network);
            assert!(c.bytes() <= 10_000);
        }
        assert!(c.get(&([99; 32], 18, 99)).is_some());
        assert!(c.get(&([0; 32], 18, 0)).is_none());
        c.insert(([1; 32], 18, 1), chunk(20_000, 1), Source::Network); // larger than the whole cache: not kept
        assert!(c.bytes() <= 10_000);
    }

    /// Block values are bounded in bytes, the most recent kept, and an entry's cost covers at
    /// least its key, its values and the LRU's two links.
    #[test]
    fn block_values_stay_within_their_bytes() {
        let need = std::mem::size_of::<((ChunkKey, usize), BlockCvs)>() + 16;
        assert!(BLOCK_ENTRY_COST as usize >= need, "{need}");
        let g = Geometry::new(1 << 20, 18).unwrap();
        let data = vec![5u8; 1 << 18];
        let c = VerifiedChunk::verify(&g, &blake3::hash(b"unused"), 0, Some(&crate::chunk::chunk_cv(&g, 0, &data)), data.clone()).unwrap();
        let span = crate::chunk::VerifiedSpan::verify(&g, c.pieces().unwrap(), 0, data).unwrap();
        assert_eq!(span.block_cvs().len(), 16);
        let lru = ChunkLru::new(0);
        let n = BLOCK_BYTES / BLOCK_ENTRY_COST;
        for i in 0..n / 16 + 100 {
            lru.put_blocks(([2; 32], 18, i), span.block_cvs());
        }
        assert!(lru.blocks(&([2; 32], 18, n / 16 + 99), 15).is_some());
        assert!(lru.blocks(&([2; 32], 18, 0), 0).is_none(), "the oldest went first");
        assert!(lru.blocks(&([2; 32], 18, 0), 16).is_none());
        let g = lru.blocks.lock().unwrap();
        assert!(g.bytes <= BLOCK_BYTES && g.lru.len() as u64 == n, "{} {}", g.bytes, g.lru.len());
    }

    /// Piece values are bounded in bytes: 16 MiB chunks (1,024 pieces each) keep at most what
    /// fits in `PIECE_BYTES`, the most recent ones.
    #[test]
    fn piece_values_stay_within_their_bytes() {
        let g = Geometry::new((16 << 20) + 1, 24).unwrap();
        let data = vec![3u8; 16 << 20];
        let cv = crate::chunk::chunk_cv(&g, 0, &data);
        let c = VerifiedChunk::verify(&g, &blake3::hash(b"unused for 2+ chunks"), 0, Some(&cv), data).unwrap();
        let p = c.pieces().expect("a 16 MiB chunk has pieces").clone();
        assert_eq!(p.len(), 1024);
        let lru = ChunkLru::new(0);
        for i in 0..3000u64 {
            lru.put_pieces(([1; 32], 24, i), p.clone());
        }
        let g = lru.pieces.lock().unwrap();
        assert!(g.bytes <= PIECE_BYTES, "{}", g.bytes);
        assert!(g.lru.len() < 1100 && g.lru.len() > 900, "{}", g.lru.len());
        assert!(g.lru.contains(&([1; 32], 24, 2999)) && !g.lru.contains(&([1; 32], 24, 0)));
    }

    #[test]
    fn forget_lets_go_of_a_files_chunks_and_their_bytes() {
        let c = ChunkLru::new(100_000);
        for i in 0..5u64 {
            c.insert(([7; 32], 18, i), chunk(1000, i as u8), Source::Network);
        }
        c.insert(([8; 32], 18, 1), chunk(1000, 9), Source::Network);
        c.forget([7; 32], 18, 1..3);
        assert!(c.contains(&([7; 32], 18, 0)) && c.contains(&([7; 32], 18, 3)));
        assert!(!c.contains(&([7; 32], 18, 1)) && !c.contains(&([7; 32], 18, 2)));
        assert!(c.contains(&([8; 32], 18, 1)), "another file's chunk 1 stays");
        assert_eq!(c.bytes(), 4 * chunk(1000, 0).mem_cost() as u64);
        c.forget([7; 32], 18, 3..3);
        assert!(c.contains(&([7; 32], 18, 3)), "an empty range lets go of nothing");
    }

    /// A waiter whose caller gives up returns `Interrupted` while the lead still runs (a
    /// prefetch on a hard mount may retry until the server is back); a lead that was itself
    /// interrupted lets go, and a waiter then fetches for itself instead of inheriting it.
    #[test]
    fn waiters_give_up_on_their_own_and_do_not_inherit_a_leads_interruption() {
        use std::time::{Duration, Instant};
        let sf: Arc<SingleFlight<u32, u32>> = Arc::new(SingleFlight::default());
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let lead = {
            let sf = sf.clone();
            std::thread::spawn(move || {
                sf.run(1, || false, || {
                    wait.recv().unwrap();
                    Err(Error::Interrupted)
                })
            })
        };
        while !sf.is_inflight(&1) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        assert_eq!(sf.run(1, || true, || Ok(5)), Err(Error::Interrupted), "the waiter's caller gave up");
        assert!(t0.elapsed() < 3 * WAIT_POLL, "{:?}", t0.elapsed());
        let waiter = {
            let sf = sf.clone();
            std::thread::spawn(move || sf.run(1, || false, || Ok(7)))
        };
        std::thread::sleep(Duration::from_millis(100));
        go.send(()).unwrap();
        assert_eq!(lead.join().unwrap(), Err(Error::Interrupted));
        assert_eq!(waiter.join().unwrap(), Ok(7), "the waiter fetched for itself");
    }

    #[test]
    fn single_flight_runs_once() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let sf: Arc<SingleFlight<u32, u32>> = Arc::new(SingleFlight::default());
        let runs = Arc::new(AtomicU32::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (sf, runs) = (sf.clone(), runs.clone());
                std::thread::spawn(move || {
                    sf.run(1, || false, || {
                        runs.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        Ok(7)
                    })
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), Ok(7));
        }
        assert!(runs.load(Ordering::SeqCst) < 8);
    }

    #[test]
    fn a_lead_is_waited_for_and_one_let_go_is_fetched_again() {
        let sf: Arc<SingleFlight<u32, u32>> = Arc::new(SingleFlight::default());
        let mut leads = sf.lead([1, 2]);
        assert_eq!(leads.iter().map(|l| *l.key()).collect::<Vec<_>>(), [1, 2]);
        assert!(sf.lead([1, 3]).iter().map(|l| *l.key()).eq([3]), "1 is led already; 3 was let go at once");
        assert!(sf.is_inflight(&2) && !sf.is_inflight(&3));
        let waiter = |k| {
            let sf = sf.clone();
            std::thread::spawn(move || sf.run(k, || false, || Ok(100 + k)))
        };
        let (w1, w2) = (waiter(1), waiter(2));
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(!w1.is_finished() && !w2.is_finished(), "both wait for their lead");
        let l2 = leads.pop().unwrap();
        let l1 = leads.pop().unwrap();
        l1.finish(Ok(7));
        assert_eq!(w1.join().unwrap(), Ok(7), "the lead's result, not a fetch of its own");
        drop(l2);
        assert_eq!(w2.join().unwrap(), Ok(102), "let go without a result: the waiter fetched");
        assert!(!sf.is_inflight(&1) && !sf.is_inflight(&2));
    }
}
