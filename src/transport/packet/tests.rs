use super::*;
use proptest::prelude::*;

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(a), port))
}

fn v6(a: [u8; 16], port: u16) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(a), port, 0, 0))
}

#[test]
fn ipv4_header_checksum_matches_a_known_header() {
    // A textbook header (total length 0x73, DF, TTL 64, UDP, 192.168.0.1 -> 192.168.0.199).
    let mut h = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00,
        0xc7,
    ];
    assert_eq!(ipv4_checksum(&h), 0xb861);
    h[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
    assert_eq!(ipv4_checksum(&h), 0, "a header with its checksum sums to zero");
}

#[test]
fn built_ipv4_frame_has_expected_fields() {
    let ep = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src: v4([10, 77, 1, 1], 7447),
        dst: v4([10, 77, 1, 2], 40000),
    };
    let mut buf = [0u8; 128];
    let n = build(&mut buf, &ep, b"hello").unwrap();
    assert_eq!(n, 14 + 20 + 8 + 5);
    assert_eq!(&buf[12..14], &[0x08, 0x00]);
    assert_eq!(buf[14], 0x45);
    assert_eq!(&buf[16..18], &(33u16).to_be_bytes()); // total length
    assert_eq!(&buf[20..22], &[0x40, 0x00]); // DF
    assert_eq!(ipv4_checksum(&buf[14..34]), 0);
    assert_eq!(&buf[34..36], &7447u16.to_be_bytes());
    assert_eq!(&buf[40..42], &[0, 0], "UDP checksum deliberately zero over IPv4");
}

#[test]
fn ipv6_udp_checksum_verifies() {
    let ep = Endpoints {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src: v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 7447),
        dst: v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2], 5000),
    };
    let mut buf = [0u8; 200];
    let n = build(&mut buf, &ep, &[0xab; 77]).unwrap();
    let udp = &buf[54..n];
    assert_ne!(&udp[6..8], &[0, 0]);
    // Summing the datagram with its checksum in place gives all ones: the check a receiver does.
    let acc = sum_words(udp, 0) + 17 + udp.len() as u64;
    let acc = sum_words(&buf[22..54], acc);
    assert_eq!(fold(acc), 0xffff);
}

#[test]
fn parse_rejects_what_it_must() {
    let ep = Endpoints { src_mac: [1; 6], dst_mac: [2; 6], src: v4([1, 2, 3, 4], 1), dst: v4([5, 6, 7, 8], 2) };
    let mut buf = [0u8; 100];
    let n = build(&mut buf, &ep, b"abc").unwrap();
    let good = buf[..n].to_vec();
    assert!(parse(&good).is_ok());
    let mut bad = good.clone();
    bad[24] ^= 1; // TTL changed without the checksum
    assert_eq!(parse(&bad), Err(ParseError::BadIpChecksum));
    let mut frag = good.clone();
    frag[20] = 0x20; // more fragments
    frag[24..26].copy_from_slice(&[0, 0]);
    let c = ipv4_checksum(&frag[14..34]);
    frag[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(parse(&frag), Err(ParseError::Fragment));
    assert_eq!(parse(&good[..n - 1]), Err(ParseError::BadLength), "IP length beyond the frame");
    let mut arp = good.clone();
    arp[12..14].copy_from_slice(&[0x08, 0x06]);
    assert_eq!(parse(&arp), Err(ParseError::NotIp));
    assert_eq!(build(&mut [0u8; 40], &ep, b"abc"), Err(BuildError::NoRoom));
    let mixed = Endpoints { dst: v6([0; 16], 1), ..ep };
    assert_eq!(write_headers(&mut [0u8; 100], &mixed, 0), Err(BuildError::MixedFamilies));
}

#[test]
fn parse_skips_vlan_tags_and_trailing_padding() {
    let ep = Endpoints { src_mac: [1; 6], dst_mac: [2; 6], src: v4([1, 2, 3, 4], 1), dst: v4([5, 6, 7, 8], 2) };
    let mut buf = [0u8; 100];
    let n = build(&mut buf, &ep, b"x").unwrap();
    let mut tagged = buf[..12].to_vec();
    tagged.extend_from_slice(&[0x81, 0x00, 0x00, 0x07]);
    tagged.extend_from_slice(&buf[12..n]);
    tagged.extend_from_slice(&[0; 13]); // Ethernet minimum-size padding
    let d = parse(&tagged).unwrap();
    assert_eq!(d.payload, b"x");
    assert_eq!(d.dst, ep.dst);
}

fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>(), any::<[u8; 4]>(), any::<u16>()).prop_map(|(a, p, b, q)| (v4(a, p), v4(b, q))),
        (any::<[u8; 16]>(), any::<u16>(), any::<[u8; 16]>(), any::<u16>()).prop_map(|(a, p, b, q)| (v6(a, p), v6(b, q))),
    ]
}

proptest! {
    #[test]
    fn build_then_parse_round_trips(
        (src, dst) in addr_pair(),
        src_mac in any::<[u8; 6]>(),
        dst_mac in any::<[u8; 6]>(),
        payload in proptest::collection::vec(any::<u8>(), 0..3000),
    ) {
        let ep = Endpoints { src_mac, dst_mac, src, dst };
        let mut buf = vec![0u8; 3100];
        let n = build(&mut buf, &ep, &payload).unwrap();
        prop_assert_eq!(n, header_len(dst.is_ipv6()) + payload.len());
        let d = parse(&buf[..n]).unwrap();
        prop_assert_eq!(d, Datagram { src_mac, dst_mac, src, dst, payload: &payload });
        if let (SocketAddr::V6(s), SocketAddr::V6(t)) = (src, dst) {
            // A checksum that verifies: recomputing over the datagram as sent gives 0 or 0xffff.
            let udp = &buf[54..n];
            let acc = sum_words(udp, 0) + 17 + udp.len() as u64;
            let acc = sum_words(&t.ip().octets(), sum_words(&s.ip().octets(), acc));
            prop_assert_eq!(fold(acc), 0xffff);
        }
    }

    #[test]
    fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse(&bytes);
    }

    #[test]
    fn parse_never_panics_on_damaged_frames(
        payload in proptest::collection::vec(any::<u8>(), 0..100),
        at in 0usize..200,
        val in any::<u8>(),
        cut in 0usize..200,
        ipv6 in any::<bool>(),
    ) {
        let (src, dst) = if ipv6 { (v6([1; 16], 1), v6([2; 16], 2)) } else { (v4([1; 4], 1), v4([2; 4], 2)) };
        let ep = Endpoints { src_mac: [1; 6], dst_mac: [2; 6], src, dst };
        let mut buf = vec![0u8; 200];
        let n = build(&mut buf, &ep, &payload).unwrap();
        let mut f = buf[..n].to_vec();
        if at < f.len() { f[at] = val; }
        f.truncate(cut.max(1));
        if let Ok(d) = parse(&f) {
            prop_assert!(d.payload.len() <= f.len());
        }
    }
}
