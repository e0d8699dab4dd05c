//! Bodies of REQUEST and RESPONSE datagrams (after the header, before the MAC).
//!
//! REQUEST:  req_id u64 | n_missing u16 | n × (start u16, len u16) | request bytes
//! RESPONSE: req_id u64 | total u32 | piece_size u16 | index u16 | piece bytes

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Missing {
    pub start: u16,
    pub len: u16,
}

pub const RESP_HDR: usize = 16;

pub fn encode_request(out: &mut Vec<u8>, id: u64, missing: &[Missing], body: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&(missing.len() as u16).to_le_bytes());
    for m in missing {
        out.extend_from_slice(&m.start.to_le_bytes());
        out.extend_from_slice(&m.len.to_le_bytes());
    }
    out.extend_from_slice(body);
}

pub struct RequestFrame<'a> {
    pub id: u64,
    pub missing: Vec<Missing>,
    pub body: &'a [u8],
}

pub fn decode_request(b: &[u8]) -> Option<RequestFrame<'_>> {
    if b.len() < 10 {
        return None;
    }
    let id = u64::from_le_bytes(b[..8].try_into().ok()?);
    let n = u16::from_le_bytes([b[8], b[9]]) as usize;
    let rest = &b[10..];
    if rest.len() < n * 4 {
        return None;
    }
    let missing = (0..n)
        .map(|i| Missing {
            start: u16::from_le_bytes([rest[i * 4], rest[i * 4 + 1]]),
            len: u16::from_le_bytes([rest[i * 4 + 2], rest[i * 4 + 3]]),
        })
        .collect();
    Some(RequestFrame { id, missing, body: &rest[n * 4..] })
}

pub struct Piece<'a> {
    pub req_id: u64,
    pub total: u32,
    pub piece_size: u16,
    pub index: u16,
    pub data: &'a [u8],
}

pub fn encode_piece_header(out: &mut Vec<u8>, req_id: u64, total: u32, piece_size: u16, index: u16) {
    out.extend_from_slice(&req_id.to_le_bytes());
    out.extend_from_slice(&total.to_le_bytes());
    out.extend_from_slice(&piece_size.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
}

pub fn decode_piece(b: &[u8]) -> Option<Piece<'_>> {
    if b.len() < RESP_HDR {
        return None;
    }
    Some(Piece {
        req_id: u64::from_le_bytes(b[..8].try_into().ok()?),
        total: u32::from_le_bytes(b[8..12].try_into().ok()?),
        piece_size: u16::from_le_bytes([b[12], b[13]]),
        index: u16::from_le_bytes([b[14], b[15]]),
        data: &b[16..],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut v = Vec::new();
        let m = [Missing { start: 3, len: 2 }, Missing { start: 9, len: 1 }];
        encode_request(&mut v, 42, &m, b"body");
        let f = decode_request(&v).unwrap();
        assert_eq!(f.id, 42);
        assert_eq!(f.missing, m);
        assert_eq!(f.body, b"body");
        assert!(decode_request(&v[..9]).is_none());
    }

    #[test]
    fn piece_round_trip() {
        let mut v = Vec::new();
        encode_piece_header(&mut v, 7, 1000, 300, 3);
        v.extend_from_slice(b"xyz");
        let p = decode_piece(&v).unwrap();
        assert_eq!((p.req_id, p.total, p.piece_size, p.index, p.data), (7, 1000, 300, 3, &b"xyz"[..]));
    }
}
