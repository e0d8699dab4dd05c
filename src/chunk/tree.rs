//! The BLAKE3 tree over chunk CVs: building the table of aligned subtrees, the root, range proofs and
//! their verification.
//!
//! Nodes of the left-balanced tree are leaf ranges `[start, start + len)`. A node with `len` a power of
//! two is always aligned (its start is a sum of larger powers of two), so it is the stored subtree
//! `(log2 len, start >> log2 len)`. Only the nodes on the right spine have other lengths; their CV is the
//! merge of a stored left child and the (spine) right child, i.e. one stored read per set bit of `len`.

use super::{ChunkError, Cv};
use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, Mode};
use std::io;

/// Number of aligned complete subtrees at `level` (level 0 = leaves): `n_leaves >> level`.
pub fn level_len(n_leaves: u64, level: u8) -> u64 {
    n_leaves.checked_shr(u32::from(level)).unwrap_or(0)
}

/// Number of levels stored: the levels `0..n_levels` are those with `level_len > 0`.
pub fn n_levels(n_leaves: u64) -> u8 {
    (64 - n_leaves.leading_zeros()) as u8
}

/// Leaf count of the left child of a node over `len >= 2` leaves: the largest power of two `< len`.
fn left_len(len: u64) -> u64 {
    debug_assert!(len >= 2);
    1u64 << (63 - (len - 1).leading_zeros())
}

fn merge(left: &Cv, right: &Cv, is_root: bool) -> Cv {
    if is_root {
        *merge_subtrees_root(left, right, Mode::Hash).as_bytes()
    } else {
        merge_subtrees_non_root(left, right, Mode::Hash)
    }
}

