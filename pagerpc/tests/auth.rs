//! Pre-shared-key authentication: right key, wrong key, no key, replay.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pagerpc::codec::{decode_stream, encode_head, Flags, Header, Kind, Limits};
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, Code, Pages, Payload, Server, ServerConfig, Status};

fn server(key: &[u8], seen: Arc<AtomicUsize>) -> Server {
    let cfg = ServerConfig {
        auth_key: Some(key.into()),
        ..ServerConfig::default()
    };
    Server::builder()
        .config(cfg)
        .register("echo", move |_ctx, req: MetadataEntry, p: Pages| {
            seen.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Status>((req, Payload::Pages(p)))
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

fn keyed(key: &[u8]) -> ClientConfig {
    ClientConfig {
        auth_key: Some(key.into()),
        connect_timeout: Duration::from_secs(2),
        ..ClientConfig::default()
    }
}

fn msg() -> MetadataEntry {
    MetadataEntry::default()
}

#[test]
fn the_right_key_gets_in() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = server(b"correct horse battery staple", seen.clone());
    let c = Client::connect_with(s.local_addr(), keyed(b"correct horse battery staple")).unwrap();
    let r = c
        .call::<_, MetadataEntry>("echo", &msg(), vec![5u8; 10_000])
        .unwrap();
    assert_eq!(r.payload.len(), 10_000);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}

#[test]
fn a_wrong_key_is_refused_before_any_dispatch() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = server(b"right", seen.clone());
    let e = Client::connect_with(s.local_addr(), keyed(b"wrong")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
    assert!(
        e.to_string().contains("does not match the pre-shared key"),
        "{e}"
    );
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

#[test]
fn a_missing_key_is_refused_with_a_clear_error() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = server(b"right", seen.clone());
    let c = Client::connect(s.local_addr()).unwrap();
    let e = c
        .call::<_, MetadataEntry>("echo", &msg(), Payload::Empty)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert!(e.message().contains("pre-shared-key authentication"), "{e}");
    assert_eq!(seen.load(Ordering::SeqCst), 0, "nothing was dispatched");
}

/// Reads AUTH/ERROR frames from a raw connection.
fn read_one(s: &mut TcpStream) -> pagerpc::codec::DecodedFrame {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let out = decode_stream(&buf, Limits::default(), &[]);
        if let Some(f) = out.frames.into_iter().next() {
            return f;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a frame arrived");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn auth_frame(body: Vec<u8>) -> Vec<u8> {
    let h = Header {
        kind: Kind::Auth as i32,
        body,
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    wire
}

#[test]
fn a_replayed_handshake_is_refused() {
    let seen = Arc::new(AtomicUsize::new(0));
    let key = b"k3y";
    let s = server(key, seen.clone());
    // Record a genuine client's handshake response on one connection...
    let mut first = TcpStream::connect(s.local_addr()).unwrap();
    let challenge = read_one(&mut first).head.header.body;
    assert_eq!(challenge.len(), 32);
    let mut response = [9u8; 32].to_vec();
    response.extend(hmac_sha256(
        key,
        b"pagerpc-v1 client",
        &challenge,
        &[9u8; 32],
    ));
    first.write_all(&auth_frame(response.clone())).unwrap();
    assert_eq!(
        read_one(&mut first).head.kind(),
        Kind::Auth,
        "the genuine response is accepted"
    );
    // ...and replay it on another: the server's nonce differs, so it fails.
    let mut second = TcpStream::connect(s.local_addr()).unwrap();
    let challenge2 = read_one(&mut second).head.header.body;
    assert_ne!(challenge, challenge2, "every connection gets a fresh nonce");
    second.write_all(&auth_frame(response)).unwrap();
    let f = read_one(&mut second);
    assert_eq!(f.head.kind(), Kind::Error);
    assert_eq!(f.head.header.status_code, Code::Unauthenticated.as_u32());
    assert!(f
        .head
        .header
        .status_message
        .contains("authentication failed"));
    assert_eq!(seen.load(Ordering::SeqCst), 0);
}

#[test]
fn a_keyed_client_notices_a_server_without_authentication() {
    let plain = Server::builder().bind("127.0.0.1:0").unwrap();
    let mut cfg = keyed(b"k");
    cfg.connect_timeout = Duration::from_millis(300);
    let e = Client::connect_with(plain.local_addr(), cfg).unwrap_err();
    assert!(e.to_string().contains("no authentication challenge"), "{e}");
}

/// HMAC-SHA256 by the book (RFC 2104), independent of the library's code.
fn hmac_sha256(key: &[u8], label: &[u8], a: &[u8], b: &[u8]) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let ipad: Vec<u8> = k.iter().map(|x| x ^ 0x36).collect();
    let opad: Vec<u8> = k.iter().map(|x| x ^ 0x5c).collect();
    let inner = Sha256::new()
        .chain_update(&ipad)
        .chain_update(label)
        .chain_update(a)
        .chain_update(b)
        .finalize();
    Sha256::new()
        .chain_update(&opad)
        .chain_update(inner)
        .finalize()
        .to_vec()
}
