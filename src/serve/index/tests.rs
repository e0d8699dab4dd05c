use super::*;
use std::io::Write;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3] ^ seed)
        .collect()
}

/// A file with `bytes`, opened for reading, and its version.
fn source(dir: &Path, name: &str, bytes: &[u8]) -> (Arc<File>, Version) {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let f = File::open(&path).unwrap();
    let v = version_of(&f.metadata().unwrap());
    (Arc::new(f), v)
}

fn tree_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

const LONG: Duration = Duration::from_secs(60);

#[test]
fn header_golden_bytes() {
    let h = Header {
        version: Version {
            dev: 0x0102_0304_0506_0708,
            ino: 0x1112_1314_1516_1718,
            size: 0x2122_2324_2526_2728,
            mtime_ns: -2,
            ctime_ns: 0x4142_4344_4546_4748,
        },
        chunk_log2: 18,
        n_leaves: 0x5152_5354_5556_5758,
        root: [0xAA; 32],
    };
    let golden: &[u8; 96] = b"WRAITHTR\x01\x00\x00\x00\
        \x08\x07\x06\x05\x04\x03\x02\x01\
        \x18\x17\x16\x15\x14\x13\x12\x11\
        \x28\x27\x26\x25\x24\x23\x22\x21\
        \xfe\xff\xff\xff\xff\xff\xff\xff\
        \x48\x47\x46\x45\x44\x43\x42\x41\
        \x12\
        \x58\x57\x56\x55\x54\x53\x52\x51\
        \xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\
        \xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\xaa\
        \x00\x00\x00";
    assert_eq!(&h.encode(), golden);
    assert_eq!(Header::decode(golden), Some(h));
    for (at, value) in [(0, b'X'), (8, 2), (93, 1), (95, 1)] {
        let mut bad = *golden;
        bad[at] = value;
        assert_eq!(Header::decode(&bad), None, "byte {at}");
    }
    // Layout arithmetic: 5 leaves store levels of 5, 2 and 1 CVs.
    assert_eq!(
        (level_offset(5, 0), level_offset(5, 1), level_offset(5, 2)),
        (96, 96 + 160, 96 + 224)
    );
    assert_eq!((tree_file_len(5), tree_file_len(1)), (96 + 256, 96));
}

#[test]
fn roots_are_b3sum_and_proofs_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let index = HashIndex::open(&tmp.path().join("state")).unwrap();
    let sizes = [
        0usize,
        1,
        1023,
        1024,
        1025,
        4096,
        5000,
        3 * 4096 + 1,
        100_000,
        600_000,
    ];
    for (k, size) in sizes.into_iter().enumerate() {
        let bytes = data(size, k as u8);
        let (file, v) = source(tmp.path(), &format!("f{k}"), &bytes);
        for log2 in [10u8, 12, 18] {
            let tree = index.get(file.clone(), v, log2, LONG).unwrap();
            let g = tree.geometry();
            assert_eq!((g.size, g.chunk_log2), (size as u64, log2));
            assert_eq!(tree.root(), blake3::hash(&bytes), "size {size} log2 {log2}");
            let n = g.n_chunks();
            let path = index.shared.tree_path(&(v, log2));
            assert_eq!(std::fs::metadata(&path).unwrap().len(), tree_file_len(n));
            if n == 1 {
                assert!(tree.leaves(0, 1).unwrap().is_empty());
                assert!(tree.prove(0, 1).unwrap().is_empty());
                continue;
            }
            let leaves = tree.leaves(0, u64::MAX).unwrap();
            assert_eq!(leaves.len() as u64, n);
            for (i, leaf) in leaves.iter().enumerate() {
                let at = g.chunk_offset(i as u64) as usize;
                let chunk = &bytes[at..at + g.chunk_len(i as u64)];
                assert_eq!(*leaf, chunk::chunk_cv(&g, i as u64, chunk));
            }
            for (first, count) in [(0, 1), (n - 1, 1), (0, n), (n / 2, n - n / 2), (1, n - 1)] {
                let proof = tree.prove(first, count).unwrap();
                let range = tree.leaves(first, count).unwrap();
                chunk::verify_leaves(n, first, &range, &proof, &tree.root()).unwrap();
            }
            assert_eq!(
                tree.leaves(n - 1, 10).unwrap(),
                vec![leaves[n as usize - 1]]
            );
            assert!(tree.leaves(n, 1).unwrap().is_empty());
            assert!(tree.prove(n, 1).is_err());
            assert!(tree.prove(0, 0).is_err());
        }
    }
}

