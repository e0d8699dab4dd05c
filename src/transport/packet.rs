//! Ethernet, IPv4, IPv6 and UDP headers: built and parsed by pure code, no I/O.
//!
//! Built frames carry no VLAN tag, IPv4 with DF set (wraith never relies on fragmentation),
//! IPv6 without extension headers. Parsing accepts up to two VLAN tags, checks the IPv4 header
//! checksum and every length field, and refuses fragments and IPv4 options it cannot skip.
//!
//! UDP checksum: over IPv4 wraith sends **zero** (no checksum), deliberately. Every wraith
//! datagram ends in a keyed BLAKE3 MAC that the receiver checks before using a byte, which
//! catches any corruption a 16-bit sum would and much more, and the link has its own CRC; a
//! checksum would cost one more pass over every payload byte on the hottest path. RFC 768
//! allows zero over IPv4. Over IPv6 a checksum is mandatory (RFC 8200), so it is computed. On
//! receipt the UDP checksum is not verified, for the same reason: the MAC is.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

pub type Mac = [u8; 6];

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const UDP_LEN: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_QINQ: u16 = 0x88a8;
const PROTO_UDP: u8 = 17;
const TTL: u8 = 64;

/// Both ends of a UDP datagram on one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

/// Bytes of headers in front of the payload.
pub const fn header_len(ipv6: bool) -> usize {
    ETH_LEN + if ipv6 { IPV6_LEN } else { IPV4_LEN } + UDP_LEN
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// One address is IPv4 and the other IPv6.
    MixedFamilies,
    /// The buffer is smaller than headers plus payload.
    NoRoom,
    /// More payload than one IP packet carries.
    TooBig,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    Truncated,
    NotIp,
    NotUdp,
    BadIpHeader,
    BadIpChecksum,
    Fragment,
    BadLength,
}

/// A parsed UDP datagram; `payload` borrows from the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Datagram<'a> {
    pub src_mac: Mac,
    pub dst_mac: Mac,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub payload: &'a [u8],
}

/// One's-complement sum of `data` as big-endian 16-bit words, added to `acc` (not folded).
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let v = u64::from_be_bytes(c.try_into().unwrap());
        acc += (v >> 48) + ((v >> 32) & 0xffff) + ((v >> 16) & 0xffff) + (v & 0xffff);
    }
    let mut rest = chunks.remainder().chunks_exact(2);
    for c in &mut rest {
        acc += u16::from_be_bytes([c[0], c[1]]) as u64;
    }
    if let [b] = rest.remainder() {
        acc += (*b as u64) << 8;
    }
    acc
}

fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The IPv4 header checksum of `hdr` (with its checksum field as it is; zero it to compute).
pub fn ipv4_checksum(hdr: &[u8]) -> u16 {
    !fold(sum_words(hdr, 0))
}

/// The UDP checksum of `udp` (header and payload, checksum field as it is) between `src` and
/// `dst`, with the pseudo-header. Zero comes out as 0xffff, as RFC 768 says to send it.
pub fn udp_checksum(src: IpAddr, dst: IpAddr, udp: &[u8]) -> u16 {
    let mut acc = sum_words(udp, 0) + PROTO_UDP as u64 + udp.len() as u64;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum_words(&s.octets(), acc);
            acc = sum_words(&d.octets(), acc);
        }
        (s, d) => {
            acc = sum_words(&to_v6(s).octets(), acc);
            acc = sum_words(&to_v6(d).octets(), acc);
        }
    }
    match !fold(acc) {
        0 => 0xffff,
        c => c,
    }
}

fn to_v6(a: IpAddr) -> Ipv6Addr {
    match a {
        IpAddr::V4(v) => v.to_ipv6_mapped(),
        IpAddr::V6(v) => v,
    }
}

/// Write the headers for a payload of `payload_len` bytes that is already in place at
/// `buf[header_len(..)..]`. Returns the frame length.
pub fn write_headers(buf: &mut [u8], ep: &Endpoints, payload_len: usize) -> Result<usize, BuildError> {
    let ipv6 = match (ep.src, ep.dst) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => false,
        (SocketAddr::V6(_), SocketAddr::V6(_)) => true,
        _ => return Err(BuildError::MixedFamilies),
    };
    let hl = header_len(ipv6);
    let udp_len = UDP_LEN + payload_len;
    if udp_len > u16::MAX as usize - if ipv6 { 0 } else { IPV4_LEN } {
        return Err(BuildError::TooBig);
    }
    let total = hl + payload_len;
    if buf.len() < total {
        return Err(BuildError::NoRoom);
    }
    let (eth, rest) = buf.split_at_mut(ETH_LEN);
    eth[0..6].copy_from_slice(&ep.dst_mac);
    eth[6..12].copy_from_slice(&ep.src_mac);
    eth[12..14].copy_from_slice(&if ipv6 { ETHERTYPE_IPV6 } else { ETHERTYPE_IPV4 }.to_be_bytes());
    let ip_len = if ipv6 { IPV6_LEN } else { IPV4_LEN };
    let (ip, rest) = rest.split_at_mut(ip_len);
    let udp = &mut rest[..udp_len];
    udp[0..2].copy_from_slice(&ep.src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&ep.dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    match (ep.src, ep.dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            ip[0] = 0x45; // version 4, 5 words
            ip[1] = 0; // DSCP/ECN
            ip[2..4].copy_from_slice(&((IPV4_LEN + udp_len) as u16).to_be_bytes());
            ip[4..6].copy_from_slice(&[0, 0]); // id: any value for an unfragmentable packet (RFC 6864)
            ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes()); // DF
            ip[8] = TTL;
            ip[9] = PROTO_UDP;
            ip[10..12].copy_from_slice(&[0, 0]);
            ip[12..16].copy_from_slice(&s.ip().octets());
            ip[16..20].copy_from_slice(&d.ip().octets());
            let c = ipv4_checksum(ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            // UDP checksum stays zero: see the module documentation.
        }
        (SocketAddr::V6(s), SocketAddr::V6(d)) => {
            ip[0..4].copy_from_slice(&(6u32 << 28 | (s.flowinfo() & 0xf_ffff)).to_be_bytes());
            ip[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
            ip[6] = PROTO_UDP;
            ip[7] = TTL;
            ip[8..24].copy_from_slice(&s.ip().octets());
            ip[24..40].copy_from_slice(&d.ip().octets());
            let c = udp_checksum(IpAddr::V6(*s.ip()), IpAddr::V6(*d.ip()), udp);
            udp[6..8].copy_from_slice(&c.to_be_bytes());
        }
        _ => unreachable!("families checked above"),
    }
    Ok(total)
}

