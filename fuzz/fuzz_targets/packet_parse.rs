//! Any bytes into the frame parser: it must not panic, and a frame it accepts must survive being
//! rebuilt from what it parsed (same addresses, ports and payload).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wraith::transport::packet::{build, parse, Endpoints};

fuzz_target!(|data: &[u8]| {
    let Ok(d) = parse(data) else { return };
    assert!(d.payload.len() <= data.len());
    let ep = Endpoints { src_mac: d.src_mac, dst_mac: d.dst_mac, src: d.src, dst: d.dst };
    let mut buf = vec![0u8; d.payload.len() + 64];
    let n = build(&mut buf, &ep, d.payload).expect("a parsed datagram can be rebuilt");
    let again = parse(&buf[..n]).expect("a built frame parses");
    assert_eq!(again.src, d.src);
    assert_eq!(again.dst, d.dst);
    assert_eq!(again.payload, d.payload);
});