#[test]
fn reload_does_not_rehash() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let bytes = data(50_000, 1);
    let (file, v) = source(tmp.path(), "f", &bytes);
    let first = HashIndex::open(&state).unwrap();
    let a = first.get(file.clone(), v, 10, LONG).unwrap();
    assert_eq!(first.shared.hashed_bytes.load(Ordering::Relaxed), 50_000);
    let again = first.get(file.clone(), v, 10, LONG).unwrap();
    assert!(Arc::ptr_eq(&a, &again));
    drop(first);
    // A new index (as after a restart) loads the persisted tree without reading the source.
    let second = HashIndex::open(&state).unwrap();
    let b = second.get(file.clone(), v, 10, Duration::ZERO).unwrap();
    assert_eq!(second.shared.hashed_bytes.load(Ordering::Relaxed), 0);
    assert_eq!(b.root(), blake3::hash(&bytes));
    assert_eq!(b.leaves(0, 100).unwrap(), a.leaves(0, 100).unwrap());
    assert_eq!(b.prove(3, 7).unwrap(), a.prove(3, 7).unwrap());
    // Another chunk size is another tree.
    second.get(file, v, 11, LONG).unwrap();
    assert_eq!(second.shared.hashed_bytes.load(Ordering::Relaxed), 50_000);
    let names = tree_files(&state);
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(names.iter().all(|p| p.extension().unwrap() == "tree"));
}

#[test]
fn bounded_open_trees_reload_from_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let index = HashIndex::with_capacity(&tmp.path().join("state"), 2).unwrap();
    let files: Vec<_> = (0..4)
        .map(|k| source(tmp.path(), &format!("f{k}"), &data(5000, k)))
        .collect();
    for (f, v) in &files {
        index.get(f.clone(), *v, 10, LONG).unwrap();
    }
    assert_eq!(lock(&index.shared.state).open.len(), 2);
    let hashed = index.shared.hashed_bytes.load(Ordering::Relaxed);
    for (k, (f, v)) in files.iter().enumerate() {
        let t = index.get(f.clone(), *v, 10, LONG).unwrap();
        assert_eq!(t.root(), blake3::hash(&data(5000, k as u8)));
    }
    assert_eq!(index.shared.hashed_bytes.load(Ordering::Relaxed), hashed);
}

#[test]
fn busy_then_ready_and_shared() {
    let tmp = tempfile::tempdir().unwrap();
    let index = Arc::new(HashIndex::open(&tmp.path().join("state")).unwrap());
    let bytes = data(16 << 20, 3);
    let (file, v) = source(tmp.path(), "big", &bytes);
    assert_eq!(
        index.get(file.clone(), v, 10, Duration::ZERO).err(),
        Some(Error::Busy)
    );
    // Callers arriving meanwhile join the same computation.
    let waiters: Vec<_> = (0..4)
        .map(|_| {
            let (index, file) = (index.clone(), file.clone());
            std::thread::spawn(move || index.get(file, v, 10, LONG).unwrap())
        })
        .collect();
    let trees: Vec<_> = waiters.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(trees.iter().all(|t| Arc::ptr_eq(t, &trees[0])));
    assert_eq!(trees[0].root(), blake3::hash(&bytes));
    assert_eq!(index.shared.hashed_bytes.load(Ordering::Relaxed), 16 << 20);
    let now = index.get(file, v, 10, Duration::ZERO).unwrap();
    assert!(Arc::ptr_eq(&now, &trees[0]));
    let st = lock(&index.shared.state);
    assert!(st.pending.is_empty() && st.queue.is_empty());
}

