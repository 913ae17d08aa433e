//! The send and receive halves over real loopback sockets.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc_core::{encode_head, CodecError, Counters, Flags, Header, Kind, Limits, Section};
use pagerpc_receiver::{Receiver, RecvConfig, RecvError};
use pagerpc_sender::{OutFrame, Payload, SendConfig, SendErrorKind, Sender};

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

fn receiver(s: TcpStream) -> Receiver {
    s.set_nonblocking(true).unwrap();
    Receiver::new(
        Arc::new(OwnedFd::from(s)),
        RecvConfig::default(),
        Arc::new(Counters::new()),
    )
}

fn sender(s: TcpStream) -> Sender {
    s.set_nonblocking(true).unwrap();
    Sender::new(
        Arc::new(OwnedFd::from(s)),
        SendConfig::default(),
        Arc::new(Counters::new()),
    )
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + 7) % 251) as u8 ^ seed)
        .collect()
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

#[test]
fn batches_of_mixed_sizes_arrive_whole_and_in_order() {
    let (a, b) = pair();
    let mut tx = sender(a);
    let mut rx = receiver(b);
    let sizes = [0usize, 1, 100, 4095, 4096, 4097, 70_000, (1 << 20) + 13, 3];
    let t = std::thread::spawn(move || {
        let frames = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| OutFrame {
                header: req(i as u64),
                payload: Payload::Vec(pattern(n, i as u8)),
            })
            .collect();
        tx.send_batch(frames).unwrap();
        tx
    });
    for (i, &n) in sizes.iter().enumerate() {
        let f = rx.recv_frame(deadline()).unwrap();
        assert_eq!(f.head.call_id(), i as u64);
        assert_eq!(f.payload.len(), n);
        assert!(*f.payload == pattern(n, i as u8)[..], "frame {i}");
        if n > 0 {
            assert_eq!(
                f.payload.as_ptr() as usize % 4096,
                0,
                "payload is page-aligned"
            );
        }
    }
    let _tx = t.join().unwrap();
    let c = rx.counters().snapshot();
    assert_eq!(c.frames_received, sizes.len() as u64);
    assert_eq!(c.payload_bytes_received, sizes.iter().sum::<usize>() as u64);
    assert_eq!(
        c.bytes_copied(),
        c.payload_bytes_received,
        "the copy backend copies every byte"
    );
}

#[test]
fn partial_writes_with_a_tiny_send_buffer() {
    let (a, b) = pair();
    // The 8 MiB payload is far larger than the default socket buffers, so
    // the sender meets EAGAIN and partial writes while the reader sleeps.
    let mut tx = sender(a);
    let mut rx = receiver(b);
    let payload = pattern(8 << 20, 9);
    let expect = payload.clone();
    let t = std::thread::spawn(move || tx.send(req(1), Payload::Vec(payload)).map(|_| ()));
    // Read slowly at first, so the sender sees EAGAIN and partial writes.
    std::thread::sleep(Duration::from_millis(100));
    let f = rx.recv_frame(deadline()).unwrap();
    assert!(*f.payload == expect[..]);
    t.join().unwrap().unwrap();
}

