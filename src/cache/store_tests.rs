use super::*;
use crate::chunk::chunk_cv;
use crate::error::Error;

const LOG2: u8 = 16;
/// Room a whole chunk takes in the cache: 64 KiB of data and its four piece values.
const COST: u64 = 65536 + 4 * 32;

struct TestFile {
    geom: Geometry,
    data: Vec<u8>,
    root: Root,
}

impl TestFile {
    fn new(size: u64, seed: u8) -> Self {
        let geom = Geometry::new(size, LOG2).unwrap();
        let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed ^ (i >> 13) as u8)).collect();
        let root = *blake3::hash(&data).as_bytes();
        TestFile { geom, data, root }
    }
    fn slice(&self, i: u64) -> &[u8] {
        &self.data[self.geom.chunk_offset(i) as usize..][..self.geom.chunk_len(i)]
    }
    fn cv(&self, i: u64) -> Option<Cv> {
        (self.geom.n_chunks() > 1).then(|| chunk_cv(&self.geom, i, self.slice(i)))
    }
    fn chunk(&self, i: u64) -> VerifiedChunk {
        let root = blake3::Hash::from_bytes(self.root);
        VerifiedChunk::verify(&self.geom, &root, i, self.cv(i).as_ref(), self.slice(i).to_vec()).unwrap()
    }
    fn fill(&self, s: &Store) {
        for i in 0..self.geom.n_chunks() {
            s.admit(&self.root, &self.geom, self.cv(i), &self.chunk(i));
        }
        s.flush();
    }
    fn load(&self, s: &Store, i: u64) -> Option<Vec<u8>> {
        s.load(&self.root, &self.geom, i, || Ok(self.cv(i))).map(|c| c.bytes().to_vec())
    }
}

fn cfg(dir: &Path, size: u64, force_sync: bool) -> CacheConfig {
    CacheConfig { dir: dir.to_path_buf(), size, force_sync, lend_bytes: 16 << 20 }
}

fn roundtrip(force_sync: bool) {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(5 * 65536 + 100, 1);
    {
        let s = Store::open(&cfg(d.path(), 64 << 20, force_sync)).unwrap();
        if force_sync {
            assert_eq!(s.mode(), Mode::Sync);
        }
        f.fill(&s);
        for i in 0..6 {
            assert_eq!(f.load(&s, i).as_deref(), Some(f.slice(i)), "chunk {i}");
        }
        assert!((s.fraction(&f.root, &f.geom) - 1.0).abs() < 1e-9);
        assert!(s.pin_complete(&f.root, &f.geom).is_some());
        assert_eq!(s.stats().hits.load(Ordering::Relaxed), 6);
    }
    // Reopened: replayed, and a complete file needs no network for its leaf values.
    let s = Store::open(&cfg(d.path(), 64 << 20, force_sync)).unwrap();
    for i in 0..6 {
        let got = s.load(&f.root, &f.geom, i, || Err(Error::RemoteTimeout)).map(|c| c.bytes().to_vec());
        assert_eq!(got.as_deref(), Some(f.slice(i)), "chunk {i} after reopen");
    }
    let meta = std::fs::metadata(data_path(d.path(), &f.root)).unwrap();
    assert_eq!(meta.len(), f.geom.size);
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777, 0o700);
}

#[test]
fn write_read_reopen_uring() {
    roundtrip(false);
}

#[test]
fn write_read_reopen_forced_pread_fallback() {
    roundtrip(true);
}

#[test]
fn single_chunk_file_is_checked_against_the_root() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(1000, 2);
    let s = Store::open(&cfg(d.path(), 1 << 20, false)).unwrap();
    f.fill(&s);
    assert_eq!(f.load(&s, 0).as_deref(), Some(&f.data[..]));
}

