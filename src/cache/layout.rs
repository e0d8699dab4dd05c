//! The on-disk format of the chunk cache. Pure: bytes in, values out.
//!
//! ```text
//! <dir>/lock                     flock'ed by the one mount that uses the directory
//! <dir>/journal                  header, then fixed-size records, appended
//! <dir>/data/<hh>/<root hex>     one sparse file per file version (its BLAKE3 root): chunk i at
//!                                offset i * chunk_size, exactly the file's bytes where present,
//!                                holes elsewhere; the file's size is the real file size
//! <dir>/data/<hh>/<root hex>.pcv the 16 KiB piece values of each present chunk (see
//!                                [`pieces_path`]); checked against the proven leaf before use
//! <dir>/meta/<id>                what a mount knew about names (`cache::meta`)
//! ```
//!
//! Journal header (64 bytes): magic `WRAITHCJ`, version u32 LE, record length u32 LE, 40 zero
//! bytes, then the first 8 bytes of BLAKE3 over the 56 bytes before.
//!
//! Record (96 bytes), all integers little-endian:
//! ```text
//!  0  u8      kind: 1 present, 2 chunk absent, 3 file gone
//!  1  u8      chunk_log2
//!  2  u16     0
//!  4  u32     chunk length
//!  8  [32]    file root (BLAKE3 of the whole file)
//! 40  u64     chunk index
//! 48  u64     file size
//! 56  [32]    chunk's leaf chaining value (zero for a one-chunk file)
//! 88  [8]     first 8 bytes of BLAKE3 over bytes 0..88
//! ```
//! A present record is appended only after the chunk's data write completed. Replay stops at the
//! first record that is short or fails its check (a write torn by a crash); the store then
//! rewrites the journal compacted.

use std::path::{Path, PathBuf};

use crate::chunk::Cv;

pub const MAGIC: [u8; 8] = *b"WRAITHCJ";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const RECORD_LEN: usize = 96;

pub type Root = [u8; 32];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// Chunk `idx` of the file with `root` is on disk, `len` bytes, leaf value `cv`.
    Present { root: Root, idx: u64, size: u64, chunk_log2: u8, len: u32, cv: Cv },
    /// Chunk `idx` was evicted or found damaged.
    Absent { root: Root, idx: u64 },
    /// The whole data file was deleted.
    FileGone { root: Root },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// Not a wraith cache journal (wrong magic or a damaged header).
    Foreign,
    /// A wraith journal of another format version.
    Version(u32),
}

fn check(bytes: &[u8]) -> [u8; 8] {
    let h = blake3::hash(bytes);
    let mut c = [0; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

pub fn encode_header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
    let c = check(&h[..56]);
    h[56..].copy_from_slice(&c);
    h
}

pub fn decode_header(h: &[u8]) -> Result<(), LayoutError> {
    if h.len() < HEADER_LEN || h[..8] != MAGIC || check(&h[..56]) != h[56..64] {
        return Err(LayoutError::Foreign);
    }
    let version = u32::from_le_bytes(h[8..12].try_into().unwrap());
    let rlen = u32::from_le_bytes(h[12..16].try_into().unwrap());
    if version != VERSION || rlen as usize != RECORD_LEN {
        return Err(LayoutError::Version(version));
    }
    Ok(())
}

impl Record {
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut r = [0u8; RECORD_LEN];
        match *self {
            Record::Present { root, idx, size, chunk_log2, len, cv } => {
                r[0] = 1;
                r[1] = chunk_log2;
                r[4..8].copy_from_slice(&len.to_le_bytes());
                r[8..40].copy_from_slice(&root);
                r[40..48].copy_from_slice(&idx.to_le_bytes());
                r[48..56].copy_from_slice(&size.to_le_bytes());
                r[56..88].copy_from_slice(&cv);
            }
            Record::Absent { root, idx } => {
                r[0] = 2;
                r[8..40].copy_from_slice(&root);
                r[40..48].copy_from_slice(&idx.to_le_bytes());
            }
            Record::FileGone { root } => {
                r[0] = 3;
                r[8..40].copy_from_slice(&root);
            }
        }
        let c = check(&r[..88]);
        r[88..].copy_from_slice(&c);
        r
    }

    /// None for a short, damaged or unknown record.
    pub fn decode(r: &[u8]) -> Option<Record> {
        if r.len() < RECORD_LEN || check(&r[..88]) != r[88..96] {
            return None;
        }
        let root: Root = r[8..40].try_into().unwrap();
        let idx = u64::from_le_bytes(r[40..48].try_into().unwrap());
        Some(match r[0] {
            1 => Record::Present {
                root,
                idx,
                size: u64::from_le_bytes(r[48..56].try_into().unwrap()),
                chunk_log2: r[1],
                len: u32::from_le_bytes(r[4..8].try_into().unwrap()),
                cv: r[56..88].try_into().unwrap(),
            },
            2 => Record::Absent { root, idx },
            3 => Record::FileGone { root },
            _ => return None,
        })
    }
}

