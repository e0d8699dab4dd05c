use super::*;
use proptest::prelude::*;

/// Deterministic bytes (xorshift), different per seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn leaf_cvs(geom: &Geometry, bytes: &[u8]) -> Vec<Cv> {
    (0..geom.n_chunks())
        .map(|i| {
            let off = geom.chunk_offset(i) as usize;
            chunk_cv(geom, i, &bytes[off..off + geom.chunk_len(i)])
        })
        .collect()
}

fn fake_leaves(n: u64) -> Vec<Cv> {
    (0..n)
        .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect()
}

/// A table computed on demand (no memory), counting reads.
struct CountingSource {
    inner: MemTree,
    reads: usize,
}

impl NodeSource for CountingSource {
    fn node(&mut self, level: u8, index: u64) -> std::io::Result<Cv> {
        self.reads += 1;
        self.inner.node(level, index)
    }
}

#[test]
fn geometry() {
    assert_eq!(Geometry::new(5, 9), Err(ChunkError::BadGeometry));
    assert_eq!(Geometry::new(5, 25), Err(ChunkError::BadGeometry));
    assert!(Geometry::new(5, MIN_CHUNK_LOG2).is_ok());
    assert!(Geometry::new(5, MAX_CHUNK_LOG2).is_ok());

    let g = Geometry::new(0, 10).unwrap();
    assert_eq!((g.n_chunks(), g.chunk_len(0), g.chunk_len(1)), (1, 0, 0));

    let g = Geometry::new(1024, 10).unwrap();
    assert_eq!(
        (g.chunk_size(), g.n_chunks(), g.chunk_len(0)),
        (1024, 1, 1024)
    );

    let g = Geometry::new(2049, 10).unwrap();
    assert_eq!(g.n_chunks(), 3);
    assert_eq!(g.chunk_offset(2), 2048);
    assert_eq!(
        (g.chunk_len(1), g.chunk_len(2), g.chunk_len(3)),
        (1024, 1, 0)
    );

    let g = Geometry::new(u64::MAX, DEFAULT_CHUNK_LOG2).unwrap();
    assert_eq!(g.n_chunks(), (u64::MAX >> 18) + 1);
    assert_eq!(g.chunk_len(g.n_chunks() - 1), (1 << 18) - 1);
    assert_eq!(g.chunk_offset(u64::MAX), u64::MAX);
    assert_eq!(g.chunk_len(u64::MAX), 0);
}

#[test]
fn levels() {
    assert_eq!(n_levels(0), 0);
    assert_eq!(n_levels(1), 1);
    assert_eq!(n_levels(2), 2);
    assert_eq!(n_levels(3), 2);
    assert_eq!(n_levels(4), 3);
    assert_eq!(n_levels(u64::MAX), 64);
    assert_eq!(level_len(13, 0), 13);
    assert_eq!(level_len(13, 2), 3);
    assert_eq!(level_len(13, 4), 0);
    assert_eq!(level_len(u64::MAX, 64), 0);
    assert_eq!(level_len(u64::MAX, 255), 0);
    for n in 1..200u64 {
        let t = MemTree::from_leaves(&fake_leaves(n));
        assert_eq!(t.levels.len(), n_levels(n) as usize);
        for (j, l) in t.levels.iter().enumerate() {
            assert_eq!(l.len() as u64, level_len(n, j as u8));
        }
    }
    assert!(MemTree::from_leaves(&[]).levels.is_empty());
}

