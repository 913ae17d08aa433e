//! Connection payload credit (`conn_window` in SETTINGS): a sender keeps at
//! most the peer's window of separate payloads unread in the peer's socket,
//! so the peer's TCP window never closes on a pagerpc sender.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use pagerpc::codec::conn::PeerSettings;
use pagerpc::codec::{decode_stream, encode_head, Flags, Header, Kind, Limits};
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, Pages, Payload, Server, Status};

const MIB: usize = 1 << 20;

fn control(kind: Kind, body: Vec<u8>, credit: u64) -> Vec<u8> {
    let h = Header {
        kind: kind as i32,
        body,
        credit,
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    wire
}

/// Response frames (kind, id) among what arrived so far.
fn responses(buf: &[u8]) -> usize {
    decode_stream(buf, Limits::default(), &[])
        .frames
        .iter()
        .filter(|f| f.head.kind() == Kind::Response)
        .count()
}

fn read_for(s: &mut TcpStream, buf: &mut Vec<u8>, wait: Duration) {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    while let Ok(n) = s.read(&mut chunk) {
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn the_server_sends_no_more_than_the_clients_window() {
    let server = Server::builder()
        .register("get", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(pattern_pages(MIB))))
        })
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    // This peer announces a 1 MiB window, then asks for four 1 MiB
    // responses, and gives no credit back.
    let settings = PeerSettings::new(Limits::default(), None, 1 << 20).with_conn_window(MIB as u64);
    let mut wire = control(Kind::Settings, settings.encode(), 0);
    for id in 1..=4 {
        wire.extend(raw_request(id, "get", b""));
    }
    s.write_all(&wire).unwrap();
    let mut buf = Vec::new();
    read_for(&mut s, &mut buf, Duration::from_millis(500));
    assert_eq!(
        responses(&buf),
        1,
        "one window's worth, then the server waits"
    );
    // Credit for what was read: exactly one more.
    s.write_all(&control(Kind::Credit, Vec::new(), MIB as u64))
        .unwrap();
    read_for(&mut s, &mut buf, Duration::from_millis(500));
    assert_eq!(responses(&buf), 2);
    for want in [3, 4] {
        s.write_all(&control(Kind::Credit, Vec::new(), MIB as u64))
            .unwrap();
        read_for(&mut s, &mut buf, Duration::from_millis(500));
        assert_eq!(responses(&buf), want);
    }
    // Every response is whole.
    for f in decode_stream(&buf, Limits::default(), &[]).frames {
        if f.head.kind() == Kind::Response {
            assert_bytes_eq(&f.payload, &pattern_pages(MIB), "response payload");
        }
    }
}

