//! Idle is idle: after zero-copy calls, a process with an open connection
//! uses no CPU. A test binary of its own, so no other test's work is
//! counted in the process's CPU time.

use std::time::Duration;

use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, ClientConfig, PageBuf, Pages, Payload, Server, ServerConfig, Status,
};

fn pattern_pages(len: usize) -> Pages {
    let mut b = PageBuf::new(len).unwrap();
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    b.freeze()
}

/// CPU time (user + system) this process has used, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / 100) // USER_HZ is 100 on Linux
}

/// Defect 1: a MSG_ZEROCOPY completion left on the error queue made epoll
/// report EPOLLERR forever and the pool spin. Timing-dependent, hence the
/// repetitions.
#[test]
fn idle_is_idle_after_zero_copy_calls() {
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            ..ServerConfig::zerocopy()
        })
        .register("echo", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(p)))
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
        let t0 = cpu_time();
        std::thread::sleep(Duration::from_secs(3));
        let used = cpu_time() - t0;
        // 2 % of one core over 3 s.
        assert!(
            used <= Duration::from_millis(60),
            "repetition {rep}: {used:?} of CPU in 3 s of idle"
        );
    }
    assert!(server.counters().zc_sends > 0, "zero-copy sends were made");
}