/// The root from chunk CVs is `b3sum` for many sizes and chunk sizes.
#[test]
fn root_is_b3sum() {
    for log2 in [10u8, 11, 12, 14] {
        let cs = 1u64 << log2;
        let mut sizes = vec![
            0,
            1,
            cs - 1,
            cs,
            cs + 1,
            2 * cs - 1,
            2 * cs,
            2 * cs + 1,
            3 * cs,
        ];
        for leaves in [3u64, 4, 5, 7, 8, 9, 13, 16, 17, 31, 33] {
            sizes.extend([leaves * cs, leaves * cs - 1, (leaves - 1) * cs + 1]);
        }
        if log2 == 10 {
            sizes.extend([1000 * 1024, 999 * 1024 + 5, 1024 * 1024 + 1]);
        }
        for size in sizes {
            let bytes = data(size as usize, size ^ u64::from(log2));
            let g = Geometry::new(size, log2).unwrap();
            let expect = blake3::hash(&bytes);
            if g.n_chunks() == 1 {
                let v = VerifiedChunk::verify(&g, &expect, 0, None, bytes.clone()).unwrap();
                assert_eq!(v.bytes(), &bytes[..]);
                continue;
            }
            let leaves = leaf_cvs(&g, &bytes);
            let mut t = MemTree::from_leaves(&leaves);
            assert_eq!(
                root(g.n_chunks(), &mut t).unwrap(),
                expect,
                "size {size} log2 {log2}"
            );
            // A chunk group's CV is also what hashing its 1 KiB pieces one by one would give.
            if log2 > 10 {
                let g10 = Geometry::new(size, 10).unwrap();
                let small = leaf_cvs(&g10, &bytes);
                let mut t10 = MemTree::from_leaves(&small);
                let per = 1usize << (log2 - 10);
                if small.len() >= per {
                    assert_eq!(t10.node(log2 - 10, 0).unwrap(), leaves[0]);
                }
            }
        }
    }
}

#[test]
fn root_needs_two_leaves() {
    let mut t = MemTree::from_leaves(&fake_leaves(1));
    assert!(root(1, &mut t).is_err());
    assert!(root(0, &mut t).is_err());
    // A table that is too small for the claimed leaf count is an error, not a panic.
    assert!(root(5, &mut t).is_err());
}

#[test]
fn builder_equals_memtree() {
    for n in (1..=70u64).chain([255, 256, 257, 1000]) {
        let leaves = fake_leaves(n);
        let t = MemTree::from_leaves(&leaves);
        let mut b = TreeBuilder::new(n);
        let mut seen: Vec<Vec<Option<Cv>>> = t.levels.iter().map(|l| vec![None; l.len()]).collect();
        for (i, cv) in leaves.iter().enumerate() {
            let out = b.push(*cv);
            assert_eq!(out[0], (0, i as u64, *cv));
            for (level, index, node) in out {
                let slot = &mut seen[level as usize][index as usize];
                assert!(slot.is_none(), "node ({level},{index}) emitted twice");
                *slot = Some(node);
            }
            assert!(b.pending.len() <= 64);
        }
        for (j, level) in seen.iter().enumerate() {
            for (i, cv) in level.iter().enumerate() {
                assert_eq!(cv.as_ref(), Some(&t.levels[j][i]), "n {n} node ({j},{i})");
            }
        }
    }
}

#[test]
#[should_panic(expected = "more leaves")]
fn builder_rejects_extra_leaf() {
    let mut b = TreeBuilder::new(1);
    b.push([1; 32]);
    b.push([2; 32]);
}

/// Every range of small trees: the proof verifies, and any tampering fails.
#[test]
fn prove_verify_all_ranges() {
    for n in (2..=17u64).chain([31, 32, 33]) {
        let leaves = fake_leaves(n);
        let mut t = MemTree::from_leaves(&leaves);
        let r = root(n, &mut t).unwrap();
        for first in 0..n {
            for count in 1..=n - first {
                let range = &leaves[first as usize..(first + count) as usize];
                let proof = prove(n, first, count, &mut t).unwrap();
                assert_eq!(
                    verify_leaves(n, first, range, &proof, &r),
                    Ok(()),
                    "n {n} [{first}+{count}]"
                );
                assert!(proof.len() <= 2 * n_levels(n) as usize);
                if count == n {
                    assert!(proof.is_empty());
                }
                check_tampering(n, first, range, &proof, &r);
            }
        }
    }
}

