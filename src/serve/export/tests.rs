use super::*;
use std::io::Read;
use std::os::unix::fs::{symlink, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn spec(name: &str, path: &Path) -> ExportSpec {
    ExportSpec {
        name: name.into(),
        path: path.to_path_buf(),
        chunk_log2: DEFAULT_CHUNK_LOG2,
    }
}

/// A temp dir holding `export/` (served) and `outside/` (must never be reachable).
struct Fixture {
    tmp: tempfile::TempDir,
    ex: Exports,
}

impl Fixture {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("export")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/f"), b"SECRET").unwrap();
        let ex = Exports::new(vec![spec("data", &tmp.path().join("export"))]).unwrap();
        Fixture { tmp, ex }
    }
    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join("export").join(rel)
    }
    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }
}

fn read_all(mut f: File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn parse_spec_accepts() {
    let s = parse_export_spec("docs=/srv/docs").unwrap();
    assert_eq!(
        s,
        ExportSpec {
            name: "docs".into(),
            path: "/srv/docs".into(),
            chunk_log2: 18
        }
    );
    assert_eq!(parse_export_spec("a=/x,chunk=256K").unwrap().chunk_log2, 18);
    assert_eq!(parse_export_spec("a=/x,chunk=1K").unwrap().chunk_log2, 10);
    assert_eq!(parse_export_spec("a=/x,chunk=1m").unwrap().chunk_log2, 20);
    assert_eq!(parse_export_spec("a=/x,chunk=16M").unwrap().chunk_log2, 24);
    assert_eq!(
        parse_export_spec("a=/x,chunk=65536").unwrap().chunk_log2,
        16
    );
    assert_eq!(
        parse_export_spec("A.b_c-1=rel/dir").unwrap().path,
        PathBuf::from("rel/dir")
    );
    // Only the first '=' separates NAME from PATH.
    assert_eq!(
        parse_export_spec("a=/x=y").unwrap().path,
        PathBuf::from("/x=y")
    );
}

#[test]
fn parse_spec_rejects() {
    for bad in [
        "",
        "noequals",
        "=/x",
        "a=",
        "a=,chunk=1M",
        "a b=/x",
        "a/b=/x",
        "..=/x",
        "a=/x,chunk=3K",
        "a=/x,chunk=512",
        "a=/x,chunk=32M",
        "a=/x,chunk=",
        "a=/x,chunk=K",
        "a=/x,chunk=-1K",
        "a=/x,chunk=99999999999999999999K",
        "a=/x,foo=1",
        "a=/x,",
    ] {
        let e = parse_export_spec(bad).expect_err(bad);
        assert!(
            !e.contains('\n') && e.starts_with("export spec"),
            "{bad:?}: {e}"
        );
    }
    let long = format!("{}=/x", "n".repeat(MAX_EXPORT_NAME + 1));
    assert!(parse_export_spec(&long).is_err());
}

#[test]
fn new_reports_bad_exports() {
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("file"), b"x").unwrap();
    let e = Exports::new(vec![spec("gone", &t.path().join("missing"))]).unwrap_err();
    assert!(e.contains("\"gone\"") && e.contains("missing"), "{e}");
    let e = Exports::new(vec![spec("f", &t.path().join("file"))]).unwrap_err();
    assert!(e.contains("\"f\""), "{e}");
    let e = Exports::new(vec![spec("a", t.path()), spec("a", t.path())]).unwrap_err();
    assert!(e.contains("twice"), "{e}");
    assert!(Exports::new(vec![]).is_err());
    let mut s = spec("a", t.path());
    s.chunk_log2 = 30;
    assert!(Exports::new(vec![s]).is_err());
}

#[test]
fn shares_and_names() {
    let t = tempfile::tempdir().unwrap();
    let mut b = spec("b", t.path());
    b.chunk_log2 = 20;
    let ex = Exports::new(vec![spec("a", t.path()), b]).unwrap();
    assert_eq!(ex.names(), vec!["a".to_string(), "b".to_string()]);
    assert_eq!(ex.share("a"), Some(0));
    assert_eq!(ex.share("b"), Some(1));
    assert_eq!(ex.share("c"), None);
    assert_eq!(ex.chunk_log2(0), 18);
    assert_eq!(ex.chunk_log2(1), 20);
    assert_eq!(ex.lstat(7, b""), Err(Error::NotFound));
    assert_eq!(ex.statfs(7), Err(Error::NotFound));
}

