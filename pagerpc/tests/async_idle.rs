//! Idle is idle on the async server: after zero-copy calls, a process with
//! an open connection to it uses no CPU. A test binary of its own (like
//! `idle.rs`), so no other test's work is counted in the process's CPU
//! time.
#![cfg(feature = "tokio")]

mod common;

use std::time::Duration;

use common::{cpu_time, pattern_pages};
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    AsyncServer, CallOptions, Client, ClientConfig, Pages, Payload, ServerConfig, Status,
};

#[test]
fn idle_async_server_is_idle_after_zero_copy_calls() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(
            AsyncServer::builder()
                .config(ServerConfig::zerocopy())
                .register(
                    "echo",
                    |_ctx, req: MetadataEntry, pages: Pages| async move {
                        Ok::<_, Status>((req, Payload::Pages(pages)))
                    },
                )
                .bind("127.0.0.1:0"),
        )
        .unwrap();
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let data = pattern_pages(1 << 20);
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(10)),
        ..CallOptions::default()
    };
    for rep in 0..5 {
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
    let c = server.counters();
    assert!(c.zc_sends > 0, "zero-copy sends were made");
    assert!(c.zc_send_completions > 0, "completions were reaped");
    rt.block_on(server.shutdown());
}
