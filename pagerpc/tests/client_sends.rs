//! The client's send path: a call's deadline bounds its send, a call whose
//! request never left is handed its payload back, PING and CANCEL never
//! wait behind a blocked send, and one thread that starts many large calls
//! before waiting on any does not deadlock with a server that stops reading
//! until its responses are read.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use common::*;
use pagerpc::codec::{FrameDecoder, Kind, Need};
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallError, CallOptions, Client, Code, Limits, Pages, Payload, PendingCall, Response, Status,
};

/// Far more than the socket buffers of a connection whose peer never
/// reads hold, so a send of it blocks part-way.
const BIG: usize = 64 << 20;

/// Generous bound for something that should take about 500 ms.
const PROMPT: Duration = Duration::from_secs(3);

fn body(key: &str) -> Vec<u8> {
    msg(key).encode_to_vec()
}

fn timeout(t: Duration) -> CallOptions {
    CallOptions {
        timeout: Some(t),
        ..CallOptions::default()
    }
}

/// A client connected to a peer that reads nothing until [`drain`]: the
/// kernel buffers a little of what the client sends, then takes no more.
fn connect_raw() -> (TcpStream, Client) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    (peer, client)
}

/// Bytes that have arrived at `peer` and not been read (up to 64 KiB).
fn arrived(peer: &TcpStream) -> usize {
    let mut buf = vec![0u8; 64 << 10];
    peer.set_nonblocking(true).unwrap();
    let n = peer.peek(&mut buf).unwrap_or(0);
    peer.set_nonblocking(false).unwrap();
    n
}

/// Starts a call with a `BIG` payload on another thread and returns once
/// its first bytes reached `peer` (which already holds `before` bytes):
/// that thread then holds the connection's send side until the peer reads.
fn block_sender(
    client: &Client,
    peer: &TcpStream,
    before: usize,
) -> JoinHandle<Result<PendingCall, CallError>> {
    let c = client.clone();
    let h = thread::spawn(move || {
        c.start_call(
            "echo",
            body("big"),
            pattern(BIG, 1),
            &CallOptions::default(),
        )
    });
    assert!(
        wait_until(Duration::from_secs(10), || arrived(peer) > before + 4096),
        "the big request never reached the peer"
    );
    h
}

/// Reads the connection to its end, returning the kind and call id of
/// every frame the client sent.
fn drain(mut peer: TcpStream) -> JoinHandle<Vec<(Kind, u64)>> {
    thread::spawn(move || {
        let mut dec = FrameDecoder::new(Limits::default());
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match peer.read(&mut buf) {
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
                    let (used, head) = dec
                        .feed(&buf[i..n])
                        .expect("the client sent a malformed frame");
                    i += used;
                    if let Some(h) = head {
                        if h.kind() != Kind::Settings && h.kind() != Kind::Credit {
                            frames.push((h.kind(), h.call_id()));
                        }
                    }
                }
            }
        }
        frames
    })
}

/// Runs `f` on another thread and returns its result with how long it
/// took, failing if it takes more than 5 s: a call that waits behind
/// another thread's blocked send would otherwise wait for the 30 s write
/// timeout.
fn prompt<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> (T, Duration) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let t0 = Instant::now();
        let r = f();
        let _ = tx.send((r, t0.elapsed()));
    });
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what}: still blocked after 5 s"))
}

#[test]
fn deadline_cuts_short_a_send_the_server_does_not_read() {
    with_watchdog(Duration::from_secs(60), "blocked send", || {
        let (_peer, client) = connect_raw();
        let data = pattern(BIG, 7);
        let t0 = Instant::now();
        let mut err = client
            .start_call(
                "echo",
                body("k"),
                data.clone(),
                &timeout(Duration::from_millis(500)),
            )
            .expect_err("the server reads nothing: the send cannot complete");
        let took = t0.elapsed();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(took < PROMPT, "failed after {took:?}, not at its deadline");
        // Part of the request went out: the payload (sent by copy) comes
        // back, and the connection, whose stream is now cut, is failed.
        let back = err.take_payload().expect("the payload is handed back");
        assert_bytes_eq(back.as_slice(), &data, "handed back");
        let mut later = client
            .call::<_, MetadataEntry>("echo", &msg("later"), vec![5u8; 10])
            .unwrap_err();
        assert_eq!(later.code(), Code::Unavailable, "{later}");
        assert_eq!(later.take_payload().unwrap().as_slice(), [5u8; 10]);
    });
}