#[test]
fn lstat_files_dirs_symlinks() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("d")).unwrap();
    std::fs::write(fx.p("d/f"), b"hello").unwrap();
    std::fs::set_permissions(
        fx.p("d/f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o4640),
    )
    .unwrap();
    symlink("f", fx.p("d/l")).unwrap();

    let root = fx.ex.lstat(0, b"").unwrap();
    assert_eq!(root.kind, FileKind::Dir);
    assert_eq!(root.ino, std::fs::metadata(fx.p("")).unwrap().ino());

    let f = fx.ex.lstat(0, b"d/f").unwrap();
    let md = std::fs::symlink_metadata(fx.p("d/f")).unwrap();
    assert_eq!(f.kind, FileKind::File);
    assert_eq!(f.perm, 0o4640);
    assert_eq!(f.size, 5);
    assert_eq!(f.nlink, 1);
    assert_eq!((f.uid, f.gid), (md.uid(), md.gid()));
    assert_eq!((f.dev, f.ino), (md.dev(), md.ino()));
    assert_eq!(f.mtime_ns, md.mtime() * 1_000_000_000 + md.mtime_nsec());
    assert_eq!(f.ctime_ns, md.ctime() * 1_000_000_000 + md.ctime_nsec());
    assert_eq!(f.blocks, md.blocks());

    assert_eq!(fx.ex.lstat(0, b"d").unwrap().kind, FileKind::Dir);
    let l = fx.ex.lstat(0, b"d/l").unwrap();
    assert_eq!(l.kind, FileKind::Symlink);
    assert_eq!(l.size, 1);
    assert_eq!(fx.ex.readlink(0, b"d/l").unwrap(), b"f");
    assert_eq!(fx.ex.lstat(0, b"d/nope"), Err(Error::NotFound));
    assert_eq!(fx.ex.lstat(0, b"d/f/x"), Err(Error::NotDir));
}

#[test]
fn escaping_symlinks_are_served_as_symlinks_only() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("sub")).unwrap();
    symlink("../../etc/passwd", fx.p("sub/up")).unwrap();
    symlink("/etc/passwd", fx.p("abs")).unwrap();
    symlink("/etc", fx.p("etc")).unwrap();
    symlink(fx.outside(), fx.p("out")).unwrap();
    symlink(fx.outside().join("f"), fx.p("outf")).unwrap();

    for (path, target) in [
        (&b"sub/up"[..], &b"../../etc/passwd"[..]),
        (b"abs", b"/etc/passwd"),
        (b"etc", b"/etc"),
    ] {
        assert_eq!(fx.ex.lstat(0, path).unwrap().kind, FileKind::Symlink);
        assert_eq!(fx.ex.readlink(0, path).unwrap(), target);
        assert_eq!(fx.ex.open_file(0, path).unwrap_err(), Error::Invalid);
    }
    assert_eq!(fx.ex.open_file(0, b"outf").unwrap_err(), Error::Invalid);
    for dir in [&b"etc"[..], b"out"] {
        let e = fx.ex.readdir(0, dir, 0, 1 << 20).unwrap_err();
        assert!(matches!(e, Error::NotDir | Error::Loop), "{e:?}");
    }
    for through in [&b"etc/passwd"[..], b"out/f"] {
        assert_eq!(fx.ex.lstat(0, through), Err(Error::Loop));
        assert_eq!(fx.ex.open_file(0, through).unwrap_err(), Error::Loop);
        assert_eq!(fx.ex.readlink(0, through), Err(Error::Loop));
    }
}

#[test]
fn path_through_symlinked_dir_inside_export_fails() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("d")).unwrap();
    std::fs::write(fx.p("d/f"), b"x").unwrap();
    symlink("d", fx.p("ld")).unwrap();
    assert_eq!(fx.ex.lstat(0, b"ld").unwrap().kind, FileKind::Symlink);
    assert_eq!(fx.ex.lstat(0, b"ld/f"), Err(Error::Loop));
    assert_eq!(fx.ex.open_file(0, b"ld/f").unwrap_err(), Error::Loop);
    let e = fx.ex.readdir(0, b"ld", 0, 4096).unwrap_err();
    assert!(matches!(e, Error::NotDir | Error::Loop), "{e:?}");
    assert_eq!(read_all(fx.ex.open_file(0, b"d/f").unwrap().0), b"x");
}

