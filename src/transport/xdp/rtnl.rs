//! Questions to the kernel's routing subsystem over rtnetlink (`netlink-packet-route` builds and
//! parses the messages, `netlink-sys` carries them): which route a packet to an address takes —
//! the kernel's own decision for a UDP packet from our address and port, rules and every table
//! included, like `ip route get to DST from SRC ipproto udp sport S dport D` — and what the
//! neighbour table (ARP, IPv6 neighbour discovery) holds for one address. Each answer is waited
//! for at most 2 s.

use std::io;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteType, RouteVia};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use crate::sys::netdev::poll_any_readable;
use crate::transport::packet::Mac;

/// The kernel answers these at once; a deadline all the same.
const WAIT: Duration = Duration::from_secs(2);

/// Where the kernel sends a packet for some address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    /// Interface index it leaves through.
    pub oif: u32,
    /// The gateway, when the destination is not on the link.
    pub gateway: Option<IpAddr>,
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// Send one request (a single-entry GET) and return the kernel's answer.
fn ask(msg: RouteNetlinkMessage) -> io::Result<Option<RouteNetlinkMessage>> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    sock.set_non_blocking(true)?;
    let mut hdr = NetlinkHeader::default();
    hdr.flags = NLM_F_REQUEST;
    hdr.sequence_number = 1;
    let mut req = NetlinkMessage::new(hdr, NetlinkPayload::from(msg));
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || !poll_any_readable(&[sock.as_fd()], left)? {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the kernel did not answer an rtnetlink request"));
        }
        let (data, _) = match sock.recv_from_full() {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut at = 0;
        while at < data.len() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink answer: {e}")))?;
            let len = m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(None),
                NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
                NetlinkPayload::Error(_) => return Ok(None), // an acknowledgement
                NetlinkPayload::InnerMessage(m) => return Ok(Some(m)),
                _ => {}
            }
            // Messages in a datagram start at 4-byte boundaries (NLMSG_ALIGN); a parsed
            // header is at least 16 bytes long.
            at += len.max(16).next_multiple_of(4);
        }
    }
}

/// The route the kernel takes for a UDP packet to `dst` from `src` (None: the address the kernel
/// would pick) with source and destination ports `ports` (0: not known, and then a rule on that
/// port does not match), or None when it would not send one out of an interface (no route; an
/// unreachable, prohibit or blackhole route or rule; a local address).
pub fn route_get(dst: IpAddr, src: Option<IpAddr>, ports: (u16, u16)) -> io::Result<Option<KernelRoute>> {
    let full = if dst.is_ipv4() { 32 } else { 128 };
    let mut m = RouteMessage::default();
    m.header.address_family = family(dst);
    m.header.destination_prefix_length = full;
    m.attributes.push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if let Some(src) = src.filter(|s| s.is_ipv4() == dst.is_ipv4() && !s.is_unspecified()) {
        m.header.source_prefix_length = full;
        m.attributes.push(RouteAttribute::Source(RouteAddress::from(src)));
    }
    m.attributes.push(RouteAttribute::IpProto(libc::IPPROTO_UDP as u8));
    if ports.0 != 0 {
        m.attributes.push(RouteAttribute::Sport(ports.0));
    }
    if ports.1 != 0 {
        m.attributes.push(RouteAttribute::Dport(ports.1));
    }
    let answer = match ask(RouteNetlinkMessage::GetRoute(m)) {
        Ok(a) => a,
        // What the kernel answers for no route (ENETUNREACH) and for unreachable (EHOSTUNREACH),
        // prohibit (EACCES) and blackhole (EINVAL) routes and rules.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH | libc::EACCES | libc::EINVAL)) => {
            tracing::debug!(%dst, error = %e, "the kernel has no route");
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    Ok(match answer {
        Some(RouteNetlinkMessage::NewRoute(r)) => route_of(&r),
        _ => None,
    })
}

/// The interface and gateway of a route the kernel returned; None unless it is unicast.
fn route_of(r: &RouteMessage) -> Option<KernelRoute> {
    if r.header.kind != RouteType::Unicast {
        return None;
    }
    let mut oif = None;
    let mut gateway = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
            // An IPv4 route through an IPv6 gateway (`via inet6`, RFC 5549) and the like.
            RouteAttribute::Via(RouteVia::Inet(g)) => gateway = Some(IpAddr::V4(*g)),
            RouteAttribute::Via(RouteVia::Inet6(g)) => gateway = Some(IpAddr::V6(*g)),
            _ => {}
        }
    }
    Some(KernelRoute { oif: oif?, gateway })
}

