//! Client batching ([`pagerpc::CallBatch`]): requests go out in the order
//! they were started from one thread, whether batched or not; many threads
//! pipelining calls each get their own responses; a separate payload in a
//! batch still travels in its own `MSG_EOR` part (seen on the wire by a
//! packet socket); a batch that cannot be sent hands every call its own
//! payload back.

mod common;

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use pagerpc::codec::{decode_stream, Kind, Limits};
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{CallOptions, Client, Code, PendingCall, Server};

fn body(key: &str) -> Vec<u8> {
    msg(key).encode_to_vec()
}

/// Payload size of request `seq`: none, inline, and separate payloads
/// (a page and more) in turn.
fn size_of(seq: usize) -> usize {
    [0, 64, 5000, 1, 3 * 4096 + 17, 200][seq % 6]
}

/// Everything a raw peer reads until the client closes the connection.
fn read_all(mut peer: TcpStream) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut all = Vec::new();
        let _ = peer.read_to_end(&mut all);
        all
    })
}

#[test]
fn requests_reach_the_wire_in_the_order_one_thread_started_them() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    let reader = read_all(peer);
    let opts = CallOptions::default();
    let mut seq = 0usize;
    let mut calls: Vec<PendingCall> = Vec::new();
    let one = |client: &Client, seq: &mut usize, calls: &mut Vec<PendingCall>| {
        let c = client
            .start_call(
                "order",
                body(&format!("seq-{seq}")),
                pattern(size_of(*seq), *seq as u64),
                &opts,
            )
            .unwrap();
        calls.push(c);
        *seq += 1;
    };
    // Single calls and batches of different sizes, interleaved.
    for round in 0..12 {
        one(&client, &mut seq, &mut calls);
        let mut batch = client.batch();
        for _ in 0..(round % 5) * 3 + 1 {
            batch
                .add(
                    "order",
                    body(&format!("seq-{seq}")),
                    pattern(size_of(seq), seq as u64),
                    &opts,
                )
                .unwrap();
            seq += 1;
        }
        for c in batch.send() {
            calls.push(c.unwrap());
        }
        // A batch dropped unsent never reaches the wire, and gives its
        // call ids back.
        let pending = client.pending_calls();
        let mut dropped = client.batch();
        dropped
            .add("order", body("never-sent"), vec![9u8; 5000], &opts)
            .unwrap();
        assert_eq!(client.pending_calls(), pending + 1);
        drop(dropped);
        assert_eq!(client.pending_calls(), pending);
    }
    let sent = seq;
    let ids: Vec<u64> = calls.iter().map(PendingCall::id).collect();
    // Calls dropped unanswered send CANCEL frames, after every request.
    drop(calls);
    client.close();
    drop(client);
    let wire = reader.join().unwrap();
    let decoded = decode_stream(&wire, Limits::default(), &[]);
    let requests: Vec<_> = decoded
        .frames
        .iter()
        .filter(|f| f.head.kind() == Kind::Request)
        .collect();
    assert_eq!(requests.len(), sent, "every started request, and no other");
    for (i, f) in requests.iter().enumerate() {
        let key = MetadataEntry::decode(f.head.header.body.as_slice())
            .unwrap()
            .key;
        assert_eq!(key, format!("seq-{i}"), "request {i} out of order");
        assert_eq!(f.head.call_id(), ids[i], "call id of request {i}");
        assert_bytes_eq(
            &f.payload,
            &pattern(size_of(i), i as u64),
            &format!("payload of request {i}"),
        );
    }
}

