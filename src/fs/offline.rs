//! What the server last said about names (attributes, file versions, directory pages, symlink
//! targets, statfs), bounded, kept after the kernel forgets an inode and saved in the cache
//! directory ([`crate::cache::meta`]) so that while the server does not answer — also in a mount
//! made while it is down — cached files stay reachable.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;

use lru::LruCache;

use crate::cache::meta::{Page, Snapshot};
use crate::types::{Attr, DirEntry, FileInfo, StatFs};

/// What the server last said about a path: its attributes, and for a file opened, its version.
pub type Known = (Attr, Option<FileInfo>);

/// Paths remembered.
const KNOWN_PATHS: usize = 65536;
/// Directory pages remembered, in bytes of names (plus a fixed cost per entry).
const PAGE_BYTES: usize = 16 << 20;
const ENTRY_COST: usize = 128;
/// Symlink targets remembered.
const LINKS: usize = 4096;

/// The pages of one directory listing, by the cookie each starts at.
#[derive(Default)]
struct Listing {
    pages: BTreeMap<u64, (Vec<DirEntry>, Option<u64>)>,
    bytes: usize,
}

pub struct Remembered {
    known: LruCache<Vec<u8>, Known>,
    dirs: LruCache<Vec<u8>, Listing>,
    dir_bytes: usize,
    links: LruCache<Vec<u8>, Vec<u8>>,
    statfs: Option<StatFs>,
    /// Changed since the last snapshot.
    dirty: bool,
}

fn cost(entries: &[DirEntry]) -> usize {
    entries.iter().map(|e| e.name.len() + ENTRY_COST).sum()
}

impl Default for Remembered {
    fn default() -> Self {
        Remembered {
            known: LruCache::new(NonZeroUsize::new(KNOWN_PATHS).unwrap()),
            dirs: LruCache::unbounded(),
            dir_bytes: 0,
            links: LruCache::new(NonZeroUsize::new(LINKS).unwrap()),
            statfs: None,
            dirty: false,
        }
    }
}

impl Remembered {
    /// The server said `attr` (and, on open, `info`) about `path`. A version learned by an
    /// earlier open is kept while the attributes still describe that version.
    pub fn learn(&mut self, path: &[u8], attr: Attr, info: Option<FileInfo>) {
        let keep =
            info.or_else(|| self.known.peek(path).and_then(|old| old.1).filter(|i| i.attr.version() == attr.version()));
        let new = (attr, keep);
        if self.known.peek(path) != Some(&new) {
            self.dirty = true;
        }
        self.known.put(path.to_vec(), new);
    }

    pub fn known(&mut self, path: &[u8]) -> Option<Known> {
        self.known.get(path).copied()
    }

    /// One page of `path`'s listing. A page from cookie 0 starts a new listing: older pages of
    /// the directory are dropped so that offline a listing is never a mix of two.
    pub fn put_page(&mut self, path: &[u8], cookie: u64, entries: Vec<DirEntry>, next: Option<u64>) {
        let add = cost(&entries);
        if add > PAGE_BYTES / 4 {
            return;
        }
        if self.dirs.peek(path).is_none() {
            self.dirs.put(path.to_vec(), Listing::default());
        }
        let l = self.dirs.get_mut(path).unwrap();
        if cookie == 0 {
            self.dir_bytes -= l.bytes;
            l.pages.clear();
            l.bytes = 0;
        }
        if let Some((old, _)) = l.pages.insert(cookie, (entries, next)) {
            let c = cost(&old);
            l.bytes -= c;
            self.dir_bytes -= c;
        }
        l.bytes += add;
        self.dir_bytes += add;
        self.dirty = true;
        while self.dir_bytes > PAGE_BYTES {
            match self.dirs.pop_lru() {
                Some((_, l)) => self.dir_bytes -= l.bytes,
                None => break,
            }
        }
    }

    pub fn page(&mut self, path: &[u8], cookie: u64) -> Option<(Vec<DirEntry>, Option<u64>)> {
        self.dirs.get(path).and_then(|l| l.pages.get(&cookie)).cloned()
    }

    pub fn has_page(&self, path: &[u8], cookie: u64) -> bool {
        self.dirs.peek(path).is_some_and(|l| l.pages.contains_key(&cookie))
    }

    pub fn put_link(&mut self, path: &[u8], target: &[u8]) {
        if self.links.peek(path).map(Vec::as_slice) != Some(target) {
            self.links.put(path.to_vec(), target.to_vec());
            self.dirty = true;
        }
    }

    pub fn link(&mut self, path: &[u8]) -> Option<Vec<u8>> {
        self.links.get(path).cloned()
    }

