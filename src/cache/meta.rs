//! What a mount last knew about its share's names, kept in the cache directory so that a mount
//! made while the server is down can still reach the files whose chunks are on disk.
//!
//! ```text
//! <dir>/meta/<id>      one file per mount identity (server address and remote spec)
//!
//! magic "WRAITHMD" | u32 version | u32 record count | records | [32] BLAKE3 of all bytes before
//! record: u8 tag | u32 path length | path | u32 body length | body
//!   tag 1  the mount root's attributes        body: Response::Attr
//!   tag 2  statfs                             body: Response::StatFs
//!   tag 3  a path's attributes                body: Response::Attr
//!   tag 4  a path's file version (root hash)  body: Response::Opened (no inline data)
//!   tag 5  one page of a directory listing    body: u64 cookie, then Response::Dir
//!   tag 6  a symlink's target                 body: Response::Link
//! ```
//! Bodies are the protocol's own response encodings (docs/PROTOCOL.md), all integers little-endian.
//! The file is written whole to a temporary name, synced and renamed over the old one, so a crash
//! leaves the old snapshot or the new one. A snapshot that fails its checksum or does not parse
//! is ignored with a warning: it only lets names be found offline; every byte read through them
//! is still verified against its file's BLAKE3 root, and a wrong root hash only makes the cached
//! chunks fail verification.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::proto::msg::Response;
use crate::proto::wire::{R, W};
use crate::types::{Attr, DirEntry, FileInfo, StatFs};

pub const MAGIC: [u8; 8] = *b"WRAITHMD";
pub const VERSION: u32 = 1;
/// A snapshot larger than this is not read (a damaged length must not cost memory).
pub const MAX_LEN: u64 = 256 << 20;

/// One directory page: the listing from `cookie` on, and the server's next cookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub path: Vec<u8>,
    pub cookie: u64,
    pub entries: Vec<DirEntry>,
    pub next: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub root: Option<Attr>,
    pub statfs: Option<StatFs>,
    /// Path, attributes, and the file version last opened (when it is still that version).
    pub known: Vec<(Vec<u8>, Attr, Option<FileInfo>)>,
    pub pages: Vec<Page>,
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
}

/// The snapshot file of the mount identified by `id` in cache directory `dir`.
pub fn path_for(dir: &Path, id: &str) -> PathBuf {
    dir.join("meta").join(&blake3::hash(id.as_bytes()).to_hex()[..16])
}

fn record(w: &mut W, n: &mut u32, tag: u8, path: &[u8], body: &[u8]) {
    w.u8(tag).bytes(path).bytes(body);
    *n += 1;
}

pub fn encode(s: &Snapshot) -> Vec<u8> {
    let mut w = W::new();
    let mut n = 0u32;
    if let Some(a) = s.root {
        record(&mut w, &mut n, 1, b"", &Response::Attr(a).encode());
    }
    if let Some(f) = s.statfs {
        record(&mut w, &mut n, 2, b"", &Response::StatFs(f).encode());
    }
    for (path, attr, info) in &s.known {
        record(&mut w, &mut n, 3, path, &Response::Attr(*attr).encode());
        if let Some(info) = info {
            record(&mut w, &mut n, 4, path, &Response::Opened { info: *info, inline: None }.encode());
        }
    }
    for p in &s.pages {
        let mut body = p.cookie.to_le_bytes().to_vec();
        body.extend(Response::Dir { entries: p.entries.clone(), next: p.next }.encode());
        record(&mut w, &mut n, 5, &p.path, &body);
    }
    for (path, target) in &s.links {
        record(&mut w, &mut n, 6, path, &Response::Link(target.clone()).encode());
    }
    let mut out = Vec::with_capacity(16 + w.0.len() + 32);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&n.to_le_bytes());
    out.extend_from_slice(&w.0);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