#[test]
fn small_windows_both_ways_never_deadlock() {
    let mut cfg = config(2);
    cfg.conn_window = 64 * 1024;
    let server = echo_builder().config(cfg).bind("127.0.0.1:0").unwrap();
    let ccfg = ClientConfig {
        conn_window: 64 * 1024,
        ..ClientConfig::default()
    };
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    with_watchdog(Duration::from_secs(60), "small windows", move || {
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let c = client.clone();
                std::thread::spawn(move || {
                    for i in 0..16u64 {
                        let data = pattern(MIB + (i as usize) * 4096, t * 100 + i);
                        let r = c
                            .call::<_, MetadataEntry>("echo", &msg("e"), data.clone())
                            .unwrap();
                        assert_bytes_eq(&r.payload, &data, "echo under credit");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    });
}

/// One thread keeps 8 calls of 1 MiB in flight with `start_call` (the
/// bulk bench's pattern): while its next request waits for the server's
/// credit it is also the only reader, so it must read the credit itself.
#[test]
fn one_thread_pipelining_past_the_window_reads_its_own_credit() {
    let server = Server::builder()
        .register("put", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .config(config(1))
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    with_watchdog(Duration::from_secs(60), "pipelined puts", move || {
        let pages = pattern_pages(MIB);
        let mut q = std::collections::VecDeque::new();
        for _ in 0..256 {
            if q.len() >= 8 {
                let c: pagerpc::PendingCall = q.pop_front().unwrap();
                c.wait().unwrap();
            }
            q.push_back(
                client
                    .start_call(
                        "put",
                        Vec::new(),
                        Payload::Pages(pages.clone()),
                        &pagerpc::CallOptions::default(),
                    )
                    .unwrap(),
            );
        }
        for c in q {
            c.wait().unwrap();
        }
    });
}

/// Regression: the server's credit could arrive in the same read as
/// another caller's response. That caller returned with its response and
/// left the credit in the receiver's buffer; the sender waiting for credit
/// then waited for the socket to become readable, which it never did
/// again, until the write timeout failed its request.
#[test]
fn credit_read_behind_another_callers_response_is_not_left_in_the_buffer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let settings =
            PeerSettings::new(Limits::default(), None, 1 << 20).with_conn_window(MIB as u64);
        s.write_all(&control(Kind::Settings, settings.encode(), 0))
            .unwrap();
        let mut buf = Vec::new();
        let of_kind = |buf: &[u8], kind: Kind| {
            decode_stream(buf, Limits::default(), &[])
                .frames
                .into_iter()
                .filter(|f| f.head.kind() == kind)
                .collect::<Vec<_>>()
        };
        let requests = |buf: &[u8]| of_kind(buf, Kind::Request);
        let mut chunk = vec![0u8; 1 << 20];
        // A PING first: answering it makes sure the client has read our
        // SETTINGS (and so our window) before it sends anything big.
        while of_kind(&buf, Kind::Ping).is_empty() {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let ping = of_kind(&buf, Kind::Ping)[0].head.call_id();
        let mut pong = Vec::new();
        let h = Header {
            call_id: ping,
            kind: Kind::Pong as i32,
            ..Default::default()
        };
        encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut pong).unwrap();
        s.write_all(&pong).unwrap();
        // The first request (1 MiB).
        while requests(&buf).is_empty() {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
        let first = requests(&buf)[0].head.call_id();
        // Give the second request time to block on credit, then answer
        // the first call and give the credit back in one write.
        std::thread::sleep(Duration::from_millis(300));
        let resp = Header {
            call_id: first,
            kind: Kind::Response as i32,
            ..Default::default()
        };
        let mut wire = Vec::new();
        encode_head(&resp, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
        wire.extend(control(Kind::Credit, Vec::new(), MIB as u64));
        s.write_all(&wire).unwrap();
        // The second request arrives; answer it.
        while requests(&buf).len() < 2 {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0, "the client closed before sending its second request");
            buf.extend_from_slice(&chunk[..n]);
        }
        let second = requests(&buf)[1].head.call_id();
        let mut wire = Vec::new();
        let resp = Header {
            call_id: second,
            kind: Kind::Response as i32,
            ..Default::default()
        };
        encode_head(&resp, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
        s.write_all(&wire).unwrap();
        let _ = s.read(&mut chunk);
    });
    let mut ccfg = ClientConfig::default();
    ccfg.send.write_timeout = Some(Duration::from_secs(5));
    let client = Client::connect_with(addr, ccfg).unwrap();
    client.ping(Duration::from_secs(10)).unwrap();
    let first = client
        .start_call(
            "put",
            Vec::new(),
            Payload::Pages(pattern_pages(MIB)),
            &Default::default(),
        )
        .unwrap();
    // The first caller waits for its response (it holds the reader role).
    let waiter = std::thread::spawn(move || first.wait().map(|_| ()));
    std::thread::sleep(Duration::from_millis(100));
    let t = std::time::Instant::now();
    let second = client
        .start_call(
            "put",
            Vec::new(),
            Payload::Pages(pattern_pages(MIB)),
            &Default::default(),
        )
        .expect("the second request must go once the credit is read");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    waiter.join().unwrap().unwrap();
    second.wait().unwrap();
    drop(client);
    fake.join().unwrap();
}
