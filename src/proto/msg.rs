//! Request and response bodies. A request fits one datagram; a response is a byte string of any
//! length (up to [`MAX_RESPONSE`]) carried in pieces. Responses keep their one-byte tag at the END so
//! that a data response's payload starts at offset 0 of the reassembly buffer and is handed on without
//! a copy.

use super::wire::{R, W};
use crate::chunk::{Buf, Cv};
use crate::error::Error;
use crate::types::{Attr, DirEntry, FileInfo, FileKind, StatFs, Version};

/// Largest response body (a 16 MiB chunk plus framing).
pub const MAX_RESPONSE: usize = (16 << 20) + 4096;
/// Largest path the protocol carries (one request datagram must hold it).
pub const MAX_PATH: usize = 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Attach { share: String },
    Stat { share: String, path: Vec<u8> },
    ReadDir { share: String, path: Vec<u8>, cookie: u64, max_bytes: u32 },
    ReadLink { share: String, path: Vec<u8> },
    /// Revalidate and describe a regular file: version, BLAKE3 root, chunking (+ the bytes if small).
    Open { share: String, path: Vec<u8> },
    /// Leaf chaining values [first, first+count) with the proof against the root.
    Cvs { share: String, path: Vec<u8>, version: Version, first: u64, count: u32 },
    Read { share: String, path: Vec<u8>, version: Version, index: u64 },
    StatFs { share: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    Attached { root: Attr },
    Attr(Attr),
    Dir { entries: Vec<DirEntry>, next: Option<u64> },
    Link(Vec<u8>),
    Opened { info: FileInfo, inline: Option<Vec<u8>> },
    Cvs { leaves: Vec<Cv>, proof: Vec<Cv> },
    /// A chunk's bytes (in a registered slot when they arrived into one).
    Data(Buf),
    StatFs(StatFs),
    Error(Error),
}

fn put_attr(w: &mut W, a: &Attr) {
    w.u8(a.kind.to_u8())
        .u16(a.perm)
        .u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid)
        .u64(a.size)
        .u64(a.blocks)
        .u64(a.rdev)
        .i64(a.atime_ns)
        .i64(a.mtime_ns)
        .i64(a.ctime_ns)
        .u64(a.dev)
        .u64(a.ino);
}

fn get_attr(r: &mut R) -> Result<Attr, Error> {
    Ok(Attr {
        kind: FileKind::from_u8(r.u8()?).ok_or(Error::Invalid)?,
        perm: r.u16()? & 0o7777,
        nlink: r.u32()?,
        uid: r.u32()?,
        gid: r.u32()?,
        size: r.u64()?,
        blocks: r.u64()?,
        rdev: r.u64()?,
        atime_ns: r.i64()?,
        mtime_ns: r.i64()?,
        ctime_ns: r.i64()?,
        dev: r.u64()?,
        ino: r.u64()?,
    })
}

fn put_version(w: &mut W, v: &Version) {
    w.u64(v.dev).u64(v.ino).u64(v.size).i64(v.mtime_ns).i64(v.ctime_ns);
}

fn get_version(r: &mut R) -> Result<Version, Error> {
    Ok(Version { dev: r.u64()?, ino: r.u64()?, size: r.u64()?, mtime_ns: r.i64()?, ctime_ns: r.i64()? })
}

fn get_str(r: &mut R) -> Result<String, Error> {
    String::from_utf8(r.bytes()?.to_vec()).map_err(|_| Error::Invalid)
}

fn get_path(r: &mut R) -> Result<Vec<u8>, Error> {
    let p = r.bytes()?;
    if p.len() > MAX_PATH {
        return Err(Error::NameTooLong);
    }
    Ok(p.to_vec())
}

