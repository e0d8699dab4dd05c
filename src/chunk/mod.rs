//! Chunking and BLAKE3 verification. Pure: no I/O.
//!
//! A file is cut into chunks of `2^chunk_log2` bytes (at least one BLAKE3 chunk of 1 KiB). Because the
//! chunk size is a power of two, every full chunk is a complete subtree of the file's BLAKE3 tree, the
//! last (possibly short) chunk is the rest of the tree's right spine, and the tree over chunks is itself
//! left-balanced: a node over `len >= 2` leaves has a left child over the largest power of two strictly
//! less than `len`. The root computed from the chunk chaining values therefore equals `b3sum FILE`.
//!
//! Vocabulary used throughout:
//! - *leaf*: one chunk; its CV ([`chunk_cv`]) is the non-root chaining value of its bytes at its offset.
//! - *aligned subtree* `(level, index)`: the complete subtree over leaves `[index << level, (index + 1) << level)`.
//!   These are the nodes a server stores ([`NodeSource`]); every other node of the tree lies on the right
//!   spine and is computed by merging stored ones.
//! - [`VerifiedChunk`]: bytes that were hashed and matched; the only thing the cache and readers accept.
//! - *piece*: an aligned 16 KiB part of a chunk ([`PIECE_LOG2`]). For the same reason as chunks in a
//!   file, the pieces of a chunk are complete subtrees and the chunk's CV is the left-balanced merge of
//!   theirs. A chunk is verified through its pieces, and keeps their CVs ([`PieceCvs`]), so that later a
//!   few pieces read back from disk can be verified alone ([`VerifiedSpan`]): a random 4 KiB read then
//!   costs a 16 KiB read and hash instead of a whole chunk.
//! - *block*: an aligned 4 KiB part of a piece ([`BLOCK_LOG2`]), a complete subtree again. A span is
//!   verified through its pieces' blocks and keeps their CVs ([`BlockCvs`]), so that a later read of
//!   a few blocks of one of those pieces reads and hashes only those.

pub mod pool;
mod tree;

pub use tree::{level_len, n_levels, prove, root, verify_leaves, MemTree, NodeSource, TreeBuilder};

use blake3::hazmat::HasherExt;
use std::fmt;
use std::sync::Arc;

pub use pool::Buf;

/// A BLAKE3 chaining value (of a chunk or a subtree).
pub type Cv = [u8; 32];

/// 1 KiB: one BLAKE3 chunk.
pub const MIN_CHUNK_LOG2: u8 = 10;
/// 16 MiB.
pub const MAX_CHUNK_LOG2: u8 = 24;
/// 256 KiB.
pub const DEFAULT_CHUNK_LOG2: u8 = 18;
/// 16 KiB pieces: at 256 KiB chunks, 512 bytes of piece CVs per chunk, and verifying a chunk through
/// its pieces costs 8 % more than in one go (measured: 44.1 µs against 40.7 µs per 256 KiB; 4 KiB
/// pieces cost 2.4x).
pub const PIECE_LOG2: u8 = 14;
pub const PIECE_SIZE: usize = 1 << PIECE_LOG2;
/// 4 KiB blocks: the complete subtrees of a piece at the size of a page and of a random read.
/// A piece read back from disk is verified through its blocks, and their CVs ([`BlockCvs`]) let a
/// later read of one block be verified alone. Not used to verify whole chunks: hashed as 4 KiB
/// blocks a chunk costs 1.8x as much as in one go (measured: 67 µs against 37 µs per 256 KiB).
pub const BLOCK_LOG2: u8 = 12;
pub const BLOCK_SIZE: usize = 1 << BLOCK_LOG2;
const BLOCKS_PER_PIECE: usize = PIECE_SIZE / BLOCK_SIZE;

/// How a file of `size` bytes is cut into chunks of `2^chunk_log2` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub size: u64,
    pub chunk_log2: u8,
}

impl Geometry {
    /// `BadGeometry` unless `MIN_CHUNK_LOG2 <= chunk_log2 <= MAX_CHUNK_LOG2`.
    pub fn new(size: u64, chunk_log2: u8) -> Result<Self, ChunkError> {
        if !(MIN_CHUNK_LOG2..=MAX_CHUNK_LOG2).contains(&chunk_log2) {
            return Err(ChunkError::BadGeometry);
        }
        Ok(Geometry { size, chunk_log2 })
    }

