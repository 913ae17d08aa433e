//! Wire version 2: bodies outside the header, limits announced in
//! SETTINGS and checked before sending, and a clear error for a version-1
//! peer.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use pagerpc::codec::{Header, Kind, Limits, V1_PREFIX_LEN};
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, Code, Pages, Payload, Server, Status};

const MIB: usize = 1 << 20;

fn big_limits() -> Limits {
    Limits {
        max_body_bytes: 32 * MIB as u32,
        max_header_bytes: 64 * 1024,
        ..Limits::default()
    }
}

#[test]
fn sixteen_mib_bodies_round_trip_both_ways() {
    let mut cfg = config(2);
    cfg.limits = big_limits();
    let server = Server::builder()
        .register("echo", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .config(cfg)
        .bind("127.0.0.1:0")
        .unwrap();
    let client_cfg = ClientConfig {
        limits: big_limits(),
        ..ClientConfig::default()
    };
    let client = Client::connect_with(server.local_addr(), client_cfg).unwrap();
    // One round trip first, so the server's SETTINGS have arrived.
    client.ping(Duration::from_secs(5)).unwrap();
    let value = pattern(16 * MIB, 3);
    let req = MetadataEntry {
        key: "big".into(),
        value: value.clone(),
    };
    let r = client
        .call::<_, MetadataEntry>("echo", &req, Payload::Empty)
        .unwrap();
    assert_eq!(r.message.key, "big");
    assert_bytes_eq(&r.message.value, &value, "16 MiB body");
}

#[test]
fn a_body_over_the_servers_announced_limit_fails_locally() {
    // The server accepts 1 MiB bodies and says so; the client's own
    // idea of the default (4 MiB) does not matter once it knows.
    let mut cfg = config(2);
    cfg.limits.max_body_bytes = MIB as u32;
    let server = echo_builder().config(cfg).bind("127.0.0.1:0").unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    client.ping(Duration::from_secs(5)).unwrap();
    let before = server.counters().frames_received;
    let req = MetadataEntry {
        key: "k".into(),
        value: vec![7; 2 * MIB],
    };
    let err = client
        .call::<_, MetadataEntry>("echo", &req, Payload::Empty)
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("max_body_bytes limit of 1048576"),
        "the error must name the limit and the value: {err}"
    );
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        server.counters().frames_received,
        before,
        "nothing was sent"
    );
    // The connection is fine: a body under the limit goes through.
    let ok = MetadataEntry {
        key: "k".into(),
        value: vec![7; MIB / 2],
    };
    let r = client
        .call::<_, MetadataEntry>("echo", &ok, Payload::Empty)
        .unwrap();
    assert_eq!(r.message.value.len(), MIB / 2);
}

/// A version-1 frame: the 20-byte prefix and the header with its body
/// inside (how version 1 carried it).
fn v1_request() -> Vec<u8> {
    let h = Header {
        call_id: 1,
        kind: Kind::Request as i32,
        method: "echo".into(),
        body: b"hello".to_vec(),
        ..Default::default()
    };
    let hb = h.encode_to_vec();
    let mut out = b"PGRP".to_vec();
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&(hb.len() as u32).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&hb);
    out
}

#[test]
fn a_version_1_client_gets_a_version_1_error_not_a_hang() {
    let server = echo_builder()
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let mut s = TcpStream::connect(server.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&v1_request()).unwrap();
    let mut got = Vec::new();
    // The server sends its (version-2) SETTINGS first, then, on reading
    // our version-1 frame, one version-1 ERROR, and closes.
    s.read_to_end(&mut got).expect("the server closes, no hang");
    let at = got
        .windows(5)
        .position(|w| w == b"PGRP\x01")
        .expect("a version-1 frame in the answer");
    let v1 = &got[at..];
    let hlen = u32::from_le_bytes(v1[8..12].try_into().unwrap()) as usize;
    let h = Header::decode(&v1[V1_PREFIX_LEN..V1_PREFIX_LEN + hlen]).unwrap();
    assert_eq!(h.kind, Kind::Error as i32);
    assert_eq!(h.call_id, 0);
    assert!(
        h.status_message.contains("wire version 2") && h.status_message.contains("version 1"),
        "{}",
        h.status_message
    );
}

#[test]
fn a_client_talking_to_a_version_1_server_gets_a_clear_error() {
    // A stand-in for a version-1 server: it answers whatever it reads
    // with a version-1 ERROR (what a version-1 server sends on seeing a
    // version-2 prefix) and closes.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 256];
        let _ = s.read(&mut buf);
        let _ = s.write_all(&pagerpc::codec::encode_v1_error(
            Code::InvalidArgument.as_u32(),
            "protocol error, closing: unsupported wire version 2 (this build speaks 1)",
        ));
    });
    let client = Client::connect(addr).unwrap();
    let err = with_watchdog(Duration::from_secs(20), "v1 server", move || {
        client
            .call::<_, MetadataEntry>("echo", &msg("x"), Payload::Empty)
            .unwrap_err()
    });
    t.join().unwrap();
    assert!(
        err.message().contains("wire version 1"),
        "the error must say the peer speaks version 1: {err}"
    );
}