fn corrupt_then_check(damage: impl Fn(&Path, &TestFile)) {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(4 * 65536, 3);
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    f.fill(&s);
    damage(&data_path(d.path(), &f.root), &f);
    let mut wrong = 0;
    let mut missing = 0;
    for i in 0..4 {
        match f.load(&s, i) {
            Some(b) if b != f.slice(i) => wrong += 1,
            Some(_) => {}
            None => missing += 1,
        }
    }
    assert_eq!(wrong, 0);
    assert!(missing >= 1, "damage must be detected");
    // Dropped: the next load is a plain miss, and a refill is served again.
    f.fill(&s);
    for i in 0..4 {
        assert_eq!(f.load(&s, i).as_deref(), Some(f.slice(i)));
    }
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    OpenOptions::new().write(true).open(p).unwrap().write_all_at(bytes, off).unwrap();
}

#[test]
fn flipped_byte_is_a_miss() {
    corrupt_then_check(|p, f| {
        let b = f.data[65536 + 10] ^ 0x40;
        patch(p, 65536 + 10, &[b]);
    });
}

#[test]
fn truncated_file_is_a_miss() {
    corrupt_then_check(|p, _| OpenOptions::new().write(true).open(p).unwrap().set_len(65536 + 5).unwrap());
}

#[test]
fn swapped_chunks_are_a_miss() {
    corrupt_then_check(|p, f| {
        patch(p, 0, f.slice(1));
        patch(p, 65536, f.slice(0));
    });
}

#[test]
fn deleted_file_is_a_miss() {
    corrupt_then_check(|p, _| std::fs::remove_file(p).unwrap());
}

#[test]
fn bounded_by_size_with_lru_eviction() {
    let d = tempfile::tempdir().unwrap();
    let limit = 3 * 65536;
    let s = Store::open(&cfg(d.path(), limit, false)).unwrap();
    let files: Vec<TestFile> = (0..4).map(|k| TestFile::new(2 * 65536, 10 + k)).collect();
    for f in &files {
        f.fill(&s);
        let (_, used, _) = s.usage();
        assert!(used <= limit);
    }
    assert!(s.stats().evictions.load(Ordering::Relaxed) >= 5);
    // The newest file is whole, the oldest ones are gone (their data files deleted).
    assert_eq!(f_load_all(&files[3], &s), 2);
    assert!(!data_path(d.path(), &files[0].root).exists());
    let on_disk: u64 = walk(&d.path().join("data")).iter().map(|p| std::fs::metadata(p).unwrap().blocks() * 512).sum();
    assert!(on_disk <= limit + 65536, "{on_disk} bytes allocated on disk");
}

fn f_load_all(f: &TestFile, s: &Store) -> usize {
    (0..f.geom.n_chunks()).filter(|&i| f.load(s, i).as_deref() == Some(f.slice(i))).count()
}

fn walk(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

#[test]
fn pinned_files_are_not_evicted() {
    let d = tempfile::tempdir().unwrap();
    let s = Store::open(&cfg(d.path(), 2 * COST, false)).unwrap();
    let a = TestFile::new(2 * 65536, 20);
    let b = TestFile::new(2 * 65536, 21);
    a.fill(&s);
    let pin = s.pin_complete(&a.root, &a.geom).unwrap();
    b.fill(&s);
    assert_eq!(f_load_all(&a, &s), 2);
    assert_eq!(f_load_all(&b, &s), 0);
    drop(pin);
    b.fill(&s);
    assert_eq!(f_load_all(&b, &s), 2);
}

#[test]
fn second_user_of_a_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let _s = Store::open(&cfg(d.path(), 1 << 20, false)).unwrap();
    let e = Store::open(&cfg(d.path(), 1 << 20, false)).err().unwrap();
    assert!(e.contains("in use"), "{e}");
}

#[test]
fn foreign_journal_starts_empty_and_unknown_files_go() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(2 * 65536, 30);
    {
        let s = Store::open(&cfg(d.path(), 1 << 20, false)).unwrap();
        f.fill(&s);
    }
    std::fs::write(d.path().join("journal"), b"not a wraith journal at all, not at all, no no no no no no no no no").unwrap();
    let s = Store::open(&cfg(d.path(), 1 << 20, false)).unwrap();
    assert_eq!(s.usage().0, 0);
    assert!(!data_path(d.path(), &f.root).exists());
}