impl Request {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::new();
        match self {
            Request::Attach { share } => {
                w.u8(1).bytes(share.as_bytes());
            }
            Request::Stat { share, path } => {
                w.u8(2).bytes(share.as_bytes()).bytes(path);
            }
            Request::ReadDir { share, path, cookie, max_bytes } => {
                w.u8(3).bytes(share.as_bytes()).bytes(path).u64(*cookie).u32(*max_bytes);
            }
            Request::ReadLink { share, path } => {
                w.u8(4).bytes(share.as_bytes()).bytes(path);
            }
            Request::Open { share, path } => {
                w.u8(5).bytes(share.as_bytes()).bytes(path);
            }
            Request::Cvs { share, path, version, first, count } => {
                w.u8(6).bytes(share.as_bytes()).bytes(path);
                put_version(&mut w, version);
                w.u64(*first).u32(*count);
            }
            Request::Read { share, path, version, index } => {
                w.u8(7).bytes(share.as_bytes()).bytes(path);
                put_version(&mut w, version);
                w.u64(*index);
            }
            Request::StatFs { share } => {
                w.u8(8).bytes(share.as_bytes());
            }
        }
        w.0
    }

    pub fn decode(d: &[u8]) -> Result<Request, Error> {
        let mut r = R::new(d);
        let req = match r.u8()? {
            1 => Request::Attach { share: get_str(&mut r)? },
            2 => Request::Stat { share: get_str(&mut r)?, path: get_path(&mut r)? },
            3 => Request::ReadDir {
                share: get_str(&mut r)?,
                path: get_path(&mut r)?,
                cookie: r.u64()?,
                max_bytes: r.u32()?,
            },
            4 => Request::ReadLink { share: get_str(&mut r)?, path: get_path(&mut r)? },
            5 => Request::Open { share: get_str(&mut r)?, path: get_path(&mut r)? },
            6 => Request::Cvs {
                share: get_str(&mut r)?,
                path: get_path(&mut r)?,
                version: get_version(&mut r)?,
                first: r.u64()?,
                count: r.u32()?,
            },
            7 => Request::Read {
                share: get_str(&mut r)?,
                path: get_path(&mut r)?,
                version: get_version(&mut r)?,
                index: r.u64()?,
            },
            8 => Request::StatFs { share: get_str(&mut r)? },
            _ => return Err(Error::Invalid),
        };
        r.end()?;
        Ok(req)
    }
}

