//! Integrity, limits and timeouts against misbehaving peers.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{is_connection_frame, read_raw_frames};
use pagerpc::codec::{decode_stream, encode_head, CodecError, Flags, Header, Kind, Limits};
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, Code, Pages, Payload, Server, ServerConfig, Status};

fn msg(k: &str) -> MetadataEntry {
    MetadataEntry {
        key: k.into(),
        value: vec![],
    }
}

fn request(id: u64, method: &str, payload_len: u64, crc: Option<u32>) -> Vec<u8> {
    let h = Header {
        call_id: id,
        kind: Kind::Request as i32,
        method: method.into(),
        payload_crc32c: crc,
        body: msg("x").encode_to_vec(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, payload_len, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    wire
}

fn counting_echo(seen: Arc<AtomicUsize>) -> pagerpc::ServerBuilder {
    Server::builder().register("echo", move |_ctx, req: MetadataEntry, p: Pages| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok::<_, Status>((req, Payload::Pages(p)))
    })
}

#[test]
fn checksums_round_trip_and_corruption_is_refused() {
    let seen = Arc::new(AtomicUsize::new(0));
    let mut scfg = ServerConfig::default();
    scfg.send.checksum = true;
    let server = counting_echo(seen.clone())
        .config(scfg)
        .bind("127.0.0.1:0")
        .unwrap();
    let mut ccfg = ClientConfig::default();
    ccfg.send.checksum = true;
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let data = vec![7u8; 100_000];
    let r = client
        .call::<_, MetadataEntry>("echo", &msg("ok"), data.clone())
        .unwrap();
    assert_eq!(*r.payload, data[..]);
    assert_eq!(seen.load(Ordering::SeqCst), 1);

    // A request whose payload does not match its CRC32C: DataLoss for that
    // call, the handler never sees it, and the connection goes on.
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    let payload = vec![1u8; 5000];
    let good = crc32c::crc32c(&payload);
    let mut wire = request(1, "echo", payload.len() as u64, Some(good ^ 1));
    wire.extend_from_slice(&payload);
    wire.extend(request(2, "echo", payload.len() as u64, Some(good)));
    wire.extend_from_slice(&payload);
    raw.write_all(&wire).unwrap();
    let frames = read_raw_frames(&mut raw, 2, Duration::from_secs(10));
    assert_eq!(frames.len(), 2);
    let bad = frames.iter().find(|f| f.head.call_id() == 1).unwrap();
    assert_eq!(bad.head.kind(), Kind::Error);
    assert_eq!(bad.head.header.status_code, Code::DataLoss.as_u32());
    assert!(
        bad.head.header.status_message.contains("checksum"),
        "{}",
        bad.head.header.status_message
    );
    let ok = frames.iter().find(|f| f.head.call_id() == 2).unwrap();
    assert_eq!(ok.head.kind(), Kind::Response);
    assert_eq!(ok.payload, payload);
    assert_eq!(
        seen.load(Ordering::SeqCst),
        2,
        "the corrupted payload never reached the handler"
    );
}

#[test]
fn a_corrupted_response_fails_only_its_call() {
    // A fake server that corrupts the first response's payload.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        for round in 0..2u32 {
            let frames = read_raw_frames(&mut s, 1, Duration::from_secs(10));
            let id = frames[0].head.call_id();
            let payload = vec![round as u8; 9000];
            let crc = crc32c::crc32c(&payload) ^ u32::from(round == 0);
            let h = Header {
                call_id: id,
                kind: Kind::Response as i32,
                payload_crc32c: Some(crc),
                body: msg("r").encode_to_vec(),
                ..Default::default()
            };
            let mut wire = Vec::new();
            encode_head(
                &h,
                payload.len() as u64,
                Flags::NONE,
                &Limits::default(),
                &mut wire,
            )
            .unwrap();
            wire.extend_from_slice(&payload);
            s.write_all(&wire).unwrap();
        }
        s
    });
    let client = Client::connect(addr).unwrap();
    let e = client
        .call::<_, MetadataEntry>("m", &msg("a"), Payload::Empty)
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.message().contains("checksum"));
    let r = client
        .call::<_, MetadataEntry>("m", &msg("b"), Payload::Empty)
        .unwrap();
    assert_eq!(*r.payload, [1u8; 9000][..]);
    drop(fake.join().unwrap());
}

