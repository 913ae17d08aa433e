//! Idle is idle for the real `kv-server` process: after a zero-copy PUT
//! and GET of a 4 MiB value, with the connection kept open, and while a
//! listing waits for a client that stopped reading, the server uses no
//! CPU.

mod common;

use std::time::Duration;

use common::{addr_in, assert_bytes_eq, spawn_and_wait_for, value_bytes, wait_until};
use pagerpc::PageBuf;
use pagerpc_examples::kv::{self, KvClient};

/// Kills and reaps the server when the test ends, however it ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) process `pid` has used, from /proc/<pid>/stat.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / 100) // USER_HZ is 100 on Linux
}

/// A MSG_ZEROCOPY completion left on the error queue made epoll report
/// EPOLLERR forever and the old server spin at 100 % of a core. The spin
/// was timing-dependent (about one run in five), hence the repetitions.
#[test]
fn kv_server_is_idle_after_zero_copy_put_and_get() {
    const SIZE: usize = 4 << 20;
    let (server, line) = spawn_and_wait_for(
        env!("CARGO_BIN_EXE_kv-server"),
        &["--listen", "127.0.0.1:0", "--max-bytes", "64MiB"],
        "listening on",
    );
    let server = ChildGuard(server);
    let pid = server.0.id();
    let addr = addr_in(&line);
    let data = value_bytes(SIZE, 42);
    let mut buf = PageBuf::new(SIZE).unwrap();
    buf.copy_from_slice(&data);
    let value = buf.freeze();
    // Every connection stays open while the server is measured.
    let mut clients = Vec::new();
    for rep in 0..5 {
        // As `kv put` / `kv get` do: a zero-copy client.
        let kv = KvClient::connect(addr.as_str(), true).unwrap();
        kv.put("big", value.clone()).unwrap();
        let got = kv.get("big").unwrap().expect("the value just stored");
        assert_bytes_eq(&got, &data, "GET of the 4 MiB value");
        drop(got);
        clients.push(kv);
        let t0 = cpu_time(pid);
        std::thread::sleep(Duration::from_secs(3));
        let used = cpu_time(pid) - t0;
        // 2 % of one core over 3 s.
        assert!(
            used <= Duration::from_millis(60),
            "repetition {rep}: kv-server used {used:?} of CPU in 3 s of idle"
        );
        eprintln!("repetition {rep}: kv-server used {used:?} of CPU in 3 s of idle");
    }
    let stats = clients[0].stats().unwrap();
    assert!(stats.zc_sends > 0, "the GETs were sent with MSG_ZEROCOPY");
    assert!(
        stats.bytes_mapped > 0,
        "the PUTs were received by mapping pages"
    );
}

/// A listing whose client stopped reading waits for credit: its handler
/// thread sleeps (it wakes a few times a second to look at the stream),
/// and the connection's unsent chunks wait for the socket, so the server
/// does not spin while the listing is stalled.
#[test]
fn kv_server_is_idle_while_a_listing_is_stalled() {
    const N: usize = 20_000; // 20 MB of keys: more than a stream window
    let (server, line) = spawn_and_wait_for(
        env!("CARGO_BIN_EXE_kv-server"),
        &["--listen", "127.0.0.1:0"],
        "listening on",
    );
    let server = ChildGuard(server);
    let pid = server.0.id();
    let addr = addr_in(&line);
    let c = KvClient::connect(addr.as_str(), false).unwrap();
    for i in 0..N {
        c.put(&format!("{i:08}{}", "i".repeat(992)), vec![1u8])
            .unwrap();
    }
    let reader = KvClient::connect(addr.as_str(), false).unwrap();
    let mut keys = reader.keys("");
    keys.next().unwrap().unwrap();
    // Stalled once the client's window is spent.
    let window = pagerpc::ClientConfig::default().stream_window;
    assert!(wait_until(Duration::from_secs(60), || {
        c.stats().unwrap().list_bytes_sent >= window - kv::LIST_CHUNK_BYTES as u64
    }));
    let t0 = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(3));
    let used = cpu_time(pid) - t0;
    eprintln!("kv-server used {used:?} of CPU in 3 s with a listing stalled");
    assert!(
        used <= Duration::from_millis(60),
        "kv-server used {used:?} of CPU in 3 s with a listing stalled"
    );
    let s = c.stats().unwrap();
    assert_eq!(s.lists_open, 1, "the listing is still waiting: {s:?}");
    // It finishes once read.
    assert_eq!(keys.map(Result::unwrap).count(), N - 1);
}
