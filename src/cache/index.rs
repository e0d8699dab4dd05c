//! What the disk cache holds, and what to evict. Pure: no I/O, no clock.
//!
//! Space is counted per chunk rounded up to the `O_DIRECT` block size (what the data files
//! allocate). `used + reserved + spare <= limit` always holds: a chunk is *reserved* when its
//! write is admitted (evicting least recently used chunks to make room) and *present* only once its
//! write completed ([`Index::commit`]). A *spare* slot is a chunk's blocks allocated ahead, with a
//! run of its neighbours, before its data came ([`Index::add_spare`]; see `prealloc`): counted, so
//! the allocation never takes the cache past its size, until the chunk is reserved into it or the
//! writer gives the blocks back ([`Index::take_spare`]). Chunks of *pinned* files (backing a
//! passthrough open) are never evicted: the kernel reads them without asking us.

use std::collections::{HashMap, HashSet};

use lru::LruCache;

use super::layout::Root;
use crate::chunk::{self, Cv, MemTree};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileMeta {
    pub size: u64,
    pub chunk_log2: u8,
}

impl FileMeta {
    pub fn geom(&self) -> chunk::Geometry {
        chunk::Geometry { size: self.size, chunk_log2: self.chunk_log2 }
    }

    pub fn n_chunks(&self) -> u64 {
        self.geom().n_chunks()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRec {
    pub len: u32,
    pub cv: Cv,
}

/// A chunk taken out of the index: its bytes on disk should be released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Evicted {
    pub root: Root,
    pub idx: u64,
    pub meta: FileMeta,
    /// The file has nothing present or reserved any more: delete its data file.
    pub file_empty: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Write it; release these first.
    Yes(Vec<Evicted>),
    /// Present or being written already.
    Already,
    /// No room even after evicting what may be evicted (release these anyway).
    No(Vec<Evicted>),
}

struct FileEntry {
    meta: FileMeta,
    chunks: HashMap<u64, ChunkRec>,
    reserving: HashSet<u64>,
    /// Chunks whose blocks are allocated but hold nothing yet (spare slots).
    spare: HashSet<u64>,
    pins: u32,
    /// Chunks verified (written from a verified chunk, or read back and verified) since start.
    verified: HashSet<u64>,
    /// All leaf values are present and hash to the root.
    proven: bool,
}

pub struct Index {
    files: HashMap<Root, FileEntry>,
    lru: LruCache<(Root, u64), ()>,
    used: u64,
    reserved: u64,
    /// Bytes of spare slots.
    spare: u64,
    limit: u64,
    align: u64,
}

impl Index {
    pub fn new(limit: u64, align: u64) -> Self {
        Index { files: HashMap::new(), lru: LruCache::unbounded(), used: 0, reserved: 0, spare: 0, limit, align: align.max(1) }
    }

    /// Room a chunk of `len` bytes takes: its data rounded to the alignment, and the piece values
    /// kept beside it (32 bytes per 16 KiB piece; a chunk of one piece has none).
    pub fn cost(&self, len: u32) -> u64 {
        let len = len as u64;
        let pieces = if len > crate::chunk::PIECE_SIZE as u64 { len.div_ceil(crate::chunk::PIECE_SIZE as u64) * 32 } else { 0 };
        len.div_ceil(self.align).max(1) * self.align + pieces
    }

