//! No mapping or fd leaks after 10,000 zero-copy messages. A test binary of
//! its own, so no other test's threads or mappings come and go meanwhile.

use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, PageBuf, Pages, Payload, Server, ServerConfig, Status};

fn count_lines(path: &str) -> usize {
    std::fs::read_to_string(path).unwrap().lines().count()
}

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

#[test]
fn ten_thousand_messages_leave_no_mapping_or_fd_behind() {
    // Recycled anonymous regions would be legitimate mappings that stay;
    // turn the cache off so every line of /proc/self/maps must go away.
    pagerpc::set_cache_limit(0);
    let server = Server::builder()
        .config(ServerConfig::zerocopy())
        .register("sum", |_ctx, req: MetadataEntry, pages: Pages| {
            let sum: u64 = pages.iter().map(|&b| u64::from(b)).sum();
            Ok::<_, Status>((
                MetadataEntry {
                    key: sum.to_string(),
                    ..req
                },
                Payload::Empty,
            ))
        })
        .register("echo", |_ctx, req: MetadataEntry, pages: Pages| {
            Ok::<_, Status>((req, Payload::Pages(pages)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    // Above one page, so it is sent with MSG_ZEROCOPY and both ends map.
    let mut buf = PageBuf::new(32 * 1024 + 100).unwrap();
    buf.fill(3);
    let payload = buf.freeze();
    let expect = (3 * payload.len()).to_string();
    let round = |n: usize| {
        for i in 0..n {
            let method = if i % 10 == 0 { "echo" } else { "sum" };
            let r = client
                .call::<_, MetadataEntry>(method, &MetadataEntry::default(), payload.clone())
                .unwrap();
            if method == "sum" {
                assert_eq!(r.message.key, expect);
            } else {
                assert!(*r.payload == *payload);
            }
        }
    };
    round(200); // warm up: threads, buffers, caches
    let maps0 = count_lines("/proc/self/maps");
    let fds0 = count_fds();
    round(10_000);
    let c = server.counters();
    assert!(
        c.bytes_mapped > 0,
        "the zero-copy path was exercised: {c:?}"
    );
    assert_eq!(count_lines("/proc/self/maps"), maps0, "mapping leak");
    assert_eq!(count_fds(), fds0, "fd leak");
}
