//! A sender linked to its receiver honours the peer's requests to write
//! separate payloads by copy or with `MSG_ZEROCOPY`, says in each payload's
//! header how it went, and writes its own receiver's requests as CREDIT
//! frames on call 0. Checked on a real loopback connection, decoding what
//! the other end reads.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use common::header;
use pagerpc_core::{decode_stream, Counters, Kind, Limits, PayloadSend, PayloadSendLink};
use pagerpc_pages::{PageBuf, Payload};
use pagerpc_sender::{SendConfig, Sender};

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    a.set_nonblocking(true).unwrap();
    (a, b)
}

fn pages(len: usize) -> Payload {
    let mut b = PageBuf::new(len).unwrap();
    b.fill(7);
    Payload::Pages(b.freeze())
}

#[test]
fn linked_sender_honours_requests_marks_payloads_and_writes_its_own() {
    let (a, mut b) = pair();
    let counters = Arc::new(Counters::new());
    let cfg = SendConfig {
        zerocopy: true,
        ..SendConfig::default()
    };
    let mut tx = Sender::new(Arc::new(OwnedFd::from(a)), cfg, counters.clone());
    assert!(tx.zerocopy_active(), "{:?}", tx.zerocopy_off_reason());
    let link = Arc::new(PayloadSendLink::new());
    tx.set_payload_send_link(link.clone());

    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut chunk = vec![0u8; 1 << 16];
        while let Ok(n) = b.read(&mut chunk) {
            if n == 0 {
                break;
            }
            all.extend_from_slice(&chunk[..n]);
        }
        all
    });

    // Nothing asked: MSG_ZEROCOPY as configured, and said so.
    tx.send(header(1), pages(64 << 10)).unwrap();
    assert_eq!(counters.snapshot().zc_sends, 1);
    // The peer asks for copies: later payloads go by copy.
    link.peer_asked(PayloadSend::Copy);
    assert!(tx.peer_wants_copy());
    tx.send(header(2), pages(64 << 10)).unwrap();
    tx.send(header(3), pages(1 << 20)).unwrap();
    assert_eq!(
        counters.snapshot().zc_sends,
        1,
        "no MSG_ZEROCOPY after COPY"
    );
    // And for MSG_ZEROCOPY again.
    link.peer_asked(PayloadSend::Zerocopy);
    assert!(!tx.peer_wants_copy());
    tx.send(header(4), pages(64 << 10)).unwrap();
    assert_eq!(counters.snapshot().zc_sends, 2);
    // Small payloads are inline: never marked.
    tx.send(header(5), Payload::Vec(vec![1; 100])).unwrap();
    // Our own receiver's request goes out as CREDIT on call 0, ahead of the
    // next frame.
    link.ask_peer(PayloadSend::Copy);
    tx.send(header(6), Payload::Empty).unwrap();
    assert!(!link.has_request());
    let s = counters.snapshot();
    assert_eq!((s.asked_peer_copy, s.asked_peer_zerocopy), (1, 0));
    assert!(tx.flush_zerocopy(Duration::from_secs(10)).unwrap());
    drop(tx);

    let wire = reader.join().unwrap();
    let out = decode_stream(&wire, Limits::default(), &[]);
    assert_eq!(out.error, None);
    let seen: Vec<(Kind, u64, i32)> = out
        .frames
        .iter()
        .map(|f| (f.head.kind(), f.head.call_id(), f.head.header.payload_send))
        .collect();
    let (z, c, none) = (
        PayloadSend::Zerocopy as i32,
        PayloadSend::Copy as i32,
        PayloadSend::Unspecified as i32,
    );
    assert_eq!(
        seen,
        vec![
            (Kind::Request, 1, z),
            (Kind::Request, 2, c),
            (Kind::Request, 3, c),
            (Kind::Request, 4, z),
            (Kind::Request, 5, none),
            (Kind::Credit, 0, c),
            (Kind::Request, 6, none),
        ]
    );
    let credit = &out.frames[5];
    assert_eq!(credit.head.header.credit, 0);
    assert!(credit.payload.is_empty());
}

#[test]
fn unlinked_sender_does_not_mark_payloads() {
    let (a, mut b) = pair();
    let cfg = SendConfig {
        zerocopy: true,
        ..SendConfig::default()
    };
    let mut tx = Sender::new(Arc::new(OwnedFd::from(a)), cfg, Arc::new(Counters::new()));
    tx.send(header(1), pages(64 << 10)).unwrap();
    assert!(tx.flush_zerocopy(Duration::from_secs(10)).unwrap());
    drop(tx);
    let mut wire = Vec::new();
    b.read_to_end(&mut wire).unwrap();
    let out = decode_stream(&wire, Limits::default(), &[]);
    assert_eq!(out.frames.len(), 1);
    assert_eq!(out.frames[0].head.header.payload_send, 0);
}