#[test]
fn unrecorded_write_is_released_at_start() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(40 * 65536, 31);
    {
        let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
        f.fill(&s);
    }
    // As if the process died after the writes but before the records: an empty journal.
    std::fs::write(d.path().join("journal"), layout::encode_header()).unwrap();
    let p = data_path(d.path(), &f.root);
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    assert_eq!(s.usage().0, 0);
    assert!(!p.exists() || std::fs::metadata(&p).unwrap().blocks() == 0);
}

/// 100,000 recorded chunks are replayed (and the journal compacted) in well under a second.
#[test]
fn replay_of_100k_chunks_is_fast() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("data")).unwrap();
    let mut j = layout::encode_header().to_vec();
    let per_file = 1000u64;
    for k in 0..100u32 {
        let root = *blake3::hash(&k.to_le_bytes()).as_bytes();
        let size = per_file << LOG2;
        for idx in 0..per_file {
            let r = Record::Present { root, idx, size, chunk_log2: LOG2, len: 1 << LOG2, cv: [k as u8; 32] };
            j.extend_from_slice(&r.encode());
        }
        let p = data_path(d.path(), &root);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        File::create(&p).unwrap().set_len(size).unwrap();
    }
    std::fs::write(d.path().join("journal"), &j).unwrap();
    let s = Store::open(&cfg(d.path(), 1 << 40, false)).unwrap();
    assert_eq!(s.usage().0, 100_000);
    eprintln!("replayed 100000 chunks in {:?}", s.replay_time);
    assert!(s.replay_time < Duration::from_secs(1), "{:?}", s.replay_time);
}

#[test]
fn load_many_verifies_each_and_misses_what_is_absent_or_damaged() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(6 * 65536 + 7, 9);
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    for i in [0, 1, 2, 4, 5] {
        s.admit(&f.root, &f.geom, f.cv(i), &f.chunk(i));
    }
    s.flush();
    // Damage chunk 4 on disk.
    {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new().write(true).open(data_path(d.path(), &f.root)).unwrap();
        file.write_all_at(b"xx", f.geom.chunk_offset(4) + 10).unwrap();
    }
    let sqes_before = s.io_stats().sqes;
    let mut got = Vec::new();
    s.load_many(&f.root, &f.geom, &[0, 1, 2, 3, 4, 5], |i| Ok(f.cv(i)), |i, c| got.push((i, c)));
    assert_eq!(got.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [0, 1, 2, 3, 4, 5], "each chunk once, in order");
    for (idx, c) in got {
        match idx {
            3 => assert!(c.is_none(), "absent chunk is a miss"),
            4 => assert!(c.is_none(), "damaged chunk is a miss"),
            _ => assert_eq!(c.unwrap().bytes(), f.slice(idx), "chunk {idx}"),
        }
    }
    if s.mode() == Mode::Uring {
        assert_eq!(s.io_stats().sqes - sqes_before, 5, "five reads submitted");
        assert!(s.io_stats().max_batch >= 5, "together");
    }
    assert!(!s.contains(&f.root, 4), "the damaged entry was dropped");
}

