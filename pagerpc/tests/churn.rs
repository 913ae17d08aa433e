//! 10,000 connections opened, used and closed leave no fd or mapping
//! behind. A test binary of its own, so no other test's sockets and
//! threads come and go meanwhile.

use std::time::{Duration, Instant};

use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, Pages, Payload, Server, ServerConfig, Status};

fn count_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn count_maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .count()
}

#[test]
fn ten_thousand_connections_leave_nothing_behind() {
    pagerpc::set_cache_limit(0);
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            ..ServerConfig::default()
        })
        .register("echo", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(p)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let round = |n: usize| {
        for i in 0..n {
            let c = Client::connect(addr).unwrap();
            // Every tenth connection moves a payload big enough for a
            // mapping of its own; the others only open and close.
            if i % 10 == 0 {
                let r = c
                    .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), vec![1u8; 100_000])
                    .unwrap();
                assert_eq!(r.payload.len(), 100_000);
            }
            drop(c);
        }
        // The server closes its side once it reads each EOF.
        let t0 = Instant::now();
        while server.connections() > 0 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.connections(), 0);
    };
    round(100); // warm up
    let (fds0, maps0) = (count_fds(), count_maps());
    round(10_000);
    // A pool thread may still be finishing with the last connection it
    // served (it closes the socket when it drops its handle): give the
    // counts a moment to settle.
    let t0 = Instant::now();
    while (count_fds() > fds0 || count_maps() > maps0) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(count_fds(), fds0, "fd leak");
    assert_eq!(count_maps(), maps0, "mapping leak");
}
