//! Helpers shared by the send half's socket tests.
#![allow(dead_code)]

use std::net::TcpStream;

use nix::sys::socket::{setsockopt, sockopt};
use pagerpc_core::{Header, Kind};

/// Sets a socket's receive buffer size (`SO_RCVBUF`; the kernel doubles it).
pub fn set_rcvbuf<F: std::os::fd::AsFd>(s: &F, bytes: usize) {
    setsockopt(s, sockopt::RcvBuf, &bytes).unwrap();
}

/// Sets a socket's send buffer size (`SO_SNDBUF`; the kernel doubles it).
pub fn set_sndbuf(s: &TcpStream, bytes: usize) {
    setsockopt(s, sockopt::SndBuf, &bytes).unwrap();
}

/// A request header with call id `id`.
pub fn header(id: u64) -> Header {
    Header {
        call_id: id,
        kind: Kind::Request as i32,
        method: "m".into(),
        ..Default::default()
    }
}
