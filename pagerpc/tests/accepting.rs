//! Accepting connections is never held up by a call: the thread that
//! accepts a connection does not run its first call, and shutdown closes
//! the listener while calls still run.

mod common;

use std::io::Write as _;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pagerpc::proto::MetadataEntry;
use pagerpc::{CallOptions, Client, Payload, Status};

/// Regression: the pool thread that accepted a connection also read its
/// first request and ran the handler inline, still holding the listener
/// and before re-arming it. A slow first call on a new connection then
/// kept every other connection from being accepted, and `shutdown` waited
/// for that handler before it could close the listener. (Seen as a rare
/// failure of `graceful_shutdown_finishes_inflight_calls`: the listener
/// lock was held for 15 s.) In a file of its own: it keeps both CPUs
/// busy for a few seconds, which would slow the other tests of a file.
#[test]
fn a_slow_first_call_on_a_new_connection_does_not_hold_up_accepting() {
    with_watchdog(Duration::from_secs(120), "slow first call", || {
        // Call `n` (in the order they start) blocks until `released` > n.
        let released = Arc::new(AtomicUsize::new(0));
        let (started_tx, started) = mpsc::channel::<usize>();
        let started_tx = Mutex::new(started_tx);
        let tickets = AtomicUsize::new(0);
        let server = {
            let released = released.clone();
            echo_builder()
                .config(config(2))
                .register("block", move |_ctx, req: MetadataEntry, _pages| {
                    let n = tickets.fetch_add(1, Ordering::SeqCst);
                    let _ = started_tx.lock().unwrap().send(n);
                    let t0 = Instant::now();
                    while released.load(Ordering::SeqCst) <= n
                        && t0.elapsed() < Duration::from_secs(20)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok::<_, Status>((req, Payload::Empty))
                })
                .bind("127.0.0.1:0")
                .unwrap()
        };
        let addr = server.local_addr();
        let opts = CallOptions {
            timeout: Some(Duration::from_secs(3)),
            ..CallOptions::default()
        };
        // A connection whose first request goes out right behind the
        // handshake, often before the server has accepted it; returns once
        // that call blocks.
        let blocked_call = |n: usize| {
            let mut raw = TcpStream::connect(addr).unwrap();
            raw.write_all(&raw_request(1, "block", b"")).unwrap();
            assert_eq!(started.recv_timeout(Duration::from_secs(5)).unwrap(), n);
            raw
        };
        // Whether the thread that accepts a connection also reads its first
        // request depends on timing: another pool thread must take the new
        // socket's readiness while the accepting one still owns it, which
        // takes the accepting thread being preempted in a window of a few
        // microseconds. Threads spinning on every CPU make that likely, and
        // the scenario repeats.
        let stop_spin = Arc::new(AtomicBool::new(false));
        let spinners: Vec<_> = (0..2)
            .map(|_| {
                let stop = stop_spin.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        const ROUNDS: usize = 3000;
        for round in 0..ROUNDS {
            let _raw = blocked_call(round);
            // While that call blocks, a new connection is accepted and
            // served by the other pool thread.
            let t0 = Instant::now();
            let client = Client::connect(addr).unwrap();
            let r = client.call_with::<_, MetadataEntry>(
                "echo",
                &msg("meanwhile"),
                Payload::Empty,
                &opts,
            );
            assert!(
                r.is_ok(),
                "round {round}: a new connection was not served while a first call blocked: \
                 {:?} after {:?}",
                r.err(),
                t0.elapsed()
            );
            released.store(round + 1, Ordering::SeqCst);
        }
        stop_spin.store(true, Ordering::Relaxed);
        for s in spinners {
            s.join().unwrap();
        }
        // Shutdown closes the listener at once, then waits for the call
        // still blocked.
        let _raw = blocked_call(ROUNDS);
        let stopper = std::thread::spawn(move || server.shutdown());
        assert!(
            wait_until(Duration::from_secs(3), || TcpStream::connect(addr).is_err()),
            "the listener was not closed while a call blocked"
        );
        released.store(ROUNDS + 1, Ordering::SeqCst);
        stopper.join().unwrap();
    });
}