fn check_tampering(n: u64, first: u64, range: &[Cv], proof: &[Cv], r: &blake3::Hash) {
    let ok = |n: u64, first: u64, l: &[Cv], p: &[Cv]| verify_leaves(n, first, l, p, r).is_ok();
    // One flipped bit in any leaf or proof CV (a few bit positions each).
    for bit in [0usize, 77, 255] {
        for i in 0..range.len() {
            let mut l = range.to_vec();
            l[i][bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                verify_leaves(n, first, &l, proof, r),
                Err(ChunkError::Mismatch)
            );
        }
        for i in 0..proof.len() {
            let mut p = proof.to_vec();
            p[i][bit / 8] ^= 1 << (bit % 8);
            assert_eq!(
                verify_leaves(n, first, range, &p, r),
                Err(ChunkError::Mismatch)
            );
        }
    }
    // Wrong proof lengths.
    let mut longer = proof.to_vec();
    longer.push([0; 32]);
    assert_eq!(
        verify_leaves(n, first, range, &longer, r),
        Err(ChunkError::BadProof)
    );
    if !proof.is_empty() {
        assert_eq!(
            verify_leaves(n, first, range, &proof[1..], r),
            Err(ChunkError::BadProof)
        );
        assert_eq!(
            verify_leaves(n, first, range, &proof[..proof.len() - 1], r),
            Err(ChunkError::BadProof)
        );
    }
    // Swapped proof CVs.
    if proof.len() >= 2 && proof[0] != proof[1] {
        let mut p = proof.to_vec();
        p.swap(0, 1);
        assert!(!ok(n, first, range, &p));
    }
    // Wrong leaf count. A proof binds leaves to their positions, not the file to its length: a range
    // that stops before the last leaf can have the very same merge sequence in a larger tree (n = 3 and
    // n = 4, leaves [0, 2): both compute root(parent(l0, l1), p)). The client takes n from the file
    // size it already trusts. But a range holding the true last leaf never verifies under another n.
    if first + range.len() as u64 == n {
        for wrong_n in [n - 1, n + 1, n + 2, 2 * n, 2 * n + 1] {
            assert!(
                !ok(wrong_n, first, range, proof),
                "n {n} accepted as {wrong_n}"
            );
        }
    }
    // Wrong position, a leaf too few or too many.
    if first + (range.len() as u64) < n {
        assert!(!ok(n, first + 1, range, proof));
    }
    if first > 0 {
        assert!(!ok(n, first - 1, range, proof));
    }
    if range.len() > 1 {
        assert!(!ok(n, first, &range[1..], proof));
        assert!(!ok(n, first, &range[..range.len() - 1], proof));
    }
    // Proofs are ordered: reversing a proof of several distinct CVs must fail.
    if proof.len() >= 2 {
        let rev: Vec<Cv> = proof.iter().rev().copied().collect();
        if rev != proof {
            assert!(!ok(n, first, range, &rev));
        }
    }
}

#[test]
fn bad_ranges() {
    let leaves = fake_leaves(5);
    let mut t = MemTree::from_leaves(&leaves);
    let r = root(5, &mut t).unwrap();
    assert!(prove(5, 0, 0, &mut t).is_err());
    assert!(prove(5, 4, 2, &mut t).is_err());
    assert!(prove(5, u64::MAX, 2, &mut t).is_err());
    assert_eq!(
        verify_leaves(5, 0, &[], &[], &r),
        Err(ChunkError::OutOfRange)
    );
    assert_eq!(
        verify_leaves(5, 4, &leaves[..2], &[], &r),
        Err(ChunkError::OutOfRange)
    );
    assert_eq!(
        verify_leaves(5, u64::MAX, &leaves[..2], &[], &r),
        Err(ChunkError::OutOfRange)
    );
    assert_eq!(
        verify_leaves(1, 0, &leaves[..1], &[], &r),
        Err(ChunkError::OutOfRange)
    );
    assert_eq!(
        verify_leaves(0, 0, &leaves[..1], &[], &r),
        Err(ChunkError::OutOfRange)
    );
    // A one-leaf table proves its only leaf with an empty proof.
    let mut one = MemTree::from_leaves(&leaves[..1]);
    assert_eq!(prove(1, 0, 1, &mut one).unwrap(), Vec::<Cv>::new());
}