#[test]
fn inflight_limit_per_connection_is_enforced() {
    let cfg = ServerConfig {
        max_inflight_per_conn: 2,
        threads: 4,
        ..ServerConfig::default()
    };
    let server = Server::builder()
        .config(cfg)
        .register("slow", |_ctx, req: MetadataEntry, _p: Pages| {
            std::thread::sleep(Duration::from_millis(500));
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let calls: Vec<_> = (0..3)
        .map(|i| {
            client
                .start_call(
                    "slow",
                    msg(&i.to_string()).encode_to_vec(),
                    Payload::Empty,
                    &Default::default(),
                )
                .unwrap()
        })
        .collect();
    let results: Vec<_> = calls.into_iter().map(|c| c.wait()).collect();
    let refused: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(refused.len(), 1, "{results:?}");
    assert_eq!(refused[0].code(), Code::ResourceExhausted);
    assert!(
        refused[0].message().contains("max_inflight_per_conn"),
        "{}",
        refused[0].message()
    );
}

#[test]
fn a_slowloris_peer_is_dropped_by_the_header_timeout() {
    let seen = Arc::new(AtomicUsize::new(0));
    let cfg = ServerConfig {
        header_timeout: Some(Duration::from_secs(2)),
        ..ServerConfig::default()
    };
    let server = counting_echo(seen).config(cfg).bind("127.0.0.1:0").unwrap();
    let mut slow = TcpStream::connect(server.local_addr()).unwrap();
    slow.set_nodelay(true).unwrap();
    // The server's SETTINGS arrive first: take them whole.
    let mut prefix = [0u8; pagerpc::codec::PREFIX_LEN];
    slow.read_exact(&mut prefix).unwrap();
    let p = pagerpc::codec::Prefix::decode(&prefix, &Limits::default()).unwrap();
    let mut rest = vec![0u8; p.header_len as usize + p.body_len as usize];
    slow.read_exact(&mut rest).unwrap();
    let wire = request(1, "echo", 0, None);
    let t0 = Instant::now();
    let mut dropped = None;
    for &b in &wire {
        // One header byte per second.
        if slow.write_all(&[b]).is_err() {
            break;
        }
        let mut probe = [0u8; 512];
        slow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        match slow.read(&mut probe) {
            Ok(n) => {
                dropped = Some((t0.elapsed(), probe[..n].to_vec()));
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                dropped = Some((t0.elapsed(), Vec::new()));
                break;
            }
        }
        // Meanwhile the server keeps serving others.
        let c = Client::connect(server.local_addr()).unwrap();
        c.call::<_, MetadataEntry>("echo", &msg("other"), Payload::Empty)
            .unwrap();
    }
    let (after, bytes) = dropped.expect("the slow peer was never dropped");
    assert!(
        after < Duration::from_secs(6),
        "dropped only after {after:?}"
    );
    let frames: Vec<_> = decode_stream(&bytes, Limits::default(), &[])
        .frames
        .into_iter()
        .filter(|f| !is_connection_frame(f))
        .collect();
    assert_eq!(
        frames[0].head.header.status_code,
        Code::DeadlineExceeded.as_u32()
    );
    assert!(frames[0]
        .head
        .header
        .status_message
        .contains("header_timeout"));
}

#[test]
fn idle_connections_are_closed() {
    let cfg = ServerConfig {
        idle_timeout: Some(Duration::from_millis(300)),
        ..ServerConfig::default()
    };
    let server = counting_echo(Arc::default())
        .config(cfg)
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    client
        .call::<_, MetadataEntry>("echo", &msg("a"), Payload::Empty)
        .unwrap();
    let t0 = Instant::now();
    while server.connections() > 0 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.connections(),
        0,
        "the idle connection was not closed"
    );
    let e = client
        .call::<_, MetadataEntry>("echo", &msg("b"), Payload::Empty)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(e.message().contains("idle_timeout"), "{}", e.message());
}

#[test]
fn lying_lengths_are_refused_with_the_limit_named() {
    let seen = Arc::new(AtomicUsize::new(0));
    let server = counting_echo(seen.clone()).bind("127.0.0.1:0").unwrap();
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    let big = Limits {
        max_payload_bytes: u64::MAX,
        ..Limits::default()
    };
    let h = Header {
        call_id: 9,
        kind: Kind::Request as i32,
        method: "echo".into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, 1 << 45, Flags::NONE, &big, &mut wire).unwrap();
    raw.write_all(&wire).unwrap();
    let frames = read_raw_frames(&mut raw, 1, Duration::from_secs(10));
    let m = &frames[0].head.header.status_message;
    assert_eq!(
        frames[0].head.header.status_code,
        Code::InvalidArgument.as_u32()
    );
    let expect = CodecError::PayloadTooLarge {
        limit: Limits::default().max_payload_bytes,
        got: 1 << 45,
    }
    .to_string();
    assert!(m.contains(&expect), "{m}");
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

/// 1000 trials: a peer dies at a random offset inside a request's header or
/// payload. No partial payload ever reaches a handler, and the server keeps
/// serving a well-behaved client throughout.
#[test]
fn peers_killed_mid_frame_never_deliver_partial_payloads() {
    let lens = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = lens.clone();
    let server = Server::builder()
        .register("put", move |_ctx, req: MetadataEntry, p: Pages| {
            let declared: usize = req.key.parse().unwrap_or(usize::MAX);
            l.lock()
                .unwrap()
                .push((declared, p.len(), p.iter().all(|&b| b == 0xab)));
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let good = Client::connect(server.local_addr()).unwrap();
    // A small deterministic PRNG (xorshift), so a failure can be replayed.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut whole = 0;
    for trial in 0..1000 {
        let len = [0usize, 1, 100, 4096, 5000, 70_000, 300_000][(next() % 7) as usize];
        let h = Header {
            call_id: trial + 1,
            kind: Kind::Request as i32,
            method: "put".into(),
            body: msg(&len.to_string()).encode_to_vec(),
            ..Default::default()
        };
        let mut wire = Vec::new();
        let flags = if len > 0 && len < 4096 {
            Flags::INLINE_PAYLOAD
        } else {
            Flags::NONE
        };
        encode_head(&h, len as u64, flags, &Limits::default(), &mut wire).unwrap();
        let head_len = wire.len();
        wire.resize(head_len + len, 0xab);
        // Cut anywhere in the head or the payload; one trial in ten sends
        // the frame whole, as a control.
        let cut = if trial % 10 == 0 {
            wire.len()
        } else {
            (next() % wire.len() as u64) as usize
        };
        if cut == wire.len() {
            whole += 1;
        }
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        let _ = raw.write_all(&wire[..cut]);
        drop(raw);
        if trial % 50 == 0 {
            let r = good.call::<_, MetadataEntry>("put", &msg("4"), vec![0xab; 4]);
            assert!(
                r.is_ok(),
                "trial {trial}: the server stopped serving others: {r:?}"
            );
        }
    }
    // Let the server read every dead connection to its end.
    let t0 = Instant::now();
    while server.connections() > 1 && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let lens = lens.lock().unwrap();
    for (declared, got, intact) in lens.iter() {
        assert_eq!(declared, got, "a partial payload reached the handler");
        assert!(intact);
    }
    // Every good call was delivered; a control trial's whole request may or
    // may not be (the server cancels calls whose connection closed before
    // their handler started); nothing else.
    let good_calls = lens.iter().filter(|(d, _, _)| *d == 4).count();
    assert!(good_calls >= 20, "{good_calls}");
    assert!(
        lens.len() <= whole + 20,
        "deliveries: {} of at most {}",
        lens.len(),
        whole + 20
    );
}

/// A consumer that holds pages stalls only its own connection, and the
/// memory it holds stays under the cap; releasing the pages resumes it.
#[test]
fn backpressure_stalls_only_the_connection_whose_consumer_holds_pages() {
    const CAP: usize = 4 << 20;
    let kept: Arc<std::sync::Mutex<Vec<Pages>>> = Arc::default();
    let k = kept.clone();
    let server = Server::builder()
        .config(ServerConfig {
            max_held_bytes_per_conn: Some(CAP),
            ..ServerConfig::default()
        })
        .register("hold", move |_ctx, req: MetadataEntry, p: Pages| {
            k.lock().unwrap().push(p);
            Ok::<_, Status>((req, Payload::Empty))
        })
        .register("echo", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(p)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let greedy = Client::connect(server.local_addr()).unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    let (g, d) = (greedy.clone(), done.clone());
    let sender = std::thread::spawn(move || {
        let calls: Vec<_> = (0..12)
            .map(|i| {
                g.start_call(
                    "hold",
                    msg(&i.to_string()).encode_to_vec(),
                    vec![3u8; 1 << 20],
                    &Default::default(),
                )
                .unwrap()
            })
            .collect();
        for c in calls {
            c.wait().unwrap();
            d.fetch_add(1, Ordering::SeqCst);
        }
    });
    // The connection stalls once its consumer holds more than the cap.
    std::thread::sleep(Duration::from_millis(500));
    let stalled_at = done.load(Ordering::SeqCst);
    assert!(stalled_at < 12, "nothing stalled");
    let held = server.held_payload_bytes();
    assert!(
        held <= CAP + (1 << 20) + 4096,
        "held {held} bytes, cap {CAP}"
    );
    // Other connections are served meanwhile.
    let other = Client::connect(server.local_addr()).unwrap();
    let r = other
        .call::<_, MetadataEntry>("echo", &msg("o"), vec![1u8; 2 << 20])
        .unwrap();
    assert_eq!(r.payload.len(), 2 << 20);
    assert_eq!(
        done.load(Ordering::SeqCst),
        stalled_at,
        "the stalled connection stayed stalled"
    );
    // Releasing the pages resumes it.
    let t0 = Instant::now();
    while done.load(Ordering::SeqCst) < 12 && t0.elapsed() < Duration::from_secs(20) {
        kept.lock().unwrap().clear();
        std::thread::sleep(Duration::from_millis(20));
    }
    sender.join().unwrap();
    assert_eq!(done.load(Ordering::SeqCst), 12);
}

/// 1000 trials the other way round: the server dies at a random offset
/// inside its response's header or payload. The pending call fails with a
/// clear error every time, and never returns a short payload.
#[test]
fn servers_killed_mid_response_fail_the_pending_call_clearly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const TRIALS: usize = 1000;
    let fake = std::thread::spawn(move || {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..TRIALS {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (mut s, _) = listener.accept().unwrap();
            let frames = read_raw_frames(&mut s, 1, Duration::from_secs(10));
            let id = frames[0].head.call_id();
            let len = [4096usize, 5000, 70_000, 300_000][(x % 4) as usize];
            let h = Header {
                call_id: id,
                kind: Kind::Response as i32,
                body: msg("r").encode_to_vec(),
                ..Default::default()
            };
            let mut wire = Vec::new();
            encode_head(&h, len as u64, Flags::NONE, &Limits::default(), &mut wire).unwrap();
            wire.resize(wire.len() + len, 0xcd);
            // Die anywhere before the last byte.
            let cut = ((x >> 8) % (wire.len() as u64 - 1)) as usize;
            let _ = s.write_all(&wire[..cut]);
        }
    });
    for trial in 0..TRIALS {
        let c = Client::connect(addr).unwrap();
        match c.call::<_, MetadataEntry>("m", &msg("q"), Payload::Empty) {
            Ok(r) => panic!(
                "trial {trial}: a cut response was delivered ({} bytes)",
                r.payload.len()
            ),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "trial {trial}: {e}");
                assert!(
                    e.message().contains("connection lost")
                        || e.message().contains("closed by the server"),
                    "trial {trial}: unclear error: {e}"
                );
            }
        }
    }
    fake.join().unwrap();
}

/// A consumer that keeps payloads for good and says so
/// (`Pages::detach_accounting`) is not held back by the cap.
#[test]
fn detached_pages_do_not_count_against_the_cap() {
    const CAP: usize = 4 << 20;
    let kept: Arc<std::sync::Mutex<Vec<Pages>>> = Arc::default();
    let k = kept.clone();
    let server = Server::builder()
        .config(ServerConfig {
            max_held_bytes_per_conn: Some(CAP),
            ..ServerConfig::default()
        })
        .register("store", move |_ctx, req: MetadataEntry, p: Pages| {
            p.detach_accounting();
            k.lock().unwrap().push(p);
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let c = Client::connect(server.local_addr()).unwrap();
    let opts = pagerpc::CallOptions {
        timeout: Some(Duration::from_secs(10)),
        ..Default::default()
    };
    for i in 0..12 {
        c.call_with::<_, MetadataEntry>("store", &msg(&i.to_string()), vec![5u8; 1 << 20], &opts)
            .unwrap_or_else(|e| panic!("call {i} stalled or failed: {e}"));
    }
    assert_eq!(server.held_payload_bytes(), 0);
    assert!(kept
        .lock()
        .unwrap()
        .iter()
        .all(|p| p.len() == 1 << 20 && p[0] == 5));
}