/// Build a whole frame: payload, then headers. Returns the frame length.
pub fn build(buf: &mut [u8], ep: &Endpoints, payload: &[u8]) -> Result<usize, BuildError> {
    let hl = header_len(ep.dst.is_ipv6());
    if buf.len() < hl + payload.len() {
        return Err(BuildError::NoRoom);
    }
    buf[hl..hl + payload.len()].copy_from_slice(payload);
    write_headers(buf, ep, payload.len())
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Parse an Ethernet frame carrying UDP over IPv4 or IPv6. Never panics, whatever the bytes.
pub fn parse(frame: &[u8]) -> Result<Datagram<'_>, ParseError> {
    if frame.len() < ETH_LEN {
        return Err(ParseError::Truncated);
    }
    let dst_mac: Mac = frame[0..6].try_into().unwrap();
    let src_mac: Mac = frame[6..12].try_into().unwrap();
    let mut ethertype = be16(frame, 12);
    let mut off = ETH_LEN;
    for _ in 0..2 {
        if ethertype != ETHERTYPE_VLAN && ethertype != ETHERTYPE_QINQ {
            break;
        }
        if frame.len() < off + 4 {
            return Err(ParseError::Truncated);
        }
        ethertype = be16(frame, off + 2);
        off += 4;
    }
    let ip = &frame[off..];
    let (src_ip, dst_ip, udp): (IpAddr, IpAddr, &[u8]) = match ethertype {
        ETHERTYPE_IPV4 => {
            if ip.len() < IPV4_LEN {
                return Err(ParseError::Truncated);
            }
            let ihl = (ip[0] & 0x0f) as usize * 4;
            if ip[0] >> 4 != 4 || ihl < IPV4_LEN {
                return Err(ParseError::BadIpHeader);
            }
            let total = be16(ip, 2) as usize;
            if ip.len() < ihl || total < ihl || total > ip.len() {
                return Err(ParseError::BadLength);
            }
            if ipv4_checksum(&ip[..ihl]) != 0 {
                return Err(ParseError::BadIpChecksum);
            }
            if ip[9] != PROTO_UDP {
                return Err(ParseError::NotUdp);
            }
            if be16(ip, 6) & 0x3fff != 0 {
                return Err(ParseError::Fragment);
            }
            let s = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[12..16]).unwrap());
            let d = Ipv4Addr::from(<[u8; 4]>::try_from(&ip[16..20]).unwrap());
            (s.into(), d.into(), &ip[ihl..total])
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < IPV6_LEN {
                return Err(ParseError::Truncated);
            }
            if ip[0] >> 4 != 6 {
                return Err(ParseError::BadIpHeader);
            }
            if ip[6] != PROTO_UDP {
                return Err(ParseError::NotUdp);
            }
            let plen = be16(ip, 4) as usize;
            if IPV6_LEN + plen > ip.len() {
                return Err(ParseError::BadLength);
            }
            let s = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).unwrap());
            let d = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).unwrap());
            (s.into(), d.into(), &ip[IPV6_LEN..IPV6_LEN + plen])
        }
        _ => return Err(ParseError::NotIp),
    };
    if udp.len() < UDP_LEN {
        return Err(ParseError::Truncated);
    }
    let ulen = be16(udp, 4) as usize;
    if ulen < UDP_LEN || ulen > udp.len() {
        return Err(ParseError::BadLength);
    }
    let sock = |ip: IpAddr, port: u16| match ip {
        IpAddr::V4(a) => SocketAddr::V4(SocketAddrV4::new(a, port)),
        IpAddr::V6(a) => SocketAddr::V6(SocketAddrV6::new(a, port, 0, 0)),
    };
    Ok(Datagram {
        src_mac,
        dst_mac,
        src: sock(src_ip, be16(udp, 0)),
        dst: sock(dst_ip, be16(udp, 2)),
        payload: &udp[UDP_LEN..ulen],
    })
}

#[cfg(test)]
mod tests;
