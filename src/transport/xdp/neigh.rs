//! Next hops and their Ethernet addresses, from the kernel of the calling process's network
//! namespace: the route a packet to a peer takes (`rtnl::route_get`: the kernel's own decision for
//! our source address and the ports, policy rules and every table included) and the neighbour table
//! (`rtnl::neighbour`: ARP for IPv4, neighbour discovery for IPv6). The kernel keeps resolving
//! neighbours on the interface, because the XDP filter passes ARP and ICMPv6; when an entry is
//! missing, one datagram through an ordinary socket to the next hop's discard port makes the kernel
//! resolve it. The interface's IPv6 addresses come from `/proc/net/if_inet6` (parser pure and
//! tested).

use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use super::rtnl;
use crate::sys::netdev;
use crate::transport::packet::Mac;

/// Why the next hop's MAC is not known.
#[derive(Debug)]
pub enum NeighError {
    /// No route, or the route leaves through another interface.
    NoRoute { dst: IpAddr, via: Option<String> },
    /// The kernel did not resolve the next hop in time.
    Unresolved { hop: IpAddr },
    Io(io::Error),
}

impl std::fmt::Display for NeighError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NeighError::NoRoute { dst, via: None } => write!(f, "no route to {dst}"),
            NeighError::NoRoute { dst, via: Some(i) } => write!(f, "the route to {dst} leaves through {i}"),
            NeighError::Unresolved { hop: hop @ IpAddr::V4(_) } => {
                write!(f, "the kernel could not resolve {hop} to an Ethernet address (ARP)")
            }
            NeighError::Unresolved { hop } => {
                write!(f, "the kernel could not resolve {hop} to an Ethernet address (neighbour discovery)")
            }
            NeighError::Io(e) => write!(f, "asking the kernel for a route or neighbour (rtnetlink): {e}"),
        }
    }
}

/// The next hop for a UDP packet from `src` to `dst` and the index of the interface it leaves
/// through, if that is `ifindex` (None: any interface). Port 0 in `src`: not known yet.
pub fn next_hop(dst: SocketAddr, src: Option<SocketAddr>, ifindex: Option<u32>) -> Result<(IpAddr, u32), NeighError> {
    let ports = (src.map_or(0, |s| s.port()), dst.port());
    let r = rtnl::route_get(dst.ip(), src.map(|s| s.ip()), ports).map_err(NeighError::Io)?;
    let dst = dst.ip();
    let r = r.ok_or(NeighError::NoRoute { dst, via: None })?;
    if ifindex.is_some_and(|i| i != r.oif) {
        let via = netdev::ifname(r.oif).unwrap_or_else(|_| format!("interface #{}", r.oif));
        return Err(NeighError::NoRoute { dst, via: Some(via) });
    }
    Ok((r.gateway.unwrap_or(dst), r.oif))
}

fn hex_v6(h: &str) -> Option<Ipv6Addr> {
    (h.len() == 32).then(|| u128::from_str_radix(h, 16).ok().map(Ipv6Addr::from)).flatten()
}

/// `if_inet6` flags of addresses not to use: DAD failed, deprecated, tentative.
const IFA_UNUSABLE: u32 = 0x08 | 0x20 | 0x40;

/// `if_inet6` flag of a temporary (privacy) address: it changes every day or so.
const IFA_TEMPORARY: u32 = 0x01;

/// Parse `/proc/net/if_inet6`: (address, prefix length, scope, interface) of usable addresses,
/// temporary ones after the others (a server answers on the first; a temporary address would
/// move away under its clients).
pub fn parse_if_inet6(text: &str) -> Vec<(Ipv6Addr, u8, u8, String)> {
    let mut out = Vec::new();
    let mut temporary = Vec::new();
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
        let to = if flags & IFA_TEMPORARY != 0 { &mut temporary } else { &mut out };
        to.push((a, plen, scope, f[5].to_string()));
    }
    out.extend(temporary);
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

