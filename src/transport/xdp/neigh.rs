//! Next hops and their Ethernet addresses, from the kernel: the IPv4 routing table
//! (`/proc/net/route`) and the neighbour (ARP) table (`/proc/net/arp`), both of the calling
//! process's network namespace. The kernel keeps doing ARP on the interface, because the XDP
//! filter passes ARP; when an entry is missing, one datagram through an ordinary socket to the
//! next hop's discard port makes the kernel resolve it. For IPv6: the routing table
//! (`/proc/net/ipv6_route`) and the interface addresses (`/proc/net/if_inet6`); the IPv6
//! neighbour table has no `/proc` file (only netlink), so an IPv6 peer's Ethernet address is
//! learned from its frames, and until then datagrams to it go through the kernel's UDP socket,
//! which does neighbour discovery (the filter passes ICMPv6). Parsers are pure and tested.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use crate::transport::packet::Mac;

/// One IPv4 route: packets to `dest/mask` leave through `iface`, via `gateway` if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub dest: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub metric: u32,
}

const RTF_UP: u32 = 0x1;
const RTF_GATEWAY: u32 = 0x2;
const ATF_COM: u32 = 0x2;

/// The kernel prints addresses as the hex of the 32-bit value as it sits in memory.
fn proc_ipv4(hex: &str) -> Option<Ipv4Addr> {
    let v = u32::from_str_radix(hex, 16).ok()?;
    Some(Ipv4Addr::from(v.to_ne_bytes()))
}

/// Parse `/proc/net/route`. Lines that do not parse, and routes that are not up, are skipped.
pub fn parse_routes(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Some(dest), Some(gw), Ok(flags), Ok(metric), Some(mask)) =
            (proc_ipv4(f[1]), proc_ipv4(f[2]), u32::from_str_radix(f[3], 16), f[6].parse::<u32>(), proc_ipv4(f[7]))
        else {
            continue;
        };
        // Routes that are down, and reject (unreachable, prohibit, blackhole) routes, carry
        // nothing; the kernel prints those with the interface "*".
        if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 || f[0] == "*" {
            continue;
        }
        let gateway = (flags & RTF_GATEWAY != 0 && !gw.is_unspecified()).then_some(gw);
        out.push(Route { iface: f[0].to_string(), dest, mask, gateway, metric });
    }
    out
}

/// The route the kernel's main table would pick for `dst`: longest prefix, then lowest metric.
pub fn lookup_route(routes: &[Route], dst: Ipv4Addr) -> Option<&Route> {
    routes
        .iter()
        .filter(|r| u32::from(dst) & u32::from(r.mask) == u32::from(r.dest) & u32::from(r.mask))
        .max_by(|a, b| u32::from(a.mask).count_ones().cmp(&u32::from(b.mask).count_ones()).then(b.metric.cmp(&a.metric)))
}

/// Parse `/proc/net/arp` into complete entries: (address, MAC, interface).
pub fn parse_arp(text: &str) -> Vec<(Ipv4Addr, Mac, String)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let Ok(ip) = f[0].parse::<Ipv4Addr>() else { continue };
        let Ok(flags) = u32::from_str_radix(f[2].trim_start_matches("0x"), 16) else { continue };
        let Some(mac) = parse_mac(f[3]) else { continue };
        if flags & ATF_COM == 0 || mac == [0; 6] {
            continue;
        }
        out.push((ip, mac, f[5].to_string()));
    }
    out
}

pub fn parse_mac(s: &str) -> Option<Mac> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in mac.iter_mut() {
        *m = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Why the next hop's MAC is not known.
#[derive(Debug)]
pub enum NeighError {
    /// No route, or the route leaves through another interface.
    NoRoute { dst: IpAddr, via: Option<String> },
    /// The kernel did not resolve the next hop in time.
    Unresolved { hop: Ipv4Addr },
    Io(io::Error),
}

impl std::fmt::Display for NeighError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NeighError::NoRoute { dst, via: None } => write!(f, "no route to {dst}"),
            NeighError::NoRoute { dst, via: Some(i) } => write!(f, "the route to {dst} leaves through {i}"),
            NeighError::Unresolved { hop } => write!(f, "the kernel could not resolve {hop} to an Ethernet address (ARP)"),
            NeighError::Io(e) => write!(f, "reading the kernel's tables: {e}"),
        }
    }
}