#[test]
fn ten_thousand_pipelined_calls_from_16_threads_each_get_their_own_response() {
    with_watchdog(Duration::from_secs(120), "pipelined calls", || {
        let server = echo_builder().bind("127.0.0.1:0").unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        let threads: Vec<_> = (0..16)
            .map(|t| {
                let client = client.clone();
                thread::spawn(move || {
                    let opts = CallOptions::default();
                    let mut q: std::collections::VecDeque<(usize, PendingCall)> =
                        Default::default();
                    let mut next = 0usize;
                    let mut answered = 0usize;
                    let check = |seq: usize, c: PendingCall| {
                        let f = c.wait().unwrap_or_else(|e| panic!("t{t} call {seq}: {e}"));
                        let key = MetadataEntry::decode(f.head.header.body.as_slice())
                            .unwrap()
                            .key;
                        assert_eq!(key, format!("t{t}-{seq}"), "a response to another call");
                        assert_bytes_eq(
                            &f.payload,
                            &pattern(size_of(seq), (t * 1000 + seq) as u64),
                            &format!("t{t} response {seq}"),
                        );
                    };
                    while answered < 625 {
                        // Up to 32 in flight: a batch of a size that varies,
                        // or single calls.
                        let room = (32 - q.len()).min(625 - next);
                        if room > 0 {
                            if next.is_multiple_of(3) {
                                let c = client
                                    .start_call(
                                        "echo",
                                        body(&format!("t{t}-{next}")),
                                        pattern(size_of(next), (t * 1000 + next) as u64),
                                        &opts,
                                    )
                                    .unwrap();
                                q.push_back((next, c));
                                next += 1;
                            } else {
                                let mut b = client.batch();
                                let first = next;
                                for _ in 0..room.min(1 + next % 11) {
                                    b.add(
                                        "echo",
                                        body(&format!("t{t}-{next}")),
                                        pattern(size_of(next), (t * 1000 + next) as u64),
                                        &opts,
                                    )
                                    .unwrap();
                                    next += 1;
                                }
                                for (i, c) in b.send().into_iter().enumerate() {
                                    q.push_back((first + i, c.unwrap()));
                                }
                            }
                        }
                        let (seq, c) = q.pop_front().unwrap();
                        check(seq, c);
                        answered += 1;
                        while q.front().is_some_and(|(_, c)| c.is_ready()) {
                            let (seq, c) = q.pop_front().unwrap();
                            check(seq, c);
                            answered += 1;
                        }
                    }
                    answered
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 10_000);
        assert_eq!(client.pending_calls(), 0);
        server.shutdown();
    });
}

/// A batch that cannot be written before its deadline (another thread
/// holds the send side, stuck on a peer that does not read) fails every
/// call with its own payload handed back, and leaves the connection usable
/// for the calls behind it.
#[test]
fn a_batch_that_is_not_sent_hands_every_call_its_own_payload() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::connect(listener.local_addr().unwrap()).unwrap();
    let (peer, _) = listener.accept().unwrap();
    // A big request fills the socket: its thread holds the send side.
    let c = client.clone();
    let blocker = thread::spawn(move || {
        c.start_call(
            "echo",
            body("big"),
            pattern(64 << 20, 1),
            &CallOptions::default(),
        )
    });
    assert!(
        wait_until(Duration::from_secs(10), || {
            let mut buf = vec![0u8; 8192];
            peer.set_nonblocking(true).unwrap();
            let n = peer.peek(&mut buf).unwrap_or(0);
            peer.set_nonblocking(false).unwrap();
            n > 4096
        }),
        "the big request never reached the peer"
    );
    let opts = CallOptions {
        timeout: Some(Duration::from_millis(300)),
        ..CallOptions::default()
    };
    let mut batch = client.batch();
    let sizes = [0usize, 64, 5000, 3 * 4096 + 17];
    for (i, &n) in sizes.iter().enumerate() {
        batch
            .add("echo", body(&format!("b{i}")), pattern(n, i as u64), &opts)
            .unwrap();
    }
    let t0 = Instant::now();
    let results = batch.send();
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "the batch waited past its deadline"
    );
    assert_eq!(results.len(), sizes.len());
    for (i, r) in results.into_iter().enumerate() {
        let mut e = r.expect_err("nothing of the batch could be written");
        assert_eq!(e.code(), Code::DeadlineExceeded, "call {i}: {e}");
        let back = e.take_payload().expect("the payload comes back");
        assert_bytes_eq(
            back.as_slice(),
            &pattern(sizes[i], i as u64),
            "payload handed back",
        );
    }
    // The connection still works once the peer reads: the big request
    // goes out whole.
    let reader = read_all(peer);
    let big = blocker.join().unwrap().expect("the big request was sent");
    big.cancel();
    client.close();
    drop(client);
    let wire = reader.join().unwrap();
    let frames = decode_stream(&wire, Limits::default(), &[]).frames;
    let requests: Vec<_> = frames
        .iter()
        .filter(|f| f.head.kind() == Kind::Request)
        .collect();
    assert_eq!(requests.len(), 1, "only the big request reached the wire");
    assert_eq!(requests[0].payload.len(), 64 << 20);
}

/// One captured TCP segment: sequence number and data.
struct Segment {
    seq: u32,
    data: Vec<u8>,
}

/// Parses a frame captured on loopback by a packet socket: link header
/// (14 bytes), IPv4, TCP. Returns the destination port and the segment.
fn parse_packet(p: &[u8]) -> Option<(u16, Segment)> {
    let ip = p.get(14..)?;
    if ip.first()? >> 4 != 4 || *ip.get(9)? != 6 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let tcp = ip.get(ihl..total)?;
    let dport = u16::from_be_bytes([tcp[2], tcp[3]]);
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let off = usize::from(tcp.get(12)? >> 4) * 4;
    Some((
        dport,
        Segment {
            seq,
            data: tcp.get(off..)?.to_vec(),
        },
    ))
}

/// A packet socket seeing every frame on this host's interfaces (root
/// only: CI runs the tests as root).
fn packet_socket() -> std::os::fd::OwnedFd {
    use nix::sys::socket::{
        setsockopt, socket, sockopt, AddressFamily, SockFlag, SockProtocol, SockType,
    };
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("a packet socket (AF_PACKET) needs CAP_NET_RAW: run the tests as root");
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 50_000),
    )
    .unwrap();
    setsockopt(&fd, sockopt::RcvBuf, &(16 << 20)).unwrap();
    fd
}