/// The neighbour table's MAC for `hop` on interface `ifindex`, if the entry is usable.
pub fn cached_mac(hop: IpAddr, ifindex: u32) -> Result<Option<Mac>, NeighError> {
    rtnl::neighbour(hop, ifindex).map_err(NeighError::Io)
}

/// The MAC of `hop` on interface `ifindex`, asking the kernel to resolve it when it has none
/// (bounded by `wait`); `src` is our address, so that the kernel routes the datagram that makes
/// it resolve by the same rules as our packets.
pub fn resolve(hop: IpAddr, src: Option<IpAddr>, ifindex: u32, wait: Duration) -> Result<Mac, NeighError> {
    if let Some(m) = cached_mac(hop, ifindex)? {
        return Ok(m);
    }
    // Any datagram the kernel must send to `hop` starts ARP or neighbour discovery; the discard
    // port ignores it. A link-local IPv6 next hop needs its interface.
    let (any, to) = match hop {
        IpAddr::V4(_) => (IpAddr::from([0u8; 4]), SocketAddr::new(hop, 9)),
        IpAddr::V6(a) => (IpAddr::from([0u16; 8]), SocketAddr::V6(SocketAddrV6::new(a, 9, 0, scope(a, ifindex)))),
    };
    let from = src.filter(|s| s.is_ipv4() == hop.is_ipv4()).unwrap_or(any);
    let s = UdpSocket::bind(SocketAddr::new(from, 0)).or_else(|_| UdpSocket::bind(SocketAddr::new(any, 0))).map_err(NeighError::Io)?;
    let deadline = Instant::now() + wait;
    let mut next_poke = Instant::now();
    loop {
        let now = Instant::now();
        if now >= next_poke {
            let _ = s.send_to(b"wraith-neigh", to);
            next_poke = now + Duration::from_millis(500);
        }
        std::thread::sleep(Duration::from_millis(20));
        if let Some(m) = cached_mac(hop, ifindex)? {
            return Ok(m);
        }
        if Instant::now() >= deadline {
            return Err(NeighError::Unresolved { hop });
        }
    }
}

/// The scope id a socket address for `a` needs: the interface for a link-local address.
pub(super) fn scope(a: Ipv6Addr, ifindex: u32) -> u32 {
    if a.is_unicast_link_local() {
        ifindex
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_parse() {
        let a = parse_if_inet6(
            "fd000077000000010000000000000002 05 40 00 80     wx1\n             fe80000000000000a8bbccfffedd0e0f 05 40 20 80     wx1\n             fd000077000000010000000000000009 05 40 00 c0     wx1\n             fd00007700000001000000000000000a 05 40 00 a0     wx1\n             short\n",
        );
        assert_eq!(a.len(), 2, "tentative and deprecated addresses are skipped");
        assert_eq!(a[0], ("fd00:77:0:1::2".parse().unwrap(), 64, 0, "wx1".to_string()));
        assert_eq!(a[1].2, 0x20, "link-local scope");
    }

    #[test]
    fn temporary_addresses_come_after_stable_ones() {
        let a = parse_if_inet6("20010db8000000001111222233334444 05 40 00 01     wx1
20010db8000000000000000000000002 05 40 00 80     wx1
");
        let addrs: Vec<Ipv6Addr> = a.iter().map(|x| x.0).collect();
        assert_eq!(addrs, ["2001:db8::2".parse::<Ipv6Addr>().unwrap(), "2001:db8::1111:2222:3333:4444".parse().unwrap()]);
    }

    #[test]
    fn a_link_local_next_hop_needs_its_interface() {
        assert_eq!(scope("fe80::1".parse().unwrap(), 5), 5);
        assert_eq!(scope("fd00::1".parse().unwrap(), 5), 0);
    }

    #[test]
    fn the_kernels_own_address_has_no_route_out() {
        let lo = netdev::netdev("lo").unwrap().index;
        // The kernel sends nothing out of an interface for its own address.
        match next_hop("127.0.0.1:7447".parse().unwrap(), None, Some(lo)) {
            Err(NeighError::NoRoute { via: None, .. }) => {}
            other => panic!("{other:?}"),
        }
    }
}