#[test]
fn a_span_of_pieces_is_read_alone_and_verified() {
    let d = tempfile::tempdir().unwrap();
    // 64 KiB chunks: four 16 KiB pieces each; the last chunk is 10,000 bytes (one short piece).
    let f = TestFile::new(3 * 65536 + 10_000, 4);
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    f.fill(&s);
    let whole = s.load(&f.root, &f.geom, 1, || Ok(f.cv(1))).unwrap();
    let pieces = whole.pieces().unwrap().clone();
    assert_eq!(pieces.len(), 4);
    let span = s.load_span(&f.root, &f.geom, &pieces, 1, 2).unwrap();
    assert_eq!(span.offset(), 65536 + 16384);
    assert_eq!(span.bytes(), &f.slice(1)[16384..49152]);
    let before = s.io_stats().sqes;
    let last = s.load(&f.root, &f.geom, 3, || Ok(f.cv(3))).unwrap();
    let lp = last.pieces().unwrap().clone();
    assert_eq!(s.load_span(&f.root, &f.geom, &lp, 0, 1).unwrap().bytes(), f.slice(3));
    assert!(s.io_stats().sqes > before);
    // Damage piece 3 of chunk 1: piece 0 still reads; piece 3 is a miss and drops the chunk.
    {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new().write(true).open(data_path(d.path(), &f.root)).unwrap();
        file.write_all_at(b"zz", 65536 + 3 * 16384 + 5).unwrap();
    }
    assert_eq!(s.load_span(&f.root, &f.geom, &pieces, 0, 1).unwrap().bytes(), &f.slice(1)[..16384]);
    assert!(s.load_span(&f.root, &f.geom, &pieces, 3, 1).is_none());
    assert!(!s.contains(&f.root, 1), "the damaged chunk was dropped");
    assert_eq!(s.stats().span_reads.load(Ordering::Relaxed), 3);
}

#[test]
fn a_block_of_a_piece_read_before_is_read_alone_and_verified() {
    block_reads(false);
}

#[test]
fn a_block_read_alone_with_the_forced_pread_fallback() {
    block_reads(true);
}

fn block_reads(force_sync: bool) {
    let d = tempfile::tempdir().unwrap();
    // 64 KiB chunks; the last is 10,000 bytes: one short piece of three blocks, the last short.
    let f = TestFile::new(3 * 65536 + 10_000, 6);
    let s = Store::open(&cfg(d.path(), 64 << 20, force_sync)).unwrap();
    if force_sync {
        assert_eq!(s.mode(), Mode::Sync);
    }
    f.fill(&s);
    let pieces = s.load(&f.root, &f.geom, 1, || Ok(f.cv(1))).unwrap().pieces().unwrap().clone();
    let span = s.load_span(&f.root, &f.geom, &pieces, 2, 2).unwrap();
    let blocks = span.block_cvs();
    assert_eq!(blocks.iter().map(|b| (b.chunk(), b.piece())).collect::<Vec<_>>(), [(1, 2), (1, 3)]);
    let from_cache = |s: &Store| s.stats().bytes_from_cache.load(Ordering::Relaxed);
    let before = from_cache(&s);
    let one = s.load_blocks(&f.root, &f.geom, &blocks[0], 1, 1).unwrap();
    assert_eq!(one.offset(), 65536 + 2 * 16384 + 4096);
    assert_eq!(one.bytes(), &f.slice(1)[2 * 16384 + 4096..2 * 16384 + 8192]);
    assert_eq!(from_cache(&s) - before, 4096, "one block read, not the piece");
    let three = s.load_blocks(&f.root, &f.geom, &blocks[1], 1, 3).unwrap();
    assert_eq!(three.bytes(), &f.slice(1)[3 * 16384 + 4096..]);
    assert!(s.load_blocks(&f.root, &f.geom, &blocks[1], 2, 3).is_none(), "past the piece");
    assert!(s.load_blocks(&f.root, &f.geom, &blocks[0], 3, 2).is_none(), "past the piece, in the chunk");
    assert!(s.contains(&f.root, 1), "a miss, not damage");
    // The short last piece: its blocks are 4096, 4096 and 1,808 bytes.
    let lp = s.load(&f.root, &f.geom, 3, || Ok(f.cv(3))).unwrap().pieces().unwrap().clone();
    let tail = s.load_span(&f.root, &f.geom, &lp, 0, 1).unwrap().block_cvs()[0];
    assert_eq!(s.load_blocks(&f.root, &f.geom, &tail, 2, 1).unwrap().bytes(), &f.slice(3)[8192..]);
    assert_eq!(s.load_blocks(&f.root, &f.geom, &tail, 0, 3).unwrap().bytes(), f.slice(3));
    assert_eq!(s.stats().block_reads.load(Ordering::Relaxed), 4);
    // Damage block 0 of piece 2 of chunk 1: block 1 still reads; block 0 is a miss and drops the chunk.
    {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new().write(true).open(data_path(d.path(), &f.root)).unwrap();
        file.write_all_at(b"zz", 65536 + 2 * 16384 + 100).unwrap();
    }
    assert_eq!(s.load_blocks(&f.root, &f.geom, &blocks[0], 1, 1).unwrap().bytes(), one.bytes());
    let failures = s.stats().verify_failures.load(Ordering::Relaxed);
    assert!(s.load_blocks(&f.root, &f.geom, &blocks[0], 0, 1).is_none());
    assert_eq!(s.stats().verify_failures.load(Ordering::Relaxed), failures + 1);
    assert!(!s.contains(&f.root, 1), "the damaged chunk was dropped");
    assert!(s.load_blocks(&f.root, &f.geom, &blocks[0], 1, 1).is_none(), "and is a miss now");
}