#[test]
fn stale_versions_persist_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let index = HashIndex::open(&state).unwrap();
    let (file, v) = source(tmp.path(), "f", &data(10_000, 4));
    for wrong in [
        Version {
            mtime_ns: v.mtime_ns + 1,
            ..v
        },
        Version {
            ctime_ns: v.ctime_ns - 1,
            ..v
        },
        Version {
            size: v.size + 1,
            ..v
        },
    ] {
        assert_eq!(
            index.get(file.clone(), wrong, 10, LONG).err(),
            Some(Error::Stale)
        );
    }
    assert!(tree_files(&state).is_empty());
    assert_eq!(
        index.get(file.clone(), v, 9, LONG).err(),
        Some(Error::Invalid)
    );
    assert_eq!(
        index.get(file.clone(), v, 25, LONG).err(),
        Some(Error::Invalid)
    );

    // A file that changes while it is being hashed.
    let bytes = data(16 << 20, 5);
    let (big, bv) = source(tmp.path(), "big", &bytes);
    assert_eq!(
        index.get(big.clone(), bv, 10, Duration::ZERO).err(),
        Some(Error::Busy)
    );
    let mut w = OpenOptions::new()
        .append(true)
        .open(tmp.path().join("big"))
        .unwrap();
    w.write_all(b"more").unwrap();
    assert_eq!(
        index.get(big.clone(), bv, 10, LONG).err(),
        Some(Error::Stale)
    );
    // The running job may have ended with Stale before that call; either way nothing was kept.
    while !lock(&index.shared.state).pending.is_empty() {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(tree_files(&state).is_empty(), "{:?}", tree_files(&state));
    // And a file asked about while it is current is fine afterwards.
    assert!(index.get(file, v, 10, LONG).is_ok());
}

#[test]
fn stale_when_file_shrinks_during_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let index = HashIndex::open(&state).unwrap();
    let (big, bv) = source(tmp.path(), "big", &data(16 << 20, 6));
    let job = Job {
        key: (bv, 10),
        file: big.clone(),
        done: Mutex::new(None),
        cond: Condvar::new(),
    };
    OpenOptions::new()
        .write(true)
        .open(tmp.path().join("big"))
        .unwrap()
        .set_len(1000)
        .unwrap();
    let path = index.shared.tree_path(&job.key);
    assert_eq!(index.shared.build(&job, &path).err(), Some(Error::Stale));
    assert!(tree_files(&state).is_empty());
}

#[test]
fn damaged_tree_files_are_rebuilt() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let bytes = data(70_000, 7);
    let (file, v) = source(tmp.path(), "f", &bytes);
    HashIndex::open(&state)
        .unwrap()
        .get(file.clone(), v, 10, LONG)
        .unwrap();
    let path = HashIndex::open(&state).unwrap().shared.tree_path(&(v, 10));
    let good = std::fs::read(&path).unwrap();
    // 69 leaves; the top stored node (leaves 0..64) is the root's left child.
    let damages: [fn(&mut Vec<u8>); 10] = [
        |b| b.truncate(b.len() - 1),
        |b| b.truncate(50),
        |b| b.clear(),
        |b| b[0] ^= 1,
        |b| b[8] = 2,
        |b| b[20] ^= 1,
        |b| b[70] ^= 1,
        |b| b.push(0),
        |b| b[level_offset(69, chunk::n_levels(69) - 1) as usize] ^= 1,
        |b| *b = b"not a tree at all".to_vec(),
    ];
    for damage in damages {
        let mut b = good.clone();
        damage(&mut b);
        std::fs::write(&path, &b).unwrap();
        let index = HashIndex::open(&state).unwrap();
        let tree = index.get(file.clone(), v, 10, LONG).unwrap();
        assert_eq!(tree.root(), blake3::hash(&bytes));
        assert_eq!(
            index.shared.hashed_bytes.load(Ordering::Relaxed),
            70_000,
            "not rebuilt"
        );
        assert_eq!(std::fs::read(&path).unwrap(), good);
    }
}

