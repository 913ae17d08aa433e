//! Helpers shared by the pagerpc integration tests.
#![allow(dead_code, missing_docs)]

use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagerpc::proto::MetadataEntry;
use pagerpc::{Pages, Payload, Server, ServerBuilder, ServerConfig, Status};

/// A non-trivial byte pattern: byte `i` is `(i * 31 + 7 + seed) mod 251`.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut x = (7 + seed) % 251;
    for _ in 0..len {
        v.push(x as u8);
        x = (x + 31) % 251;
    }
    v
}

/// Compares two byte slices without printing megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: payload length differs");
    if got != want {
        let i = got
            .iter()
            .zip(want)
            .position(|(a, b)| a != b)
            .expect("slices differ");
        panic!(
            "{what}: payload differs first at byte {i} of {}: got {:#04x}, want {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Server settings with `threads` pool threads.
pub fn config(threads: usize) -> ServerConfig {
    ServerConfig {
        threads,
        ..ServerConfig::default()
    }
}

/// A message to send as a request body.
pub fn msg(key: impl Into<String>) -> MetadataEntry {
    MetadataEntry {
        key: key.into(),
        value: Vec::new(),
    }
}

/// A builder with an "echo" method that returns the request message and
/// payload unchanged.
pub fn echo_builder() -> ServerBuilder {
    Server::builder().register("echo", |_ctx, req: MetadataEntry, pages: Pages| {
        Ok::<_, Status>((req, Payload::Pages(pages)))
    })
}

/// Polls `f` every few milliseconds until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Runs `f` on its own thread and fails the test if it does not finish
/// within `limit`, so a hang shows up as a failure instead of a stuck suite.
/// A panic in `f` is re-raised here.
#[track_caller]
pub fn with_watchdog<T: Send + 'static>(
    limit: Duration,
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    let h = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(limit) {
        Ok(()) => h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked.
            match h.join() {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e),
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: did not finish within {limit:?} (hang)")
        }
    }
}
