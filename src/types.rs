//! Domain types shared by the server, the protocol and the filesystem core.
//! Plain data: no I/O, no fuser types.

/// What kind of object a directory entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

impl FileKind {
    pub fn to_u8(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::CharDev => 5,
            FileKind::BlockDev => 6,
            FileKind::Socket => 7,
        }
    }
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::CharDev,
            6 => FileKind::BlockDev,
            7 => FileKind::Socket,
            _ => return None,
        })
    }
    /// From the `S_IFMT` bits of a `st_mode`.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & 0o170000 {
            0o100000 => FileKind::File,
            0o040000 => FileKind::Dir,
            0o120000 => FileKind::Symlink,
            0o010000 => FileKind::Fifo,
            0o020000 => FileKind::CharDev,
            0o060000 => FileKind::BlockDev,
            0o140000 => FileKind::Socket,
            _ => return None,
        })
    }
}

/// Identity of one version of a file on the server. Two equal versions have the same bytes
/// (as far as the server's filesystem can tell); any write changes mtime/ctime/size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Version {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// Attributes of a server object as `lstat` reports them (never following a final symlink).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: FileKind,
    /// Permission bits only (07777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// 512-byte blocks allocated.
    pub blocks: u64,
    pub rdev: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// The server's device and inode numbers (identity, used for hard links and versions).
    pub dev: u64,
    pub ino: u64,
}

impl Attr {
    pub fn version(&self) -> Version {
        Version {
            dev: self.dev,
            ino: self.ino,
            size: self.size,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
        }
    }
}

/// One directory entry with its attributes (readdirplus).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// Filesystem statistics of an export.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// What the client needs to read a regular file: its version, its BLAKE3 root and chunking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileInfo {
    pub attr: Attr,
    /// BLAKE3 root of the whole file: what `b3sum` prints.
    pub root: [u8; 32],
    /// log2 of the chunk size in bytes (e.g. 18 for 256 KiB).
    pub chunk_log2: u8,
}

#[cfg(test)]
impl Attr {
    /// Attributes for tests: an object of `kind` and `size` with inode number `ino`, 0644,
    /// one link, everything else zero.
    pub fn for_test(kind: FileKind, size: u64, ino: u64) -> Attr {
        Attr {
            kind,
            perm: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size,
            blocks: 0,
            rdev: 0,
            atime_ns: 0,
            mtime_ns: 0,
            ctime_ns: 0,
            dev: 1,
            ino,
        }
    }
}
