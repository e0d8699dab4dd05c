//! Datagram framing: the fixed header, the authentication trailer (a keyed-BLAKE3 MAC on the
//! handshake, an AES-128-GCM tag on session datagrams, whose bodies are encrypted) and
//! little-endian field codecs. Pure code: bytes in, bytes out. Layout is specified in
//! docs/PROTOCOL.md.

use ring::aead::{self, Aad, LessSafeKey, Nonce, Tag, UnboundKey};

use crate::error::Error;

pub const MAGIC: u16 = 0x5752; // "WR"
/// 2: session datagrams are AES-128-GCM (1 had a keyed-BLAKE3 MAC and clear bodies).
pub const VERSION: u8 = 2;
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

/// The answer to a HELLO of another protocol version (right magic, other version byte, type
/// HELLO, full size): a REJECT in *our* version, echoing the HELLO's nonce, so its sender can say
/// "the server speaks version N" instead of timing out. Every version keeps this much of the
/// layout: magic, version, type, 16 bytes, then the 32-byte nonce. 52 bytes, far less than the
/// 1200-byte HELLO. None for anything else.
pub fn version_reject(d: &[u8]) -> Option<Vec<u8>> {
    if d.len() < MIN_DATAGRAM || u16::from_le_bytes([d[0], d[1]]) != MAGIC || d[2] == VERSION || d[3] != Kind::Hello as u8 {
        return None;
    }
    let mut r = Vec::with_capacity(HEADER_LEN + 32);
    Header { kind: Kind::Reject, session: 0, pn: 0 }.encode(&mut r);
    r.extend_from_slice(&d[HEADER_LEN..HEADER_LEN + 32]);
    Some(r)
}

/// The version of a REJECT from a server of another protocol version, with the nonce it echoes.
pub fn other_version_reject(d: &[u8]) -> Option<(u8, &[u8])> {
    (d.len() >= HEADER_LEN + 32
        && u16::from_le_bytes([d[0], d[1]]) == MAGIC
        && d[2] != VERSION
        && d[3] == Kind::Reject as u8)
        .then(|| (d[2], &d[HEADER_LEN..HEADER_LEN + 32]))
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

/// One direction's key of a session: AES-128-GCM. The nonce of a datagram is its packet number,
/// which a sender never repeats within a session (and every session has its own keys). Cheap to
/// clone (shared).
#[derive(Clone)]
pub struct SessionKey {
    key: std::sync::Arc<LessSafeKey>,
    /// Kept only to tell keys apart in tests.
    raw: [u8; 16],
}

impl SessionKey {
    pub fn new(raw: [u8; 16]) -> SessionKey {
        let key = LessSafeKey::new(UnboundKey::new(&aead::AES_128_GCM, &raw).expect("a 16-byte AES-128 key"));
        SessionKey { key: std::sync::Arc::new(key), raw }
    }
}

impl PartialEq for SessionKey {
    fn eq(&self, other: &SessionKey) -> bool {
        self.raw == other.raw
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

fn nonce(header: &[u8]) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&header[12..20]);
    Nonce::assume_unique_for_key(n)
}

/// Encrypt the body of the datagram that starts at `buf[start]` (its header is written, its body
/// follows) in place, the header authenticated as associated data, and append the tag.
pub fn seal_session(key: &SessionKey, buf: &mut Vec<u8>, start: usize) {
    let (hdr, body) = buf[start..].split_at_mut(HEADER_LEN);
    let tag = key
        .key
        .seal_in_place_separate_tag(nonce(hdr), Aad::from(&*hdr), body)
        .expect("a datagram is far below AES-GCM's length limit");
    buf.extend_from_slice(tag.as_ref());
}

/// Authenticate and decrypt a session datagram in place; returns header + body (without the
/// tag). None for anything that does not authenticate (its bytes are then unspecified).
pub fn open_session<'a>(key: &SessionKey, d: &'a mut [u8]) -> Option<&'a [u8]> {
    if d.len() < HEADER_LEN + MAC_LEN {
        return None;
    }
    let n = d.len() - MAC_LEN;
    let (msg, tag) = d.split_at_mut(n);
    let tag = Tag::from(<[u8; MAC_LEN]>::try_from(&*tag).ok()?);
    let (hdr, body) = msg.split_at_mut(HEADER_LEN);
    key.key.open_in_place_separate_tag(nonce(hdr), Aad::from(&*hdr), tag, body, 0..).ok()?;
    Some(&d[..n])
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
            [0x52, 0x57, 2, 5, 8, 7, 6, 5, 4, 3, 2, 1, 9, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(Header::decode(&v), Some(h));
        assert_eq!(Header::decode(&v[..19]), None);
        let mut bad = v.clone();
        bad[2] = 1; // version 1 (BLAKE3-MAC'd clear bodies) is not spoken any more
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

    /// AES-128-GCM: the body is encrypted, every flipped bit (header included) and a wrong key
    /// are refused, and a golden datagram pins the format (key, nonce = packet number, AAD =
    /// header).
    #[test]
    fn session_seal_open_and_golden() {
        let k = SessionKey::new([7u8; 16]);
        let mut v = Vec::new();
        Header { kind: Kind::Response, session: 3, pn: 5 }.encode(&mut v);
        v.extend_from_slice(b"chunk bytes, in confidence");
        let clear = v.clone();
        seal_session(&k, &mut v, 0);
        assert_eq!(v.len(), clear.len() + MAC_LEN);
        assert_eq!(v[..HEADER_LEN], clear[..HEADER_LEN], "the header stays readable");
        assert!(!v.windows(11).any(|w| w == b"chunk bytes"), "the body is encrypted");
        // The same bytes as Python's `cryptography` AESGCM(key).encrypt(nonce, body, header)
        // with nonce = 4 zero bytes + the packet number little-endian.
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5257020603000000000000000500000000000000\
             47b9b3a5c1a4455b0ab3ed5c5b1fe42b9fad2639e4a5a4822fe64a3c63376dec2ae1e22f00244f943bd1"
        );
        assert_eq!(open_session(&k, &mut v.clone()), Some(&clear[..]));
        for i in 0..v.len() {
            let mut c = v.clone();
            c[i] ^= 1;
            assert!(open_session(&k, &mut c).is_none(), "flip at {i} accepted");
        }
        assert!(open_session(&SessionKey::new([8u8; 16]), &mut v.clone()).is_none());
        assert!(open_session(&k, &mut v[..HEADER_LEN + MAC_LEN - 1].to_vec()).is_none());
        // A second datagram with the next packet number encrypts the same body differently.
        let mut w = Vec::new();
        Header { kind: Kind::Response, session: 3, pn: 6 }.encode(&mut w);
        w.extend_from_slice(b"chunk bytes, in confidence");
        seal_session(&k, &mut w, 0);
        assert_ne!(w[HEADER_LEN..], v[HEADER_LEN..]);
    }
}