pub fn decode(d: &[u8]) -> Result<Snapshot, String> {
    if d.len() < 16 + 32 || d[..8] != MAGIC {
        return Err("not a wraith metadata snapshot".into());
    }
    let (body, sum) = d.split_at(d.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch (damaged)".into());
    }
    let version = u32::from_le_bytes(body[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(format!("format version {version}, this wraith reads {VERSION}"));
    }
    let count = u32::from_le_bytes(body[12..16].try_into().unwrap());
    let bad = |what: &str| format!("bad {what} record");
    let mut r = R::new(&body[16..]);
    let mut s = Snapshot::default();
    for _ in 0..count {
        let tag = r.u8().map_err(|_| bad("truncated"))?;
        let path = r.bytes().map_err(|_| bad("truncated"))?.to_vec();
        let mut b = r.bytes().map_err(|_| bad("truncated"))?;
        let cookie = if tag == 5 {
            let c = R::new(b).u64().map_err(|_| bad("directory"))?;
            b = &b[8..];
            c
        } else {
            0
        };
        let resp = Response::decode(b.to_vec()).map_err(|_| bad("response"))?;
        match (tag, resp) {
            (1, Response::Attr(a)) => s.root = Some(a),
            (2, Response::StatFs(f)) => s.statfs = Some(f),
            (3, Response::Attr(a)) => s.known.push((path, a, None)),
            (4, Response::Opened { info, .. }) => match s.known.last_mut() {
                Some((p, _, i)) if *p == path => *i = Some(info),
                _ => return Err(bad("file version")),
            },
            (5, Response::Dir { entries, next }) => s.pages.push(Page { path, cookie, entries, next }),
            (6, Response::Link(t)) => s.links.push((path, t)),
            (t, _) => return Err(format!("unknown record tag {t}")),
        }
    }
    r.end().map_err(|_| "trailing bytes".to_string())?;
    Ok(s)
}

/// Write `s` to `path` atomically (temporary file, fsync, rename), mode 0600.
pub fn save(path: &Path, s: &Snapshot) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&encode(s))?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The snapshot at `path`: None when there is none; a damaged one is reported and ignored.
pub fn load(path: &Path) -> Option<Snapshot> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(file = %path.display(), "cannot read the metadata snapshot ({e}); ignored");
            return None;
        }
    };
    let mut d = Vec::new();
    if let Err(e) = f.take(MAX_LEN).read_to_end(&mut d) {
        tracing::warn!(file = %path.display(), "cannot read the metadata snapshot ({e}); ignored");
        return None;
    }
    match decode(&d) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(file = %path.display(), "metadata snapshot unusable: {e}; ignored (offline mounts need a new one)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::FileKind;

    fn attr(kind: FileKind, size: u64) -> Attr {
        Attr { uid: 1, gid: 2, blocks: 8, atime_ns: 1, mtime_ns: 2, ctime_ns: 3, ..Attr::for_test(kind, size, size + 5) }
    }

    fn sample() -> Snapshot {
        let f = attr(FileKind::File, 100);
        Snapshot {
            root: Some(attr(FileKind::Dir, 0)),
            statfs: Some(StatFs { blocks: 9, bfree: 8, bavail: 7, files: 6, ffree: 5, bsize: 4096, namelen: 255, frsize: 4096 }),
            known: vec![
                (b"a".to_vec(), f, Some(FileInfo { attr: f, root: [7; 32], chunk_log2: 18 })),
                (b"d".to_vec(), attr(FileKind::Dir, 0), None),
            ],
            pages: vec![Page {
                path: b"".to_vec(),
                cookie: 0,
                entries: vec![DirEntry { name: b"a".to_vec(), attr: f }],
                next: Some(1),
            }],
            links: vec![(b"l".to_vec(), b"a".to_vec())],
        }
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        assert_eq!(decode(&encode(&Snapshot::default())).unwrap(), Snapshot::default());
    }

    #[test]
    fn golden_header() {
        let e = encode(&Snapshot::default());
        assert_eq!(&e[..16], b"WRAITHMD\x01\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(e.len(), 16 + 32);
    }

    #[test]
    fn every_damage_is_refused_not_a_panic() {
        let e = encode(&sample());
        for i in 0..e.len() {
            let mut d = e.clone();
            d[i] ^= 0x40;
            assert!(decode(&d).is_err(), "flip at {i} accepted");
        }
        for n in 0..e.len() {
            assert!(decode(&e[..n]).is_err(), "truncation to {n} accepted");
        }
    }

    #[test]
    fn save_and_load() {
        let dir = std::env::temp_dir().join(format!("wraith-meta-{}", std::process::id()));
        let p = path_for(&dir, "127.0.0.1:1|srv:/x");
        assert!(load(&p).is_none());
        save(&p, &sample()).unwrap();
        assert_eq!(load(&p).unwrap(), sample());
        std::fs::write(&p, b"garbage").unwrap();
        assert!(load(&p).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