#[test]
fn malformed_paths_are_rejected() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("a")).unwrap();
    std::fs::write(fx.p("a/b"), b"x").unwrap();
    assert!(fx.ex.lstat(0, b"a/b").is_ok());
    for bad in [
        &b".."[..],
        b".",
        b"/etc",
        b"/",
        b"a//b",
        b"a/",
        b"/a/b",
        b"./a",
        b"a/./b",
        b"a/../a/b",
        b"a/..",
        b"a\0b",
    ] {
        assert_eq!(
            fx.ex.lstat(0, bad),
            Err(Error::Invalid),
            "{:?}",
            String::from_utf8_lossy(bad)
        );
        assert_eq!(fx.ex.open_file(0, bad).unwrap_err(), Error::Invalid);
        assert_eq!(fx.ex.readdir(0, bad, 0, 4096).unwrap_err(), Error::Invalid);
        assert_eq!(fx.ex.readlink(0, bad), Err(Error::Invalid));
    }
    let long = vec![b'a'; MAX_PATH + 1];
    assert_eq!(fx.ex.lstat(0, &long), Err(Error::NameTooLong));
    let long_name = vec![b'a'; MAX_NAME + 1];
    assert_eq!(fx.ex.lstat(0, &long_name), Err(Error::NameTooLong));
    assert_eq!(fx.ex.lstat(0, &vec![b'a'; MAX_NAME]), Err(Error::NotFound));
}

#[test]
fn readdir_pagination_returns_each_entry_once_in_order() {
    let fx = Fixture::new();
    let mut want: Vec<Vec<u8>> = Vec::new();
    for i in 0..57 {
        let name = match i % 4 {
            0 => format!("file {i}"),
            1 => format!("ü-日本-{i}"),
            2 => format!("{}{i}", "x".repeat(i * 3)),
            _ => format!(".hidden{i}"),
        };
        std::fs::write(fx.p(&name), name.as_bytes()).unwrap();
        want.push(name.into_bytes());
    }
    std::fs::create_dir(fx.p("zdir")).unwrap();
    symlink("/etc", fx.p("zlink")).unwrap();
    want.push(b"zdir".to_vec());
    want.push(b"zlink".to_vec());
    want.sort();

    // Everything at once.
    let (all, next) = fx.ex.readdir(0, b"", 0, usize::MAX).unwrap();
    assert_eq!(next, None);
    assert_eq!(all.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), want);
    let zlink = all.iter().find(|e| e.name == b"zlink").unwrap();
    assert_eq!(zlink.attr.kind, FileKind::Symlink);
    assert_eq!(
        all.iter().find(|e| e.name == b"zdir").unwrap().attr.kind,
        FileKind::Dir
    );
    for e in &all {
        assert_eq!(e.attr, fx.ex.lstat(0, &e.name).unwrap());
    }

    // Small pages: every entry exactly once, in order, each page within budget.
    for max in [DIRENT_OVERHEAD + 400, 300, 1000] {
        let mut got = Vec::new();
        let mut cookie = 0;
        let mut pages = 0;
        loop {
            let (page, next) = fx.ex.readdir(0, b"", cookie, max).unwrap();
            let size: usize = page.iter().map(|e| DIRENT_OVERHEAD + e.name.len()).sum();
            assert!(size <= max && !page.is_empty());
            got.extend(page.into_iter().map(|e| e.name));
            pages += 1;
            match next {
                Some(c) => cookie = c,
                None => break,
            }
        }
        assert_eq!(got, want, "max_bytes {max}");
        assert!(pages > 1);
    }

    // Past the end, and a budget too small for the next entry.
    assert_eq!(
        fx.ex.readdir(0, b"", want.len() as u64, 100).unwrap(),
        (vec![], None)
    );
    assert_eq!(
        fx.ex.readdir(0, b"", u64::MAX, 100).unwrap(),
        (vec![], None)
    );
    assert_eq!(fx.ex.readdir(0, b"", 0, 10).unwrap_err(), Error::Range);
    // Empty directory.
    std::fs::create_dir(fx.p("zdir/empty")).unwrap();
    assert_eq!(
        fx.ex.readdir(0, b"zdir/empty", 0, 10).unwrap(),
        (vec![], None)
    );
}

