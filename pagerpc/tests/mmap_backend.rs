//! The consuming-`mmap()` backend (`Backend::Mmap`, `kernel-patch/`).
//!
//! On a stock kernel, detection must say no and the connection must use
//! `TCP_ZEROCOPY_RECEIVE` instead. `kernel-patch/run-uml.sh` runs this file
//! again inside the patched UML guest with `PAGERPC_EXPECT_MMAP_CONSUME=1`,
//! where every connection must use the consuming `mmap()`. Either way,
//! payloads are byte-exact, aligned ones are mapped, and fallbacks copy.

use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};

use pagerpc::codec::{encode_head, Flags, Header, Kind, Limits};
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    Backend, Client, ClientConfig, Origin, PageBuf, Pages, Payload, ReceivePath, SegmentAlign,
    Server, ServerConfig, Status,
};

fn expect_mmap() -> bool {
    std::env::var("PAGERPC_EXPECT_MMAP_CONSUME").is_ok_and(|v| v == "1")
}

fn expected_path() -> ReceivePath {
    if expect_mmap() {
        ReceivePath::Mmap
    } else {
        ReceivePath::ZeroCopy
    }
}

type Seen = Arc<Mutex<Vec<(ReceivePath, Pages)>>>;

fn server(segments: SegmentAlign) -> (Server, Seen) {
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let mut cfg = ServerConfig::zerocopy();
    cfg.recv.backend = Backend::Mmap;
    cfg.segments = segments;
    let server = Server::builder()
        .config(cfg)
        .register("keep", move |ctx, req: MetadataEntry, pages: Pages| {
            s.lock().unwrap().push((ctx.receive_path(), pages));
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    (server, seen)
}

fn client(server: &Server, segments: SegmentAlign) -> Client {
    let mut cfg = ClientConfig::zerocopy();
    cfg.segments = segments;
    Client::connect_with(server.local_addr(), cfg).unwrap()
}

fn payload(len: usize, seed: u8) -> Pages {
    let mut b = PageBuf::new(len).unwrap();
    for (i, x) in b.iter_mut().enumerate() {
        *x = ((i * 31 + 7) % 251) as u8 ^ seed;
    }
    b.freeze()
}

#[test]
fn aligned_payloads_are_mapped_by_the_detected_backend() {
    let (server, seen) = server(SegmentAlign::Auto);
    let c = client(&server, SegmentAlign::Auto);
    let data = payload(1 << 20, 1);
    for _ in 0..8 {
        c.call::<_, MetadataEntry>("keep", &MetadataEntry::default(), data.clone())
            .unwrap();
    }
    let before = server.counters();
    for _ in 0..32 {
        c.call::<_, MetadataEntry>("keep", &MetadataEntry::default(), data.clone())
            .unwrap();
    }
    let m = server.counters().since(&before);
    assert!(
        m.mapped_percent() > 99.0,
        "{:.2}% mapped: {m:?}",
        m.mapped_percent()
    );
    for (path, p) in seen.lock().unwrap().iter() {
        assert_eq!(*path, expected_path());
        assert_eq!(p.origin(), Origin::Socket);
        assert!(**p == *data);
    }
    // Sizes around page boundaries, byte-exact.
    for (k, len) in [4096usize, 4097, 8191, (1 << 20) + 13, 16 << 20]
        .into_iter()
        .enumerate()
    {
        let d = payload(len, k as u8);
        c.call::<_, MetadataEntry>("keep", &MetadataEntry::default(), d.clone())
            .unwrap();
        let last = seen.lock().unwrap().last().map(|(_, p)| p.clone()).unwrap();
        assert!(*last == *d, "{len} bytes");
    }
}

#[test]
fn misaligned_segments_fall_back_to_copy_byte_exact() {
    // Without page-sized segments the kernel refuses the pages (EINVAL for
    // the consuming mmap, a skip hint for TCP_ZEROCOPY_RECEIVE): copies.
    let (server, seen) = server(SegmentAlign::Off);
    let c = client(&server, SegmentAlign::Off);
    let data = payload((1 << 20) + 5, 2);
    for _ in 0..4 {
        c.call::<_, MetadataEntry>("keep", &MetadataEntry::default(), data.clone())
            .unwrap();
    }
    for (path, p) in seen.lock().unwrap().iter() {
        assert_eq!(*path, expected_path());
        assert!(**p == *data, "fallback is byte-exact");
    }
    let m = server.counters();
    assert!(m.copied_unmappable + m.copied_not_queued > 0, "{m:?}");
    assert_eq!(m.bytes_mapped + m.bytes_copied(), 4 * data.len() as u64);
}

#[test]
fn a_payload_cut_short_never_reaches_the_handler() {
    // The peer dies mid-payload: the mapping call sees EIO (or the copy
    // sees the end of stream) and the connection fails; nothing short is
    // delivered and the server keeps serving.
    let (server, seen) = server(SegmentAlign::Auto);
    let mut raw = TcpStream::connect(server.local_addr()).unwrap();
    let h = Header {
        call_id: 1,
        kind: Kind::Request as i32,
        method: "keep".into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, 1 << 20, Flags::NONE, &Limits::default(), &mut wire).unwrap();
    raw.write_all(&wire).unwrap();
    raw.write_all(&vec![9u8; 300 * 1024]).unwrap();
    drop(raw);
    let c = client(&server, SegmentAlign::Auto);
    let d = payload(1 << 20, 3);
    c.call::<_, MetadataEntry>("keep", &MetadataEntry::default(), d.clone())
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1, "only the whole payload was delivered");
    assert!(*seen[0].1 == *d);
}

#[test]
fn mapped_pages_outlive_the_connection() {
    let (server, seen) = server(SegmentAlign::Auto);
    let d = payload(2 << 20, 4);
    {
        let c = client(&server, SegmentAlign::Auto);
        c.call::<_, MetadataEntry>("keep", &MetadataEntry::default(), d.clone())
            .unwrap();
        c.close();
    }
    server.shutdown();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].1.origin(), Origin::Socket);
    assert!(
        *seen[0].1 == *d,
        "readable after the connection and server are gone"
    );
}
