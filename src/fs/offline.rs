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
/// What a listing costs besides its entries and its path (so that empty listings count too).
const LISTING_COST: usize = 128;
/// Symlink targets remembered.
const LINKS: usize = 4096;

/// What is known of one directory's listing: entries by their position (the server's cookie),
/// whatever pages they came in (the kernel's buffer, not the server's page, decides where the next
/// request starts, so pages overlap), and where the listing ends, once seen.
#[derive(Default)]
struct Listing {
    entries: BTreeMap<u64, DirEntry>,
    end: Option<u64>,
    bytes: usize,
}

/// Entries served from one offline listing request at most.
const OFFLINE_PAGE: usize = 1024;

/// Everything the mount remembers for offline use, bounded; `dirty` says whether it changed
/// since the last snapshot.
pub struct Remembered {
    known: LruCache<Vec<u8>, Known>,
    dirs: LruCache<Vec<u8>, Listing>,
    dir_bytes: usize,
    links: LruCache<Vec<u8>, Vec<u8>>,
    statfs: Option<StatFs>,
    /// Changed since the last snapshot.
    dirty: bool,
}

fn cost(e: &DirEntry) -> usize {
    e.name.len() + ENTRY_COST
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

    /// One page of `path`'s listing: `entries` from position `cookie`, then `next` (None: the
    /// end). A first page that differs from what is known starts the listing anew, so that offline
    /// a listing is never a mix of two versions of the directory; the same listing again changes
    /// nothing (and does not make the snapshot dirty).
    pub fn put_page(&mut self, path: &[u8], cookie: u64, entries: Vec<DirEntry>, next: Option<u64>) {
        if entries.iter().map(cost).sum::<usize>() > PAGE_BYTES / 4 {
            return;
        }
        let base = path.len() + LISTING_COST;
        let before = match self.dirs.peek(path) {
            Some(l) => l.bytes,
            None => {
                self.dirs.put(path.to_vec(), Listing::default());
                0
            }
        };
        let Some(l) = self.dirs.get_mut(path) else { return };
        l.bytes = l.bytes.max(base);
        let mut changed = false;
        if cookie == 0 && entries.iter().enumerate().any(|(i, e)| l.entries.get(&(i as u64)) != Some(e)) {
            changed |= !l.entries.is_empty() || l.end.is_some();
            l.entries.clear();
            l.end = None;
            l.bytes = base;
        }
        let n = entries.len() as u64;
        for (i, e) in entries.into_iter().enumerate() {
            let at = cookie + i as u64;
            if l.entries.get(&at) != Some(&e) {
                changed = true;
                l.bytes += cost(&e);
                if let Some(old) = l.entries.insert(at, e) {
                    l.bytes -= cost(&old);
                }
            }
        }
        match next {
            None => {
                let end = cookie + n;
                if l.end != Some(end) {
                    l.end = Some(end);
                    changed = true;
                }
                // Anything past the end is from an older, longer listing.
                for (_, e) in l.entries.split_off(&end) {
                    l.bytes -= cost(&e);
                    changed = true;
                }
            }
            Some(c) if l.end.is_some_and(|e| e < c) => {
                l.end = None;
                changed = true;
            }
            Some(_) => {}
        }
        self.dir_bytes = self.dir_bytes + l.bytes - before;
        self.dirty |= changed;
        while self.dir_bytes > PAGE_BYTES {
            match self.dirs.pop_lru() {
                Some((_, l)) => self.dir_bytes -= l.bytes,
                None => break,
            }
        }
    }

    /// The known entries of `path` from position `cookie` on (consecutive ones, up to
    /// [`OFFLINE_PAGE`]) and the next cookie (None: the end). None if nothing is known there.
    pub fn page(&mut self, path: &[u8], cookie: u64) -> Option<(Vec<DirEntry>, Option<u64>)> {
        let l = self.dirs.get(path)?;
        if l.end == Some(cookie) {
            return Some((Vec::new(), None));
        }
        let mut out = Vec::new();
        for (&at, e) in l.entries.range(cookie..) {
            if at != cookie + out.len() as u64 || out.len() == OFFLINE_PAGE || l.end.is_some_and(|end| at >= end) {
                break;
            }
            out.push(e.clone());
        }
        if out.is_empty() {
            return None;
        }
        let next = cookie + out.len() as u64;
        Some((out, (l.end != Some(next)).then_some(next)))
    }

    pub fn has_page(&self, path: &[u8], cookie: u64) -> bool {
        self.dirs.peek(path).is_some_and(|l| l.end == Some(cookie) || l.entries.contains_key(&cookie))
    }

    /// What a listing of the parent directory said about `path` (offline lookups of names that
    /// were listed but never looked up).
    pub fn listed(&self, path: &[u8]) -> Option<Attr> {
        let (parent, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        let l = self.dirs.peek(parent)?;
        l.entries.values().find(|e| e.name == name).map(|e| e.attr)
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
            // Runs of consecutive entries, each a page.
            let mut run: Option<Page> = None;
            for (&at, e) in &l.entries {
                match &mut run {
                    Some(p) if p.cookie + p.entries.len() as u64 == at => p.entries.push(e.clone()),
                    _ => {
                        if let Some(mut p) = run.take() {
                            p.next = Some(p.cookie + p.entries.len() as u64);
                            pages.push(p);
                        }
                        run = Some(Page { path: path.clone(), cookie: at, entries: vec![e.clone()], next: None });
                    }
                }
            }
            if let Some(mut p) = run {
                let after = p.cookie + p.entries.len() as u64;
                p.next = (l.end != Some(after)).then_some(after);
                pages.push(p);
            } else if let Some(end) = l.end {
                pages.push(Page { path: path.clone(), cookie: end, entries: Vec::new(), next: None });
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
        Attr { mtime_ns: 1, ctime_ns: 1, ..Attr::for_test(FileKind::File, size, 2) }
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

    /// Empty listings count too (their path and a fixed cost): a tree of a million empty
    /// directories listed once does not grow the memory without end.
    #[test]
    fn empty_listings_stay_within_the_byte_bound() {
        let mut r = Remembered::default();
        for d in 0..300_000 {
            r.put_page(format!("some/deep/path/to/an/empty/directory/{d}").as_bytes(), 0, Vec::new(), None);
        }
        assert!(r.dir_bytes <= PAGE_BYTES);
        assert!(r.dirs.len() < 150_000, "{} listings kept", r.dirs.len());
        assert_eq!(r.page(b"some/deep/path/to/an/empty/directory/299999", 0), Some((Vec::new(), None)));
    }

    #[test]
    fn overlapping_pages_cost_once_and_any_cookie_is_served() {
        let mut r = Remembered::default();
        let all = entries(500);
        // The kernel's buffer ends mid-page: each request starts inside the previous page.
        let mut cookie = 0u64;
        while cookie < 500 {
            let end = (cookie + 100).min(500);
            let next = (end < 500).then_some(end);
            r.put_page(b"d", cookie, all[cookie as usize..end as usize].to_vec(), next);
            cookie += 37;
        }
        let one: usize = all.iter().map(cost).sum();
        assert_eq!(r.dir_bytes, one + 1 + LISTING_COST, "every entry counted once, and the listing itself");
        let (got, next) = r.page(b"d", 123).unwrap();
        assert_eq!(got, all[123..].to_vec());
        assert_eq!(next, None);
        assert_eq!(r.page(b"d", 500), Some((Vec::new(), None)), "the end");
        assert!(r.has_page(b"d", 499) && r.has_page(b"d", 500) && !r.has_page(b"d", 501));
    }

    #[test]
    fn a_changed_listing_replaces_the_old_one_and_the_same_one_is_not_a_change() {
        let mut r = Remembered::default();
        r.put_page(b"d", 0, entries(5), None);
        r.dirty = false;
        r.put_page(b"d", 0, entries(5), None);
        assert!(!r.dirty, "the same listing again");
        // Shorter now, with a different first entry.
        let mut e = entries(3);
        e[0].name = b"aaa".to_vec();
        r.put_page(b"d", 0, e.clone(), None);
        assert!(r.dirty);
        assert_eq!(r.page(b"d", 0).unwrap(), (e, None));
        assert_eq!(r.page(b"d", 3), Some((Vec::new(), None)));
        assert!(r.page(b"d", 4).is_none(), "nothing from the older, longer listing");
        assert_eq!(r.dir_bytes, r.dirs.peek(b"d".as_slice()).unwrap().bytes);
    }

    #[test]
    fn a_listed_name_can_be_looked_up() {
        let mut r = Remembered::default();
        r.put_page(b"sub", 0, entries(3), None);
        assert_eq!(r.listed(b"sub/name-000001"), Some(attr(1)));
        assert_eq!(r.listed(b"sub/other"), None);
        r.put_page(b"", 0, entries(1), None);
        assert_eq!(r.listed(b"name-000000"), Some(attr(0)));
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
