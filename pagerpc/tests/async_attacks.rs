//! The async server attacked as a peer would: a slowloris header, lying
//! lengths, and peers killed at random points inside a request. Each is
//! refused or dropped with a typed error while other clients are served,
//! and no partial payload reaches a handler. (Stopping reading, holding
//! pages and running out of descriptors are in `async_server.rs` and
//! `fd_exhaustion.rs`.)
#![cfg(feature = "tokio")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::read_raw_frames;
use pagerpc::codec::{encode_head, CodecError, Flags, Header, Kind, Limits};
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{AsyncServer, Client, Code, Pages, Payload, ServerConfig};

fn msg(k: &str) -> MetadataEntry {
    MetadataEntry {
        key: k.into(),
        value: vec![],
    }
}

/// A runtime with an async server whose "put" handler records (declared
/// length, received length, intact) for every payload it gets.
type Seen = Arc<Mutex<Vec<(usize, usize, bool)>>>;

fn server(cfg: ServerConfig) -> (tokio::runtime::Runtime, AsyncServer, Seen) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let server = rt
        .block_on(
            AsyncServer::builder()
                .config(cfg)
                .register("put", move |_ctx, req: MetadataEntry, p: Pages| {
                    let declared: usize = req.key.parse().unwrap_or(usize::MAX);
                    s.lock()
                        .unwrap()
                        .push((declared, p.len(), p.iter().all(|&b| b == 0xab)));
                    async move { Ok((req, Payload::Empty)) }
                })
                .bind("127.0.0.1:0"),
        )
        .unwrap();
    (rt, server, seen)
}

fn request(id: u64, len: usize) -> Vec<u8> {
    let h = Header {
        call_id: id,
        kind: Kind::Request as i32,
        method: "put".into(),
        body: msg(&len.to_string()).encode_to_vec(),
        ..Default::default()
    };
    let flags = if len > 0 && len < 4096 {
        Flags::INLINE_PAYLOAD
    } else {
        Flags::NONE
    };
    let mut wire = Vec::new();
    encode_head(&h, len as u64, flags, &Limits::default(), &mut wire).unwrap();
    wire.resize(wire.len() + len, 0xab);
    wire
}

#[test]
fn a_slowloris_header_is_dropped_while_others_are_served() {
    let (_rt, server, _) = server(ServerConfig {
        header_timeout: Some(Duration::from_secs(1)),
        ..ServerConfig::default()
    });
    let good = Client::connect(server.local_addr()).unwrap();
    let mut slow = TcpStream::connect(server.local_addr()).unwrap();
    // Half a prefix, then nothing.
    slow.write_all(&request(1, 0)[..10]).unwrap();
    let t0 = Instant::now();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut got = Vec::new();
    let closed = loop {
        let mut buf = [0u8; 4096];
        match slow.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
        if t0.elapsed() > Duration::from_secs(8) {
            break false;
        }
        // Others are served meanwhile.
        good.call::<_, MetadataEntry>("put", &msg("4"), vec![0xab; 4])
            .unwrap();
    };
    assert!(
        closed,
        "the slow peer was not dropped in {:?}",
        t0.elapsed()
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "dropped only after {:?}",
        t0.elapsed()
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("header_timeout"), "{text:?}");
}

#[test]
fn lying_lengths_are_refused_with_the_limit_named() {
    let (_rt, server, seen) = server(ServerConfig::default());
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    let big = Limits {
        max_payload_bytes: u64::MAX,
        ..Limits::default()
    };
    let h = Header {
        call_id: 9,
        kind: Kind::Request as i32,
        method: "put".into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, 1 << 45, Flags::NONE, &big, &mut wire).unwrap();
    raw.write_all(&wire).unwrap();
    let frames = read_raw_frames(&mut raw, 1, Duration::from_secs(10));
    let hdr = &frames[0].head.header;
    assert_eq!(hdr.status_code, Code::InvalidArgument.as_u32());
    let expect = CodecError::PayloadTooLarge {
        limit: Limits::default().max_payload_bytes,
        got: 1 << 45,
    }
    .to_string();
    assert!(
        hdr.status_message.contains(&expect),
        "{}",
        hdr.status_message
    );
    assert!(seen.lock().unwrap().is_empty());
    // Others are still served.
    let good = Client::connect(server.local_addr()).unwrap();
    good.call::<_, MetadataEntry>("put", &msg("4"), vec![0xab; 4])
        .unwrap();
}

/// 300 trials: a peer dies at a random offset inside a request's head or
/// payload. No partial payload reaches the async handler, the receive
/// budget comes back, and a well-behaved client is served throughout.
#[test]
fn peers_killed_mid_frame_never_deliver_partial_payloads() {
    let (_rt, server, seen) = server(ServerConfig::default());
    let good = Client::connect(server.local_addr()).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut whole = 0;
    for trial in 0..300u64 {
        let len = [0usize, 1, 100, 4096, 5000, 70_000, 300_000][(next() % 7) as usize];
        let wire = request(trial + 1, len);
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
        if trial % 25 == 0 {
            let r = good.call::<_, MetadataEntry>("put", &msg("4"), vec![0xab; 4]);
            assert!(r.is_ok(), "trial {trial}: others are not served: {r:?}");
        }
    }
    let t0 = Instant::now();
    while (server.connections() > 1 || server.receive_budget().0 > 0)
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.connections(), 1, "dead peers still counted");
    assert_eq!(
        server.receive_budget().0,
        0,
        "receive budget not returned: {:?}",
        server.receive_budget()
    );
    let seen = seen.lock().unwrap();
    for (declared, got, intact) in seen.iter() {
        assert_eq!(declared, got, "a partial payload reached the handler");
        assert!(intact);
    }
    let good_calls = seen.iter().filter(|(d, _, _)| *d == 4).count();
    assert!(good_calls >= 12, "{good_calls}");
    assert!(
        seen.len() <= whole + good_calls,
        "{} deliveries",
        seen.len()
    );
}
