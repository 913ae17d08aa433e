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