#[test]
fn hard_links_share_ino_and_count() {
    let fx = Fixture::new();
    std::fs::write(fx.p("a"), b"same").unwrap();
    std::fs::hard_link(fx.p("a"), fx.p("b")).unwrap();
    let a = fx.ex.lstat(0, b"a").unwrap();
    let b = fx.ex.lstat(0, b"b").unwrap();
    assert_eq!((a.nlink, b.nlink), (2, 2));
    assert_eq!((a.dev, a.ino), (b.dev, b.ino));
    let (entries, _) = fx.ex.readdir(0, b"", 0, 4096).unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].attr.ino, entries[1].attr.ino);
    assert_eq!(entries[0].attr.nlink, 2);
}

#[test]
fn utf8_and_space_names() {
    let fx = Fixture::new();
    let names = [
        "with space",
        "naïve café",
        "日本語",
        "emoji 🦀 file",
        " lead",
        "trail ",
    ];
    std::fs::create_dir(fx.p("ü dir")).unwrap();
    for n in names {
        std::fs::write(fx.p(&format!("ü dir/{n}")), n.as_bytes()).unwrap();
    }
    for n in names {
        let path = format!("ü dir/{n}");
        let (f, attr) = fx.ex.open_file(0, path.as_bytes()).unwrap();
        assert_eq!(attr.size, n.len() as u64);
        assert_eq!(read_all(f), n.as_bytes());
    }
    let (entries, next) = fx.ex.readdir(0, "ü dir".as_bytes(), 0, 1 << 16).unwrap();
    assert_eq!(next, None);
    let mut want: Vec<&[u8]> = names.iter().map(|n| n.as_bytes()).collect();
    want.sort();
    assert_eq!(
        entries
            .iter()
            .map(|e| e.name.as_slice())
            .collect::<Vec<_>>(),
        want
    );
}

#[test]
fn open_file_only_opens_regular_files() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("d")).unwrap();
    std::fs::write(fx.p("f"), b"data").unwrap();
    let st = std::process::Command::new("mkfifo")
        .arg(fx.p("fifo"))
        .status()
        .unwrap();
    assert!(st.success());
    let _sock = std::os::unix::net::UnixListener::bind(fx.p("sock")).unwrap();

    let (f, attr) = fx.ex.open_file(0, b"f").unwrap();
    assert_eq!(attr.kind, FileKind::File);
    // Reads work through std's positional read.
    let mut buf = [0u8; 2];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 2).unwrap();
    assert_eq!(&buf, b"ta");
    assert_eq!(fx.ex.open_file(0, b"d").unwrap_err(), Error::IsDir);
    assert_eq!(fx.ex.open_file(0, b"").unwrap_err(), Error::IsDir);
    // A FIFO must fail at once, not block waiting for a writer.
    assert_eq!(fx.ex.lstat(0, b"fifo").unwrap().kind, FileKind::Fifo);
    assert_eq!(fx.ex.open_file(0, b"fifo").unwrap_err(), Error::Invalid);
    assert_eq!(fx.ex.lstat(0, b"sock").unwrap().kind, FileKind::Socket);
    assert_eq!(fx.ex.open_file(0, b"sock").unwrap_err(), Error::Invalid);
    assert_eq!(fx.ex.readlink(0, b"f"), Err(Error::Invalid));
    assert_eq!(fx.ex.readlink(0, b""), Err(Error::Invalid));
    assert_eq!(fx.ex.readdir(0, b"f", 0, 4096).unwrap_err(), Error::NotDir);
    assert_eq!(fx.ex.open_file(0, b"missing").unwrap_err(), Error::NotFound);
}

#[test]
fn statfs_works() {
    let fx = Fixture::new();
    let s = fx.ex.statfs(0).unwrap();
    assert!(s.bsize > 0 && s.frsize > 0 && s.namelen >= 255);
    assert!(s.blocks >= s.bfree && s.bfree >= s.bavail);
}