#[test]
fn call_behind_a_blocked_send_fails_at_its_deadline_with_its_payload() {
    with_watchdog(Duration::from_secs(60), "queued call", || {
        let (peer, client) = connect_raw();
        let big = block_sender(&client, &peer, 0);
        let small = pattern(64 << 10, 2);
        let (r, took) = {
            let (c, small) = (client.clone(), small.clone());
            prompt("a call behind a blocked send", move || {
                c.start_call(
                    "echo",
                    body("small"),
                    small,
                    &timeout(Duration::from_millis(500)),
                )
                .map(|p| p.id())
            })
        };
        let mut err = r.expect_err("its request cannot have been sent");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(took < PROMPT, "failed after {took:?}, not at its deadline");
        let back = err
            .take_payload()
            .expect("nothing was written: payload back");
        assert_bytes_eq(back.as_slice(), &small, "handed back");

        // The connection is intact: once the peer reads, the big request
        // completes and later ones follow; the abandoned one never went out.
        let wire = drain(peer);
        let big = big.join().unwrap().expect("the big request is sent");
        let later = client
            .start_call(
                "echo",
                body("later"),
                pattern(1000, 3),
                &CallOptions::default(),
            )
            .expect("the connection still works");
        let want = vec![big.id(), later.id()];
        drop((big, later));
        client.close();
        let requests: Vec<u64> = wire
            .join()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| *k == Kind::Request)
            .map(|(_, id)| id)
            .collect();
        assert_eq!(requests, want, "requests on the wire");
    });
}

#[test]
fn ping_behind_a_blocked_send_fails_at_its_timeout() {
    with_watchdog(Duration::from_secs(60), "ping", || {
        let (peer, client) = connect_raw();
        let big = block_sender(&client, &peer, 0);
        let (r, took) = {
            let c = client.clone();
            prompt("a ping behind a blocked send", move || {
                c.ping(Duration::from_millis(500))
            })
        };
        let err = r.expect_err("the ping cannot have been sent");
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(took < PROMPT, "failed after {took:?}, not at its timeout");

        let wire = drain(peer);
        let big = big.join().unwrap().expect("the big request is sent");
        drop(big);
        client.close();
        let frames = wire.join().unwrap();
        assert!(
            frames.iter().all(|(k, _)| *k != Kind::Ping),
            "the abandoned ping went out: {frames:?}"
        );
    });
}

#[test]
fn cancel_behind_a_blocked_send_does_not_wait_and_is_sent_later() {
    with_watchdog(Duration::from_secs(60), "cancel", || {
        let (peer, client) = connect_raw();
        let first = client
            .start_call(
                "echo",
                body("first"),
                pattern(1000, 4),
                &CallOptions::default(),
            )
            .unwrap();
        let first_id = first.id();
        assert!(
            wait_until(Duration::from_secs(10), || arrived(&peer) > 1000),
            "the first request never reached the peer"
        );
        let big = block_sender(&client, &peer, arrived(&peer));
        let ((), took) = prompt("a cancel behind a blocked send", move || first.cancel());
        assert!(took < PROMPT, "cancel took {took:?}");

        // Once the peer reads, the CANCEL goes out before the next request.
        let wire = drain(peer);
        let big = big.join().unwrap().expect("the big request is sent");
        let later = client
            .start_call(
                "echo",
                body("later"),
                pattern(1000, 5),
                &CallOptions::default(),
            )
            .expect("the connection still works");
        let want = vec![
            (Kind::Request, first_id),
            (Kind::Request, big.id()),
            (Kind::Cancel, first_id),
            (Kind::Request, later.id()),
        ];
        drop((big, later));
        client.close();
        let frames = wire.join().unwrap();
        assert!(
            frames.len() >= want.len() && frames[..want.len()] == want[..],
            "frames on the wire: {frames:?}, want them to start with {want:?}"
        );
    });
}

