//! `Backend::Auto` and payload send requests against peers that do not
//! know them, over real loopback sockets.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc_core::{
    encode_head, Counters, Flags, Header, Kind, Limits, PayloadSend, PayloadSendLink,
};
use pagerpc_receiver::{Backend, PageBuf, Receiver, RecvConfig};
use pagerpc_sender::{Payload, SendConfig, Sender};

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

fn receiver(s: TcpStream, backend: Backend, counters: Arc<Counters>) -> Receiver {
    s.set_nonblocking(true).unwrap();
    let mut cfg = RecvConfig::default();
    cfg.backend = backend;
    Receiver::new(Arc::new(OwnedFd::from(s)), cfg, counters)
}

fn req(id: u64) -> Header {
    Header {
        call_id: id,
        kind: Kind::Request as i32,
        method: "m".into(),
        ..Default::default()
    }
}

fn deadline() -> Option<Instant> {
    Some(Instant::now() + Duration::from_secs(20))
}

fn pattern(len: usize, seed: usize) -> PageBuf {
    let mut b = PageBuf::new(len).unwrap();
    for (i, x) in b.iter_mut().enumerate() {
        *x = ((i * 31 + seed * 7) % 251) as u8;
    }
    b
}

/// A sender that does not mark its payloads (as an older pagerpc, or one
/// not linked to a receiver) writing with `MSG_ZEROCOPY`: Auto samples by
/// count, asks nothing, and every payload arrives whole, counted once.
#[test]
fn auto_against_a_sender_that_does_not_mark() {
    let (a, b) = pair();
    a.set_nonblocking(true).unwrap();
    let cfg = SendConfig {
        zerocopy: true,
        ..SendConfig::default()
    };
    let mut tx = Sender::new(Arc::new(OwnedFd::from(a)), cfg, Arc::new(Counters::new()));
    let counters = Arc::new(Counters::new());
    let mut rx = receiver(b, Backend::Auto, counters.clone());
    let link = Arc::new(PayloadSendLink::new());
    rx.set_payload_send_link(link.clone());
    let sizes = [1 << 20, (1 << 20) + 77, 512 << 10, 64 << 10, 100];
    let n = 40;
    let total: usize = (0..n).map(|k| sizes[k % sizes.len()]).sum();
    let writer = std::thread::spawn(move || {
        for k in 0..n {
            let p = pattern(sizes[k % sizes.len()], k);
            tx.send(req(k as u64), Payload::Pages(p.freeze())).unwrap();
        }
        assert!(tx.flush_zerocopy(Duration::from_secs(10)).unwrap());
        tx
    });
    for k in 0..n {
        let f = rx.recv_frame(deadline()).unwrap();
        assert_eq!(f.head.call_id(), k as u64);
        assert_eq!(f.head.header.payload_send, 0, "not marked");
        let want = pattern(sizes[k % sizes.len()], k);
        assert!(f.payload[..] == want[..], "payload {k} differs");
    }
    let _tx = writer.join().unwrap();
    let c = counters.snapshot();
    assert_eq!(c.payload_bytes_received, total as u64);
    assert_eq!(c.bytes_mapped + c.bytes_copied(), total as u64);
    assert_eq!(c.auto.bytes(), total as u64);
    assert_eq!(c.auto.payloads(), n as u64);
    // 16 of the 40 payloads are below the floor (64 KiB and 100 B).
    assert_eq!(c.auto.below_floor, 16);
    // Mapping was tried on some of the rest (every second payload while
    // it had no estimate), though nothing asked the peer.
    assert!(c.auto.map_chosen + c.auto.map_sample > 0, "{:?}", c.auto);
    assert!(!rx.has_payload_send_request());
    assert_eq!(
        link.take_request(),
        None,
        "a peer that does not mark is never asked"
    );
}

/// A receiver on any backend passes the peer's request on to its linked
/// sender, and still delivers the CREDIT frame that carried it (an older
/// receiver, which does not know the field, sees a CREDIT of 0 bytes).
#[test]
fn a_request_from_the_peer_reaches_the_linked_sender() {
    let (mut a, b) = pair();
    let counters = Arc::new(Counters::new());
    let mut rx = receiver(b, Backend::Copy, counters.clone());
    let link = Arc::new(PayloadSendLink::new());
    rx.set_payload_send_link(link.clone());
    let mut wire = Vec::new();
    for mode in [PayloadSend::Copy, PayloadSend::Zerocopy, PayloadSend::Copy] {
        let h = Header {
            kind: Kind::Credit as i32,
            payload_send: mode as i32,
            ..Default::default()
        };
        encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    }
    // A stream CREDIT with the field set is no request (call id not 0).
    let h = Header {
        call_id: 5,
        kind: Kind::Credit as i32,
        credit: 10,
        payload_send: PayloadSend::Zerocopy as i32,
        ..Default::default()
    };
    encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    a.write_all(&wire).unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let f = rx.recv_frame(deadline()).unwrap();
        assert_eq!(f.head.kind(), Kind::Credit);
        seen.push(f.head.header.payload_send);
        if f.head.call_id() == 0 {
            assert_eq!(f.head.header.credit, 0);
        }
    }
    assert_eq!(seen, [1, 2, 1, 2]);
    assert_eq!(link.peer_wants(), Some(PayloadSend::Copy));
    let c = counters.snapshot();
    assert_eq!((c.peer_asked_copy, c.peer_asked_zerocopy), (2, 1));
}
