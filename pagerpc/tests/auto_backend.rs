//! `Backend::Auto` over real loopback sockets: it settles on the path made
//! clearly cheaper, tells the peer's sender how to write, switches when the
//! costs change, and every payload arrives byte-exact, counted once.
//!
//! Costs are made clearly different by forcing segments that are not
//! page-aligned (mapping fails) or by the hidden `AutoCostBias` hook, which
//! inflates what the receiver measures for one path. Nothing here asserts
//! speed.

use std::collections::hash_map::DefaultHasher;
use std::hash::Hasher;
use std::sync::Arc;

use pagerpc::proto::MetadataEntry;
use pagerpc::{
    AutoCostBias, Backend, CallOptions, Client, ClientConfig, CountersSnapshot, PageBuf, Pages,
    Payload, SegmentAlign, Server, ServerConfig, Status,
};

const MIB: usize = 1 << 20;

/// Payload sizes cycled through: whole pages, tails, sizes between the
/// floor and a MiB, one below the floor and one inline.
const SIZES: [usize; 6] = [MIB, MIB + 100, (700 << 10) + 13, 300 << 10, 100 << 10, 3000];

fn hash(bytes: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

/// Payload `k`: its size from [`SIZES`], bytes that differ per `k`.
fn payload(k: usize) -> PageBuf {
    let len = SIZES[k % SIZES.len()];
    let mut b = PageBuf::new(len).unwrap();
    let mut x = (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = chunk.len();
        chunk.copy_from_slice(&x.to_le_bytes()[..n]);
    }
    b
}

/// A server whose `hash` method answers with the hash and length of the
/// payload it received (in the response's key), and whose `echo` method
/// sends the payload back.
fn server(cfg: ServerConfig) -> Server {
    Server::builder()
        .config(cfg)
        .register("hash", |_ctx, _req: MetadataEntry, pages: Pages| {
            let key = format!("{}:{}", hash(&pages), pages.len());
            Ok::<_, Status>((
                MetadataEntry {
                    key,
                    value: Vec::new(),
                },
                Payload::Empty,
            ))
        })
        .register("echo", |_ctx, req: MetadataEntry, pages: Pages| {
            Ok::<_, Status>((req, Payload::Pages(pages)))
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

/// Sends payloads `from..to` with `hash` and checks that each arrived
/// byte-exact.
fn send(client: &Client, from: usize, to: usize) {
    for k in from..to {
        let p = payload(k);
        let want = format!("{}:{}", hash(&p), p.len());
        let r = client
            .call::<_, MetadataEntry>("hash", &MetadataEntry::default(), p)
            .unwrap_or_else(|e| panic!("payload {k}: {e}"));
        assert_eq!(r.message.key, want, "payload {k} differs");
    }
}

/// Every payload byte received is counted once: mapped or copied, and by
/// Auto under one path and reason.
#[track_caller]
fn assert_accounted(c: &CountersSnapshot) {
    assert_eq!(
        c.bytes_mapped + c.bytes_copied(),
        c.payload_bytes_received,
        "{c:?}"
    );
    assert_eq!(c.auto.bytes(), c.payload_bytes_received, "{c:?}");
}

/// Which path the connection is settled on in the counters' window: the
/// one all of its "chosen" payloads took (`None` if both or neither).
fn settled(c: &CountersSnapshot) -> Option<&'static str> {
    match (c.auto.map_chosen, c.auto.copy_chosen) {
        (m, 0) if m > 0 => Some("map"),
        (0, n) if n > 0 => Some("copy"),
        _ => None,
    }
}

/// Sends payloads (from `*k` on) in windows of `window` until `want` is
/// the settled path in a whole window, at most `max` payloads. Returns the
/// counters of that window.
fn until_settled(
    server: &Server,
    client: &Client,
    k: &mut usize,
    want: &str,
    window: usize,
    max: usize,
) -> CountersSnapshot {
    let start = *k;
    loop {
        let before = server.counters();
        send(client, *k, *k + window);
        *k += window;
        let c = server.counters().since(&before);
        assert_accounted(&c);
        if settled(&c) == Some(want) {
            return c;
        }
        assert!(
            *k - start < max,
            "not settled on {want} after {} payloads: last window {:?}",
            *k - start,
            c.auto
        );
    }
}

fn auto_server_config(bias: &Arc<AutoCostBias>, segments: SegmentAlign) -> ServerConfig {
    let mut cfg = ServerConfig::zerocopy();
    cfg.recv.backend = Backend::Auto;
    cfg.recv.auto_cost_bias = Some(bias.clone());
    cfg.segments = segments;
    cfg
}

/// Segments that are not page-aligned: mapping fails. Auto settles on
/// copying even though the cost hook makes copying look ten times as
/// costly, asks the client to write by copy, and the client's sender stops
/// using `MSG_ZEROCOPY`.
#[test]
fn misaligned_segments_settle_on_copy_and_the_sender_stops_zero_copy() {
    let bias = Arc::new(AutoCostBias::default());
    bias.set(100, 1000);
    let server = server(auto_server_config(&bias, SegmentAlign::Off));
    let mut ccfg = ClientConfig::zerocopy();
    ccfg.segments = SegmentAlign::Off;
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let mut k = 0;
    // Only the large payloads count for the window: a window of 12
    // payloads holds 8 at or above the floor.
    let c = until_settled(&server, &client, &mut k, "copy", 12, 240);
    assert!(c.auto.copy_chosen >= 6, "{:?}", c.auto);
    let total = server.counters();
    assert_accounted(&total);
    assert!(
        total.auto.map_chosen + total.auto.map_sample > 0,
        "mapping was tried first: {:?}",
        total.auto
    );
    assert!(total.copied_unmappable > 0, "and failed: {total:?}");
    assert!(total.asked_peer_copy >= 1, "{total:?}");
    // The client was told, and writes by copy now.
    let (c0, z0) = (client.counters(), client.zerocopy_send_stats());
    assert!(c0.peer_asked_copy >= 1, "{c0:?}");
    send(&client, k, k + 36);
    let (c1, z1) = (client.counters(), client.zerocopy_send_stats());
    let zc_sends = c1.zc_sends - c0.zc_sends;
    // 24 payloads large enough for MSG_ZEROCOPY: a probe of mapping may
    // still take one or two (probes back off after failures).
    assert!(zc_sends <= 3, "{zc_sends} MSG_ZEROCOPY sends after COPY");
    assert!(z1.ids_issued - z0.ids_issued <= 3 * 16);
    assert_accounted(&server.counters());
}

/// Aligned segments, the cost hook flipped twice: Auto moves from mapping
/// to copying, back, and to copying again, tells the client each time,
/// and every payload arrives byte-exact.
#[test]
fn the_cost_hook_moves_auto_between_paths_and_back() {
    let bias = Arc::new(AutoCostBias::default());
    let server = server(auto_server_config(&bias, SegmentAlign::Auto));
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let mut k = 0;
    // Mapping ten times as costly: copying.
    bias.set(1000, 100);
    until_settled(&server, &client, &mut k, "copy", 12, 600);
    let (z0, c0) = (client.counters(), server.counters());
    send(&client, k, k + 12);
    k += 12;
    let (z1, c1) = (client.counters(), server.counters());
    assert!(
        z1.zc_sends - z0.zc_sends <= 2,
        "the client still writes with MSG_ZEROCOPY while Auto copies: {z1:?}"
    );
    assert!(c1.since(&c0).copied_auto > 0);
    // Copying ten times as costly: mapping.
    bias.set(100, 1000);
    let c = until_settled(&server, &client, &mut k, "map", 12, 2000);
    assert!(c.bytes_mapped > 0, "{c:?}");
    let (z0, c0) = (client.counters(), server.counters());
    send(&client, k, k + 12);
    k += 12;
    let (z1, c1) = (client.counters(), server.counters());
    assert!(
        z1.zc_sends - z0.zc_sends >= 6,
        "the client writes by copy while Auto maps: {z1:?}"
    );
    let w = c1.since(&c0);
    assert!(
        w.bytes_mapped * 2 > w.payload_bytes_received,
        "mapped {} of {}",
        w.bytes_mapped,
        w.payload_bytes_received
    );
    // And back to copying.
    bias.set(1000, 100);
    until_settled(&server, &client, &mut k, "copy", 12, 2000);
    let total = server.counters();
    assert_accounted(&total);
    assert!(total.asked_peer_copy >= 2 && total.asked_peer_zerocopy >= 1);
    let told = client.counters();
    assert!(told.peer_asked_copy >= 2 && told.peer_asked_zerocopy >= 1);
    // Small and inline payloads were never measured or sampled.
    let small = (k / SIZES.len()) as u64 * 2;
    assert!(total.auto.below_floor >= small, "{:?}", total.auto);
}

/// The client's receiver in Auto asks the server's sender: responses the
/// server echoes with `MSG_ZEROCOPY` go by copy once the client settles on
/// copying.
#[test]
fn a_client_in_auto_steers_the_servers_sender() {
    let bias = Arc::new(AutoCostBias::default());
    bias.set(1000, 100);
    let server = server(ServerConfig::zerocopy());
    let mut ccfg = ClientConfig::zerocopy();
    ccfg.recv.backend = Backend::Auto;
    ccfg.recv.auto_cost_bias = Some(bias.clone());
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let mut settled_at = None;
    for k in 0..600 {
        let p = payload(k);
        let want = p.to_vec();
        let r = client
            .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), p)
            .unwrap();
        assert!(r.payload[..] == want[..], "echo {k} differs");
        if k % 12 == 11 {
            let c = client.counters();
            if c.auto.copy_chosen >= 16 && c.asked_peer_copy >= 1 {
                settled_at = Some(k);
                break;
            }
        }
    }
    assert!(settled_at.is_some(), "{:?}", client.counters());
    let s0 = server.counters();
    assert!(s0.peer_asked_copy >= 1, "{s0:?}");
    let c0 = client.counters();
    for k in 1000..1024 {
        let p = payload(k);
        let want = p.to_vec();
        let r = client
            .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), p)
            .unwrap();
        assert!(r.payload[..] == want[..], "echo {k} differs");
    }
    let (s1, c1) = (server.counters(), client.counters());
    assert!(
        s1.zc_sends - s0.zc_sends <= 2,
        "the server still echoes with MSG_ZEROCOPY: {s1:?}"
    );
    let w = c1.since(&c0);
    assert_accounted(&w);
}