#[test]
fn a_payload_in_a_batch_keeps_its_own_eor_part_on_the_wire() {
    let server = echo_builder().bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().port();
    let cap = packet_socket();
    let stop = Arc::new(AtomicBool::new(false));
    let capture = {
        let stop = stop.clone();
        thread::spawn(move || {
            let mut segs: Vec<Segment> = Vec::new();
            let mut buf = vec![0u8; 1 << 17];
            while !stop.load(Ordering::SeqCst) {
                match nix::sys::socket::recv(
                    cap.as_raw_fd(),
                    &mut buf,
                    nix::sys::socket::MsgFlags::empty(),
                ) {
                    Ok(n) => {
                        if let Some((dport, s)) = parse_packet(&buf[..n]) {
                            // Loopback shows each segment twice (out, in).
                            if dport == port
                                && !s.data.is_empty()
                                && !segs.iter().any(|o| o.seq == s.seq)
                            {
                                segs.push(s);
                            }
                        }
                    }
                    Err(_) => continue,
                }
            }
            segs
        })
    };
    // Let the capture start before anything is sent.
    thread::sleep(Duration::from_millis(100));
    let client = Client::connect(server.local_addr()).unwrap();
    let big = 3 * 4096 + 123;
    let payload = pattern(big, 77);
    let opts = CallOptions::default();
    let mut batch = client.batch();
    batch
        .add("echo", body("small-1"), vec![1u8; 64], &opts)
        .unwrap();
    batch
        .add("echo", body("big"), payload.clone(), &opts)
        .unwrap();
    batch
        .add("echo", body("small-2"), vec![2u8; 64], &opts)
        .unwrap();
    batch.add("echo", body("none"), Vec::new(), &opts).unwrap();
    for c in batch.send() {
        c.unwrap().wait().unwrap();
    }
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let mut segs = capture.join().unwrap();
    segs.sort_by_key(|s| s.seq);
    assert!(!segs.is_empty(), "nothing was captured on loopback");
    // The client's byte stream, and where each segment starts in it.
    let base = segs[0].seq;
    let mut stream = Vec::new();
    let mut starts = Vec::new();
    for s in &segs {
        let at = s.seq.wrapping_sub(base) as usize;
        assert_eq!(at, stream.len(), "a gap in the capture at {at}");
        starts.push(at);
        stream.extend_from_slice(&s.data);
    }
    starts.push(stream.len());
    let at = stream
        .windows(256)
        .position(|w| w == &payload[..256])
        .expect("the payload is in the captured stream");
    assert_bytes_eq(&stream[at..at + big], &payload, "the payload on the wire");
    assert!(
        starts.contains(&at),
        "the payload does not start a segment of its own: it is at {at}, segments start at {starts:?}"
    );
    assert!(
        starts.contains(&(at + big)),
        "the payload shares its last segment with what follows: it ends at {}, segments start at {starts:?}",
        at + big
    );
    drop(client);
    server.shutdown();
}