#[test]
fn one_thread_starting_many_large_echo_calls_before_waiting_completes_them_all() {
    with_watchdog(Duration::from_secs(120), "many large calls", || {
        const CALLS: usize = 64;
        const LEN: usize = 8 << 20;
        let server = echo_builder()
            .config(config(2))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        // Both directions fill: the server queues responses up to its
        // outbound budget and then stops reading this connection, so the
        // client must read while it sends.
        let calls: Vec<PendingCall> = (0..CALLS)
            .map(|i| {
                client
                    .start_call(
                        "echo",
                        body(&format!("c{i}")),
                        pattern(LEN, i as u64),
                        &CallOptions::default(),
                    )
                    .unwrap_or_else(|e| panic!("start_call {i}: {e}"))
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let resp: Response<MetadataEntry> = call
                .wait_typed()
                .unwrap_or_else(|e| panic!("call {i}: {e}"));
            assert_eq!(resp.message.key, format!("c{i}"));
            assert_bytes_eq(&resp.payload, &pattern(LEN, i as u64), &format!("call {i}"));
        }
        assert_eq!(client.pending_calls(), 0);
    });
}

#[test]
fn threads_sending_large_calls_while_others_read_complete_them_all() {
    with_watchdog(Duration::from_secs(120), "senders and readers", || {
        const THREADS: usize = 4;
        const ROUNDS: usize = 2;
        const CALLS: usize = 12;
        const LEN: usize = 8 << 20;
        let server = echo_builder()
            .config(config(2))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        // Each thread starts a batch before waiting on any, so while some
        // send, others hold the reader role (blocked in `recv`): a blocked
        // sender must read when that role is free, and be woken when it is
        // given back.
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let c = client.clone();
                thread::spawn(move || {
                    for r in 0..ROUNDS {
                        let seed = |i: usize| (t * 1000 + r * 100 + i) as u64;
                        let calls: Vec<PendingCall> = (0..CALLS)
                            .map(|i| {
                                c.start_call(
                                    "echo",
                                    body(&format!("t{t}r{r}c{i}")),
                                    pattern(LEN, seed(i)),
                                    &CallOptions::default(),
                                )
                                .unwrap_or_else(|e| panic!("start t{t}r{r}c{i}: {e}"))
                            })
                            .collect();
                        for (i, call) in calls.into_iter().enumerate() {
                            let resp: Response<MetadataEntry> = call
                                .wait_typed()
                                .unwrap_or_else(|e| panic!("t{t}r{r}c{i}: {e}"));
                            assert_eq!(resp.message.key, format!("t{t}r{r}c{i}"));
                            assert_bytes_eq(
                                &resp.payload,
                                &pattern(LEN, seed(i)),
                                &format!("t{t}r{r}c{i}"),
                            );
                        }
                    }
                })
            })
            .collect();
        for s in senders {
            s.join().unwrap();
        }
        assert_eq!(client.pending_calls(), 0);
    });
}

#[test]
fn a_blocked_sender_reads_once_the_reader_leaves() {
    with_watchdog(Duration::from_secs(120), "reader leaves", || {
        const CALLS: usize = 48;
        const LEN: usize = 8 << 20;
        let (open, gate) = mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let server = echo_builder()
            .config(config(3))
            .register("gate", move |_ctx, req: MetadataEntry, _pages: Pages| {
                let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(60));
                Ok::<_, Status>((req, Payload::Empty))
            })
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        // One thread waits for a response that comes only once the gate
        // opens: it holds the reader role meanwhile.
        let reader = {
            let c = client.clone();
            thread::spawn(move || c.call::<_, MetadataEntry>("gate", &msg("gate"), Payload::Empty))
        };
        assert!(wait_until(Duration::from_secs(10), || client
            .pending_calls()
            == 1));
        // Another starts many large calls before waiting on any. While the
        // reader reads, it waits for room to send; once the reader has its
        // response and leaves, nobody else reads, and the server stops
        // reading when its responses pile up: the sender must read.
        let started = Arc::new(AtomicUsize::new(0));
        let sender = {
            let (c, started) = (client.clone(), started.clone());
            thread::spawn(move || {
                let calls: Vec<PendingCall> = (0..CALLS)
                    .map(|i| {
                        let call = c
                            .start_call(
                                "echo",
                                body(&format!("c{i}")),
                                pattern(LEN, i as u64),
                                &CallOptions::default(),
                            )
                            .unwrap_or_else(|e| panic!("start_call {i}: {e}"));
                        started.fetch_add(1, Ordering::SeqCst);
                        call
                    })
                    .collect();
                for (i, call) in calls.into_iter().enumerate() {
                    let resp: Response<MetadataEntry> = call
                        .wait_typed()
                        .unwrap_or_else(|e| panic!("call {i}: {e}"));
                    assert_bytes_eq(&resp.payload, &pattern(LEN, i as u64), &format!("call {i}"));
                }
            })
        };
        assert!(
            wait_until(Duration::from_secs(60), || started.load(Ordering::SeqCst)
                >= 4),
            "the sender made no progress while another thread read"
        );
        open.send(()).unwrap();
        reader.join().unwrap().expect("the gate call");
        sender.join().unwrap();
        assert_eq!(client.pending_calls(), 0);
    });
}