/// Proofs need O(log n) reads, whatever the range, on a large tree.
#[test]
fn prove_reads_are_logarithmic() {
    let n = (1u64 << 16) + 12_345;
    let mut src = CountingSource {
        inner: MemTree::from_leaves(&fake_leaves(n)),
        reads: 0,
    };
    let r = root(n, &mut src).unwrap();
    assert!(src.reads <= 64, "root took {} reads", src.reads);
    let leaves = src.inner.levels[0].clone();
    let ranges = [
        (0, 1),
        (n - 1, 1),
        (n / 2, 3),
        (1, n - 2),
        (12_345, 54_321),
        (65_535, 2),
        (0, n - 1),
    ];
    for (first, count) in ranges {
        src.reads = 0;
        let proof = prove(n, first, count, &mut src).unwrap();
        assert!(
            src.reads <= 3 * 17,
            "range [{first}+{count}] took {} reads",
            src.reads
        );
        let range = &leaves[first as usize..(first + count) as usize];
        assert_eq!(verify_leaves(n, first, range, &proof, &r), Ok(()));
    }
}

/// A proof over real chunks verifies, and each chunk then verifies against its proven leaf.
#[test]
fn verified_chunks_end_to_end() {
    let g = Geometry::new(7 * 2048 + 100, 11).unwrap();
    let bytes = data(g.size as usize, 7);
    let r = blake3::hash(&bytes);
    let leaves = leaf_cvs(&g, &bytes);
    let mut t = MemTree::from_leaves(&leaves);
    let proof = prove(g.n_chunks(), 2, 6, &mut t).unwrap();
    verify_leaves(g.n_chunks(), 2, &leaves[2..8], &proof, &r).unwrap();
    let chunk = |i: u64| {
        let off = g.chunk_offset(i) as usize;
        bytes[off..off + g.chunk_len(i)].to_vec()
    };
    for i in 2..8 {
        let v = VerifiedChunk::verify(&g, &r, i, Some(&leaves[i as usize]), chunk(i)).unwrap();
        assert_eq!(
            (v.index(), v.bytes(), v.len()),
            (i, &chunk(i)[..], g.chunk_len(i))
        );
        assert!(!v.is_empty());
        let c = v.clone();
        assert_eq!(
            c.bytes().as_ptr(),
            v.bytes().as_ptr(),
            "clones share the bytes"
        );
    }
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 7, Some(&leaves[7]), chunk(7))
            .unwrap()
            .len(),
        100
    );

    // Flipped byte anywhere.
    for pos in [0, 1000, 2047] {
        let mut d = chunk(3);
        d[pos] ^= 0x40;
        let e = VerifiedChunk::verify(&g, &r, 3, Some(&leaves[3]), d).unwrap_err();
        assert_eq!(e, ChunkError::Mismatch);
    }
    // Short and long data.
    let mut short = chunk(3);
    short.pop();
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 3, Some(&leaves[3]), short).unwrap_err(),
        ChunkError::Mismatch
    );
    let mut long = chunk(7);
    long.push(0);
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 7, Some(&leaves[7]), long).unwrap_err(),
        ChunkError::Mismatch
    );
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 3, Some(&leaves[3]), vec![]).unwrap_err(),
        ChunkError::Mismatch
    );
    // Wrong index: the right bytes and leaf of chunk 3 claimed as chunk 4, and chunk 4's leaf for chunk 3's bytes.
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 4, Some(&leaves[3]), chunk(3)).unwrap_err(),
        ChunkError::Mismatch
    );
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 4, Some(&leaves[4]), chunk(3)).unwrap_err(),
        ChunkError::Mismatch
    );
    // Same bytes at two positions still have different CVs (the offset is hashed in).
    let same = Geometry::new(4096, 10).unwrap();
    assert_ne!(
        chunk_cv(&same, 1, &[7; 1024]),
        chunk_cv(&same, 2, &[7; 1024])
    );
    // Past the end, and no proven leaf.
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 8, Some(&leaves[7]), chunk(7)).unwrap_err(),
        ChunkError::OutOfRange
    );
    assert_eq!(
        VerifiedChunk::verify(&g, &r, 3, None, chunk(3)).unwrap_err(),
        ChunkError::BadProof
    );
}