/// One thread keeps swapping directory `d` (inside) with a symlink to `target_dir` (outside,
/// holding a file `name` too) while this thread resolves `d/NAME` over and over. Nothing may
/// ever come from outside the export.
fn rename_race(target_dir: &Path, name: &str) {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("d")).unwrap();
    std::fs::write(fx.p(&format!("d/{name}")), b"inside").unwrap();
    symlink(target_dir, fx.p("evil")).unwrap();
    let inside_ino = std::fs::metadata(fx.p(&format!("d/{name}"))).unwrap().ino();
    let outside_ino = std::fs::metadata(target_dir.join(name)).unwrap().ino();
    assert_ne!(inside_ino, outside_ino);

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let (d, evil, tmp) = (fx.p("d"), fx.p("evil"), fx.p("tmp"));
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                std::fs::rename(&d, &tmp).unwrap();
                std::fs::rename(&evil, &d).unwrap();
                std::fs::rename(&d, &evil).unwrap();
                std::fs::rename(&tmp, &d).unwrap();
                swaps += 1;
            }
            swaps
        })
    };

    let path = format!("d/{name}");
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..2000 {
        match fx.ex.open_file(0, path.as_bytes()) {
            Ok((f, attr)) => {
                assert_eq!(attr.ino, inside_ino);
                assert_eq!(read_all(f), b"inside");
                ok += 1;
            }
            Err(e) => {
                assert!(
                    matches!(e, Error::Loop | Error::NotFound | Error::Invalid),
                    "{e:?}"
                );
                refused += 1;
            }
        }
        if let Ok(a) = fx.ex.lstat(0, path.as_bytes()) {
            assert_eq!(a.ino, inside_ino);
        }
        if let Ok((entries, _)) = fx.ex.readdir(0, b"d", 0, 1 << 16) {
            assert!(
                entries.iter().all(|e| e.attr.ino == inside_ino),
                "{entries:?}"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    eprintln!(
        "rename race ({}): {ok} opened inside, {refused} refused, {swaps} swaps",
        target_dir.display()
    );
}

#[test]
fn rename_race_never_escapes_to_etc() {
    rename_race(Path::new("/etc"), "passwd");
}

#[test]
fn rename_race_never_escapes_to_sibling_dir() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("f"), b"SECRET").unwrap();
    rename_race(outside.path(), "f");
}

#[test]
fn a_directory_listing_is_sorted_once_and_a_change_is_seen() {
    let fx = Fixture::new();
    std::fs::create_dir(fx.p("big")).unwrap();
    for i in 0..300 {
        std::fs::write(fx.p(&format!("big/f{i:03}")), b"").unwrap();
    }
    // Changed within RACY: not kept, but listed right.
    let (all, _) = fx.ex.readdir(0, b"big", 0, usize::MAX).unwrap();
    assert_eq!(all.len(), 300);
    assert_eq!(fx.ex.listings.lock().unwrap().lru.len(), 0);
    std::thread::sleep(RACY + std::time::Duration::from_millis(100));
    // Paged: one read and sort of the directory, kept.
    let mut got = Vec::new();
    let mut cookie = 0;
    loop {
        let (page, next) = fx.ex.readdir(0, b"big", cookie, 1000).unwrap();
        got.extend(page.into_iter().map(|e| e.name));
        match next {
            Some(c) => cookie = c,
            None => break,
        }
    }
    assert_eq!(got.len(), 300);
    assert!(got.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(fx.ex.listings.lock().unwrap().lru.len(), 1);
    // A new entry changes the directory's times: the next listing has it.
    std::fs::write(fx.p("big/a-new"), b"").unwrap();
    let (all, _) = fx.ex.readdir(0, b"big", 0, usize::MAX).unwrap();
    assert_eq!(all.len(), 301);
    assert_eq!(all[0].name, b"a-new");
    // A removed one vanishes too.
    std::fs::remove_file(fx.p("big/f000")).unwrap();
    let (all, _) = fx.ex.readdir(0, b"big", 0, usize::MAX).unwrap();
    assert_eq!(all.len(), 300);
    assert!(all.iter().all(|e| e.name != b"f000"));
}
