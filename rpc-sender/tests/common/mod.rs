//! Helpers shared by the send half's socket tests.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};

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

/// A connected pair whose receiving end `b` has a small receive buffer
/// (its window closes quickly, so later data waits in `a`'s send queue,
/// still referencing `a`'s pages) and whose sending end `a` has room for
/// 8 MiB and is non-blocking.
pub fn held_back_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    set_rcvbuf(&listener, 16 * 1024);
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    set_sndbuf(&a, 8 << 20);
    a.set_nonblocking(true).unwrap();
    (a, b)
}