    pub fn chunk_size(&self) -> u64 {
        1u64 << self.chunk_log2
    }

    /// `max(1, ceil(size / chunk_size))`: an empty file has one empty chunk.
    pub fn n_chunks(&self) -> u64 {
        let full = self.size >> self.chunk_log2;
        let partial = u64::from(self.size & (self.chunk_size() - 1) != 0);
        (full + partial).max(1)
    }

    /// Byte offset of chunk `index` (saturates for absurd indexes instead of overflowing).
    pub fn chunk_offset(&self, index: u64) -> u64 {
        index.saturating_mul(self.chunk_size())
    }

    /// Length of chunk `index`: `chunk_size`, less for the last chunk, 0 for the empty file's chunk and for
    /// indexes past the end.
    pub fn chunk_len(&self, index: u64) -> usize {
        let rest = self.size.saturating_sub(self.chunk_offset(index));
        rest.min(self.chunk_size()) as usize
    }
}

/// Why a chunk or a proof was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// Chunk size out of range.
    BadGeometry,
    /// Bytes or CVs do not hash to the expected value (includes data of the wrong length).
    Mismatch,
    /// A proof with the wrong number of CVs, or no proven leaf CV where one is needed.
    BadProof,
    /// A chunk index or leaf range outside the file, or a tree too small for proofs.
    OutOfRange,
}

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ChunkError::BadGeometry => "chunk size out of range",
            ChunkError::Mismatch => "data does not match its BLAKE3 tree",
            ChunkError::BadProof => "malformed BLAKE3 proof",
            ChunkError::OutOfRange => "chunk index or range outside the file",
        })
    }
}

impl std::error::Error for ChunkError {}

/// Non-root chaining value of chunk `index` holding `data` (hazmat, input offset `index * chunk_size`).
/// Only meaningful when `geom.n_chunks() >= 2`, where every chunk is non-empty.
///
/// Never panics: data that cannot be a chunk at that position (empty, longer than a chunk, or an offset
/// past `u64`) yields the all-zero CV, which no real tree contains, so it fails any later comparison.
pub fn chunk_cv(geom: &Geometry, index: u64, data: &[u8]) -> Cv {
    let Some(offset) = index.checked_mul(geom.chunk_size()) else {
        return [0; 32];
    };
    if data.is_empty() || data.len() as u64 > geom.chunk_size() {
        return [0; 32];
    }
    cv_at(offset, data)
}

/// Non-root chaining value of the complete subtree holding `data` at input offset `offset`.
fn cv_at(offset: u64, data: &[u8]) -> Cv {
    blake3::Hasher::new().set_input_offset(offset).update(data).finalize_non_root()
}

/// Chunk bytes that were checked against the file's tree. [`VerifiedChunk::verify`] is the only way to
/// make one.
#[derive(Clone)]
pub struct VerifiedChunk {
    index: u64,
    data: Arc<Buf>,
    /// The CVs of its pieces (chunks larger than a piece, in files of two chunks or more).
    pieces: Option<PieceCvs>,
}

/// The piece CVs of a verified chunk: made only by [`VerifiedChunk::verify`] (hashed from the
/// bytes) and [`PieceCvs::from_stored`] (checked against the chunk's proven leaf value), so a
/// [`VerifiedSpan`] checked against them is as good as the chunk.
#[derive(Clone, Debug)]
pub struct PieceCvs {
    index: u64,
    cvs: Arc<[Cv]>,
}

impl PieceCvs {
    /// The chunk these are the pieces of.
    pub fn index(&self) -> u64 {
        self.index
    }

    /// How many pieces.
    pub fn len(&self) -> usize {
        self.cvs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cvs.is_empty()
    }

    /// The values, 32 bytes each, to be stored beside the chunk.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.cvs.iter().flatten().copied().collect()
    }

    /// Piece values read back from storage, accepted only if they are as many as chunk `index`
    /// has pieces and merge into `leaf`, the chunk's proven leaf value.
    pub fn from_stored(geom: &Geometry, index: u64, bytes: &[u8], leaf: &Cv) -> Option<PieceCvs> {
        let want = pieces_in(geom, index)?;
        if bytes.len() != want * 32 {
            return None;
        }
        let cvs: Vec<Cv> = bytes.chunks_exact(32).map(|c| c.try_into().unwrap()).collect();
        let merged = tree::from_leaves(&cvs, false);
        (blake3::Hash::from(merged) == blake3::Hash::from(*leaf)).then(|| PieceCvs { index, cvs: cvs.into() })
    }
}