#[test]
fn state_dir_and_temp_files() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("a/b/state");
    HashIndex::open(&state).unwrap();
    let mode = std::fs::metadata(&state).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    // A dead writer's temp file goes; ours, a live one's and other files stay.
    let dead = state.join(format!("x.tree.{}.0.tmp", u32::MAX - 1));
    let live = state.join(format!("x.tree.{}.0.tmp", std::process::id()));
    let other = state.join("notes.txt");
    for p in [&dead, &live, &other] {
        std::fs::write(p, b"x").unwrap();
    }
    HashIndex::open(&state).unwrap();
    assert!(!dead.exists() && live.exists() && other.exists());
    // Names are deterministic per (version, chunk_log2).
    let v = Version {
        dev: 1,
        ino: 2,
        size: 3,
        mtime_ns: 4,
        ctime_ns: 5,
    };
    assert_eq!(key_name(&(v, 10)), key_name(&(v, 10)));
    assert_ne!(key_name(&(v, 10)), key_name(&(v, 11)));
    assert_eq!(key_name(&(v, 10)).len(), 64);
}

#[test]
fn more_jobs_than_workers() {
    let tmp = tempfile::tempdir().unwrap();
    let index = HashIndex::open(&tmp.path().join("state")).unwrap();
    let files: Vec<_> = (0..12)
        .map(|k| source(tmp.path(), &format!("f{k}"), &data(300_000 + k as usize, k)))
        .collect();
    for (f, v) in &files {
        match index.get(f.clone(), *v, 10, Duration::ZERO) {
            Ok(_) | Err(Error::Busy) => {}
            Err(e) => panic!("{e}"),
        }
    }
    assert!(lock(&index.shared.state).workers <= index.shared.max_workers);
    for (k, (f, v)) in files.iter().enumerate() {
        let t = index.get(f.clone(), *v, 10, LONG).unwrap();
        assert_eq!(t.root(), blake3::hash(&data(300_000 + k, k as u8)));
    }
    // Idle workers exit.
    let deadline = Instant::now() + LONG;
    while lock(&index.shared.state).workers > 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    let hashed: u64 = (0..12).map(|k| 300_000 + k).sum();
    assert_eq!(index.shared.hashed_bytes.load(Ordering::Relaxed), hashed);
}

/// Rewrite the file behind `path` in place (same inode, new size/mtime/ctime) and give its new
/// version.
fn rewrite(path: &Path, bytes: &[u8]) -> (Arc<File>, Version) {
    std::thread::sleep(Duration::from_millis(20)); // a later ctime, whatever the clock's grain
    std::fs::OpenOptions::new().write(true).truncate(true).open(path).unwrap().write_all(bytes).unwrap();
    let f = File::open(path).unwrap();
    let v = version_of(&f.metadata().unwrap());
    (Arc::new(f), v)
}

#[test]
fn trees_of_superseded_versions_are_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let index = HashIndex::open(&state).unwrap();
    let (f1, v1) = source(tmp.path(), "f", &data(50_000, 1));
    let (g, vg) = source(tmp.path(), "g", &data(30_000, 2));
    index.get(f1, v1, 10, LONG).unwrap();
    index.get(g.clone(), vg, 10, LONG).unwrap();
    index.get(g.clone(), vg, 11, LONG).unwrap(); // another chunk size: its own tree, kept
    assert_eq!(tree_files(&state).len(), 3);
    let old = index.shared.tree_path(&(v1, 10));
    let saved = std::fs::read(&old).unwrap();
    // The file changes (same inode): serving the new version removes the old tree.
    let (f2, v2) = rewrite(&tmp.path().join("f"), &data(60_000, 3));
    assert_eq!((v2.dev, v2.ino), (v1.dev, v1.ino));
    index.get(f2.clone(), v2, 10, LONG).unwrap();
    assert!(!old.exists(), "the superseded tree is gone");
    assert_eq!(tree_files(&state).len(), 3);
    assert_eq!(index.collected(), 1);
    drop(index);
    // An old tree left behind (say, by a server that stopped first) goes at the next start's
    // scan; the current ones stay and load without rehashing.
    std::fs::write(&old, &saved).unwrap();
    std::fs::write(state.join("foreign.tree"), b"not a tree").unwrap();
    let index = HashIndex::open(&state).unwrap();
    assert_eq!(index.collect_stale(), 1);
    assert!(!old.exists());
    assert!(state.join("foreign.tree").exists(), "what it cannot read it leaves to `load`");
    let t = index.get(f2, v2, 10, Duration::ZERO).unwrap();
    assert_eq!(t.root(), blake3::hash(&data(60_000, 3)));
    index.get(g, vg, 11, Duration::ZERO).unwrap();
    assert_eq!(index.shared.hashed_bytes.load(Ordering::Relaxed), 0, "nothing rehashed");
    // A second scan finds nothing more.
    assert_eq!(index.collect_stale(), 0);
    // A slow job for the old version finishing late changes nothing: the newer tree stays.
    index.shared.supersede(&(v1, 10));
    assert!(index.shared.tree_path(&(v2, 10)).exists());
    assert_eq!(index.collect_stale(), 0);
    assert!(index.shared.tree_path(&(v2, 10)).exists());
}