/// Records of a whole journal, and whether it ended cleanly (false: a torn or damaged tail that
/// replay stopped at).
pub fn replay(bytes: &[u8]) -> Result<(Vec<Record>, bool), LayoutError> {
    decode_header(bytes)?;
    let body = &bytes[HEADER_LEN..];
    let mut out = Vec::with_capacity(body.len() / RECORD_LEN);
    for r in body.chunks(RECORD_LEN) {
        match Record::decode(r) {
            Some(rec) => out.push(rec),
            None => return Ok((out, false)),
        }
    }
    Ok((out, true))
}

pub fn hex(root: &Root) -> String {
    blake3::Hash::from_bytes(*root).to_hex().to_string()
}

/// Where the data file of the file version with `root` lives.
pub fn data_path(dir: &Path, root: &Root) -> PathBuf {
    let h = hex(root);
    dir.join("data").join(&h[..2]).join(h)
}

/// Beside each data file, the piece values of its chunks (`chunk::PieceCvs`): chunk `i`'s at
/// offset `i * (chunk size / 16 KiB) * 32`, 32 bytes per piece, holes elsewhere. Written after the
/// chunk's data; trusted only after they merge into the chunk's proven leaf value.
pub fn pieces_path(dir: &Path, root: &Root) -> PathBuf {
    let mut p = data_path(dir, root).into_os_string();
    p.push(PIECES_SUFFIX);
    p.into()
}

pub const PIECES_SUFFIX: &str = ".pcv";

/// Offset of chunk `idx`'s piece values in its pieces file.
pub fn pieces_offset(chunk_log2: u8, idx: u64) -> u64 {
    let per_chunk = (1u64 << chunk_log2.saturating_sub(crate::chunk::PIECE_LOG2)) * 32;
    idx.saturating_mul(per_chunk)
}

/// The bytes of a pieces file that releasing chunk `idx` may free: the chunk's own values, widened
/// toward the edges of the `block`-sized blocks they lie in over the values of neighbours that
/// `holds` says are not held (present or being written). So a block is freed whole once none
/// of its chunks is held, and no held chunk's values are touched. (A punch that covers part of a
/// block only zeroes it; zeroed values fail their check and cost a whole-chunk read, never a
/// wrong byte.)
pub fn pieces_release(chunk_log2: u8, n_chunks: u64, idx: u64, block: u64, holds: impl Fn(u64) -> bool) -> std::ops::Range<u64> {
    let per = pieces_offset(chunk_log2, 1);
    let block = block.max(1);
    let (start, end) = (pieces_offset(chunk_log2, idx), pieces_offset(chunk_log2, idx + 1));
    let (floor, ceil) = (start / block * block, end.div_ceil(block).saturating_mul(block));
    let (mut lo, mut hi) = (start, end);
    let mut j = idx;
    while j > 0 && lo > floor && !holds(j - 1) {
        j -= 1;
        lo = pieces_offset(chunk_log2, j).max(floor);
    }
    let mut j = idx + 1;
    while j < n_chunks && hi < ceil && !holds(j) {
        hi = (hi + per).min(ceil);
        j += 1;
    }
    lo..hi
}