#[test]
fn piece_values_are_stored_beside_the_data_and_survive_a_reopen() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(3 * 65536 + 10_000, 5);
    {
        let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
        f.fill(&s);
    }
    let pcv = layout::pieces_path(d.path(), &f.root);
    assert!(pcv.exists(), "written with the data");
    // A stray pieces file of an unknown version is removed at start.
    let stray = layout::pieces_path(d.path(), &[7; 32]);
    std::fs::create_dir_all(stray.parent().unwrap()).unwrap();
    std::fs::write(&stray, b"x").unwrap();
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    assert!(!stray.exists());
    assert!(pcv.exists(), "kept for a known version");
    for i in 0..4 {
        let p = s.stored_pieces(&f.root, &f.geom, i).expect("stored and proven");
        let span = s.load_span(&f.root, &f.geom, &p, 0, 1).unwrap();
        assert_eq!(span.bytes(), &f.slice(i)[..f.slice(i).len().min(16384)]);
    }
    // Damaged values are refused (the caller reads the whole chunk instead).
    {
        use std::os::unix::fs::FileExt;
        let file = OpenOptions::new().write(true).open(&pcv).unwrap();
        file.write_all_at(b"zz", layout::pieces_offset(LOG2, 2) + 3).unwrap();
    }
    assert!(s.stored_pieces(&f.root, &f.geom, 2).is_none());
    assert!(s.stored_pieces(&f.root, &f.geom, 1).is_some());
}

/// Bytes the pieces file of `f` holds on disk.
fn pieces_allocated(d: &Path, f: &TestFile) -> u64 {
    std::fs::metadata(layout::pieces_path(d, &f.root)).map_or(0, |m| m.blocks() * 512)
}

/// A file streamed through a cache much smaller than it keeps the piece values of the chunks the
/// cache holds, not of every chunk it ever held; and a pieces file left holding values of
/// chunks no longer recorded (a smaller cache_size at the next start) is trimmed at start.
#[test]
fn piece_values_of_evicted_chunks_are_released() {
    let d = tempfile::tempdir().unwrap();
    // 1,024 chunks of 64 KiB: 128 bytes of values each, 128 KiB in all.
    let f = TestFile::new(64 << 20, 9);
    {
        let s = Store::open(&cfg(d.path(), 4 << 20, false)).unwrap();
        f.fill(&s);
        let held = s.shared.index.lock().unwrap().chunks() as u64;
        assert!(held <= 64, "{held} chunks held in a 4 MiB cache");
        let got = pieces_allocated(d.path(), &f);
        let want = value_blocks(&s, &f);
        assert!(got <= want + 8192, "{got} bytes of piece values kept for {held} chunks, whose values lie in {want}");
        assert_values_of_held_chunks_intact(d.path(), &s, &f);
    }
    let g = TestFile::new(64 << 20, 10);
    {
        let s = Store::open(&cfg(d.path(), 256 << 20, false)).unwrap();
        g.fill(&s);
    }
    assert!(pieces_allocated(d.path(), &g) >= 128 << 10);
    let s = Store::open(&cfg(d.path(), 4 << 20, false)).unwrap();
    let got = pieces_allocated(d.path(), &g);
    let want = value_blocks(&s, &g);
    assert!(got <= want + 8192, "{got} bytes of piece values kept after the start trimmed the cache, {want} in use");
    assert_values_of_held_chunks_intact(d.path(), &s, &g);
}