/// With `conn_window` 0 a client gives no connection credit back, which
/// otherwise carries its receiver's requests to the server's sender. A
/// client that only receives a server stream still gets them there: they
/// go with the stream credit it gives back for each message.
#[test]
fn a_client_without_connection_credit_still_sends_its_requests() {
    let bias = Arc::new(AutoCostBias::default());
    // Mapping measures ten times costlier: the receiver soon asks the
    // server to write by copy (to sample copying, then to settle on it).
    bias.set(1000, 100);
    let server = Server::builder()
        .config(ServerConfig::zerocopy())
        .register_server_stream("source", |_ctx, _body, _pages, tx| {
            for k in 0..48 {
                tx.send(&MetadataEntry::default(), payload(k * SIZES.len()))?;
            }
            Ok(Vec::new())
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let mut ccfg = ClientConfig::zerocopy();
    ccfg.recv.backend = Backend::Auto;
    ccfg.recv.auto_cost_bias = Some(bias);
    ccfg.conn_window = 0;
    ccfg.stream_window = 1 << 30;
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let mut rx = client
        .server_stream(
            "source",
            &MetadataEntry::default(),
            Payload::Empty,
            &CallOptions::default(),
        )
        .unwrap();
    let mut k = 0;
    while let Some(m) = rx.recv().unwrap() {
        let want = payload(k * SIZES.len());
        assert!(m.payload[..] == want[..], "message {k} differs");
        k += 1;
    }
    assert_eq!(k, 48);
    let c = client.counters();
    assert!(c.asked_peer_copy >= 1, "the receiver asked nothing: {c:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    while server.counters().peer_asked_copy == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let s = server.counters();
    assert!(
        s.peer_asked_copy >= 1,
        "the client's request never reached the server: {s:?}"
    );
    assert_accounted(&c);
}

/// The same on the async client and server (feature `tokio`).
#[cfg(feature = "tokio")]
#[test]
fn async_client_and_server_take_the_requests_too() {
    use pagerpc::{AsyncClient, AsyncServer};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let bias = Arc::new(AutoCostBias::default());
        bias.set(1000, 100);
        let server = AsyncServer::builder()
            .config(auto_server_config(&bias, SegmentAlign::Auto))
            .register(
                "echo",
                |_ctx, req: MetadataEntry, pages: Pages| async move {
                    Ok::<_, Status>((req, Payload::Pages(pages)))
                },
            )
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        let mut ccfg = ClientConfig::zerocopy();
        ccfg.recv.backend = Backend::Auto;
        ccfg.recv.auto_cost_bias = Some(bias.clone());
        let client = AsyncClient::connect_with(server.local_addr(), ccfg)
            .await
            .unwrap();
        let mut done = false;
        for k in 0..600 {
            let p = payload(k);
            let want = p.to_vec();
            let r = client
                .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), p)
                .await
                .unwrap();
            assert!(r.payload[..] == want[..], "echo {k} differs");
            let (s, c) = (server.counters(), client.counters());
            if s.auto.copy_chosen >= 16 && c.auto.copy_chosen >= 16 {
                done = true;
                break;
            }
        }
        let (s0, c0) = (server.counters(), client.counters());
        assert!(done, "server {:?}, client {:?}", s0.auto, c0.auto);
        assert!(s0.peer_asked_copy >= 1 && c0.peer_asked_copy >= 1);
        for k in 1000..1024 {
            let p = payload(k);
            let want = p.to_vec();
            let r = client
                .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), p)
                .await
                .unwrap();
            assert!(r.payload[..] == want[..], "echo {k} differs");
        }
        let (s1, c1) = (server.counters(), client.counters());
        assert!(s1.zc_sends - s0.zc_sends <= 2, "server: {s1:?}");
        assert!(c1.zc_sends - c0.zc_sends <= 2, "client: {c1:?}");
        assert_accounted(&s1);
        assert_accounted(&c1);
        server.shutdown().await;
    });
}