/// While as many callers wait for hashing as may, a version not hashed yet is answered BUSY at
/// once instead of holding one more caller (a server worker) for the whole wait; with a place
/// free the caller waits for the tree; a known tree needs no place. Places are given back.
#[test]
fn only_so_many_callers_wait_for_hashing() {
    let tmp = tempfile::tempdir().unwrap();
    let index = HashIndex::open(&tmp.path().join("state")).unwrap();
    index.set_max_waiters(2);
    let [a, b] = ["a", "b"].map(|name| {
        let p = tmp.path().join(name);
        File::create(&p).unwrap().set_len(64 << 20).unwrap();
        let f = File::open(&p).unwrap();
        let v = version_of(&f.metadata().unwrap());
        (Arc::new(f), v)
    });
    let wait = Duration::from_millis(1500);
    let waiters = &index.shared.waiters;
    // Two callers are waiting already.
    waiters.store(2, Ordering::Relaxed);
    let t0 = Instant::now();
    assert!(matches!(index.get(a.0.clone(), a.1, 18, wait), Err(Error::Busy)), "the third waiter is told BUSY");
    assert!(t0.elapsed() < Duration::from_millis(500), "at once: {:?}", t0.elapsed());
    assert_eq!(waiters.load(Ordering::Relaxed), 2, "its place is given back");
    // One of them is done: the next one waits for its tree.
    waiters.store(1, Ordering::Relaxed);
    assert!(index.get(b.0.clone(), b.1, 18, wait).is_ok(), "a waiter with a place gets the tree");
    assert_eq!(waiters.load(Ordering::Relaxed), 1);
    // The version answered BUSY was hashed meanwhile; a known tree needs no place.
    waiters.store(0, Ordering::Relaxed);
    assert_eq!(index.get(a.0.clone(), a.1, 18, LONG).unwrap().geom.size, 64 << 20);
    waiters.store(2, Ordering::Relaxed);
    assert!(index.get(a.0.clone(), a.1, 18, wait).is_ok(), "a known tree is answered with every place taken");
    assert_eq!(waiters.load(Ordering::Relaxed), 2);
}

/// Versions waiting to be hashed are bounded (each holds its file open): past the bound, a new
/// one is answered BUSY without being queued, and is hashed once asked again with room.
#[test]
fn pending_hashes_are_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let mut index = HashIndex::open(&tmp.path().join("state")).unwrap();
    Arc::get_mut(&mut index.shared).unwrap().max_pending = 2;
    let files: Vec<_> = (0..12u64)
        .map(|k| {
            let p = tmp.path().join(format!("sparse{k}"));
            let f = File::create(&p).unwrap();
            f.set_len((64 << 20) + k).unwrap();
            let f = File::open(&p).unwrap();
            let v = version_of(&f.metadata().unwrap());
            (Arc::new(f), v)
        })
        .collect();
    let mut most = 0;
    for (f, v) in &files {
        match index.get(f.clone(), *v, 10, Duration::ZERO) {
            Ok(_) | Err(Error::Busy) => {}
            Err(e) => panic!("{e}"),
        }
        most = most.max(lock(&index.shared.state).pending.len());
    }
    assert!(most <= 2, "{most} versions pending");
    for (f, v) in &files {
        let deadline = Instant::now() + LONG;
        loop {
            match index.get(f.clone(), *v, 10, Duration::from_millis(50)) {
                Ok(t) => break assert_eq!(t.geom.size, v.size),
                Err(Error::Busy) => assert!(Instant::now() < deadline, "still busy"),
                Err(e) => panic!("{e}"),
            }
        }
    }
}