/// The root a data file name stands for (None for foreign names).
pub fn root_of_name(name: &str) -> Option<Root> {
    if name.len() != 64 {
        return None;
    }
    blake3::Hash::from_hex(name).ok().map(|h| *h.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 256 KiB chunks: 512 bytes of values each, eight to a 4 KiB block.
    #[test]
    fn releasing_pieces_frees_whole_blocks_and_keeps_held_values() {
        let l = 18;
        // Nothing else held: the whole block of chunks 8..16.
        assert_eq!(pieces_release(l, 100, 11, 4096, |_| false), 4096..8192);
        // Chunks 9 and 14 held: only 10..14, never theirs.
        assert_eq!(pieces_release(l, 100, 11, 4096, |j| j == 9 || j == 14), 5120..7168);
        // A neighbour right beside it held on each side: only its own values.
        assert_eq!(pieces_release(l, 100, 11, 4096, |j| j == 10 || j == 12), 5632..6144);
        // The file's last chunks: not past its end.
        assert_eq!(pieces_release(l, 13, 11, 4096, |_| false), 4096..6656);
        assert_eq!(pieces_release(l, 100, 0, 4096, |_| false), 0..4096);
        // Values larger than a block (64 MiB chunks: 128 KiB each): exactly its own.
        assert_eq!(pieces_release(26, 10, 3, 4096, |_| false), 3 * 131072..4 * 131072);
    }

    fn hexs(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// The format is a promise to the next version of wraith: these bytes must not change
    /// without bumping VERSION.
    #[test]
    fn golden_bytes() {
        let h = encode_header();
        assert_eq!(hexs(&h[..16]), "575241495448434a0100000060000000");
        assert_eq!(&h[..8], b"WRAITHCJ");
        assert_eq!(&h[8..16], &[1, 0, 0, 0, 96, 0, 0, 0]);
        assert!(h[16..56].iter().all(|&b| b == 0));
        assert_eq!(hexs(&h[56..]), hexs(&blake3::hash(&h[..56]).as_bytes()[..8]));
        let rec = Record::Present { root: [0xab; 32], idx: 0x0102, size: 0x1_0000_0001, chunk_log2: 18, len: 4096, cv: [0xcd; 32] };
        let b = rec.encode();
        let want = format!("0112000000100000{}02010000000000000100000001000000{}", "ab".repeat(32), "cd".repeat(32));
        assert_eq!(hexs(&b[..88]), want);
        assert_eq!(hexs(&b[88..]), hexs(&blake3::hash(&b[..88]).as_bytes()[..8]));
        assert_eq!(hexs(&Record::FileGone { root: [1; 32] }.encode()[..8]), "0300000000000000");
    }

    #[test]
    fn records_round_trip_and_torn_tail_stops_replay() {
        let recs = [
            Record::Present { root: [1; 32], idx: 7, size: 1 << 30, chunk_log2: 18, len: 262144, cv: [9; 32] },
            Record::Absent { root: [1; 32], idx: 7 },
            Record::FileGone { root: [2; 32] },
        ];
        let mut j = encode_header().to_vec();
        for r in &recs {
            assert_eq!(Record::decode(&r.encode()), Some(*r));
            j.extend_from_slice(&r.encode());
        }
        assert_eq!(replay(&j).unwrap(), (recs.to_vec(), true));
        j.extend_from_slice(&recs[0].encode()[..50]); // torn
        assert_eq!(replay(&j).unwrap(), (recs.to_vec(), false));
        let mut bad = j.clone();
        bad[HEADER_LEN + RECORD_LEN + 3] ^= 1; // damaged second record
        assert_eq!(replay(&bad).unwrap(), (recs[..1].to_vec(), false));
        let mut foreign = j.clone();
        foreign[0] = b'X';
        assert_eq!(replay(&foreign), Err(LayoutError::Foreign));
    }

    #[test]
    fn names() {
        let root = [0x5a; 32];
        let p = data_path(Path::new("/c"), &root);
        assert_eq!(p.parent().unwrap(), Path::new("/c/data/5a"));
        assert_eq!(root_of_name(p.file_name().unwrap().to_str().unwrap()), Some(root));
        assert_eq!(root_of_name("x"), None);
    }
}