#[test]
fn single_chunk_files() {
    for size in [0usize, 1, 1000, 2048] {
        let g = Geometry::new(size as u64, 11).unwrap();
        assert_eq!(g.n_chunks(), 1);
        let bytes = data(size, 3);
        let r = blake3::hash(&bytes);
        let v = VerifiedChunk::verify(&g, &r, 0, Some(&[9; 32]), bytes.clone()).unwrap();
        assert_eq!((v.len(), v.is_empty()), (size, size == 0));
        if size > 0 {
            let mut bad = bytes.clone();
            bad[size / 2] ^= 1;
            assert_eq!(
                VerifiedChunk::verify(&g, &r, 0, None, bad).unwrap_err(),
                ChunkError::Mismatch
            );
            let short = bytes[..size - 1].to_vec();
            assert_eq!(
                VerifiedChunk::verify(&g, &r, 0, None, short).unwrap_err(),
                ChunkError::Mismatch
            );
        }
        assert_eq!(
            VerifiedChunk::verify(&g, &r, 1, None, vec![]).unwrap_err(),
            ChunkError::OutOfRange
        );
    }
}

#[test]
fn chunk_cv_never_panics() {
    let g = Geometry::new(10_000, 10).unwrap();
    assert_eq!(chunk_cv(&g, 1, &[]), [0; 32]);
    assert_eq!(chunk_cv(&g, 1, &[0; 1025]), [0; 32]);
    assert_eq!(chunk_cv(&g, 0, &[0; 1025]), [0; 32]);
    assert_eq!(chunk_cv(&g, u64::MAX, &[0; 5]), [0; 32]);
    assert_ne!(chunk_cv(&g, 1, &[0; 5]), [0; 32]);
}

#[test]
fn error_display() {
    for e in [
        ChunkError::BadGeometry,
        ChunkError::Mismatch,
        ChunkError::BadProof,
        ChunkError::OutOfRange,
    ] {
        assert!(!e.to_string().is_empty());
        let _: &dyn std::error::Error = &e;
    }
    let g = Geometry::new(1, 10).unwrap();
    let v = VerifiedChunk::verify(&g, &blake3::hash(&[0]), 0, None, vec![0]).unwrap();
    assert_eq!(format!("{v:?}"), "VerifiedChunk { index: 0, len: 1 }");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Random files: the root is b3sum, a random range proves and verifies, its chunks verify, and a
    /// flipped byte in one of them is caught.
    #[test]
    fn random_files(size in 0usize..64 * 1024, log2 in 10u8..=12, seed: u64, a: u64, b: u64, flip: usize) {
        let g = Geometry::new(size as u64, log2).unwrap();
        let bytes = data(size, seed);
        let r = blake3::hash(&bytes);
        let n = g.n_chunks();
        if n == 1 {
            prop_assert!(VerifiedChunk::verify(&g, &r, 0, None, bytes).is_ok());
            return Ok(());
        }
        let leaves = leaf_cvs(&g, &bytes);
        let mut t = MemTree::from_leaves(&leaves);
        prop_assert_eq!(root(n, &mut t).unwrap(), r);
        let first = a % n;
        let count = 1 + b % (n - first);
        let proof = prove(n, first, count, &mut t).unwrap();
        let range = &leaves[first as usize..(first + count) as usize];
        prop_assert_eq!(verify_leaves(n, first, range, &proof, &r), Ok(()));
        for i in first..first + count {
            let off = g.chunk_offset(i) as usize;
            let mut d = bytes[off..off + g.chunk_len(i)].to_vec();
            prop_assert!(VerifiedChunk::verify(&g, &r, i, Some(&leaves[i as usize]), d.clone()).is_ok());
            let pos = flip % d.len();
            d[pos] ^= 0x80;
            prop_assert_eq!(
                VerifiedChunk::verify(&g, &r, i, Some(&leaves[i as usize]), d).unwrap_err(),
                ChunkError::Mismatch
            );
        }
    }

    /// Random large leaf counts (synthetic leaves): builder = table, prove/verify, tampering caught.
    #[test]
    fn random_trees(n in 2u64..3000, a: u64, b: u64, which: usize) {
        let leaves = fake_leaves(n);
        let mut t = MemTree::from_leaves(&leaves);
        let mut builder = TreeBuilder::new(n);
        for cv in &leaves {
            for (level, index, node) in builder.push(*cv) {
                prop_assert_eq!(node, t.levels[level as usize][index as usize]);
            }
        }
        let r = root(n, &mut t).unwrap();
        let first = a % n;
        let count = 1 + b % (n - first);
        let proof = prove(n, first, count, &mut t).unwrap();
        let range = &leaves[first as usize..(first + count) as usize];
        prop_assert_eq!(verify_leaves(n, first, range, &proof, &r), Ok(()));
        if !proof.is_empty() {
            let mut p = proof.clone();
            p[which % proof.len()][which % 32] ^= 1;
            prop_assert_eq!(verify_leaves(n, first, range, &p, &r), Err(ChunkError::Mismatch));
        }
        let mut l = range.to_vec();
        l[which % range.len()][31] ^= 0x10;
        prop_assert_eq!(verify_leaves(n, first, &l, &proof, &r), Err(ChunkError::Mismatch));
    }
}

