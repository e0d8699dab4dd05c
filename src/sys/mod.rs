//! Thin, safe adapters over the kernel interfaces wraith needs. Every `unsafe` block of the crate
//! lives under this module and carries a `// SAFETY:` comment; callers only see safe functions.
//! No domain policy here: errors stay `io::Error`, attributes stay raw stat fields.
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod arena;
pub mod disk;
pub mod fs;
pub mod mount;
pub mod net;
pub mod netdev;
pub mod process;
pub mod uring;
pub mod xdp_prog;
pub mod xsk;