    pub fn put_statfs(&mut self, s: StatFs) {
        if self.statfs != Some(s) {
            self.statfs = Some(s);
            self.dirty = true;
        }
    }

    pub fn statfs(&self) -> Option<StatFs> {
        self.statfs
    }

    /// A snapshot of everything, least recently used first (loading it back keeps the order),
    /// or None when nothing changed since the last one.
    pub fn snapshot_if_dirty(&mut self, root: Attr) -> Option<Snapshot> {
        if !self.dirty {
            return None;
        }
        self.dirty = false;
        let known = self.known.iter().rev().map(|(p, (a, i))| (p.clone(), *a, *i)).collect();
        let mut pages = Vec::new();
        for (path, l) in self.dirs.iter().rev() {
            for (cookie, (entries, next)) in &l.pages {
                pages.push(Page { path: path.clone(), cookie: *cookie, entries: entries.clone(), next: *next });
            }
        }
        let links = self.links.iter().rev().map(|(p, t)| (p.clone(), t.clone())).collect();
        Some(Snapshot { root: Some(root), statfs: self.statfs, known, pages, links })
    }

    /// Save again next time (the last save failed).
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// Take in a snapshot saved by an earlier mount.
    pub fn restore(&mut self, s: Snapshot) {
        for (p, a, i) in s.known {
            self.known.put(p, (a, i));
        }
        for pg in s.pages {
            self.put_page(&pg.path, pg.cookie, pg.entries, pg.next);
        }
        for (p, t) in s.links {
            self.links.put(p, t);
        }
        self.statfs = s.statfs;
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::FileKind;

    fn attr(size: u64) -> Attr {
        Attr {
            kind: FileKind::File,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size,
            blocks: 0,
            rdev: 0,
            atime_ns: 0,
            mtime_ns: 1,
            ctime_ns: 1,
            dev: 1,
            ino: 2,
        }
    }

    fn entries(n: usize) -> Vec<DirEntry> {
        (0..n).map(|i| DirEntry { name: format!("name-{i:06}").into_bytes(), attr: attr(i as u64) }).collect()
    }

    #[test]
    fn pages_stay_within_their_byte_bound() {
        let mut r = Remembered::default();
        for d in 0..2000 {
            r.put_page(format!("dir{d}").as_bytes(), 0, entries(100), None);
            assert!(r.dir_bytes <= PAGE_BYTES);
        }
        assert!(r.page(b"dir1999", 0).is_some());
        assert!(r.page(b"dir0", 0).is_none(), "the oldest listing was evicted");
    }

    #[test]
    fn a_new_listing_replaces_the_old_pages() {
        let mut r = Remembered::default();
        r.put_page(b"d", 0, entries(2), Some(2));
        r.put_page(b"d", 2, entries(1), None);
        r.put_page(b"d", 0, entries(3), None);
        assert!(r.page(b"d", 2).is_none());
        assert_eq!(r.page(b"d", 0).unwrap().0.len(), 3);
    }

    #[test]
    fn a_version_is_kept_only_while_the_attributes_match() {
        let mut r = Remembered::default();
        let info = FileInfo { attr: attr(10), root: [1; 32], chunk_log2: 18 };
        r.learn(b"f", attr(10), Some(info));
        r.learn(b"f", attr(10), None);
        assert_eq!(r.known(b"f").unwrap().1, Some(info));
        r.learn(b"f", attr(11), None);
        assert_eq!(r.known(b"f").unwrap().1, None);
    }

    #[test]
    fn snapshot_restores_the_same_state_and_only_when_changed() {
        let mut r = Remembered::default();
        let info = FileInfo { attr: attr(10), root: [1; 32], chunk_log2: 18 };
        r.learn(b"f", attr(10), Some(info));
        r.learn(b"g", attr(3), None);
        r.put_page(b"", 0, entries(2), None);
        r.put_link(b"l", b"f");
        let s = r.snapshot_if_dirty(attr(0)).unwrap();
        assert!(r.snapshot_if_dirty(attr(0)).is_none(), "nothing changed since");
        let mut back = Remembered::default();
        back.restore(crate::cache::meta::decode(&crate::cache::meta::encode(&s)).unwrap());
        // The same content in the same recency order.
        back.dirty = true;
        assert_eq!(back.snapshot_if_dirty(attr(0)).unwrap(), s);
        assert_eq!(back.known(b"f"), Some((attr(10), Some(info))));
        assert_eq!(back.page(b"", 0).unwrap().0, entries(2));
        assert_eq!(back.link(b"l").unwrap(), b"f");
    }
}