/// Chunk `pick % n_chunks` of a file of random bytes (two chunks or more) cut as `geom` says,
/// verified against its leaf value: its file offset, its bytes and the verified chunk.
fn a_verified_chunk(geom: &Geometry, seed: u64, pick: u64) -> (usize, Vec<u8>, VerifiedChunk) {
    let bytes = data(geom.size as usize, seed);
    let leaves = leaf_cvs(geom, &bytes);
    let idx = pick % geom.n_chunks();
    let off = geom.chunk_offset(idx) as usize;
    let chunk = bytes[off..off + geom.chunk_len(idx)].to_vec();
    let c = VerifiedChunk::verify(geom, &blake3::hash(&bytes), idx, Some(&leaves[idx as usize]), chunk.clone()).unwrap();
    (off, chunk, c)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// A chunk verified through its pieces matches the one-pass CV (and so b3sum), and every
    /// run of its pieces verifies alone; a flipped byte or a shifted run does not.
    #[test]
    fn pieces_verify_like_the_whole_chunk(size in 1u64..2_000_000, log2 in 15u8..=19, seed in any::<u64>(), pick in any::<u64>()) {
        let geom = Geometry::new(size, log2).unwrap();
        prop_assume!(geom.n_chunks() >= 2);
        let (off, chunk, c) = a_verified_chunk(&geom, seed, pick);
        let p = c.pieces().expect("a chunk larger than a piece has pieces").clone();
        let np = chunk.len().div_ceil(PIECE_SIZE);
        prop_assert_eq!(p.cvs.len(), np);
        let first = (pick >> 32) as usize % np;
        let n = 1 + (pick >> 16) as usize % (np - first);
        let span = chunk[first * PIECE_SIZE..((first + n) * PIECE_SIZE).min(chunk.len())].to_vec();
        let v = VerifiedSpan::verify(&geom, &p, first, span.clone()).unwrap();
        prop_assert_eq!(v.offset(), (off + first * PIECE_SIZE) as u64);
        prop_assert_eq!(v.bytes(), &span[..]);
        let mut bad = span.clone();
        let at = (pick as usize) % bad.len();
        bad[at] ^= 1;
        prop_assert!(VerifiedSpan::verify(&geom, &p, first, bad).is_err());
        if np > 1 {
            let other = if first == 0 { 1 } else { 0 };
            prop_assert!(VerifiedSpan::verify(&geom, &p, other, span.clone()).is_err(), "the same bytes as another piece");
        }
        prop_assert!(VerifiedSpan::verify(&geom, &p, first, span[..span.len() - 1].to_vec()).is_err(), "short");
        prop_assert!(VerifiedSpan::verify(&geom, &p, np, span).is_err(), "past the chunk");
    }

    /// A span keeps the block CVs of its pieces, and every run of a piece's blocks then verifies
    /// alone against them; a flipped byte, another block's bytes, a short run or a run past the
    /// piece do not.
    #[test]
    fn blocks_of_a_verified_span_verify_alone(size in 1u64..1_200_000, log2 in 15u8..=18, seed in any::<u64>(), pick in any::<u64>()) {
        let geom = Geometry::new(size, log2).unwrap();
        prop_assume!(geom.n_chunks() >= 2);
        let (off, chunk, c) = a_verified_chunk(&geom, seed, pick);
        let idx = c.index();
        let p = c.pieces().unwrap().clone();
        let np = p.len();
        let first = (pick >> 32) as usize % np;
        let n = 1 + (pick >> 16) as usize % (np - first);
        let span = VerifiedSpan::verify(&geom, &p, first, chunk[first * PIECE_SIZE..((first + n) * PIECE_SIZE).min(chunk.len())].to_vec()).unwrap();
        prop_assert_eq!(span.block_cvs().len(), n);
        for (k, b) in span.block_cvs().iter().enumerate() {
            prop_assert_eq!((b.chunk(), b.piece()), (idx, first + k));
            let piece = &chunk[b.piece() * PIECE_SIZE..((b.piece() + 1) * PIECE_SIZE).min(chunk.len())];
            let nb = piece.len().div_ceil(BLOCK_SIZE);
            prop_assert_eq!(b.n, nb);
            let fb = (pick >> 8) as usize % nb;
            let m = 1 + (pick >> 24) as usize % (nb - fb);
            let run = piece[fb * BLOCK_SIZE..((fb + m) * BLOCK_SIZE).min(piece.len())].to_vec();
            let v = VerifiedSpan::verify_blocks(&geom, b, fb, run.clone()).unwrap();
            prop_assert_eq!(v.offset(), (off + b.piece() * PIECE_SIZE + fb * BLOCK_SIZE) as u64);
            prop_assert_eq!(v.bytes(), &run[..]);
            prop_assert!(v.block_cvs().is_empty());
            let mut bad = run.clone();
            let at = (pick as usize >> 3) % bad.len();
            bad[at] ^= 0x40;
            prop_assert!(VerifiedSpan::verify_blocks(&geom, b, fb, bad).is_err(), "a flipped byte");
            if nb > 1 && run.len() == BLOCK_SIZE {
                let other = if fb == 0 { 1 } else { 0 };
                prop_assert!(VerifiedSpan::verify_blocks(&geom, b, other, run.clone()).is_err(), "another block's bytes");
            }
            prop_assert!(VerifiedSpan::verify_blocks(&geom, b, fb, run[..run.len() - 1].to_vec()).is_err(), "short");
            prop_assert!(VerifiedSpan::verify_blocks(&geom, b, nb, run.clone()).is_err(), "past the piece");
            prop_assert!(VerifiedSpan::verify_blocks(&geom, b, fb, Vec::new()).is_err(), "empty");
        }
    }
}