/// How many pieces chunk `index` is cut into; None when it is not cut (see [`piece_cvs`]).
pub fn pieces_in(geom: &Geometry, index: u64) -> Option<usize> {
    let len = geom.chunk_len(index);
    (geom.chunk_log2 > PIECE_LOG2 && geom.n_chunks() >= 2 && len > 0).then(|| len.div_ceil(PIECE_SIZE))
}

/// The CVs of the pieces of chunk `index` holding `data` (exactly `chunk_len(index)` bytes);
/// None when the chunk is not cut into pieces ([`pieces_in`]).
fn piece_cvs(geom: &Geometry, index: u64, data: &[u8]) -> Option<Vec<Cv>> {
    pieces_in(geom, index)?;
    let base = index.checked_mul(geom.chunk_size())?;
    Some(data.chunks(PIECE_SIZE).enumerate().map(|(i, p)| cv_at(base + (i * PIECE_SIZE) as u64, p)).collect())
}

/// The CVs of the 4 KiB blocks of one piece: made only by [`VerifiedSpan::verify`], from bytes
/// whose block CVs merged into the piece's proven CV, so a block checked against them is as good
/// as the piece.
#[derive(Clone, Copy, Debug)]
pub struct BlockCvs {
    chunk: u64,
    piece: usize,
    /// How many blocks the piece has (fewer than four only in a short last piece).
    n: usize,
    cvs: [Cv; BLOCKS_PER_PIECE],
}

impl BlockCvs {
    /// The chunk the piece is in.
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    /// Which piece of the chunk.
    pub fn piece(&self) -> usize {
        self.piece
    }

    /// How many blocks the piece has.
    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

/// Bytes of one chunk's whole pieces, or of whole blocks of one piece, each hashed at its offset
/// and matched against the piece CVs of that chunk as it was verified (or the block CVs of that
/// piece). What a partial read of the disk cache serves.
pub struct VerifiedSpan {
    /// File offset of the first byte.
    offset: u64,
    data: Vec<u8>,
    /// The block CVs of the pieces verified (none when the span was verified as blocks).
    blocks: Vec<BlockCvs>,
}

/// The CV of `data` at `offset` hashed as its 4 KiB blocks (their CVs written to `out`, their
/// number returned beside it), merged.
fn cv_by_blocks(offset: u64, data: &[u8], out: &mut [Cv; BLOCKS_PER_PIECE]) -> (Cv, usize) {
    let mut n = 0;
    for (i, b) in data.chunks(BLOCK_SIZE).enumerate() {
        out[i] = cv_at(offset + (i * BLOCK_SIZE) as u64, b);
        n += 1;
    }
    (tree::from_leaves(&out[..n], false), n)
}

impl VerifiedSpan {
    /// Check `data` as pieces `first..` of chunk `pieces.index` (whole pieces; the last may be
    /// short only if it is the chunk's last). `Mismatch` for wrong bytes or length, `OutOfRange`
    /// for pieces the chunk does not have.
    pub fn verify(geom: &Geometry, pieces: &PieceCvs, first: usize, data: Vec<u8>) -> Result<Self, ChunkError> {
        let n = data.len().div_ceil(PIECE_SIZE);
        if data.is_empty() || first.checked_add(n).is_none_or(|end| end > pieces.cvs.len()) {
            return Err(ChunkError::OutOfRange);
        }
        let chunk_len = geom.chunk_len(pieces.index);
        let start = first * PIECE_SIZE;
        if data.len() != (chunk_len.saturating_sub(start)).min(n * PIECE_SIZE) {
            return Err(ChunkError::Mismatch);
        }
        let offset = geom.chunk_offset(pieces.index) + start as u64;
        let mut blocks = Vec::with_capacity(n);
        for (i, p) in data.chunks(PIECE_SIZE).enumerate() {
            let mut cvs = [[0; 32]; BLOCKS_PER_PIECE];
            let (cv, nb) = cv_by_blocks(offset + (i * PIECE_SIZE) as u64, p, &mut cvs);
            if blake3::Hash::from(cv) != blake3::Hash::from(pieces.cvs[first + i]) {
                return Err(ChunkError::Mismatch);
            }
            blocks.push(BlockCvs { chunk: pieces.index, piece: first + i, n: nb, cvs });
        }
        Ok(VerifiedSpan { offset, data, blocks })
    }