/// The Ethernet address the kernel's neighbour table holds for `ip` on interface `ifindex`, if
/// the entry is usable (reachable, stale, being confirmed, permanent, or no-ARP with an address).
/// One entry is asked for (`RTM_GETNEIGH` with the address, Linux 5.0+), not the whole table.
pub fn neighbour(ip: IpAddr, ifindex: u32) -> io::Result<Option<Mac>> {
    let mut m = NeighbourMessage::default();
    m.header.family = family(ip);
    m.header.ifindex = ifindex;
    m.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::from(ip)));
    match ask(RouteNetlinkMessage::GetNeighbour(m)) {
        Ok(Some(RouteNetlinkMessage::NewNeighbour(n))) => Ok(usable_mac(&n, ip, ifindex)),
        Ok(_) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn usable_mac(n: &NeighbourMessage, ip: IpAddr, ifindex: u32) -> Option<Mac> {
    use NeighbourState as S;
    if n.header.ifindex != ifindex || !matches!(n.header.state, S::Reachable | S::Stale | S::Delay | S::Probe | S::Permanent | S::Noarp) {
        return None;
    }
    let mut dst = None;
    let mut mac = None;
    for a in &n.attributes {
        match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => dst = Some(IpAddr::V4(*d)),
            NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => dst = Some(IpAddr::V6(*d)),
            NeighbourAttribute::LinkLayerAddress(l) => mac = <Mac>::try_from(l.as_slice()).ok(),
            _ => {}
        }
    }
    (dst == Some(ip)).then_some(mac?).filter(|m| *m != [0; 6])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn lo_index() -> u32 {
        crate::sys::netdev::netdev("lo").unwrap().index
    }

    #[test]
    fn a_unicast_route_names_its_interface_and_gateway() {
        let mut r = RouteMessage::default();
        r.header.kind = RouteType::Unicast;
        r.attributes.push(RouteAttribute::Oif(7));
        assert_eq!(route_of(&r), Some(KernelRoute { oif: 7, gateway: None }));
        r.attributes.push(RouteAttribute::Gateway(RouteAddress::Inet(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(route_of(&r), Some(KernelRoute { oif: 7, gateway: Some(Ipv4Addr::new(10, 0, 0, 1).into()) }));
        r.header.kind = RouteType::Unreachable;
        assert_eq!(route_of(&r), None, "a reject route carries nothing");
        r.header.kind = RouteType::Unicast;
        r.attributes.push(RouteAttribute::Via(RouteVia::Inet6("fe80::1".parse().unwrap())));
        assert_eq!(route_of(&r).unwrap().gateway, Some("fe80::1".parse().unwrap()), "an IPv4 route via inet6");
        r.attributes.retain(|a| !matches!(a, RouteAttribute::Oif(_)));
        assert_eq!(route_of(&r), None, "no interface, no route");
    }

    #[test]
    fn only_usable_neighbour_entries_give_an_address() {
        let ip: IpAddr = "fd00::2".parse::<Ipv6Addr>().unwrap().into();
        let mut n = NeighbourMessage::default();
        n.header.ifindex = 3;
        n.header.state = NeighbourState::Reachable;
        n.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet6("fd00::2".parse().unwrap())));
        n.attributes.push(NeighbourAttribute::LinkLayerAddress(vec![2, 0, 0, 0, 0, 9]));
        assert_eq!(usable_mac(&n, ip, 3), Some([2, 0, 0, 0, 0, 9]));
        assert_eq!(usable_mac(&n, ip, 4), None, "another interface");
        assert_eq!(usable_mac(&n, "fd00::3".parse().unwrap(), 3), None, "another address");
        n.header.state = NeighbourState::Incomplete;
        assert_eq!(usable_mac(&n, ip, 3), None, "not resolved yet");
        n.header.state = NeighbourState::Failed;
        assert_eq!(usable_mac(&n, ip, 3), None, "resolution failed");
    }

    #[test]
    fn a_neighbour_the_table_lacks_is_none() {
        // Loopback has no neighbours; the question must still get an answer.
        assert_eq!(neighbour(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)), lo_index()).unwrap(), None);
        assert_eq!(neighbour(IpAddr::V6(Ipv6Addr::LOCALHOST), lo_index()).unwrap(), None);
    }
}
