//! Idle is idle: after zero-copy calls, a process with an open connection
//! uses no CPU. A test binary of its own, so no other test's work is
//! counted in the process's CPU time.

mod common;

use std::time::Duration;

use common::{cpu_time, echo_builder, pattern_pages};
use pagerpc::proto::MetadataEntry;
use pagerpc::{CallOptions, Client, ClientConfig, ServerConfig};

/// Defect 1: a MSG_ZEROCOPY completion left on the error queue made epoll
/// report EPOLLERR forever and the pool spin. Timing-dependent, hence the
/// repetitions.
#[test]
fn idle_is_idle_after_zero_copy_calls() {
    let server = echo_builder()
        .config(ServerConfig {
            threads: 2,
            ..ServerConfig::zerocopy()
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let data = pattern_pages(1 << 20);
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(10)),
        ..CallOptions::default()
    };
    for rep in 0..10 {
        for _ in 0..10 {
            let r = client
                .call_with::<_, MetadataEntry>(
                    "echo",
                    &MetadataEntry::default(),
                    data.clone(),
                    &opts,
                )
                .unwrap();
            assert_eq!(r.payload.len(), 1 << 20);
        }
        let t0 = cpu_time(None);
        std::thread::sleep(Duration::from_secs(3));
        let used = cpu_time(None) - t0;
        // 2 % of one core over 3 s.
        assert!(
            used <= Duration::from_millis(60),
            "repetition {rep}: {used:?} of CPU in 3 s of idle"
        );
    }
    assert!(server.counters().zc_sends > 0, "zero-copy sends were made");
}