    /// Check `data` as blocks `first..` of the piece `blocks` are of (whole blocks; the last may be
    /// short only if it is the piece's last). `Mismatch` for wrong bytes or length, `OutOfRange`
    /// for blocks the piece does not have.
    pub fn verify_blocks(geom: &Geometry, blocks: &BlockCvs, first: usize, data: Vec<u8>) -> Result<Self, ChunkError> {
        let n = data.len().div_ceil(BLOCK_SIZE);
        if data.is_empty() || first.checked_add(n).is_none_or(|end| end > blocks.n) {
            return Err(ChunkError::OutOfRange);
        }
        let piece_start = blocks.piece * PIECE_SIZE;
        let piece_len = geom.chunk_len(blocks.chunk).saturating_sub(piece_start).min(PIECE_SIZE);
        let start = first * BLOCK_SIZE;
        if data.len() != piece_len.saturating_sub(start).min(n * BLOCK_SIZE) {
            return Err(ChunkError::Mismatch);
        }
        let offset = geom.chunk_offset(blocks.chunk) + (piece_start + start) as u64;
        for (i, b) in data.chunks(BLOCK_SIZE).enumerate() {
            let cv = cv_at(offset + (i * BLOCK_SIZE) as u64, b);
            if blake3::Hash::from(cv) != blake3::Hash::from(blocks.cvs[first + i]) {
                return Err(ChunkError::Mismatch);
            }
        }
        Ok(VerifiedSpan { offset, data, blocks: Vec::new() })
    }

    /// The block CVs of the pieces this span was verified as (see [`BlockCvs`]).
    pub fn block_cvs(&self) -> &[BlockCvs] {
        &self.blocks
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl VerifiedChunk {
    /// Check `data` as chunk `index` of the file with geometry `geom` and BLAKE3 root `root`.
    ///
    /// - `n_chunks >= 2`: `data` must be exactly `chunk_len(index)` bytes and its [`chunk_cv`] must equal
    ///   `expected`, a leaf CV already proven with [`verify_leaves`] (`None` is `BadProof`).
    /// - `n_chunks == 1`: `expected` is ignored; `blake3::hash(data)` must equal `root`.
    ///
    /// `OutOfRange` for an index past the end, `Mismatch` for wrong bytes or a wrong length.
    pub fn verify(
        geom: &Geometry,
        root: &blake3::Hash,
        index: u64,
        expected: Option<&Cv>,
        data: impl Into<Buf>,
    ) -> Result<Self, ChunkError> {
        let data = data.into();
        let n = geom.n_chunks();
        if index >= n {
            return Err(ChunkError::OutOfRange);
        }
        if data.len() != geom.chunk_len(index) {
            return Err(ChunkError::Mismatch);
        }
        let pieces = if n == 1 {
            if blake3::hash(&data) != *root {
                return Err(ChunkError::Mismatch);
            }
            None
        } else {
            let expected = expected.ok_or(ChunkError::BadProof)?;
            let (cv, pieces) = match piece_cvs(geom, index, &data) {
                Some(p) => (tree::from_leaves(&p, false), Some(PieceCvs { index, cvs: p.into() })),
                None => (chunk_cv(geom, index, &data), None),
            };
            // blake3::Hash compares in constant time.
            if blake3::Hash::from(cv) != blake3::Hash::from(*expected) {
                return Err(ChunkError::Mismatch);
            }
            pieces
        };
        Ok(VerifiedChunk { index, data: Arc::new(data), pieces })
    }

    /// The CVs of this chunk's pieces, if it is cut into pieces.
    pub fn pieces(&self) -> Option<&PieceCvs> {
        self.pieces.as_ref()
    }

    pub fn index(&self) -> u64 {
        self.index
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    /// The buffer the bytes are in (the disk cache writes a registered slot without a copy).
    pub fn buf(&self) -> &Buf {
        &self.data
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes of memory it holds (a recycled buffer may be larger than the chunk).
    pub fn mem_cost(&self) -> usize {
        self.data.capacity() + self.pieces.as_ref().map_or(0, |p| p.cvs.len() * 32)
    }
}

impl fmt::Debug for VerifiedChunk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedChunk")
            .field("index", &self.index)
            .field("len", &self.data.len())
            .finish()
    }
}

#[cfg(test)]
mod tests;