/// The next hop for `dst` if it leaves through `iface` (None: any interface).
pub fn next_hop(dst: Ipv4Addr, iface: Option<&str>) -> Result<(Ipv4Addr, String), NeighError> {
    let text = std::fs::read_to_string("/proc/net/route").map_err(NeighError::Io)?;
    let routes = parse_routes(&text);
    let r = lookup_route(&routes, dst).ok_or(NeighError::NoRoute { dst: dst.into(), via: None })?;
    if iface.is_some_and(|i| i != r.iface) {
        return Err(NeighError::NoRoute { dst: dst.into(), via: Some(r.iface.clone()) });
    }
    Ok((r.gateway.unwrap_or(dst), r.iface.clone()))
}

/// One IPv6 route from `/proc/net/ipv6_route`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub iface: String,
    pub dest: Ipv6Addr,
    pub plen: u8,
    pub next_hop: Option<Ipv6Addr>,
    pub metric: u32,
}

const RTF_REJECT: u32 = 0x0200;

fn hex_v6(h: &str) -> Option<Ipv6Addr> {
    (h.len() == 32).then(|| u128::from_str_radix(h, 16).ok().map(Ipv6Addr::from)).flatten()
}

/// Parse `/proc/net/ipv6_route` (all tables). Routes that are not up, reject routes and routes
/// through `lo` (the host's own addresses) are skipped.
pub fn parse_routes6(text: &str) -> Vec<Route6> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let (Some(dest), Ok(plen), Some(hop), Ok(metric), Ok(flags)) = (
            hex_v6(f[0]),
            u8::from_str_radix(f[1], 16),
            hex_v6(f[4]),
            u32::from_str_radix(f[5], 16),
            u32::from_str_radix(f[8], 16),
        ) else {
            continue;
        };
        if flags & RTF_UP == 0 || flags & RTF_REJECT != 0 || f[9] == "lo" || plen > 128 {
            continue;
        }
        let next_hop = (!hop.is_unspecified()).then_some(hop);
        out.push(Route6 { iface: f[9].to_string(), dest, plen, next_hop, metric });
    }
    out
}

/// Longest prefix, then lowest metric.
pub fn lookup_route6(routes: &[Route6], dst: Ipv6Addr) -> Option<&Route6> {
    let mask = |plen: u8| if plen == 0 { 0 } else { u128::MAX << (128 - plen as u32) };
    routes
        .iter()
        .filter(|r| u128::from(dst) & mask(r.plen) == u128::from(r.dest) & mask(r.plen))
        .max_by(|a, b| a.plen.cmp(&b.plen).then(b.metric.cmp(&a.metric)))
}

/// The IPv6 next hop for `dst` if it leaves through `iface` (None: any interface).
pub fn next_hop6(dst: Ipv6Addr, iface: Option<&str>) -> Result<(Ipv6Addr, String), NeighError> {
    let text = std::fs::read_to_string("/proc/net/ipv6_route").map_err(NeighError::Io)?;
    let routes = parse_routes6(&text);
    let r = lookup_route6(&routes, dst).ok_or(NeighError::NoRoute { dst: dst.into(), via: None })?;
    if iface.is_some_and(|i| i != r.iface) {
        return Err(NeighError::NoRoute { dst: dst.into(), via: Some(r.iface.clone()) });
    }
    Ok((r.next_hop.unwrap_or(dst), r.iface.clone()))
}

/// `if_inet6` flags of addresses not to use: DAD failed, deprecated, tentative.
const IFA_UNUSABLE: u32 = 0x08 | 0x20 | 0x40;

/// Parse `/proc/net/if_inet6`: (address, prefix length, scope, interface) of usable addresses.
pub fn parse_if_inet6(text: &str) -> Vec<(Ipv6Addr, u8, u8, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let (Some(a), Ok(plen), Ok(scope), Ok(flags)) =
            (hex_v6(f[0]), u8::from_str_radix(f[2], 16), u8::from_str_radix(f[3], 16), u32::from_str_radix(f[4], 16))
        else {
            continue;
        };
        if flags & IFA_UNUSABLE != 0 {
            continue;
        }
        out.push((a, plen, scope, f[5].to_string()));
    }
    out
}

/// The global-scope IPv6 addresses of `iface`.
pub fn ipv6_addrs(iface: &str) -> io::Result<Vec<Ipv6Addr>> {
    let text = match std::fs::read_to_string("/proc/net/if_inet6") {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()), // IPv6 disabled
        Err(e) => return Err(e),
    };
    Ok(parse_if_inet6(&text).into_iter().filter(|(_, _, scope, i)| *scope == 0 && i == iface).map(|(a, ..)| a).collect())
}

