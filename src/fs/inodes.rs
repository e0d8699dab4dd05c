//! The client's inode table: local inode numbers for server objects, their paths and cached
//! attributes, with the kernel's lookup counts so forgotten inodes are freed (bounded memory).

use std::collections::HashMap;
use std::time::Instant;

use crate::types::Attr;

pub const ROOT: u64 = 1;

pub struct Node {
    /// Path relative to the share root (including the mount's subdirectory), no leading '/'.
    pub path: Vec<u8>,
    pub attr: Attr,
    pub attr_at: Instant,
    nlookup: u64,
}

pub struct Inodes {
    nodes: HashMap<u64, Node>,
    /// (server dev, server ino) -> local inode: hard links share one local inode.
    by_key: HashMap<(u64, u64), u64>,
    next: u64,
}

pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
    p.extend_from_slice(parent);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

impl Inodes {
    pub fn new(root_path: Vec<u8>, root: Attr, now: Instant) -> Self {
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node { path: root_path, attr: root, attr_at: now, nlookup: 1 });
        let mut by_key = HashMap::new();
        by_key.insert((root.dev, root.ino), ROOT);
        Inodes { nodes, by_key, next: ROOT + 1 }
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub fn path(&self, ino: u64) -> Option<Vec<u8>> {
        self.nodes.get(&ino).map(|n| n.path.clone())
    }

    /// The attributes last seen for `path`, if the kernel still knows it (offline lookups).
    pub fn find(&self, path: &[u8]) -> Option<Attr> {
        self.nodes.values().find(|n| n.path == path).map(|n| n.attr)
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Record that the kernel now knows `path` (one more lookup) and return its inode.
    pub fn remember(&mut self, path: Vec<u8>, attr: Attr, now: Instant) -> u64 {
        let key = (attr.dev, attr.ino);
        if let Some(&ino) = self.by_key.get(&key) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.path = path;
                n.attr = attr;
                n.attr_at = now;
                n.nlookup += 1;
                return ino;
            }
        }
        let ino = self.next;
        self.next += 1;
        self.by_key.insert(key, ino);
        self.nodes.insert(ino, Node { path, attr, attr_at: now, nlookup: 1 });
        ino
    }

    pub fn update_attr(&mut self, ino: u64, attr: Attr, now: Instant) {
        if let Some(n) = self.nodes.get_mut(&ino) {
            if (n.attr.dev, n.attr.ino) != (attr.dev, attr.ino) && ino != ROOT {
                // The path now names another object; keep our key map truthful.
                self.by_key.remove(&(n.attr.dev, n.attr.ino));
                self.by_key.insert((attr.dev, attr.ino), ino);
            }
            n.attr = attr;
            n.attr_at = now;
        }
    }

    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.nlookup = node.nlookup.saturating_sub(n);
                node.nlookup == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = self.nodes.remove(&ino) {
                if self.by_key.get(&(node.attr.dev, node.attr.ino)) == Some(&ino) {
                    self.by_key.remove(&(node.attr.dev, node.attr.ino));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::FileKind;

    fn attr(ino: u64) -> Attr {
        Attr::for_test(FileKind::File, 0, ino)
    }

    #[test]
    fn hard_links_share_and_forget_frees() {
        let now = Instant::now();
        let mut t = Inodes::new(vec![], attr(100), now);
        let a = t.remember(b"a".to_vec(), attr(5), now);
        let b = t.remember(b"b".to_vec(), attr(5), now);
        assert_eq!(a, b);
        let c = t.remember(b"c".to_vec(), attr(6), now);
        assert_ne!(a, c);
        t.forget(a, 1);
        assert!(t.get(a).is_some());
        t.forget(a, 1);
        assert!(t.get(a).is_none());
        assert_eq!(t.len(), 2);
        t.forget(ROOT, 100);
        assert!(t.get(ROOT).is_some());
        assert_eq!(join(b"", b"x"), b"x");
        assert_eq!(join(b"d", b"x"), b"d/x");
    }
}
