//! Zero-copy receive and send over real loopback sockets, with page-aligned
//! segments (TCP_MAXSEG 4108), asserted through the transfer counters.

use std::sync::{Arc, Mutex};

use pagerpc::proto::MetadataEntry;
use pagerpc::{
    Backend, Client, ClientConfig, Origin, PageBuf, Pages, Payload, SegmentAlign, Server,
    ServerConfig, Status,
};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + 7) % 251) as u8 ^ seed)
        .collect()
}

fn page_buf(data: &[u8]) -> PageBuf {
    let mut b = PageBuf::new(data.len()).unwrap();
    b.copy_from_slice(data);
    b
}

fn msg() -> MetadataEntry {
    MetadataEntry::default()
}

/// A server that keeps every payload it receives and echoes it back.
fn keeping_server(cfg: ServerConfig) -> (Server, Arc<Mutex<Vec<Pages>>>) {
    let kept = Arc::new(Mutex::new(Vec::new()));
    let k = kept.clone();
    let server = Server::builder()
        .config(cfg)
        .register("keep", move |_ctx, req: MetadataEntry, pages: Pages| {
            k.lock().unwrap().push(pages);
            Ok::<_, Status>((req, Payload::Empty))
        })
        .register("echo", |_ctx, req: MetadataEntry, pages: Pages| {
            Ok::<_, Status>((req, Payload::Pages(pages)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    (server, kept)
}

#[test]
fn aligned_megabyte_payloads_are_mapped() {
    let (server, kept) = keeping_server(ServerConfig::zerocopy());
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    // TCP_MAXSEG 4108 was set; the connection reports its payload per
    // segment, options excluded: one page.
    assert_eq!(
        client.mss().unwrap(),
        4096,
        "loopback segments carry one page"
    );
    let data = pattern(1 << 20, 1);
    // A fresh connection's receive buffer is still small; let autotuning
    // settle, as in any bulk transfer, then measure.
    for _ in 0..8 {
        client
            .call::<_, MetadataEntry>("keep", &msg(), page_buf(&data))
            .unwrap();
    }
    let before = server.counters();
    for _ in 0..64 {
        client
            .call::<_, MetadataEntry>("keep", &msg(), page_buf(&data))
            .unwrap();
    }
    let c = server.counters().since(&before);
    assert_eq!(c.payload_bytes_received, 64 << 20);
    assert!(
        c.mapped_percent() > 99.0,
        "only {:.2}% mapped: {c:?}",
        c.mapped_percent()
    );
    for p in kept.lock().unwrap().iter() {
        assert_eq!(p.origin(), Origin::Socket);
        assert!(**p == data[..]);
    }
    // The sender used MSG_ZEROCOPY, and every completion arrives.
    assert!(client
        .flush_zerocopy(std::time::Duration::from_secs(10))
        .unwrap());
    let s = client.counters();
    assert_eq!(s.zc_sends, 72);
    // One notification id per sendmsg call: a payload the socket took in
    // two calls has two.
    let ids = u64::from(client.zerocopy_send_stats().ids_issued);
    assert!(ids >= 72);
    assert_eq!(s.zc_send_completions, ids, "{s:?}");
}

#[test]
fn sizes_are_byte_exact_in_zero_copy_mode() {
    let (server, _) = keeping_server(ServerConfig::zerocopy());
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    for (k, len) in [0usize, 1, 4095, 4096, 4097, (1 << 20) + 13, 64 << 20]
        .into_iter()
        .enumerate()
    {
        let data = pattern(len, k as u8);
        let resp = client
            .call::<_, MetadataEntry>("echo", &msg(), page_buf(&data))
            .unwrap_or_else(|e| panic!("{len}: {e}"));
        assert_eq!(resp.payload.len(), len);
        assert!(*resp.payload == data[..], "echo of {len} bytes differs");
        if len >= 4096 {
            // Both directions mapped the whole pages.
            assert_eq!(resp.payload.origin(), Origin::Socket, "{len}");
        }
    }
    let c = server.counters();
    // Every byte was mapped or copied for a reason the kernel gave: never
    // because the backend was off. (A burst can still meet an odd-sized
    // segment on loopback, after SACK reordering; then the rest of that
    // payload is copied, byte-exact; see docs/zero-copy.md.)
    assert_eq!(c.copied_backend_off, 0, "{c:?}");
    assert!(c.bytes_mapped >= (1 << 20), "{c:?}");
    assert_eq!(
        c.bytes_mapped + c.bytes_copied(),
        [0usize, 1, 4095, 4096, 4097, (1 << 20) + 13, 64 << 20]
            .iter()
            .sum::<usize>() as u64
    );
}

#[test]
fn misaligned_segments_fall_back_to_copy_byte_exact() {
    let mut scfg = ServerConfig::zerocopy();
    scfg.segments = SegmentAlign::Off;
    let mut ccfg = ClientConfig::zerocopy();
    ccfg.segments = SegmentAlign::Off;
    let (server, kept) = keeping_server(scfg);
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let data = pattern((1 << 20) + 100, 3);
    for _ in 0..8 {
        client
            .call::<_, MetadataEntry>("keep", &msg(), page_buf(&data))
            .unwrap();
    }
    for p in kept.lock().unwrap().iter() {
        assert!(**p == data[..], "fallback copy is byte-exact");
    }
    let c = server.counters();
    assert!(
        c.copied_unmappable > 0,
        "big segments are not mappable: {c:?}"
    );
    assert_eq!(c.bytes_mapped + c.bytes_copied(), 8 * data.len() as u64);
}

#[test]
fn small_payloads_and_copy_backend_are_counted_as_copies() {
    // Small payloads in zero-copy mode: inline, counted as tail.
    let (server, _) = keeping_server(ServerConfig::zerocopy());
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    for len in [1usize, 100, 3000] {
        let data = pattern(len, 4);
        let r = client
            .call::<_, MetadataEntry>("echo", &msg(), data.clone())
            .unwrap();
        assert!(*r.payload == data[..]);
    }
    let c = server.counters();
    assert_eq!(c.bytes_mapped, 0);
    assert_eq!(c.copied_tail, 3101);

    // The backend switched off: every byte copied, for that reason.
    let mut cfg = ServerConfig::zerocopy();
    cfg.recv.backend = Backend::Copy;
    let (server, kept) = keeping_server(cfg);
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let data = pattern(1 << 20, 5);
    client
        .call::<_, MetadataEntry>("keep", &msg(), page_buf(&data))
        .unwrap();
    assert!(*kept.lock().unwrap()[0] == data[..]);
    let c = server.counters();
    assert_eq!(c.copied_backend_off, 1 << 20);
    assert_eq!(c.bytes_mapped, 0);
}

#[test]
fn mapped_pages_outlive_the_connection() {
    let (server, kept) = keeping_server(ServerConfig::zerocopy());
    let data = pattern(2 << 20, 6);
    let echoed;
    {
        let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
        client
            .call::<_, MetadataEntry>("keep", &msg(), page_buf(&data))
            .unwrap();
        echoed = client
            .call::<_, MetadataEntry>("echo", &msg(), page_buf(&data))
            .unwrap()
            .payload;
        client.close();
    }
    // The client is gone; shut the server down too.
    server.shutdown();
    let kept = kept.lock().unwrap();
    assert_eq!(kept[0].origin(), Origin::Socket);
    assert!(
        *kept[0] == data[..],
        "server-side pages readable after the peer left"
    );
    assert_eq!(echoed.origin(), Origin::Socket);
    assert!(
        *echoed == data[..],
        "client-side pages readable after both ends closed"
    );
}

#[test]
fn received_pages_can_be_sent_back_out() {
    // What a GET of a stored value does: the stored Pages (mapped from one
    // socket) are the payload of a response on another connection.
    let (server, kept) = keeping_server(ServerConfig::zerocopy());
    let data = pattern((1 << 20) + 7, 7);
    let a = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    a.call::<_, MetadataEntry>("keep", &msg(), page_buf(&data))
        .unwrap();
    let stored = kept.lock().unwrap()[0].clone();
    let b = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let back = b
        .call::<_, MetadataEntry>("echo", &msg(), stored.clone())
        .unwrap();
    assert!(*back.payload == data[..]);
    assert!(*stored == data[..], "the stored pages are unchanged");
}
