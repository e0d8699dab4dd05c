//! The wraith protocol, sans-IO: message formats, session set-up, MACs, replay windows,
//! retransmission and the request window. Nothing here touches a socket, the clock or a thread;
//! `transport` drives it. Specified in docs/PROTOCOL.md.

pub mod cc;
pub mod client;
pub mod frame;
pub mod msg;
pub mod server;
pub mod session;
pub mod wire;

#[cfg(test)]
mod sim_tests;