/// Bytes of the 4 KiB blocks the values of `f`'s held chunks lie in.
fn value_blocks(s: &Store, f: &TestFile) -> u64 {
    let blocks: HashSet<u64> = (0..f.geom.n_chunks()).filter(|&i| s.contains(&f.root, i)).map(|i| layout::pieces_offset(LOG2, i) / 4096).collect();
    blocks.len() as u64 * 4096
}

fn assert_values_of_held_chunks_intact(d: &Path, s: &Store, f: &TestFile) {
    use std::os::unix::fs::FileExt;
    let file = File::open(layout::pieces_path(d, &f.root)).unwrap();
    let mut held = 0;
    for i in (0..f.geom.n_chunks()).filter(|&i| s.contains(&f.root, i)) {
        let want = f.chunk(i).pieces().unwrap().to_bytes();
        let mut got = vec![0; want.len()];
        file.read_exact_at(&mut got, layout::pieces_offset(LOG2, i)).unwrap();
        assert_eq!(got, want, "values of chunk {i}, still held");
        held += 1;
    }
    assert!(held >= 32, "{held} chunks held");
}

/// Bytes the data file of `f` holds on disk.
fn allocated(d: &Path, f: &TestFile) -> u64 {
    std::fs::metadata(data_path(d, &f.root)).unwrap().blocks() * 512
}

/// The data file of `f` holds `want` bytes of data, and at most [`FS_OWN_BLOCKS`] more.
fn assert_allocated(d: &Path, f: &TestFile, want: u64) {
    let got = allocated(d, f);
    assert!((want..=want + FS_OWN_BLOCKS).contains(&got), "{got} bytes allocated, want {want} (+ at most {FS_OWN_BLOCKS} of the filesystem's own)");
}

#[test]
fn a_file_filled_in_order_is_allocated_in_groups_and_unused_room_is_given_back() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(24 << 20, 3); // 384 chunks of 64 KiB: three 8 MiB groups
    {
        let s = Store::open(&cfg(d.path(), 256 << 20, false)).unwrap();
        assert!(s.shared.direct, "the test directory takes O_DIRECT writes");
        f.fill(&s);
        assert!(s.stats().prealloc_groups.load(Ordering::Relaxed) >= 2, "{}", s.describe());
        assert_allocated(d.path(), &f, 24 << 20);
        for i in [0, 100, 383] {
            assert_eq!(f.load(&s, i).as_deref(), Some(f.slice(i)), "chunk {i}");
        }
    }
    // Only the first 20 chunks of another file: its first group is allocated whole (spare room,
    // counted), and what holds no chunk is given back when the cache stops.
    let g = TestFile::new(24 << 20, 4);
    {
        let s = Store::open(&cfg(d.path(), 256 << 20, false)).unwrap();
        for i in 0..20 {
            s.admit(&g.root, &g.geom, g.cv(i), &g.chunk(i));
        }
        s.flush();
        assert!(s.describe().lines().any(|l| l.starts_with("cache_spare_bytes ") && l != "cache_spare_bytes 0"), "{}", s.describe());
        assert!(allocated(d.path(), &g) >= 8 << 20);
    }
    assert_allocated(d.path(), &g, 20 * 65536);
    let s = Store::open(&cfg(d.path(), 256 << 20, false)).unwrap();
    for i in [0, 19] {
        assert_eq!(g.load(&s, i).as_deref(), Some(g.slice(i)), "chunk {i} after reopen");
    }
    assert_eq!(f.load(&s, 200).as_deref(), Some(f.slice(200)));
}