/// The neighbour table's MAC for `hop` on `iface`, if complete.
pub fn cached_mac(hop: Ipv4Addr, iface: &str) -> Result<Option<Mac>, NeighError> {
    let text = std::fs::read_to_string("/proc/net/arp").map_err(NeighError::Io)?;
    Ok(parse_arp(&text).into_iter().find(|(ip, _, dev)| *ip == hop && dev == iface).map(|(_, m, _)| m))
}

/// The MAC of `hop` on `iface`, asking the kernel to resolve it when it has none (bounded).
pub fn resolve(hop: Ipv4Addr, iface: &str, wait: Duration) -> Result<Mac, NeighError> {
    if let Some(m) = cached_mac(hop, iface)? {
        return Ok(m);
    }
    // Any datagram the kernel must send to `hop` starts ARP; the discard port ignores it.
    let s = UdpSocket::bind("0.0.0.0:0").map_err(NeighError::Io)?;
    let deadline = Instant::now() + wait;
    let mut next_poke = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_poke {
            let _ = s.send_to(b"wraith-arp", SocketAddrV4::new(hop, 9));
            next_poke = now + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(10));
        if let Some(m) = cached_mac(hop, iface)? {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            return Err(NeighError::Unresolved { hop });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTE: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0101A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
        wr0\t00014D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        eth0\t0001A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\t0\t0\t0\n\
        down\t00024D0A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        *\t00034D0A\t00000000\t0201\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";

    #[test]
    fn routes_parse_and_longest_prefix_wins() {
        if cfg!(target_endian = "big") {
            return; // the fixture is a little-endian host's file
        }
        let r = parse_routes(ROUTE);
        assert_eq!(r.len(), 3, "the route that is not up and the unreachable one are skipped");
        assert_eq!(r[1].dest, Ipv4Addr::new(10, 77, 1, 0));
        assert_eq!(r[1].mask, Ipv4Addr::new(255, 255, 255, 0));
        let hop = lookup_route(&r, Ipv4Addr::new(10, 77, 1, 2)).unwrap();
        assert_eq!((hop.iface.as_str(), hop.gateway), ("wr0", None));
        let def = lookup_route(&r, Ipv4Addr::new(8, 8, 8, 8)).unwrap();
        assert_eq!((def.iface.as_str(), def.gateway), ("eth0", Some(Ipv4Addr::new(192, 168, 1, 1))));
        assert!(lookup_route(&r[1..2], Ipv4Addr::new(10, 77, 2, 1)).is_none());
        assert_eq!(lookup_route(&r, Ipv4Addr::new(10, 77, 3, 9)).unwrap().iface, "eth0", "the reject route is not taken");
    }

    #[test]
    fn ipv6_routes_and_addresses_parse() {
        let t = "fd00007700000001000000000000000040 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 wx1\n                 fd000077000000010000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 wx1\n                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth0\n                 fd000077000000010000000000000002 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001 lo\n                 00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        let r = parse_routes6(t);
        assert_eq!(r.len(), 2, "malformed, local and reject routes are skipped: {r:?}");
        let on_link = lookup_route6(&r, "fd00:77:0:1::1".parse().unwrap()).unwrap();
        assert_eq!((on_link.iface.as_str(), on_link.next_hop), ("wx1", None));
        let def = lookup_route6(&r, "2001:db8::1".parse().unwrap()).unwrap();
        assert_eq!((def.iface.as_str(), def.next_hop), ("eth0", Some("fe80::1".parse().unwrap())));
        let a = parse_if_inet6(
            "fd000077000000010000000000000002 05 40 00 80     wx1\n             fe80000000000000a8bbccfffedd0e0f 05 40 20 80     wx1\n             fd000077000000010000000000000009 05 40 00 c0     wx1\n             fd00007700000001000000000000000a 05 40 00 a0     wx1\n             short\n",
        );
        assert_eq!(a.len(), 2, "tentative and deprecated addresses are skipped");
        assert_eq!(a[0], ("fd00:77:0:1::2".parse().unwrap(), 64, 0, "wx1".to_string()));
        assert_eq!(a[1].2, 0x20, "link-local scope");
    }

    #[test]
    fn arp_keeps_complete_entries_only() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.77.1.2        0x1         0x2         aa:bb:cc:dd:ee:0f     *        wr0\n\
                 10.77.1.3        0x1         0x0         00:00:00:00:00:00     *        wr0\n\
                 garbage\n";
        let a = parse_arp(t);
        assert_eq!(a, vec![(Ipv4Addr::new(10, 77, 1, 2), [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f], "wr0".to_string())]);
        assert_eq!(parse_mac("01:02:03:04:05"), None);
        assert_eq!(parse_mac("01:02:03:04:05:06:07"), None);
    }
}