impl Response {
    /// Encode, consuming: a data payload gets its tag appended in place instead of being copied
    /// (its buffer, heap or slot, is what is sent from).
    pub fn into_bytes(self) -> Buf {
        match self {
            Response::Data(mut d) => {
                d.push(7);
                d
            }
            other => other.encode().into(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut w = W::new();
        let tag = match self {
            Response::Attached { root } => {
                put_attr(&mut w, root);
                1
            }
            Response::Attr(a) => {
                put_attr(&mut w, a);
                2
            }
            Response::Dir { entries, next } => {
                w.u32(entries.len() as u32);
                for e in entries {
                    w.bytes(&e.name);
                    put_attr(&mut w, &e.attr);
                }
                match next {
                    Some(c) => w.u8(1).u64(*c),
                    None => w.u8(0),
                };
                3
            }
            Response::Link(t) => {
                w.bytes(t);
                4
            }
            Response::Opened { info, inline } => {
                put_attr(&mut w, &info.attr);
                w.raw(&info.root).u8(info.chunk_log2);
                match inline {
                    Some(d) => w.u8(1).bytes(d),
                    None => w.u8(0),
                };
                5
            }
            Response::Cvs { leaves, proof } => {
                w.u32(leaves.len() as u32).u32(proof.len() as u32);
                for c in leaves.iter().chain(proof) {
                    w.raw(c);
                }
                6
            }
            Response::Data(d) => {
                w.raw(d);
                7
            }
            Response::StatFs(s) => {
                w.u64(s.blocks)
                    .u64(s.bfree)
                    .u64(s.bavail)
                    .u64(s.files)
                    .u64(s.ffree)
                    .u32(s.bsize)
                    .u32(s.namelen)
                    .u32(s.frsize);
                8
            }
            Response::Error(e) => {
                w.u16(e.to_wire());
                9
            }
        };
        w.u8(tag);
        w.0
    }

    /// Decode, taking ownership so a data payload is returned without a copy.
    pub fn decode(d: impl Into<Buf>) -> Result<Response, Error> {
        let mut d: Buf = d.into();
        let tag = d.pop().ok_or(Error::Invalid)?;
        if tag == 7 {
            return Ok(Response::Data(d));
        }
        let mut r = R::new(&d);
        let resp = match tag {
            1 => Response::Attached { root: get_attr(&mut r)? },
            2 => Response::Attr(get_attr(&mut r)?),
            3 => {
                let n = r.u32()? as usize;
                if n > r.remaining() / 8 {
                    return Err(Error::Invalid);
                }
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = r.bytes()?.to_vec();
                    entries.push(DirEntry { name, attr: get_attr(&mut r)? });
                }
                let next = match r.u8()? {
                    0 => None,
                    1 => Some(r.u64()?),
                    _ => return Err(Error::Invalid),
                };
                Response::Dir { entries, next }
            }
            4 => Response::Link(r.bytes()?.to_vec()),
            5 => {
                let attr = get_attr(&mut r)?;
                let root = r.arr32()?;
                let chunk_log2 = r.u8()?;
                let inline = match r.u8()? {
                    0 => None,
                    1 => Some(r.bytes()?.to_vec()),
                    _ => return Err(Error::Invalid),
                };
                Response::Opened { info: FileInfo { attr, root, chunk_log2 }, inline }
            }
            6 => {
                let nl = r.u32()? as usize;
                let np = r.u32()? as usize;
                if nl.saturating_add(np).saturating_mul(32) != r.remaining() {
                    return Err(Error::Invalid);
                }
                let leaves = (0..nl).map(|_| r.arr32()).collect::<Result<_, _>>()?;
                let proof = (0..np).map(|_| r.arr32()).collect::<Result<_, _>>()?;
                Response::Cvs { leaves, proof }
            }
            8 => Response::StatFs(StatFs {
                blocks: r.u64()?,
                bfree: r.u64()?,
                bavail: r.u64()?,
                files: r.u64()?,
                ffree: r.u64()?,
                bsize: r.u32()?,
                namelen: r.u32()?,
                frsize: r.u32()?,
            }),
            9 => Response::Error(Error::from_wire(r.u16()?)),
            _ => return Err(Error::Invalid),
        };
        r.end()?;
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn attr(n: u64) -> Attr {
        Attr {
            kind: FileKind::File,
            perm: 0o644,
            nlink: 2,
            uid: 1,
            gid: 2,
            size: n,
            blocks: 8,
            rdev: 0,
            atime_ns: -5,
            mtime_ns: 1_700_000_000_123_456_789,
            ctime_ns: 3,
            dev: 9,
            ino: n + 1,
        }
    }

    #[test]
    fn round_trips() {
        let v = attr(5).version();
        let reqs = vec![
            Request::Attach { share: "s".into() },
            Request::Stat { share: "s".into(), path: b"a/b c".to_vec() },
            Request::ReadDir { share: "s".into(), path: vec![], cookie: 7, max_bytes: 9000 },
            Request::ReadLink { share: "s".into(), path: b"l".to_vec() },
            Request::Open { share: "s".into(), path: "日本".as_bytes().to_vec() },
            Request::Cvs { share: "s".into(), path: b"f".to_vec(), version: v, first: 3, count: 1024 },
            Request::Read { share: "s".into(), path: b"f".to_vec(), version: v, index: 77 },
            Request::StatFs { share: "s".into() },
        ];
        for r in reqs {
            assert_eq!(Request::decode(&r.encode()).unwrap(), r);
        }
        let resps = vec![
            Response::Attached { root: attr(0) },
            Response::Attr(attr(1)),
            Response::Dir {
                entries: vec![DirEntry { name: b"x".to_vec(), attr: attr(3) }],
                next: Some(4),
            },
            Response::Dir { entries: vec![], next: None },
            Response::Link(b"../x".to_vec()),
            Response::Opened {
                info: FileInfo { attr: attr(4), root: [5; 32], chunk_log2: 18 },
                inline: Some(vec![1, 2, 3]),
            },
            Response::Cvs { leaves: vec![[1; 32], [2; 32]], proof: vec![[3; 32]] },
            Response::Data(vec![9; 1000].into()),
            Response::Data(vec![].into()),
            Response::StatFs(StatFs { blocks: 1, bfree: 2, bavail: 3, files: 4, ffree: 5, bsize: 6, namelen: 7, frsize: 8 }),
            Response::Error(Error::Stale),
        ];
        for r in resps {
            assert_eq!(Response::decode(r.encode()).unwrap(), r);
            assert_eq!(&*r.clone().into_bytes(), &r.encode()[..]);
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(d in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Request::decode(&d);
            let _ = Response::decode(d);
        }
    }
}
