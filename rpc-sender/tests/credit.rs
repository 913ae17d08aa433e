//! Connection payload credit: a frame whose payload the peer has no credit
//! for waits, head and all; credit frames go ahead of it.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use common::header;
use pagerpc_core::{decode_stream, Counters, Header, Kind, Limits};
use pagerpc_pages::{PageBuf, Payload};
use pagerpc_sender::{Flush, OutFrame, SendConfig, Sender};

fn pair() -> (Sender, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nonblocking(true).unwrap();
    let fd = Arc::new(OwnedFd::from(a));
    (
        Sender::new(fd, SendConfig::default(), Arc::new(Counters::new())),
        b,
    )
}

fn frame(id: u64, len: usize) -> OutFrame {
    OutFrame {
        header: header(id),
        payload: Payload::Buf(PageBuf::new(len).unwrap()),
    }
}

fn credit(n: u64) -> OutFrame {
    OutFrame {
        header: Header {
            kind: Kind::Credit as i32,
            credit: n,
            ..Default::default()
        },
        payload: Payload::Empty,
    }
}

/// Reads what arrived within `wait` and decodes it: (kind, call id) pairs.
fn arrived(b: &mut TcpStream, buf: &mut Vec<u8>, wait: Duration) -> Vec<(Kind, u64)> {
    b.set_read_timeout(Some(wait)).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    while let Ok(n) = b.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    decode_stream(buf, Limits::default(), &[])
        .frames
        .iter()
        .map(|f| (f.head.kind(), f.head.call_id()))
        .collect()
}

#[test]
fn a_payload_without_credit_waits_head_and_all_and_credit_frames_go_ahead() {
    let (mut tx, mut b) = pair();
    tx.set_payload_window(256 * 1024);
    tx.enqueue(vec![frame(1, 200 * 1024), frame(2, 200 * 1024)])
        .unwrap();
    // The first fits the window; the second does not, and nothing of it
    // (not even its head) is written.
    assert_eq!(tx.flush().unwrap(), Flush::Blocked);
    assert!(tx.awaiting_credit());
    let mut buf = Vec::new();
    let got = arrived(&mut b, &mut buf, Duration::from_millis(200));
    assert_eq!(got, vec![(Kind::Request, 1)]);
    assert_eq!(
        decode_stream(&buf, Limits::default(), &[]).error,
        None,
        "the peer is between frames, not inside one"
    );
    // Credit we owe the peer goes out although a frame waits.
    tx.enqueue_urgent(vec![credit(77)]).unwrap();
    assert_eq!(tx.flush().unwrap(), Flush::Blocked);
    let got = arrived(&mut b, &mut buf, Duration::from_millis(200));
    assert_eq!(got, vec![(Kind::Request, 1), (Kind::Credit, 0)]);
    // The peer gives the first payload back: the second goes.
    tx.grant_credit(200 * 1024);
    assert_eq!(tx.flush().unwrap(), Flush::Done);
    assert!(!tx.awaiting_credit());
    let got = arrived(&mut b, &mut buf, Duration::from_millis(200));
    assert_eq!(
        got,
        vec![(Kind::Request, 1), (Kind::Credit, 0), (Kind::Request, 2)]
    );
}

#[test]
fn a_payload_larger_than_the_window_goes_alone() {
    let (mut tx, mut b) = pair();
    tx.set_payload_window(64 * 1024);
    tx.enqueue(vec![frame(1, 1 << 20)]).unwrap();
    let mut buf = Vec::new();
    let mut got = Vec::new();
    for _ in 0..100 {
        if tx.flush().unwrap() == Flush::Done {
            got = arrived(&mut b, &mut buf, Duration::from_millis(200));
            break;
        }
        got = arrived(&mut b, &mut buf, Duration::from_millis(10));
    }
    assert_eq!(got, vec![(Kind::Request, 1)]);
    // Nothing else goes until it is given back.
    tx.enqueue(vec![frame(2, 4096)]).unwrap();
    assert_eq!(tx.flush().unwrap(), Flush::Blocked);
    tx.grant_credit(1 << 20);
    assert_eq!(tx.flush().unwrap(), Flush::Done);
}
