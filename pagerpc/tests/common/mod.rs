//! Helpers shared by the pagerpc integration tests.
#![allow(dead_code, missing_docs)]

use std::io::Read;
use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use pagerpc::codec::{decode_stream, encode_head, DecodedFrame, Flags, Header, Kind, Limits};
use pagerpc::proto::MetadataEntry;
use pagerpc::{PageBuf, Pages, Payload, Server, ServerBuilder, ServerConfig, Status};

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

/// A page-aligned buffer holding a copy of `data`.
pub fn page_buf(data: &[u8]) -> PageBuf {
    let mut b = PageBuf::new(data.len()).unwrap();
    b.copy_from_slice(data);
    b
}

/// Page-aligned pages holding a byte pattern (`i mod 251`).
pub fn pattern_pages(len: usize) -> Pages {
    let mut b = PageBuf::new(len).unwrap();
    for (i, x) in b.iter_mut().enumerate() {
        *x = (i % 251) as u8;
    }
    b.freeze()
}

/// This process's resident memory, from /proc/self/statm.
pub fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// CPU time (user + system) a process has used, from /proc/<pid>/stat
/// (`None`: this process).
pub fn cpu_time(pid: Option<u32>) -> Duration {
    let path = pid.map_or("/proc/self/stat".to_owned(), |p| format!("/proc/{p}/stat"));
    let stat = std::fs::read_to_string(path).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 1000 / 100) // USER_HZ is 100 on Linux
}

/// A raw request frame with an empty body and `payload` inline.
pub fn raw_request(call_id: u64, method: &str, payload: &[u8]) -> Vec<u8> {
    let h = Header {
        call_id,
        kind: Kind::Request as i32,
        method: method.into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    let flags = if payload.is_empty() {
        Flags::NONE
    } else {
        Flags::INLINE_PAYLOAD
    };
    encode_head(
        &h,
        payload.len() as u64,
        flags,
        &Limits::default(),
        &mut wire,
    )
    .unwrap();
    wire.extend_from_slice(payload);
    wire
}

/// Whether a frame is the connection's own business (its SETTINGS, or
/// connection credit) rather than an answer to anything.
pub fn is_connection_frame(f: &DecodedFrame) -> bool {
    f.head.kind() == Kind::Settings || (f.head.kind() == Kind::Credit && f.head.call_id() == 0)
}

/// Frames a raw peer reads, without the server's connection frames.
fn answers(buf: &[u8]) -> Vec<DecodedFrame> {
    decode_stream(buf, Limits::default(), &[])
        .frames
        .into_iter()
        .filter(|f| !is_connection_frame(f))
        .collect()
}

/// Reads frames from a raw connection until `n` arrived, it closes, or
/// `limit` passes. The server's connection frames (SETTINGS, connection
/// credit) are left out.
pub fn read_raw_frames(s: &mut TcpStream, n: usize, limit: Duration) -> Vec<DecodedFrame> {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let end = Instant::now() + limit;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let out = answers(&buf);
        if out.len() >= n || Instant::now() > end {
            return out;
        }
        match s.read(&mut chunk) {
            Ok(0) => return answers(&buf),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(_) => {}
        }
    }
}