    /// The disk's `O_DIRECT` alignment, which every chunk's cost is rounded up to.
    pub fn align(&self) -> u64 {
        self.align
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    pub fn spare(&self) -> u64 {
        self.spare
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn chunks(&self) -> usize {
        self.lru.len()
    }

    pub fn meta(&self, root: &Root) -> Option<FileMeta> {
        self.files.get(root).map(|f| f.meta)
    }

    /// The chunk's record, marking it recently used.
    pub fn lookup(&mut self, root: &Root, idx: u64) -> Option<ChunkRec> {
        let rec = *self.files.get(root)?.chunks.get(&idx)?;
        self.lru.get(&(*root, idx));
        Some(rec)
    }

    pub fn contains(&self, root: &Root, idx: u64) -> bool {
        self.files.get(root).is_some_and(|f| f.chunks.contains_key(&idx))
    }

    /// The chunks of `root` present in `range`, in order: one lookup of the file, then whichever
    /// is fewer, the range or the file's chunks.
    pub fn present_in(&self, root: &Root, range: std::ops::Range<u64>) -> Vec<u64> {
        let Some(f) = self.files.get(root) else { return Vec::new() };
        if (f.chunks.len() as u64) < range.end.saturating_sub(range.start) {
            let mut v: Vec<u64> = f.chunks.keys().copied().filter(|i| range.contains(i)).collect();
            v.sort_unstable();
            v
        } else {
            range.filter(|i| f.chunks.contains_key(i)).collect()
        }
    }

    /// Chunk `idx` is present or being written (its piece values are or will be in use).
    pub fn holds(&self, root: &Root, idx: u64) -> bool {
        self.files.get(root).is_some_and(|f| f.chunks.contains_key(&idx) || f.reserving.contains(&idx))
    }

    /// Reserve room to write chunk `idx` (`len` bytes) of the file `root`.
    pub fn reserve(&mut self, root: &Root, meta: FileMeta, idx: u64, len: u32) -> Admit {
        if let Some(f) = self.files.get(root) {
            if f.meta != meta {
                return Admit::No(Vec::new()); // same bytes cut differently: keep the first
            }
            if f.chunks.contains_key(&idx) || f.reserving.contains(&idx) {
                return Admit::Already;
            }
        }
        let cost = self.cost(len);
        if cost > self.limit {
            return Admit::No(Vec::new());
        }
        // Reserved before room is made, so that evicting this file's last chunks cannot drop it;
        // a spare slot's room is this chunk's (counted once, not twice).
        self.reserved += cost;
        let f = self.files.entry(*root).or_insert_with(|| FileEntry::new(meta));
        f.reserving.insert(idx);
        let was_spare = f.spare.remove(&idx);
        if was_spare {
            self.spare -= cost;
        }
        let mut evicted = self.make_room(0);
        if self.used + self.reserved + self.spare <= self.limit {
            return Admit::Yes(evicted);
        }
        // No room: undo.
        self.reserved -= cost;
        if let Some(f) = self.files.get_mut(root) {
            f.reserving.remove(&idx);
            if was_spare {
                f.spare.insert(idx);
                self.spare += cost;
            }
            if f.chunks.is_empty() && f.reserving.is_empty() && f.spare.is_empty() {
                self.files.remove(root);
                // The data file goes with its last chunk.
                if let Some(e) = evicted.iter_mut().rfind(|e| e.root == *root) {
                    e.file_empty = true;
                }
            }
        }
        Admit::No(evicted)
    }

    /// Evict least recently used chunks of unpinned files until `need` more bytes fit.
    fn make_room(&mut self, need: u64) -> Vec<Evicted> {
        let mut out = Vec::new();
        let mut skipped = Vec::new();
        while self.used + self.reserved + self.spare + need > self.limit {
            let Some(((root, idx), ())) = self.lru.pop_lru() else { break };
            if self.files.get(&root).is_some_and(|f| f.pins > 0) {
                skipped.push((root, idx));
                continue;
            }
            if let Some(e) = self.take(&root, idx) {
                out.push(e);
            }
        }
        for k in skipped {
            self.lru.put(k, ());
        }
        out
    }

    /// Remove a present chunk from the books (not from the LRU list).
    fn take(&mut self, root: &Root, idx: u64) -> Option<Evicted> {
        let f = self.files.get_mut(root)?;
        let rec = f.chunks.remove(&idx)?;
        f.verified.remove(&idx);
        f.proven = false;
        let meta = f.meta;
        let empty = f.chunks.is_empty() && f.reserving.is_empty();
        if empty {
            self.drop_file(root);
        }
        self.used -= self.cost(rec.len);
        Some(Evicted { root: *root, idx, meta, file_empty: empty })
    }

    /// Forget a file that holds nothing present or reserved; its data file is deleted, spare
    /// slots and all.
    fn drop_file(&mut self, root: &Root) {
        if let Some(f) = self.files.remove(root) {
            self.spare -= self.slots_cost(f.meta, f.spare.iter().copied());
        }
    }

    /// Room the chunk slots `idxs` of a file take.
    fn slots_cost(&self, meta: FileMeta, idxs: impl Iterator<Item = u64>) -> u64 {
        let g = meta.geom();
        idxs.map(|i| self.cost(g.chunk_len(i) as u32)).sum()
    }

    /// The write of a reserved chunk completed: it is present (and verified: it was written from
    /// a verified chunk).
    pub fn commit(&mut self, root: &Root, idx: u64, rec: ChunkRec) {
        let cost = self.cost(rec.len);
        let Some(f) = self.files.get_mut(root) else { return };
        if !f.reserving.remove(&idx) {
            return;
        }
        self.reserved -= cost;
        f.chunks.insert(idx, rec);
        f.verified.insert(idx);
        self.used += cost;
        self.lru.put((*root, idx), ());
    }

    /// The write of a reserved chunk failed. True if the file now holds nothing (delete it).
    pub fn abort(&mut self, root: &Root, idx: u64, len: u32) -> bool {
        let cost = self.cost(len);
        let Some(f) = self.files.get_mut(root) else { return false };
        if !f.reserving.remove(&idx) {
            return false;
        }
        self.reserved -= cost;
        let empty = f.chunks.is_empty() && f.reserving.is_empty();
        if empty {
            self.drop_file(root);
        }
        empty
    }

    /// Drop a present chunk (found damaged).
    pub fn remove(&mut self, root: &Root, idx: u64) -> Option<Evicted> {
        self.lru.pop(&(*root, idx));
        self.take(root, idx)
    }

    /// Drop a whole file (its data file vanished or is foreign).
    pub fn remove_file(&mut self, root: &Root) -> Vec<Evicted> {
        let idxs: Vec<u64> = self.files.get(root).map(|f| f.chunks.keys().copied().collect()).unwrap_or_default();
        idxs.into_iter().filter_map(|i| self.remove(root, i)).collect()
    }

    /// Replay: a chunk recorded present (no limit check; call [`Index::set_limit`] after).
    pub fn insert_replayed(&mut self, root: &Root, meta: FileMeta, idx: u64, rec: ChunkRec) {
        let cost = self.cost(rec.len);
        let f = self.files.entry(*root).or_insert_with(|| FileEntry::new(meta));
        if f.meta != meta {
            return;
        }
        if let Some(old) = f.chunks.insert(idx, rec) {
            self.used -= self.cost(old.len);
        }
        self.used += cost;
        self.lru.put((*root, idx), ());
    }

    /// New limit (e.g. after ENOSPC, or a smaller cache_size); returns what had to go.
    pub fn set_limit(&mut self, limit: u64) -> Vec<Evicted> {
        self.limit = limit;
        self.make_room(0)
    }

    pub fn pin(&mut self, root: &Root) {
        if let Some(f) = self.files.get_mut(root) {
            f.pins += 1;
        }
    }

    /// Whether a passthrough open holds `root`'s data file (the kernel reads it unasked).
    pub fn pinned(&self, root: &Root) -> bool {
        self.files.get(root).is_some_and(|f| f.pins > 0)
    }

    pub fn unpin(&mut self, root: &Root) {
        if let Some(f) = self.files.get_mut(root) {
            f.pins = f.pins.saturating_sub(1);
        }
    }

    /// Count the chunks `idxs` of `root` that hold nothing and are not being written as spare
    /// slots (their blocks are about to be allocated with the chunk being written), if the spare
    /// bytes stay within `cap` and the cache within its limit; nothing is evicted for them. Returns
    /// the slots marked (None: no room, or the file is not being written).
    pub fn add_spare(&mut self, root: &Root, idxs: std::ops::Range<u64>, cap: u64) -> Option<Vec<u64>> {
        let f = self.files.get(root)?;
        let n = f.meta.n_chunks();
        let new: Vec<u64> =
            idxs.filter(|i| *i < n && !f.chunks.contains_key(i) && !f.reserving.contains(i) && !f.spare.contains(i)).collect();
        let bytes = self.slots_cost(f.meta, new.iter().copied());
        if self.spare + bytes > cap || self.used + self.reserved + self.spare + bytes > self.limit {
            return None;
        }
        self.spare += bytes;
        self.files.get_mut(root)?.spare.extend(new.iter().copied());
        Some(new)
    }

    /// Take `root`'s spare slots out of the books (those in `only`, or all): the caller releases
    /// their blocks. Returns the file's geometry, the slots taken, and whether the file now holds
    /// nothing (then it is forgotten: delete its data file).
    pub fn take_spare(&mut self, root: &Root, only: Option<&[u64]>) -> Option<(FileMeta, Vec<u64>, bool)> {
        let f = self.files.get_mut(root)?;
        let taken: Vec<u64> = match only {
            Some(o) => o.iter().copied().filter(|i| f.spare.remove(i)).collect(),
            None => f.spare.drain().collect(),
        };
        let meta = f.meta;
        let empty = f.chunks.is_empty() && f.reserving.is_empty() && f.spare.is_empty();
        self.spare -= self.slots_cost(meta, taken.iter().copied());
        if empty {
            self.files.remove(root);
        }
        Some((meta, taken, empty))
    }

    #[cfg(test)]
    fn spare_slots(&self) -> usize {
        self.files.values().map(|f| f.spare.len()).sum()
    }

    /// Files that have spare slots.
    pub fn spare_files(&self) -> Vec<Root> {
        self.files.iter().filter(|(_, f)| !f.spare.is_empty()).map(|(r, _)| *r).collect()
    }

    /// How many of the file's chunks are present.
    pub fn present(&self, root: &Root) -> u64 {
        self.files.get(root).map_or(0, |f| f.chunks.len() as u64)
    }

    pub fn mark_verified(&mut self, root: &Root, idx: u64) {
        if let Some(f) = self.files.get_mut(root) {
            if f.chunks.contains_key(&idx) {
                f.verified.insert(idx);
            }
        }
    }

    /// Every chunk is present and was verified since start.
    pub fn all_verified(&self, root: &Root) -> bool {
        self.files.get(root).is_some_and(|f| f.verified.len() as u64 == f.meta.n_chunks())
    }

    /// The stored leaf values of a complete file may stand in for the network's: they were proven
    /// against the root (checked and remembered on first use).
    pub fn proven(&mut self, root: &Root) -> bool {
        let Some(f) = self.files.get_mut(root) else { return false };
        if f.proven {
            return true;
        }
        let n = f.meta.n_chunks();
        if n < 2 || f.chunks.len() as u64 != n {
            return false;
        }
        let leaves: Vec<Cv> = (0..n).map(|i| f.chunks[&i].cv).collect();
        let mut t = MemTree::from_leaves(&leaves);
        f.proven = chunk::root(n, &mut t).is_ok_and(|r| r == blake3::Hash::from_bytes(*root));
        f.proven
    }

    /// Every present chunk, least recently used first (for rewriting the journal).
    pub fn oldest_first(&self) -> Vec<(Root, FileMeta, u64, ChunkRec)> {
        self.lru
            .iter()
            .rev()
            .filter_map(|((r, i), ())| {
                let f = self.files.get(r)?;
                Some((*r, f.meta, *i, *f.chunks.get(i)?))
            })
            .collect()
    }

    /// Every file and its present chunks (for reconciling data files at start).
    pub fn files(&self) -> impl Iterator<Item = (&Root, FileMeta, Vec<(u64, ChunkRec)>)> {
        self.files.iter().map(|(r, f)| (r, f.meta, f.chunks.iter().map(|(i, c)| (*i, *c)).collect()))
    }
}

impl FileEntry {
    fn new(meta: FileMeta) -> Self {
        FileEntry {
            meta,
            chunks: HashMap::new(),
            reserving: HashSet::new(),
            spare: HashSet::new(),
            pins: 0,
            verified: HashSet::new(),
            proven: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: FileMeta = FileMeta { size: 10 * 4096, chunk_log2: 12 };
    fn rec(len: u32) -> ChunkRec {
        ChunkRec { len, cv: [0; 32] }
    }
    fn put(ix: &mut Index, root: u8, idx: u64) -> Vec<Evicted> {
        match ix.reserve(&[root; 32], M, idx, 4096) {
            Admit::Yes(ev) => {
                ix.commit(&[root; 32], idx, rec(4096));
                ev
            }
            other => panic!("not admitted: {other:?}"),
        }
    }

    #[test]
    fn spare_slots_are_counted_once_and_given_back() {
        let mut ix = Index::new(10 * 4096, 4096);
        assert!(matches!(ix.reserve(&[1; 32], M, 0, 4096), Admit::Yes(_)));
        // Chunk 0 is being written: the others of 0..4 become spare.
        assert_eq!(ix.add_spare(&[1; 32], 0..4, 1 << 20), Some(vec![1, 2, 3]));
        assert_eq!(ix.spare(), 3 * 4096);
        assert_eq!(ix.add_spare(&[1; 32], 4..8, 4 * 4096), None, "over the cap");
        assert_eq!(ix.add_spare(&[2; 32], 0..4, 1 << 20), None, "a file not being written");
        // A chunk reserved into a spare slot takes its room: counted once.
        assert!(matches!(ix.reserve(&[1; 32], M, 1, 4096), Admit::Yes(_)));
        assert_eq!((ix.spare(), ix.reserved()), (2 * 4096, 2 * 4096));
        ix.commit(&[1; 32], 0, rec(4096));
        ix.commit(&[1; 32], 1, rec(4096));
        assert_eq!((ix.used(), ix.reserved(), ix.spare()), (2 * 4096, 0, 2 * 4096));
        assert_eq!(ix.spare_files(), vec![[1; 32]]);
        let (_, mut slots, empty) = ix.take_spare(&[1; 32], None).unwrap();
        slots.sort_unstable();
        assert_eq!((slots, empty, ix.spare()), (vec![2, 3], false, 0));
        assert!(ix.spare_files().is_empty());
    }

    #[test]
    fn spare_room_counts_toward_the_limit_and_goes_with_the_file() {
        let mut ix = Index::new(4 * 4096, 4096);
        put(&mut ix, 1, 0);
        assert!(matches!(ix.reserve(&[1; 32], M, 1, 4096), Admit::Yes(_)));
        assert_eq!(ix.add_spare(&[1; 32], 0..4, 1 << 20), Some(vec![2, 3]));
        ix.commit(&[1; 32], 1, rec(4096));
        // Full: another file's chunk evicts a present chunk, never the spare room.
        let ev = put(&mut ix, 2, 0);
        assert_eq!(ev.len(), 1);
        assert_eq!(ix.spare(), 2 * 4096);
        assert!(ix.used() + ix.reserved() + ix.spare() <= ix.limit());
        // File 1's last chunk goes: the file is dropped whole, spare slots and all.
        let ev = put(&mut ix, 2, 1);
        assert_eq!(ev.len(), 1);
        assert!(ev[0].file_empty && ev[0].root == [1; 32]);
        assert_eq!(ix.spare(), 0);
        assert!(ix.take_spare(&[1; 32], None).is_none());
    }

    #[test]
    fn a_refused_reservation_undoes_itself() {
        // Everything but file 1's one chunk is pinned: file 3's chunk evicts it and still does
        // not fit; file 1's data file goes (file_empty), file 3 is not left behind.
        let mut ix = Index::new(3 * 4096, 4096);
        put(&mut ix, 2, 0);
        put(&mut ix, 2, 1);
        ix.pin(&[2; 32]);
        put(&mut ix, 1, 0);
        let big = FileMeta { size: 3 * 4096, chunk_log2: 13 }; // 8 KiB chunks
        match ix.reserve(&[3; 32], big, 0, 8192) {
            Admit::No(ev) => {
                assert_eq!(ev.len(), 1);
                assert!(ev[0].root == [1; 32] && ev[0].file_empty);
            }
            other => panic!("admitted: {other:?}"),
        }
        assert_eq!((ix.used(), ix.reserved(), ix.spare()), (2 * 4096, 0, 0));
        assert!(ix.meta(&[3; 32]).is_none() && ix.meta(&[1; 32]).is_none());
        // A spare slot stays spare when its chunk cannot be reserved.
        ix.unpin(&[2; 32]);
        assert!(matches!(ix.reserve(&[2; 32], M, 2, 4096), Admit::Yes(_)));
        assert_eq!(ix.add_spare(&[2; 32], 3..4, 1 << 20), None, "full");
    }

    #[test]
    fn lru_order_and_bound() {
        let mut ix = Index::new(3 * 4096, 4096);
        for i in 0..3 {
            assert!(put(&mut ix, 1, i).is_empty());
        }
        assert!(ix.lookup(&[1; 32], 0).is_some()); // 0 is now the most recent
        let ev = put(&mut ix, 1, 3);
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].idx, 1);
        assert!(!ev[0].file_empty);
        assert!(ix.used() <= ix.limit());
        assert!(ix.contains(&[1; 32], 0) && !ix.contains(&[1; 32], 1));
    }

    /// `present_in` answers as `contains` per chunk would, in order, whichever way it looks
    /// (over the range, or over the file's chunks when they are fewer).
    #[test]
    fn present_in_is_contains_over_a_range() {
        let mut ix = Index::new(10 * 4096, 4096);
        for i in [1, 3, 4, 7] {
            put(&mut ix, 1, i);
        }
        assert!(matches!(ix.reserve(&[1; 32], M, 5, 4096), Admit::Yes(_)), "reserved, not present");
        #[allow(clippy::reversed_empty_ranges)]
        for range in [0..10, 2..5, 4..5, 5..7, 8..100, 0..0, 6..2] {
            let want: Vec<u64> = range.clone().filter(|&i| ix.contains(&[1; 32], i)).collect();
            assert_eq!(ix.present_in(&[1; 32], range.clone()), want, "{range:?}");
        }
        assert_eq!(ix.present_in(&[1; 32], 0..3), vec![1], "range shorter than the file's chunks");
        assert_eq!(ix.present_in(&[1; 32], 0..1000), vec![1, 3, 4, 7], "file's chunks fewer than the range");
        assert!(ix.present_in(&[2; 32], 0..10).is_empty(), "a file not cached");
    }

    #[test]
    fn reservation_counts_and_is_not_present_until_commit() {
        let mut ix = Index::new(2 * 4096, 4096);
        assert_eq!(ix.reserve(&[1; 32], M, 0, 100), Admit::Yes(vec![]));
        assert_eq!(ix.reserve(&[1; 32], M, 0, 100), Admit::Already);
        assert!(!ix.contains(&[1; 32], 0));
        assert_eq!(ix.reserved(), 4096); // rounded up to the block
        assert_eq!(ix.reserve(&[2; 32], M, 0, 4096), Admit::Yes(vec![]));
        // Full of reservations: nothing can be evicted.
        assert_eq!(ix.reserve(&[3; 32], M, 0, 4096), Admit::No(vec![]));
        assert!(ix.abort(&[1; 32], 0, 100));
        assert_eq!(ix.reserved(), 4096);
        ix.commit(&[2; 32], 0, rec(4096));
        assert_eq!((ix.used(), ix.reserved()), (4096, 0));
        assert!(ix.contains(&[2; 32], 0));
    }

    #[test]
    fn last_chunk_evicted_empties_the_file_and_pins_protect() {
        let mut ix = Index::new(2 * 4096, 4096);
        put(&mut ix, 1, 0);
        put(&mut ix, 2, 0);
        ix.pin(&[1; 32]);
        let ev = put(&mut ix, 3, 0);
        assert_eq!(ev, vec![Evicted { root: [2; 32], idx: 0, meta: M, file_empty: true }]);
        let ev = match ix.reserve(&[4; 32], M, 0, 4096) {
            Admit::Yes(ev) => ev,
            o => panic!("{o:?}"),
        };
        assert_eq!(ev[0].root, [3; 32]); // file 1 is pinned
        ix.unpin(&[1; 32]);
        assert_eq!(ix.set_limit(0).len(), 1);
        assert_eq!(ix.used(), 0);
    }

    #[test]
    fn too_big_and_damaged() {
        let mut ix = Index::new(4096, 4096);
        assert_eq!(ix.reserve(&[1; 32], M, 0, 8192), Admit::No(vec![]));
        put(&mut ix, 1, 0);
        assert_eq!(ix.remove(&[1; 32], 0).map(|e| e.file_empty), Some(true));
        assert_eq!(ix.used(), 0);
        assert_eq!(ix.chunks(), 0);
    }

    #[test]
    fn proven_needs_every_leaf_matching_the_root() {
        let geom = chunk::Geometry::new(3 * 4096 + 5, 12).unwrap();
        let data: Vec<u8> = (0..geom.size).map(|i| (i * 31 % 253) as u8).collect();
        let root = *blake3::hash(&data).as_bytes();
        let meta = FileMeta { size: geom.size, chunk_log2: 12 };
        let mut ix = Index::new(1 << 20, 4096);
        for i in 0..geom.n_chunks() {
            let s = &data[geom.chunk_offset(i) as usize..][..geom.chunk_len(i)];
            let cv = chunk::chunk_cv(&geom, i, s);
            let cv = if i == 2 { [0; 32] } else { cv };
            assert!(!ix.proven(&root));
            assert_eq!(ix.reserve(&root, meta, i, s.len() as u32), Admit::Yes(vec![]));
            ix.commit(&root, i, ChunkRec { len: s.len() as u32, cv });
        }
        assert!(!ix.proven(&root), "a wrong leaf value must not prove");
        let s = &data[2 * 4096..3 * 4096];
        ix.remove(&root, 2);
        assert!(!ix.all_verified(&root));
        ix.reserve(&root, meta, 2, 4096);
        ix.commit(&root, 2, ChunkRec { len: 4096, cv: chunk::chunk_cv(&geom, 2, s) });
        assert!(ix.proven(&root));
        assert!(ix.all_verified(&root));
        assert_eq!(ix.present(&root), 4);
    }

    /// Reference model: random operations keep the books consistent and within the limit.
    #[test]
    fn random_operations_stay_bounded() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ix = Index::new(20 * 4096, 4096);
        let mut inflight: Vec<(u8, u64, u32)> = Vec::new();
        for _ in 0..20_000 {
            let (r, i) = (rng.gen_range(0..8u8), rng.gen_range(0..10u64));
            match rng.gen_range(0..7) {
                0 | 1 => {
                    let len = rng.gen_range(1..=4096);
                    if let Admit::Yes(_) = ix.reserve(&[r; 32], M, i, len) {
                        inflight.push((r, i, len));
                    }
                }
                2 if !inflight.is_empty() => {
                    let (r, i, len) = inflight.swap_remove(rng.gen_range(0..inflight.len()));
                    if rng.gen_bool(0.9) {
                        ix.commit(&[r; 32], i, rec(len));
                    } else {
                        ix.abort(&[r; 32], i, len);
                    }
                }
                3 => {
                    ix.remove(&[r; 32], i);
                }
                4 => {
                    ix.add_spare(&[r; 32], i..i + 4, 8 * 4096);
                }
                5 => {
                    let only = [i, i + 1];
                    ix.take_spare(&[r; 32], rng.gen_bool(0.5).then_some(&only[..]));
                }
                _ => {
                    ix.lookup(&[r; 32], i);
                }
            }
            assert!(ix.used() + ix.reserved() + ix.spare() <= ix.limit());
            assert!(ix.spare() <= 8 * 4096);
            assert_eq!(ix.spare_slots() as u64 * 4096, ix.spare());
            let sum: u64 = ix.files().map(|(_, _, c)| c.iter().map(|(_, r)| ix.cost(r.len)).sum::<u64>()).sum();
            assert_eq!(sum, ix.used());
            assert_eq!(ix.chunks() as u64 * 4096, ix.used());
        }
    }
}