#[test]
fn small_chunks_and_one_chunk_files_have_no_pieces() {
    let g = Geometry::new(3 * 16384, 14).unwrap();
    let bytes = data(3 * 16384, 1);
    let leaves = leaf_cvs(&g, &bytes);
    let c = VerifiedChunk::verify(&g, &blake3::hash(&bytes), 1, Some(&leaves[1]), bytes[16384..32768].to_vec()).unwrap();
    assert!(c.pieces().is_none());
    let g = Geometry::new(100_000, 18).unwrap();
    let bytes = data(100_000, 2);
    let c = VerifiedChunk::verify(&g, &blake3::hash(&bytes), 0, None, bytes).unwrap();
    assert!(c.pieces().is_none());
}

#[test]
fn stored_piece_values_are_taken_only_if_they_merge_into_the_leaf() {
    let g = Geometry::new(5 * 262144 + 70_000, 18).unwrap();
    let bytes = data(g.size as usize, 9);
    let leaves = leaf_cvs(&g, &bytes);
    for idx in [0u64, 5] {
        let off = g.chunk_offset(idx) as usize;
        let c = VerifiedChunk::verify(&g, &blake3::hash(&bytes), idx, Some(&leaves[idx as usize]), bytes[off..off + g.chunk_len(idx)].to_vec()).unwrap();
        let stored = c.pieces().unwrap().to_bytes();
        assert_eq!(stored.len(), pieces_in(&g, idx).unwrap() * 32);
        let p = PieceCvs::from_stored(&g, idx, &stored, &leaves[idx as usize]).unwrap();
        assert_eq!(p.to_bytes(), stored);
        let mut bad = stored.clone();
        bad[40] ^= 1;
        assert!(PieceCvs::from_stored(&g, idx, &bad, &leaves[idx as usize]).is_none());
        assert!(PieceCvs::from_stored(&g, idx, &stored[..stored.len() - 32], &leaves[idx as usize]).is_none());
        assert!(PieceCvs::from_stored(&g, idx, &stored, &leaves[1]).is_none(), "another chunk's leaf");
    }
}
