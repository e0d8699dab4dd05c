//! wraith: a verified, read-only network filesystem.
//!
//! Layers (arrows point down only):
//! `fuse` → `fs` → (`transport` → `proto`), `chunk`; `serve` → `chunk`; `sys` holds every `unsafe`.
//! See docs/ARCHITECTURE.md.
#![deny(unsafe_code)]

pub mod cache;
pub mod chunk;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod proto;
pub mod serve;
pub mod sys;
pub mod transport;
pub mod types;
pub mod cli;
pub mod daemon;
pub mod logging;