#[test]
fn batched_calls_get_a_served_answer_through_a_real_server() {
    // The common case end to end: batches of every size up to 64 on a
    // server with two pool threads, each answer matching its call.
    let server = Server::builder()
        .config(config(2))
        .register("echo", |_ctx, req: MetadataEntry, pages: pagerpc::Pages| {
            Ok::<_, pagerpc::Status>((req, pagerpc::Payload::Pages(pages)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let opts = CallOptions::default();
    for n in 1..=64usize {
        let mut b = client.batch();
        for i in 0..n {
            b.add(
                "echo",
                body(&format!("{n}-{i}")),
                pattern(size_of(i), i as u64),
                &opts,
            )
            .unwrap();
        }
        assert_eq!(b.len(), n);
        for (i, c) in b.send().into_iter().enumerate() {
            let f = c.unwrap().wait().unwrap();
            let key = MetadataEntry::decode(f.head.header.body.as_slice())
                .unwrap()
                .key;
            assert_eq!(key, format!("{n}-{i}"));
            assert_bytes_eq(&f.payload, &pattern(size_of(i), i as u64), "echo");
        }
    }
    assert!(client.batch().send().is_empty());
    server.shutdown();
}

/// A server thread running calls back to back holds their small answers
/// to write them together. When a call of a method that is usually quick
/// blocks instead, until the client has the answer held before it, the
/// held answer must still go out (another pool thread writes it at the
/// sweeper's next tick), or both calls would wait for each other.
#[test]
fn an_answer_held_behind_a_usually_quick_call_that_blocks_still_goes_out() {
    use std::sync::{Condvar, Mutex};
    let gate = Arc::new((Mutex::new(false), Condvar::new()));
    let g = gate.clone();
    let server = Server::builder()
        .config(config(2))
        .register("slow", |_ctx, req: MetadataEntry, _p: pagerpc::Pages| {
            // Longer than the client waits for "a": its own answer would
            // carry the held one out with it.
            thread::sleep(Duration::from_secs(5));
            Ok::<_, pagerpc::Status>((req, pagerpc::Payload::Empty))
        })
        .register(
            "quick",
            move |_ctx, req: MetadataEntry, _p: pagerpc::Pages| {
                if req.key == "wait" {
                    // Until the client has had the answer to "a".
                    let (m, cv) = &*g;
                    let mut open = m.lock().unwrap();
                    let end = Instant::now() + Duration::from_secs(20);
                    while !*open && Instant::now() < end {
                        open = cv.wait_timeout(open, Duration::from_millis(50)).unwrap().0;
                    }
                }
                Ok::<_, pagerpc::Status>((req, pagerpc::Payload::Empty))
            },
        )
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let opts = CallOptions::default();
    // "quick" is measured quick.
    for _ in 0..200 {
        client
            .call_with::<_, MetadataEntry>("quick", &msg("x"), Vec::new(), &opts)
            .unwrap();
    }
    // One thread reads the three requests and runs "slow" itself; the
    // other runs "a" and then "wait" back to back.
    let mut b = client.batch();
    b.add("slow", body("slow"), Vec::new(), &opts).unwrap();
    b.add("quick", body("a"), Vec::new(), &opts).unwrap();
    b.add("quick", body("wait"), Vec::new(), &opts).unwrap();
    let mut calls = b.send().into_iter().map(Result::unwrap);
    let (slow, a, wait) = (
        calls.next().unwrap(),
        calls.next().unwrap(),
        calls.next().unwrap(),
    );
    let t0 = Instant::now();
    let (a_done, a_wait) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = a_done.send(a.wait());
    });
    let got = a_wait.recv_timeout(Duration::from_secs(3));
    // Open the gate either way, so the server can finish.
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
    let a = got.unwrap_or_else(|_| {
        panic!(
            "the answer to \"a\" was held for {:?} behind a call that waits for the client to have it",
            t0.elapsed()
        )
    });
    assert!(a.is_ok());
    assert!(wait.wait().is_ok());
    assert!(slow.wait().is_ok());
    server.shutdown();
}
