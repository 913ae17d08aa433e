//! Ownership back on failure: a send that fails hands the caller's payloads
//! back in its `SendError`, whether it failed part-way through a payload
//! (the stream is then broken) or before any byte of the frame was written
//! (the stream is then intact).

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::{header, set_rcvbuf, set_sndbuf};
use pagerpc_core::{Counters, FrameDecoder, Limits, Need};
use pagerpc_pages::Payload;
use pagerpc_sender::{OutFrame, SendConfig, SendErrorKind, Sender};

/// A connected pair with small buffers; the peer (returned second) reads
/// nothing until the test says so.
fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    set_rcvbuf(&listener, 64 * 1024);
    let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    set_sndbuf(&a, 64 * 1024);
    (a, b)
}

fn sender(a: TcpStream) -> Sender {
    let cfg = SendConfig {
        write_timeout: Some(Duration::from_millis(200)),
        ..SendConfig::default()
    };
    Sender::new(Arc::new(OwnedFd::from(a)), cfg, Arc::new(Counters::new()))
}

fn frame(id: u64, payload: Vec<u8>) -> OutFrame {
    OutFrame {
        header: header(id),
        payload: Payload::Vec(payload),
    }
}

/// Non-zero bytes that differ from payload to payload.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i % 251) as u8 ^ seed) | 1)
        .collect::<Vec<u8>>()
}

#[track_caller]
fn assert_same(got: &Payload, want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    assert!(got.as_slice() == want, "{what}: bytes differ");
}

/// Reads the stream to its end and returns the call id and payload length
/// of every frame in it.
fn read_frames(mut s: TcpStream) -> Vec<(u64, u64)> {
    let mut dec = FrameDecoder::new(Limits::default());
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut i = 0;
        while i < n {
            if let Need::Payload { remaining, .. } = dec.need() {
                let k = remaining.min((n - i) as u64);
                dec.payload_received(k);
                i += k as usize;
            } else {
                let (used, head) = dec.feed(&buf[i..n]).expect("malformed frame");
                i += used;
                if let Some(h) = head {
                    frames.push((h.call_id(), h.payload_len()));
                }
            }
        }
    }
    dec.finish().expect("the stream ends between frames");
    frames
}

#[test]
fn payload_of_a_send_that_stalls_part_way_is_handed_back() {
    let (a, _peer) = pair();
    let mut tx = sender(a);
    let data = pattern(8 << 20, 0x5a);
    let t0 = Instant::now();
    let err = tx
        .send(header(1), Payload::Vec(data.clone()))
        .expect_err("the peer reads nothing: 8 MiB cannot fit");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        t0.elapsed()
    );
    assert!(
        matches!(err.kind, SendErrorKind::TimedOut),
        "kind: {:?}",
        err.kind
    );
    assert!(err.partial, "part of the payload was written");
    assert!(tx.is_broken());
    assert_eq!(err.payloads.len(), 1, "the payload comes back");
    assert_same(&err.payloads[0], &data, "handed-back payload");
}

#[test]
fn frames_not_started_by_the_deadline_are_handed_back_and_the_stream_goes_on() {
    let (a, peer) = pair();
    let mut tx = sender(a);
    // Fill the socket: a frame whose payload cannot fit stays queued, part
    // written.
    let big = pattern(8 << 20, 0x11);
    tx.enqueue(vec![frame(1, big)]).unwrap();
    assert!(matches!(tx.flush(), Ok(pagerpc_sender::Flush::Blocked)));
    assert!(tx.has_queued());

    // A deadline already past: nothing of these frames can be written.
    let small = pattern(5000, 0x22);
    let inline = pattern(100, 0x33);
    let err = tx
        .send_batch_until(
            vec![frame(2, small.clone()), frame(3, inline.clone())],
            Some(Instant::now()),
        )
        .expect_err("the socket is full");
    assert!(
        matches!(err.kind, SendErrorKind::TimedOut),
        "kind: {:?}",
        err.kind
    );
    assert!(!err.partial, "nothing of these frames was written");
    assert!(!tx.is_broken(), "the stream is intact");
    assert_eq!(err.payloads.len(), 2, "both payloads come back");
    assert_same(&err.payloads[0], &small, "first handed-back payload");
    assert_same(&err.payloads[1], &inline, "second handed-back payload");

    // Once the peer reads, the first frame completes and later ones follow;
    // the abandoned frames never reach the wire.
    let reader = thread::spawn(move || read_frames(peer));
    tx.send_batch(vec![frame(4, pattern(3000, 0x44))])
        .expect("the sender is still usable");
    drop(tx);
    assert_eq!(reader.join().unwrap(), vec![(1, 8 << 20), (4, 3000)]);
}
