//! Fetch every chunk of one file through the protocol (no FUSE) with N requests in flight:
//! `cargo run --release --example fetch -- ADDR SHARE PATH KEYFILE [N]`. A diagnostic for the
//! transport alone; the benchmark script measures the mount.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};
use wraith::proto::msg::{Request, Response};
use wraith::transport::ClientTransport;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let addr = a[1].parse().unwrap();
    let key = wraith::cli::load_key(std::path::Path::new(&a[4])).unwrap();
    let n: usize = a.get(5).map_or(16, |s| s.parse().unwrap());
    let t = ClientTransport::connect(addr, key).unwrap();
    let to = Duration::from_secs(30);
    let Response::Opened { info, .. } = t.call(&Request::Open { share: a[2].clone(), path: a[3].clone().into_bytes() }, 4096, to).unwrap() else { panic!() };
    let cs = 1u64 << info.chunk_log2;
    let chunks = info.attr.size.div_ceil(cs);
    let start = Instant::now();
    let mut inflight = std::collections::VecDeque::new();
    let mut next = 0;
    let mut bytes = 0u64;
    while next < chunks || !inflight.is_empty() {
        while next < chunks && inflight.len() < n {
            let r = Request::Read { share: a[2].clone(), path: a[3].clone().into_bytes(), version: info.attr.version(), index: next };
            inflight.push_back(t.submit(&r, cs, to));
            next += 1;
        }
        if let Some(p) = inflight.pop_front() {
            if let Ok(Response::Data(d)) = p.wait() { bytes += d.len() as u64 } else { panic!("read failed") }
        }
    }
    let s = start.elapsed().as_secs_f64();
    println!("{} MiB in {:.2}s = {:.0} MB/s; {:?}", bytes >> 20, s, bytes as f64 / s / 1e6, t.stats());
}
