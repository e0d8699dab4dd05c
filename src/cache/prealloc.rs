//! Which blocks of a data file to allocate before a chunk's `O_DIRECT` write. Pure: the writer
//! does the I/O, the index counts the space ([`super::index::Index::add_spare`]).
//!
//! Each chunk's blocks are allocated (`fallocate`, keeping the size) before it is written, so the
//! write is an overwrite the kernel starts at once. One chunk at a time, in the order chunks
//! arrive (out of order within the prefetch window), a 1 GiB file ended up in ~3,200 extents
//! scattered over the disk, and reading it back — FUSE passthrough reads the data file itself —
//! took 0.62–0.72 s against 0.49–0.54 s for a contiguous copy of it. So while a file is filled in
//! order, its blocks are allocated a *group* (8 MiB, clipped to the file) at a time: the group's
//! other chunks become spare slots, counted in the cache's size until their data comes or the
//! writer gives their blocks back (the file drops out of the recent streams, the disk is full,
//! the cache stops; after a crash, the start-up reconcile releases unrecorded blocks).
//!
//! A chunk is part of a stream when the writer wrote a chunk of the same file at most [`NEAR`]
//! chunks away, among the last [`STREAMS`] files written; a lone chunk (a random read, a file's
//! header) gets only its own blocks.

use std::collections::{HashSet, VecDeque};

use super::layout::Root;
use crate::chunk::Geometry;

/// Bytes allocated at once for a file filled in order.
pub const GROUP: u64 = 8 << 20;
/// Files filled in order that are remembered.
pub const STREAMS: usize = 8;
/// How far (in chunks) from the last chunk written a chunk of the same stream may land: the
/// prefetch window (32 chunks) and some.
pub const NEAR: u64 = 64;

#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    /// The chunk's group is allocated already.
    Done,
    /// Allocate the chunk's own blocks.
    Chunk,
    /// Allocate the whole group: chunks `first..end`, bytes `offset..offset + len`.
    Group { group: u64, first: u64, end: u64, offset: u64, len: u64 },
}

#[derive(Default)]
pub struct Groups {
    /// Recent files and the last chunk written of each, most recent last.
    streams: VecDeque<(Root, u64)>,
    /// Groups allocated whole: (file, group number).
    whole: HashSet<(Root, u64)>,
}

/// Chunks per group for this geometry (None: chunks too large to be worth grouping).
fn per_group(g: &Geometry) -> Option<u64> {
    let cs = g.chunk_size();
    (cs * 4 <= GROUP).then(|| GROUP / cs)
}

impl Groups {
    /// How to allocate chunk `idx` of `root` before its write; the file that fell out of the
    /// recent streams, if one did (give its spare slots back).
    pub fn plan(&mut self, root: &Root, g: &Geometry, idx: u64, align: u64) -> (Plan, Option<Root>) {
        let near = match self.streams.iter().position(|(r, _)| r == root) {
            Some(p) => self.streams.remove(p).is_some_and(|(_, last)| idx.abs_diff(last) <= NEAR),
            None => false,
        };
        self.streams.push_back((*root, idx));
        let dropped = if self.streams.len() > STREAMS { self.streams.pop_front().map(|(r, _)| r) } else { None };
        if let Some(d) = dropped {
            self.forget(&d);
        }
        let Some(per) = per_group(g) else { return (Plan::Chunk, dropped) };
        let group = idx / per;
        if self.whole.contains(&(*root, group)) {
            return (Plan::Done, dropped);
        }
        if !near {
            return (Plan::Chunk, dropped);
        }
        let first = group * per;
        let end = (first + per).min(g.n_chunks());
        let offset = g.chunk_offset(first);
        let last_end = g.chunk_offset(end - 1) + g.chunk_len(end - 1) as u64;
        let len = last_end.div_ceil(align) * align - offset;
        (Plan::Group { group, first, end, offset, len }, dropped)
    }

    /// The group's blocks are allocated.
    pub fn allocated(&mut self, root: &Root, group: u64) {
        self.whole.insert((*root, group));
    }

    /// Chunk `idx`'s blocks were released (evicted, failed): its group is no longer whole.
    pub fn punched(&mut self, root: &Root, g: &Geometry, idx: u64) {
        if let Some(per) = per_group(g) {
            self.whole.remove(&(*root, idx / per));
        }
    }

    /// Forget the file's groups (its spare slots were given back, or it was deleted).
    pub fn forget(&mut self, root: &Root) {
        self.whole.retain(|(r, _)| r != root);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Root = [1; 32];
    const CS: u64 = 256 << 10;

    fn geom(chunks: u64) -> Geometry {
        Geometry { size: chunks * CS - 100, chunk_log2: 18 }
    }

    #[test]
    fn a_lone_chunk_gets_its_own_blocks_and_a_stream_gets_groups() {
        let g = geom(100);
        let mut gs = Groups::default();
        assert_eq!(gs.plan(&A, &g, 0, 4096), (Plan::Chunk, None)); // first sight: lone
        let (p, _) = gs.plan(&A, &g, 2, 4096); // near the last one: a stream
        assert_eq!(p, Plan::Group { group: 0, first: 0, end: 32, offset: 0, len: GROUP });
        gs.allocated(&A, 0);
        assert_eq!(gs.plan(&A, &g, 1, 4096).0, Plan::Done);
        assert_eq!(gs.plan(&A, &g, 31, 4096).0, Plan::Done);
        // The last group is clipped to the file, rounded up to the block.
        let (p, _) = gs.plan(&A, &g, 97, 4096);
        let (off, end) = (96 * CS, (100 * CS - 100).div_ceil(4096) * 4096);
        assert_eq!(p, Plan::Chunk, "97 is far from 31");
        let (p2, _) = gs.plan(&A, &g, 98, 4096);
        assert_eq!(p2, Plan::Group { group: 3, first: 96, end: 100, offset: off, len: end - off });
        // A released chunk makes its group not whole.
        gs.punched(&A, &g, 5);
        assert_eq!(gs.plan(&A, &g, 6, 4096).0, Plan::Chunk, "far from 98");
    }

    #[test]
    fn large_chunks_are_not_grouped() {
        let g = Geometry { size: 64 << 20, chunk_log2: 22 }; // 4 MiB chunks: two per group
        let mut gs = Groups::default();
        for i in 0..8 {
            assert_eq!(gs.plan(&A, &g, i, 4096).0, Plan::Chunk);
        }
    }

    #[test]
    fn only_the_recent_files_are_streams() {
        let g = geom(100);
        let mut gs = Groups::default();
        let roots: Vec<Root> = (0..=STREAMS as u8).map(|i| [i + 10; 32]).collect();
        gs.plan(&roots[0], &g, 0, 4096);
        let (p, _) = gs.plan(&roots[0], &g, 1, 4096);
        assert!(matches!(p, Plan::Group { .. }));
        gs.allocated(&roots[0], 0);
        let mut dropped = Vec::new();
        for r in &roots[1..] {
            dropped.extend(gs.plan(r, &g, 0, 4096).1);
        }
        assert_eq!(dropped, vec![roots[0]], "the oldest file falls out");
        // Its groups are forgotten, and it starts over as a lone chunk.
        assert_eq!(gs.plan(&roots[0], &g, 2, 4096).0, Plan::Chunk);
    }
}
