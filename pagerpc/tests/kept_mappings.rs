//! A zero-copy connection keeps the socket mappings of payloads its
//! consumer dropped and maps the next payloads into them
//! (`RecvConfig::kept_mappings`), and the kernel copies a payload's
//! sub-page tail in the call that maps its last pages. Real loopback
//! sockets with page-aligned segments; mappings are counted in
//! `/proc/self/maps`, so the tests of this file run one at a time.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

mod common;

use common::{page_buf, pattern, wait_until};
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, Origin, Pages, Payload, Server, ServerConfig, Status};
use pagerpc_pages::KEPT_MAX_LEN;

/// Mappings are counted process-wide: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mappings of sockets in this process (`socket:[inode]` in its maps).
fn socket_mappings() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|l| l.contains("socket:["))
        .count()
}

type Held = Arc<Mutex<Vec<(u8, Pages)>>>;

/// A zero-copy server whose `put` keeps the payload of every call whose
/// key (a number) is a multiple of `keep_every`, and drops the others as
/// soon as the handler returns.
fn server(kept_mappings: usize, keep_every: u8) -> (Server, Held) {
    let held: Held = Arc::default();
    let h = held.clone();
    let mut cfg = ServerConfig::zerocopy();
    cfg.recv.kept_mappings = kept_mappings;
    let server = Server::builder()
        .config(cfg)
        .register("put", move |_ctx, req: MetadataEntry, pages: Pages| {
            let seed: u8 = req
                .key
                .parse()
                .map_err(|_| Status::invalid_argument("key"))?;
            if seed.is_multiple_of(keep_every) {
                h.lock().unwrap().push((seed, pages));
            }
            Ok::<_, Status>((MetadataEntry::default(), Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    (server, held)
}

fn put(client: &Client, seed: u8, data: &[u8]) {
    let req = MetadataEntry {
        key: seed.to_string(),
        ..Default::default()
    };
    client
        .call::<_, MetadataEntry>("put", &req, page_buf(data))
        .unwrap_or_else(|e| panic!("put {seed}: {e}"));
}

#[test]
fn reused_mappings_never_overwrite_a_payload_still_held() {
    let _serial = serial();
    let (server, held) = server(4, 4);
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    // Payloads end in a partial page: the kernel may copy the tail in the
    // mapping call, into the anonymous page after a kept mapping's socket
    // part.
    let len = (1 << 20) + 100;
    let payloads = 48u8;
    for seed in 0..payloads {
        put(&client, seed, &pattern(len, u64::from(seed)));
    }
    let held = held.lock().unwrap();
    assert_eq!(held.len(), 12);
    for (seed, pages) in held.iter() {
        assert_eq!(pages.origin(), Origin::Socket, "payload {seed}");
        assert!(
            **pages == pattern(len, u64::from(*seed))[..],
            "payload {seed} changed after later payloads were received"
        );
    }
    let c = server.counters();
    assert_eq!(
        c.socket_maps_made + c.socket_maps_reused,
        u64::from(payloads),
        "one mapping per payload: {c:?}"
    );
    // 36 payloads were dropped: their mappings came back for the next
    // ones. (A payload that met a segment off page boundaries, which
    // loopback can send after SACK reordering, had part of its mapping
    // replaced: that mapping is unmapped rather than kept.)
    assert!(c.socket_maps_reused >= 24, "{c:?}");
    assert_eq!(c.copied_tail, u64::from(payloads) * 100, "{c:?}");
    assert!(c.tails_copied_with_map <= u64::from(payloads), "{c:?}");
    assert_eq!(
        c.bytes_mapped + c.bytes_copied(),
        u64::from(payloads) * len as u64,
        "{c:?}"
    );
    client.close();
    server.shutdown();
}

#[test]
fn kept_mappings_are_bounded_and_unmapped_with_their_connection() {
    let _serial = serial();
    let before = socket_mappings();
    let (server, held) = server(4, 100);
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    // Payload 0 is held; 1..=16 are dropped.
    for seed in 0..=16 {
        put(&client, seed, &pattern(1 << 20, u64::from(seed)));
    }
    let c = server.counters();
    assert!(c.socket_maps_reused >= 8, "{c:?}");
    // Held: one mapping; kept for the next payloads: at least one, at
    // most the four configured.
    let live = socket_mappings() - before;
    assert!((2..=5).contains(&live), "{live} socket mappings");
    // The connection ends: its kept mappings go with it (they hold the
    // socket's file); the held payload's mapping stays until dropped.
    client.close();
    assert!(
        wait_until(Duration::from_secs(10), || socket_mappings() - before == 1),
        "{} socket mappings after the connection closed",
        socket_mappings() - before
    );
    let (seed, pages) = held.lock().unwrap().pop().unwrap();
    assert_eq!(seed, 0);
    assert!(*pages == pattern(1 << 20, 0)[..]);
    drop(pages);
    assert_eq!(
        socket_mappings(),
        before,
        "the held payload's mapping is unmapped"
    );
    server.shutdown();
}

#[test]
fn without_kept_mappings_every_payload_gets_a_mapping_of_its_own() {
    let _serial = serial();
    let before = socket_mappings();
    let (server, _held) = server(0, 100);
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    for seed in 1..=8 {
        put(&client, seed, &pattern(1 << 20, u64::from(seed)));
    }
    let c = server.counters();
    assert_eq!(c.socket_maps_reused, 0, "{c:?}");
    assert_eq!(c.socket_maps_made, 8, "{c:?}");
    assert_eq!(
        socket_mappings(),
        before,
        "every dropped payload was unmapped"
    );
    client.close();
    server.shutdown();
}

/// A peer cannot make a connection hold more mappings than the bound:
/// payloads each of a size of their own are never reused and never kept
/// past 4, and a payload over `KEPT_MAX_LEN` is not kept at all (a kept
/// mapping keeps its page tables).
#[test]
fn payloads_of_ever_new_sizes_keep_no_more_than_the_bound() {
    let _serial = serial();
    let before = socket_mappings();
    let (server, _held) = server(4, 255);
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    for seed in 1..=40u8 {
        let len = (1 << 20) + usize::from(seed) * 4096;
        put(&client, seed, &pattern(len, u64::from(seed)));
        let live = socket_mappings() - before;
        assert!(live <= 4, "payload {seed}: {live} socket mappings");
    }
    let c = server.counters();
    assert_eq!(c.socket_maps_reused, 0, "{c:?}");
    assert_eq!(c.socket_maps_made, 40, "{c:?}");
    client.close();
    assert!(wait_until(Duration::from_secs(10), || socket_mappings() == before));

    // Over the size bound, on a fresh connection: the same size twice,
    // and the second gets a mapping of its own.
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let before_big = server.counters();
    for seed in 41..=42u8 {
        put(
            &client,
            seed,
            &pattern(KEPT_MAX_LEN + 4096, u64::from(seed)),
        );
        assert_eq!(socket_mappings(), before, "payload {seed} was kept");
    }
    let c = server.counters().since(&before_big);
    assert_eq!((c.socket_maps_made, c.socket_maps_reused), (2, 0), "{c:?}");
    client.close();
    server.shutdown();
}
