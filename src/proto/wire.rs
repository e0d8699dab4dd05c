//! Datagram framing: the fixed header, the MAC trailer and little-endian field codecs.
//! Pure code: bytes in, bytes out. Layout is specified in docs/PROTOCOL.md.

use crate::error::Error;

pub const MAGIC: u16 = 0x5752; // "WR"
pub const VERSION: u8 = 1;
/// magic(2) version(1) type(1) session(8) packet number(8)
pub const HEADER_LEN: usize = 20;
pub const MAC_LEN: usize = 16;
/// Smallest datagram every IPv4/IPv6 path carries after headers; HELLO is padded to this size.
pub const MIN_DATAGRAM: usize = 1200;
/// Largest datagram we ever build, whatever the path MTU says (loopback has 64 KiB).
pub const MAX_DATAGRAM: usize = 16384;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    HelloAck = 2,
    /// Unauthenticated: the server could not authenticate a HELLO (wrong key).
    Reject = 3,
    /// Unauthenticated: the server does not know this session (it restarted).
    StaleSession = 4,
    Request = 5,
    Response = 6,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::HelloAck,
            3 => Kind::Reject,
            4 => Kind::StaleSession,
            5 => Kind::Request,
            6 => Kind::Response,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub session: u64,
    pub pn: u64,
}

impl Header {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.session.to_le_bytes());
        out.extend_from_slice(&self.pn.to_le_bytes());
    }

    /// Parse the header; `None` for anything that is not a wraith v1 datagram.
    pub fn decode(d: &[u8]) -> Option<Header> {
        if d.len() < HEADER_LEN {
            return None;
        }
        if u16::from_le_bytes([d[0], d[1]]) != MAGIC || d[2] != VERSION {
            return None;
        }
        let kind = Kind::from_u8(d[3])?;
        let session = u64::from_le_bytes(d[4..12].try_into().ok()?);
        let pn = u64::from_le_bytes(d[12..20].try_into().ok()?);
        Some(Header { kind, session, pn })
    }
}

/// Keyed BLAKE3 over `data`, truncated to 128 bits.
pub fn mac(key: &[u8; 32], data: &[u8]) -> [u8; MAC_LEN] {
    let h = blake3::keyed_hash(key, data);
    let mut t = [0u8; MAC_LEN];
    t.copy_from_slice(&h.as_bytes()[..MAC_LEN]);
    t
}

/// Append the MAC of everything in `buf` so far.
pub fn seal(key: &[u8; 32], buf: &mut Vec<u8>) {
    let t = mac(key, buf);
    buf.extend_from_slice(&t);
}

/// Check the trailing MAC in constant time; returns the authenticated part (header + body).
pub fn open<'a>(key: &[u8; 32], d: &'a [u8]) -> Option<&'a [u8]> {
    if d.len() < HEADER_LEN + MAC_LEN {
        return None;
    }
    let (body, tag) = d.split_at(d.len() - MAC_LEN);
    let want = mac(key, body);
    let mut diff = 0u8;
    for (a, b) in want.iter().zip(tag) {
        diff |= a ^ b;
    }
    (diff == 0).then_some(body)
}

/// Little-endian writer.
#[derive(Default)]
pub struct W(pub Vec<u8>);

impl W {
    pub fn new() -> Self {
        W(Vec::new())
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.0.extend_from_slice(v);
        self
    }
    /// u32 length then bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u32(v.len() as u32);
        self.raw(v)
    }
}

/// Little-endian reader; every accessor fails cleanly on short input.
pub struct R<'a> {
    d: &'a [u8],
}

impl<'a> R<'a> {
    pub fn new(d: &'a [u8]) -> Self {
        R { d }
    }
    pub fn remaining(&self) -> usize {
        self.d.len()
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.d)
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.d.len() < n {
            return Err(Error::Invalid);
        }
        let (a, b) = self.d.split_at(n);
        self.d = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn u64(&mut self) -> Result<u64, Error> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn i64(&mut self) -> Result<i64, Error> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    pub fn arr32(&mut self) -> Result<[u8; 32], Error> {
        Ok(self.take(32)?.try_into().unwrap())
    }
    pub fn bytes(&mut self) -> Result<&'a [u8], Error> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn end(&self) -> Result<(), Error> {
        if self.d.is_empty() {
            Ok(())
        } else {
            Err(Error::Invalid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_golden() {
        let h = Header { kind: Kind::Request, session: 0x0102030405060708, pn: 9 };
        let mut v = Vec::new();
        h.encode(&mut v);
        assert_eq!(
            v,
            [0x52, 0x57, 1, 5, 8, 7, 6, 5, 4, 3, 2, 1, 9, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Header::decode(&v), Some(h));
        assert_eq!(Header::decode(&v[..19]), None);
        let mut bad = v.clone();
        bad[2] = 2;
        assert_eq!(Header::decode(&bad), None);
    }

    #[test]
    fn seal_open() {
        let k = [7u8; 32];
        let mut v = vec![1u8; 40];
        seal(&k, &mut v);
        assert!(open(&k, &v).is_some());
        for i in 0..v.len() {
            let mut c = v.clone();
            c[i] ^= 1;
            assert!(open(&k, &c).is_none(), "flip at {i} accepted");
        }
        assert!(open(&[8u8; 32], &v).is_none());
    }
}
