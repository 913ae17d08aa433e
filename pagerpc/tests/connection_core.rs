//! The connection core's defects, each driven against a real server over
//! real sockets: idle after zero-copy sends, peers that stop reading,
//! zero-copy payloads of dead peers, and call ids.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pagerpc::codec::Kind;
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, Code, Pages, Payload, Server, ServerConfig, Status};

use common::{echo_builder, pattern_pages, raw_request, read_raw_frames, rss_bytes, wait_until};

/// Defect 2: clients that pipeline requests and never read their 4 MiB
/// responses must neither stall other clients nor grow the server.
#[test]
fn slow_readers_do_not_stall_or_grow_the_server() {
    const BUDGET: usize = 8 << 20;
    let big = pattern_pages(4 << 20);
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            max_outbound_bytes_per_conn: BUDGET,
            progress_timeout: Some(Duration::from_secs(3)),
            ..ServerConfig::default()
        })
        .register("big", move |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(big.clone())))
        })
        .register("ping", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let rss0 = rss_bytes();
    // Two peers send 300 requests each for 4 MiB responses (1.2 GiB
    // each if answered) and never read.
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut wire = Vec::new();
        for id in 1..=300u64 {
            wire.extend(raw_request(id, "big", b""));
        }
        s.write_all(&wire).unwrap();
        slow.push(s);
    }
    let healthy = Client::connect(addr).unwrap();
    let t_end = Instant::now() + Duration::from_secs(2);
    let mut calls = 0;
    let mut peak = 0;
    while Instant::now() < t_end {
        let t = Instant::now();
        healthy
            .call::<_, MetadataEntry>("ping", &MetadataEntry::default(), Vec::new())
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a healthy call took {:?}",
            t.elapsed()
        );
        calls += 1;
        peak = peak.max(rss_bytes().saturating_sub(rss0));
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(calls > 10);
    assert!(
        peak < 2 * BUDGET + (64 << 20),
        "server grew by {} MiB",
        peak >> 20
    );
    // The progress timeout closes both slow peers (reset).
    assert!(
        wait_until(Duration::from_secs(10), || server.connections() == 1),
        "slow peers still connected: {}",
        server.connections()
    );
    for mut s in slow {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        let end = loop {
            match s.read(&mut sink) {
                Ok(0) => break "closed",
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
                Err(e) => panic!("slow peer not closed: {e}"),
            }
        };
        assert!(end == "closed" || end == "reset");
    }
    healthy
        .call::<_, MetadataEntry>("ping", &MetadataEntry::default(), Vec::new())
        .unwrap();
}

/// Defect 3: a zero-copy GET whose client stops reading and resets used to
/// pin the stored value for good (the sender waited 2 s, then leaked it).
#[test]
fn dead_zero_copy_peers_release_their_payloads() {
    let value = pattern_pages(4 << 20);
    let stored = value.clone();
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            ..ServerConfig::zerocopy()
        })
        .register("get", move |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(stored.clone())))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    // The test and the handler each hold a handle.
    let base = value.shares();
    {
        for round in 0..200 {
            // The value is far larger than the socket buffers: most of it
            // stays queued in the server's socket, referenced by the kernel.
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(&raw_request(1, "get", b"")).unwrap();
            // Wait until the server has queued the response (the value has
            // a second owner), then reset without reading.
            assert!(
                wait_until(Duration::from_secs(5), || value.shares() > base),
                "round {round}: response never queued"
            );
            s.set_linger_zero();
            drop(s);
            assert!(
                wait_until(Duration::from_secs(5), || value.shares() == base),
                "round {round}: the value is still held {} times after the peer reset ({} connections, graveyard {} B)",
                value.shares(),
                server.connections(),
                pagerpc_sender::graveyard::held_bytes()
            );
        }
    }
    assert!(wait_until(Duration::from_secs(5), || server.connections() == 0));
}

trait LingerZero {
    /// Sets SO_LINGER {1, 0}, so that dropping the stream resets the
    /// connection.
    fn set_linger_zero(&self);
}

impl LingerZero for TcpStream {
    fn set_linger_zero(&self) {
        use std::os::fd::AsFd;
        nix::sys::socket::setsockopt(
            &self.as_fd(),
            nix::sys::socket::sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
    }
}

/// Defect 5: a duplicate call id used to overwrite the running call's
/// entry; id 0 was accepted although an id-0 ERROR means the connection.
#[test]
fn duplicate_and_zero_call_ids_are_refused() {
    let gate = Arc::new(std::sync::Barrier::new(2));
    let g = gate.clone();
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            ..ServerConfig::default()
        })
        .register("wait", move |_ctx, req: MetadataEntry, _p: Pages| {
            g.wait();
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.write_all(&raw_request(5, "wait", b"")).unwrap();
    // Let the first call start, then send the same id again.
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(&raw_request(5, "wait", b"")).unwrap();
    let frames = read_raw_frames(&mut s, 1, Duration::from_secs(5));
    assert_eq!(frames.len(), 1, "the duplicate was answered");
    let h = &frames[0].head.header;
    assert_eq!(h.call_id, 5);
    assert_eq!(h.kind, Kind::Error as i32);
    assert_eq!(h.status_code, Code::InvalidArgument.as_u32());
    assert!(
        h.status_message.contains("already in flight"),
        "{}",
        h.status_message
    );
    // The first call is still tracked and completes normally.
    gate.wait();
    let frames = read_raw_frames(&mut s, 1, Duration::from_secs(5));
    assert_eq!(frames[0].head.header.kind, Kind::Response as i32);
    assert_eq!(frames[0].head.header.call_id, 5);

    // Call id 0: refused at the connection level.
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.write_all(&raw_request(0, "wait", b"")).unwrap();
    let frames = read_raw_frames(&mut s, 1, Duration::from_secs(5));
    assert_eq!(frames.len(), 1);
    let h = &frames[0].head.header;
    assert_eq!((h.call_id, h.kind), (0, Kind::Error as i32));
    assert!(
        h.status_message.contains("call id 0"),
        "{}",
        h.status_message
    );
    assert_eq!(server.inflight(), 0, "no handler ran for id 0");
}

/// A response queued by a handler thread while the connection's owner held
/// the sender to reap zero-copy completions (EPOLLERR) was left in the
/// outbox until some later event: found by a storage-node GET that hung
/// once in a few hundred. Many pipelined zero-copy calls make completions
/// and responses race; every call must complete.
#[test]
fn responses_racing_zero_copy_completions_all_go_out() {
    let server = echo_builder()
        .config(ServerConfig {
            threads: 4,
            ..ServerConfig::zerocopy()
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client =
        pagerpc::Client::connect_with(server.local_addr(), pagerpc::ClientConfig::zerocopy())
            .unwrap();
    let data = pattern_pages(64 << 10);
    let opts = pagerpc::CallOptions {
        timeout: Some(Duration::from_secs(10)),
        ..pagerpc::CallOptions::default()
    };
    let mut window = std::collections::VecDeque::new();
    for i in 0..20_000 {
        window.push_back(
            client
                .start_call("echo", Vec::new(), data.clone(), &opts)
                .unwrap(),
        );
        if window.len() == 16 {
            let call = window.pop_front().unwrap();
            let f = call
                .wait()
                .unwrap_or_else(|e| panic!("call {}: {e}", i - 15));
            assert_eq!(f.payload.len(), 64 << 10);
        }
    }
    for call in window {
        call.wait().unwrap();
    }
}
