//! Builds wraith's XDP filter (bpf/wraith_xdp.c) into BPF bytecode with clang, the compiler the
//! AF_XDP library build (libxdp-sys) already requires. The object is embedded in the binaries
//! (`include_bytes!`), so nothing has to be installed next to them.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = "bpf/wraith_xdp.c";
    println!("cargo:rerun-if-changed={src}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("wraith_xdp.o");
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".into());
    // -g keeps the BTF that libbpf needs for the map definitions.
    let status = Command::new(&clang)
        .args(["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", "-c", src, "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {clang} to build {src}: {e} (apt-get install clang, or set CLANG)"));
    assert!(status.success(), "{clang} failed to build {src}");
}