/// A crash while a file was allocated ahead leaves its group's unwritten slots allocated (the
/// writer gives them back only when it stops). The next start gives back every whole chunk of
/// that room, not only more than 1 MiB of it.
#[test]
fn room_a_crash_left_allocated_is_given_back_at_start() {
    let d = tempfile::tempdir().unwrap();
    let g = TestFile::new(24 << 20, 5); // 64 KiB chunks
    {
        let s = Store::open(&cfg(d.path(), 256 << 20, false)).unwrap();
        for i in 0..20 {
            s.admit(&g.root, &g.geom, g.cv(i), &g.chunk(i));
        }
        s.flush();
    }
    assert_allocated(d.path(), &g, 20 * 65536);
    // What the crash left: four slots after the last chunk written, allocated but never written.
    let f = OpenOptions::new().write(true).open(data_path(d.path(), &g.root)).unwrap();
    crate::sys::disk::allocate(&f, 20 * 65536, 4 * 65536).unwrap();
    drop(f);
    assert!(allocated(d.path(), &g) >= 24 * 65536);
    let s = Store::open(&cfg(d.path(), 256 << 20, false)).unwrap();
    assert_allocated(d.path(), &g, 20 * 65536);
    for i in [0, 19] {
        assert_eq!(g.load(&s, i).as_deref(), Some(g.slice(i)), "chunk {i} after the start");
    }
    assert_eq!(g.load(&s, 20), None);
}

/// Evicting a chunk smaller than the disk's alignment releases that chunk's bytes only: its
/// neighbours, still indexed as verified, keep their data (a punch rounded up to the alignment
/// zeroed them, and a complete file could then reach the kernel through passthrough unchecked).
#[test]
fn evicting_a_chunk_smaller_than_the_alignment_keeps_its_neighbours() {
    // tmpfs aligns to a page whatever its O_DIRECT support; the root disk here aligns to 512.
    let d = tempfile::tempdir_in("/dev/shm").unwrap();
    let size = 16 * 1024;
    let geom = Geometry::new(size, 10).unwrap();
    let data: Vec<u8> = (0..size).map(|i| (i as u8).wrapping_mul(7) ^ (i >> 10) as u8).collect();
    let root = *blake3::hash(&data).as_bytes();
    let f = TestFile { geom, data, root };
    let probe = Store::open(&cfg(d.path(), 1 << 20, false)).unwrap();
    let align = probe.shared.align;
    drop(probe);
    assert!(align > 1024, "the test needs an alignment above 1 KiB, /dev/shm has {align}");
    // Room for 15 chunks: admitting the 16th evicts chunk 0, the least recently used.
    let s = Store::open(&cfg(d.path(), 15 * align, false)).unwrap();
    for i in 0..15 {
        s.admit(&f.root, &f.geom, f.cv(i), &f.chunk(i));
    }
    s.flush();
    s.admit(&f.root, &f.geom, f.cv(15), &f.chunk(15));
    s.flush();
    assert_eq!(s.stats().evictions.load(Ordering::Relaxed), 1);
    assert_eq!(f.load(&s, 0), None);
    let lost: Vec<u64> = (1..16).filter(|&i| f.load(&s, i).as_deref() != Some(f.slice(i))).collect();
    assert!(lost.is_empty(), "chunks {lost:?} lost their data when chunk 0 was evicted");
    assert_eq!(s.stats().verify_failures.load(Ordering::Relaxed), 0);
}