fn bad_input(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

/// Incremental table builder (server side), O(log n) memory. Push the leaf CVs in order; each push
/// returns every aligned complete subtree it completes as `(level, index, cv)`, the leaf itself first,
/// then upwards. Level `j` index `i` covers leaves `[i << j, (i + 1) << j)`; its CV is the non-root merge
/// of its two halves. Together the outputs are exactly [`MemTree::from_leaves`]'s table.
pub struct TreeBuilder {
    n_leaves: u64,
    pushed: u64,
    /// Left siblings still waiting for their right half; `pending[k]` is at a level lower than `pending[k-1]`.
    pub(super) pending: Vec<Cv>,
}

impl TreeBuilder {
    pub fn new(n_leaves: u64) -> Self {
        TreeBuilder {
            n_leaves,
            pushed: 0,
            pending: Vec::with_capacity(n_levels(n_leaves) as usize),
        }
    }

    /// Panics if more than `n_leaves` leaves are pushed (a caller bug: the geometry fixes the count).
    pub fn push(&mut self, cv: Cv) -> Vec<(u8, u64, Cv)> {
        assert!(
            self.pushed < self.n_leaves,
            "TreeBuilder: more leaves than announced"
        );
        let mut out = Vec::with_capacity(1 + (self.pushed + 1).trailing_zeros() as usize);
        let (mut level, mut index, mut node) = (0u8, self.pushed, cv);
        self.pushed += 1;
        out.push((level, index, node));
        // A right child (odd index) completes its parent with the pending left sibling.
        while index & 1 == 1 {
            let left = self
                .pending
                .pop()
                .expect("a right child always has a pending left sibling");
            node = merge_subtrees_non_root(&left, &node, Mode::Hash);
            level += 1;
            index >>= 1;
            out.push((level, index, node));
        }
        self.pending.push(node);
        out
    }
}

/// Where aligned-subtree CVs come from (the server's index file, or memory).
pub trait NodeSource {
    fn node(&mut self, level: u8, index: u64) -> io::Result<Cv>;
}

/// In-memory table: `levels[j][i]` is aligned subtree `(j, i)`. For tests and small files.
pub struct MemTree {
    pub levels: Vec<Vec<Cv>>,
}

impl MemTree {
    pub fn from_leaves(leaves: &[Cv]) -> Self {
        let mut levels: Vec<Vec<Cv>> = Vec::with_capacity(n_levels(leaves.len() as u64) as usize);
        if !leaves.is_empty() {
            levels.push(leaves.to_vec());
        }
        while let Some(below) = levels.last().filter(|l| l.len() >= 2) {
            let next = below
                .chunks_exact(2)
                .map(|pair| merge_subtrees_non_root(&pair[0], &pair[1], Mode::Hash))
                .collect();
            levels.push(next);
        }
        MemTree { levels }
    }
}

impl NodeSource for MemTree {
    fn node(&mut self, level: u8, index: u64) -> io::Result<Cv> {
        self.levels
            .get(level as usize)
            .and_then(|l| l.get(usize::try_from(index).ok()?))
            .copied()
            .ok_or_else(|| bad_input("tree node out of range"))
    }
}

/// CV of the node over leaves `[start, start + len)` of a left-balanced tree (`len >= 1`), never root.
fn subtree_cv(start: u64, len: u64, src: &mut impl NodeSource) -> io::Result<Cv> {
    if len.is_power_of_two() {
        let level = len.trailing_zeros() as u8;
        return src.node(level, start >> level);
    }
    let l = left_len(len);
    let left = src.node(l.trailing_zeros() as u8, start >> l.trailing_zeros())?;
    let right = subtree_cv(start + l, len - l, src)?;
    Ok(merge(&left, &right, false))
}

/// BLAKE3 root (= `b3sum`) from the table. Requires `n_leaves >= 2` (a one-chunk file's root is
/// `blake3::hash` of its bytes). O(log n) node reads.
pub fn root(n_leaves: u64, src: &mut impl NodeSource) -> io::Result<blake3::Hash> {
    if n_leaves < 2 {
        return Err(bad_input("root from a table needs at least two leaves"));
    }
    let l = left_len(n_leaves);
    let left = subtree_cv(0, l, src)?;
    let right = subtree_cv(l, n_leaves - l, src)?;
    Ok(merge_subtrees_root(&left, &right, Mode::Hash))
}

/// Where a child node stands relative to the proven range `[first, end)`.
enum Overlap {
    Disjoint,
    Inside,
    Partial,
}

fn overlap(start: u64, len: u64, first: u64, end: u64) -> Overlap {
    if start + len <= first || start >= end {
        Overlap::Disjoint
    } else if first <= start && start + len <= end {
        Overlap::Inside
    } else {
        Overlap::Partial
    }
}

/// Proof that leaves `[first, first + count)` belong to the root: the CVs of the maximal subtrees that
/// are disjoint from the range but whose parent intersects it, depth first, left before right. At most
/// two nodes per level partially overlap the range, and at most one emitted node lies on the right spine,
/// so this is O(log n) node reads for any range. `InvalidInput` for an empty range or one past the end.
/// A range covering all leaves (in particular the single leaf of a one-chunk file) has an empty proof.
pub fn prove(
    n_leaves: u64,
    first: u64,
    count: u64,
    src: &mut impl NodeSource,
) -> io::Result<Vec<Cv>> {
    let end = first
        .checked_add(count)
        .filter(|&e| count >= 1 && e <= n_leaves);
    let end = end.ok_or_else(|| bad_input("proof range outside the file"))?;
    let mut out = Vec::with_capacity(2 * n_levels(n_leaves) as usize);
    if let Overlap::Partial = overlap(0, n_leaves, first, end) {
        prove_node(0, n_leaves, first, end, src, &mut out)?;
    }
    Ok(out)
}

/// Emit the proof for a node that partially overlaps `[first, end)` (so `len >= 2`).
fn prove_node(
    start: u64,
    len: u64,
    first: u64,
    end: u64,
    src: &mut impl NodeSource,
    out: &mut Vec<Cv>,
) -> io::Result<()> {
    let l = left_len(len);
    for (s, n) in [(start, l), (start + l, len - l)] {
        match overlap(s, n, first, end) {
            Overlap::Disjoint => out.push(subtree_cv(s, n, src)?),
            Overlap::Inside => {}
            Overlap::Partial => prove_node(s, n, first, end, src, out)?,
        }
    }
    Ok(())
}

/// Client side: recompute the root from `leaves` (the CVs of leaves `first..first + leaves.len()`) and
/// `proof`, consuming the proof in the order [`prove`] emits it. Ok only if the proof has exactly the
/// right length (`BadProof` otherwise) and the result equals `root` (`Mismatch` otherwise).
/// `OutOfRange` if `n_leaves < 2`, `leaves` is empty or the range passes the end.
pub fn verify_leaves(
    n_leaves: u64,
    first: u64,
    leaves: &[Cv],
    proof: &[Cv],
    root: &blake3::Hash,
) -> Result<(), ChunkError> {
    let count = leaves.len() as u64;
    let end = first
        .checked_add(count)
        .filter(|&e| count >= 1 && e <= n_leaves);
    let end = end
        .filter(|_| n_leaves >= 2)
        .ok_or(ChunkError::OutOfRange)?;
    let mut v = Verifier {
        first,
        end,
        leaves,
        proof,
        used: 0,
    };
    let computed = v.node(0, n_leaves, true)?;
    if v.used != proof.len() {
        return Err(ChunkError::BadProof);
    }
    // blake3::Hash compares in constant time.
    if blake3::Hash::from(computed) != *root {
        return Err(ChunkError::Mismatch);
    }
    Ok(())
}

struct Verifier<'a> {
    first: u64,
    end: u64,
    leaves: &'a [Cv],
    proof: &'a [Cv],
    used: usize,
}

impl Verifier<'_> {
    /// CV of a node that intersects the range (root bytes if `is_root`).
    fn node(&mut self, start: u64, len: u64, is_root: bool) -> Result<Cv, ChunkError> {
        if let Overlap::Inside = overlap(start, len, self.first, self.end) {
            let lo = (start - self.first) as usize;
            return Ok(from_leaves(&self.leaves[lo..lo + len as usize], is_root));
        }
        let l = left_len(len);
        let left = self.child(start, l)?;
        let right = self.child(start + l, len - l)?;
        Ok(merge(&left, &right, is_root))
    }

    fn child(&mut self, start: u64, len: u64) -> Result<Cv, ChunkError> {
        match overlap(start, len, self.first, self.end) {
            Overlap::Disjoint => {
                let cv = self.proof.get(self.used).ok_or(ChunkError::BadProof)?;
                self.used += 1;
                Ok(*cv)
            }
            _ => self.node(start, len, false),
        }
    }
}

/// CV of the left-balanced subtree over `leaves` (root bytes if `is_root`; `is_root` needs >= 2 leaves).
pub(crate) fn from_leaves(leaves: &[Cv], is_root: bool) -> Cv {
    if leaves.len() == 1 {
        return leaves[0];
    }
    let l = left_len(leaves.len() as u64) as usize;
    let left = from_leaves(&leaves[..l], false);
    let right = from_leaves(&leaves[l..], false);
    merge(&left, &right, is_root)
}