#[test]
fn bytes_dribbled_one_at_a_time_still_decode() {
    let (mut a, b) = pair();
    a.set_nodelay(true).unwrap();
    let mut rx = receiver(b);
    let limits = Limits::default();
    let payload = pattern(5000, 3);
    let mut wire = Vec::new();
    encode_head(
        &req(5),
        payload.len() as u64,
        Flags::NONE,
        &limits,
        &mut wire,
    )
    .unwrap();
    wire.extend_from_slice(&payload);
    let t = std::thread::spawn(move || {
        for chunk in wire.chunks(997) {
            a.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        a
    });
    let f = rx.recv_frame(deadline()).unwrap();
    assert_eq!(f.head.call_id(), 5);
    assert!(*f.payload == payload[..]);
    drop(t.join().unwrap());
}

#[test]
fn truncation_is_an_error_never_a_short_payload() {
    let limits = Limits::default();
    let payload = pattern(100_000, 1);
    let mut wire = Vec::new();
    let head_len = encode_head(
        &req(1),
        payload.len() as u64,
        Flags::NONE,
        &limits,
        &mut wire,
    )
    .unwrap();
    wire.extend_from_slice(&payload);
    for (cut, section) in [
        (7, Section::Prefix),
        (head_len - 1, Section::Header),
        (head_len + 50_000, Section::Payload),
    ] {
        let (mut a, b) = pair();
        let mut rx = receiver(b);
        a.write_all(&wire[..cut]).unwrap();
        drop(a);
        match rx.recv_frame(deadline()) {
            Err(RecvError::Codec(CodecError::Truncated { section: s, .. })) => {
                assert_eq!(s, section)
            }
            other => panic!("cut at {cut}: {other:?}"),
        }
        // The error is sticky.
        assert!(matches!(rx.poll_frame(), Err(RecvError::Codec(_))));
    }
    // A clean close between frames is not an error of the stream.
    let (a, b) = pair();
    let mut rx = receiver(b);
    drop(a);
    assert!(matches!(rx.recv_frame(deadline()), Err(RecvError::Closed)));
}

#[test]
fn a_lying_length_is_refused_before_allocating() {
    let (mut a, b) = pair();
    let mut rx = receiver(b);
    let big = Limits {
        max_payload_bytes: u64::MAX,
        ..Limits::default()
    };
    let mut wire = Vec::new();
    encode_head(&req(1), 1 << 50, Flags::NONE, &big, &mut wire).unwrap();
    a.write_all(&wire).unwrap();
    match rx.recv_frame(deadline()) {
        Err(RecvError::Codec(CodecError::PayloadTooLarge { limit, got })) => {
            assert_eq!(limit, Limits::default().max_payload_bytes);
            assert_eq!(got, 1 << 50);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn timeouts_resume_where_they_left_off() {
    let (mut a, b) = pair();
    let mut rx = receiver(b);
    let limits = Limits::default();
    let payload = pattern(300_000, 4);
    let mut wire = Vec::new();
    encode_head(
        &req(1),
        payload.len() as u64,
        Flags::NONE,
        &limits,
        &mut wire,
    )
    .unwrap();
    wire.extend_from_slice(&payload);
    a.write_all(&wire[..100_000]).unwrap();
    let short = Some(Instant::now() + Duration::from_millis(50));
    assert!(matches!(rx.recv_frame(short), Err(RecvError::TimedOut)));
    a.write_all(&wire[100_000..]).unwrap();
    let f = rx.recv_frame(deadline()).unwrap();
    assert!(*f.payload == payload[..]);
}

#[test]
fn a_refused_send_hands_the_payload_back_and_writes_nothing() {
    let (a, b) = pair();
    let mut tx = sender(a);
    let mut rx = receiver(b);
    let mut bad = req(1);
    bad.method = "x".repeat(1000);
    let payload = pattern(10_000, 2);
    let err = tx.send(bad, Payload::Vec(payload.clone())).unwrap_err();
    assert!(matches!(
        err.kind,
        SendErrorKind::Codec(CodecError::MethodNameTooLong {
            limit: 256,
            got: 1000
        })
    ));
    assert!(!err.partial);
    match err.into_payload() {
        Payload::Vec(v) => assert_eq!(v, payload),
        other => panic!("{other:?}"),
    }
    // Nothing reached the wire: the next frame is the first one seen.
    tx.send(req(2), Payload::Empty).unwrap();
    assert_eq!(rx.recv_frame(deadline()).unwrap().head.call_id(), 2);
}

/// A blocking receive of a small frame right after a large payload must not
/// wait for the low-water mark the payload set.
#[test]
fn small_frame_after_large_payload_with_blocking_reads() {
    let (a, b) = pair();
    let mut tx = sender(a);
    // A blocking socket, so recv_frame(None) sleeps in recv itself.
    let mut rx = Receiver::new(
        Arc::new(OwnedFd::from(b)),
        RecvConfig::default(),
        Arc::new(Counters::new()),
    );
    let t = std::thread::spawn(move || {
        tx.send(req(1), Payload::Vec(pattern(3 << 20, 1))).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        tx.send(req(2), Payload::Vec(pattern(10, 2))).unwrap();
        tx
    });
    assert_eq!(rx.recv_frame(None).unwrap().payload.len(), 3 << 20);
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let h = std::thread::spawn(move || {
        let f = rx.recv_frame(None).map(|f| f.head.call_id());
        let _ = done_tx.send(());
        f
    });
    assert!(
        done_rx.recv_timeout(Duration::from_secs(10)).is_ok(),
        "the small frame after a large payload never arrived"
    );
    assert_eq!(h.join().unwrap().unwrap(), 2);
    let _tx = t.join().unwrap();
}
