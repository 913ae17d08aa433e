//! MSG_ZEROCOPY sends keep their payload alive until the kernel's
//! completion notification arrives, and not a moment less.

mod common;

use std::io::Read;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use common::{header, held_back_pair};
use pagerpc_core::Counters;
use pagerpc_pages::{PageBuf, Payload};
use pagerpc_sender::{SendConfig, Sender};

#[test]
fn payload_is_held_until_its_completion_arrives() {
    // A small receive buffer: the receiver's window closes quickly, so later
    // data waits in the sender's queue, still referencing the sender's pages.
    let (a, mut b) = held_back_pair();
    let counters = Arc::new(Counters::new());
    let cfg = SendConfig {
        zerocopy: true,
        ..SendConfig::default()
    };
    let mut tx = Sender::new(Arc::new(OwnedFd::from(a)), cfg, counters.clone());
    assert!(tx.zerocopy_active(), "{:?}", tx.zerocopy_off_reason());

    // Fill the window with copied bytes, then queue a zero-copy payload
    // behind them.
    let filler = vec![1u8; 1 << 20];
    tx.send(header(1), Payload::Vec(filler)).unwrap();
    let mut buf = PageBuf::new(1 << 20).unwrap();
    for (i, x) in buf.iter_mut().enumerate() {
        *x = (i % 253) as u8;
    }
    let pages = buf.freeze();
    tx.send(header(2), Payload::Pages(pages.clone())).unwrap();
    assert_eq!(counters.snapshot().zc_sends, 1);

    // Not transmitted, so not completed: the sender must still hold it.
    std::thread::sleep(Duration::from_millis(200));
    tx.reap_completions().unwrap();
    assert_eq!(tx.zerocopy_stats().pending_payloads, 1);
    assert_eq!(pages.shares(), 2, "released before its completion arrived");

    // Let the receiver drain everything: the data goes out, the completion
    // arrives, and only then is the payload released.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        while all.len() < (2 << 20) + 200 {
            match b.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => all.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("{e}"),
            }
            if all.len() >= (2 << 20) {
                // Both payloads and their heads are in.
                b.set_read_timeout(Some(Duration::from_millis(300)))
                    .unwrap();
            }
        }
        all
    });
    assert!(tx.flush_zerocopy(Duration::from_secs(10)).unwrap());
    assert_eq!(tx.zerocopy_stats().pending_payloads, 0);
    assert_eq!(pages.shares(), 1, "released once completed");
    assert!(counters.snapshot().zc_send_completions >= 1);
    drop(tx);
    let all = reader.join().unwrap();
    // The zero-copy payload arrived intact: it is the last 1 MiB.
    let tail = &all[all.len() - (1 << 20)..];
    assert!(tail.iter().enumerate().all(|(i, &x)| x == (i % 253) as u8));
}

/// A sender dropped while the kernel still holds one of its zero-copy
/// payloads (the peer stopped reading) returns at once and the payload is
/// released: the connection is aborted, so the kernel drops its send
/// queue and reports the completion. The old sender waited 2 s in drop,
/// then leaked the payload for good.
#[test]
fn dropping_a_sender_with_payloads_in_flight_neither_waits_nor_leaks() {
    let (a, b) = held_back_pair();
    let cfg = SendConfig {
        zerocopy: true,
        ..SendConfig::default()
    };
    let mut tx = Sender::new(Arc::new(OwnedFd::from(a)), cfg, Arc::new(Counters::new()));
    assert!(tx.zerocopy_active(), "{:?}", tx.zerocopy_off_reason());
    tx.send(header(1), Payload::Vec(vec![1u8; 1 << 20]))
        .unwrap();
    let pages = PageBuf::new(1 << 20).unwrap().freeze();
    tx.send(header(2), Payload::Pages(pages.clone())).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    tx.reap_completions().unwrap();
    assert_eq!(pages.shares(), 2, "the kernel still holds it");

    let t0 = std::time::Instant::now();
    drop(tx);
    let took = t0.elapsed();
    // 50 ms: far above the few syscalls it takes, far below the old 2 s.
    assert!(took < Duration::from_millis(50), "drop took {took:?}");
    let t0 = std::time::Instant::now();
    while pages.shares() > 1 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(pages.shares(), 1, "the payload was never released");
    assert_eq!(pagerpc_sender::graveyard::leaked_bytes(), 0);
    drop(b);
}

/// A payload that would take the bytes held for completions past
/// `zerocopy_max_inflight` waits for completions and still goes out with
/// MSG_ZEROCOPY. Sending it by copy instead (as an earlier version of the
/// non-blocking sender did) lands it at arbitrary offsets in the peer's
/// socket, where it cannot be mapped.
#[test]
fn a_payload_over_the_held_cap_waits_for_completions_instead_of_copying() {
    let (a, mut b) = held_back_pair();
    let cfg = SendConfig {
        zerocopy: true,
        zerocopy_max_inflight: 3 << 20,
        ..SendConfig::default()
    };
    let counters = Arc::new(Counters::new());
    let mut tx = Sender::new(Arc::new(OwnedFd::from(a)), cfg, counters.clone());
    assert!(tx.zerocopy_active(), "{:?}", tx.zerocopy_off_reason());
    // The peer reads nothing for a while: the first payload stays in the
    // send queue, uncompleted, so the second one does not fit the cap.
    let reader = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let mut n = 0;
        let mut chunk = vec![0u8; 1 << 16];
        b.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok(k) = b.read(&mut chunk) {
            if k == 0 {
                break;
            }
            n += k;
        }
        n
    });
    let first = PageBuf::new(2 << 20).unwrap().freeze();
    let second = PageBuf::new(2 << 20).unwrap().freeze();
    tx.send(header(1), Payload::Pages(first)).unwrap();
    assert!(!tx.awaiting_completions());
    tx.send(header(2), Payload::Pages(second)).unwrap();
    assert_eq!(
        counters.snapshot().zc_sends,
        2,
        "the second payload went by copy"
    );
    assert!(tx.flush_zerocopy(Duration::from_secs(10)).unwrap());
    drop(tx);
    assert!(reader.join().unwrap() >= 4 << 20);
}
