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

/// Waits until the server reports no connections and the process's fd and
/// mapping counts have held still for a while, then returns those counts.
///
/// `Server::connections()` drops to zero when a connection leaves the
/// server's table, but the pool thread that closed it may still hold its
/// handle (and so its socket) for a moment. A count taken in that window
/// is one too high: a baseline taken there made a clean run fail with
/// `left: 10, right: 11`. Panics, with the last counts seen, if they do not
/// settle within a bound.
fn settled_counts(server: &Server) -> (usize, usize) {
    const STABLE_FOR: Duration = Duration::from_millis(200);
    const TIMEOUT: Duration = Duration::from_secs(10);
    let t0 = Instant::now();
    let mut last = None;
    let mut since = Instant::now();
    loop {
        let now = (server.connections(), count_fds(), count_maps());
        if now.0 == 0 && last == Some(now) {
            if since.elapsed() >= STABLE_FOR {
                return (now.1, now.2);
            }
        } else {
            last = Some(now);
            since = Instant::now();
        }
        assert!(
            t0.elapsed() < TIMEOUT,
            "connections/fds/maps did not settle within {TIMEOUT:?}; last seen {now:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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
        // connections() counts accepted connections only: one the client
        // has already closed may still wait in the listen backlog, and its
        // fd appears when the server gets round to it, after the count read
        // 0. The server accepts in order (under its listener lock), so once
        // a last connection's call is answered, every earlier connection
        // has been accepted and is counted until the server closes it.
        let last = Client::connect(addr).unwrap();
        last.call::<_, MetadataEntry>("echo", &MetadataEntry::default(), Vec::<u8>::new())
            .unwrap();
        drop(last);
        // The server closes its side once it reads each EOF.
        let t0 = Instant::now();
        while server.connections() > 0 && t0.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(server.connections(), 0);
    };
    round(100); // warm up
    let (fds0, maps0) = settled_counts(&server);
    round(10_000);
    // The same wait after the churn: a pool thread may still be finishing
    // with the last connection it served. A leak is a count that settles
    // above the baseline.
    let (fds1, maps1) = settled_counts(&server);
    assert_eq!(fds1, fds0, "fd leak");
    assert_eq!(maps1, maps0, "mapping leak");
}