/// A damaged chunk of a file pinned for passthrough leaves the index (wraith's reads fetch it
/// again) but its bytes stay: the kernel reads that file unasked, and a hole would give it zeros.
/// Unpinned, the damaged chunk's bytes are released as usual.
#[test]
fn a_damaged_chunk_of_a_pinned_file_is_forgotten_but_not_punched() {
    use std::os::unix::fs::FileExt;
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(4 * 65536, 31);
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    f.fill(&s);
    let p = data_path(d.path(), &f.root);
    let pin = s.pin_complete(&f.root, &f.geom).unwrap();
    let flipped = f.data[65536 + 10] ^ 0x40;
    patch(&p, 65536 + 10, &[flipped]);
    assert_eq!(f.load(&s, 1), None);
    s.flush();
    let mut on_disk = vec![0u8; 65536];
    File::open(&p).unwrap().read_exact_at(&mut on_disk, 65536).unwrap();
    let mut want = f.slice(1).to_vec();
    want[10] = flipped;
    assert!(on_disk == want, "a pinned file's damaged chunk was released");
    assert_eq!(allocated(d.path(), &f), 4 * 65536);
    // Fetched again, it is written over the damage.
    f.fill(&s);
    assert_eq!(f_load_all(&f, &s), 4);
    drop(pin);
    patch(&p, 65536 + 10, &[flipped]);
    assert_eq!(f.load(&s, 1), None);
    s.flush();
    assert_eq!(allocated(d.path(), &f), 3 * 65536);
}

/// An append that fails part-way (a full disk) is cut back to the last whole record: replay
/// stops at a torn record, and would lose every record appended after it.
#[test]
fn a_torn_journal_append_does_not_hide_later_records() {
    let d = tempfile::tempdir().unwrap();
    let (a, b, c) = (TestFile::new(3 * 65536, 40), TestFile::new(3 * 65536, 41), TestFile::new(3 * 65536, 42));
    {
        let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
        a.fill(&s);
        s.shared.tear_next_append.store(true, Ordering::SeqCst);
        b.fill(&s);
        assert!(!s.shared.tear_next_append.load(Ordering::SeqCst), "the append was torn");
        c.fill(&s);
    }
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    assert_eq!(f_load_all(&a, &s), 3, "recorded before the torn append");
    assert_eq!(f_load_all(&c, &s), 3, "recorded after the torn append");
    // What of b was recorded in other appends reads right; the rest is a miss.
    let kept = (0..3).filter(|&i| s.contains(&b.root, i)).count();
    assert!(kept < 3, "the torn append lost none of b's records");
    assert_eq!(f_load_all(&b, &s), kept);
}

/// Start-up releases every unrecorded run of chunks around the recorded ones (one punch per
/// run), and the recorded chunks keep their bytes.
#[test]
fn unrecorded_runs_around_recorded_chunks_are_released_at_start() {
    let d = tempfile::tempdir().unwrap();
    let f = TestFile::new(40 * 65536 + 777, 32);
    {
        let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
        f.fill(&s);
    }
    // Only chunks 10, 11 and 30 recorded: the rest was written but its records were lost.
    let mut j = layout::encode_header().to_vec();
    for i in [10, 11, 30] {
        let r = Record::Present { root: f.root, idx: i, size: f.geom.size, chunk_log2: LOG2, len: 65536, cv: f.cv(i).unwrap() };
        j.extend_from_slice(&r.encode());
    }
    std::fs::write(d.path().join("journal"), j).unwrap();
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).unwrap();
    assert_eq!(s.usage().1, 3 * COST);
    assert_allocated(d.path(), &f, 3 * 65536);
    for i in 0..f.geom.n_chunks() {
        let want = [10, 11, 30].contains(&i).then(|| f.slice(i).to_vec());
        assert_eq!(f.load(&s, i), want, "chunk {i}");
    }
}

/// A filesystem that cannot punch holes could never give evicted chunks' space back: the store
/// refuses it in one line (the mount then runs without a disk cache, as for any unusable
/// directory). The probe itself leaves nothing behind.
#[test]
fn a_filesystem_that_cannot_punch_holes_is_refused() {
    let d = tempfile::tempdir().unwrap();
    PUNCH_UNSUPPORTED.set(true);
    let r = Store::open(&cfg(d.path(), 64 << 20, false));
    PUNCH_UNSUPPORTED.set(false);
    let e = r.err().expect("a filesystem that cannot punch holes is refused");
    assert!(e.contains("cannot punch holes"), "{e}");
    let s = Store::open(&cfg(d.path(), 64 << 20, false)).expect("this one can");
    assert!(!d.path().join("data/.punch-probe").exists());
    drop(s);
}
