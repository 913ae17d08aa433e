//! Helpers shared by the examples' integration tests.
#![allow(dead_code, missing_docs)]

use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pagerpc_examples::util::{hex, FastRng};
use sha2::{Digest, Sha256};

/// A directory under the system temp dir, removed with everything in it
/// on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "pagerpc-examples-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Writes `size` pseudo-random bytes (seeded) to `path`; returns their
/// SHA-256 in hex.
pub fn write_random_file(path: &Path, size: u64, seed: u64) -> String {
    let mut f = File::create(path).unwrap();
    let mut rng = FastRng::new(seed);
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.sync_all().unwrap();
    hex(&h.finalize())
}

/// SHA-256 of a file, in hex.
pub fn sha256_file(path: &Path) -> String {
    let mut r = BufReader::with_capacity(4 << 20, File::open(path).unwrap());
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex(&h.finalize())
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
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Deterministic bytes for a test value: `len` bytes from a PRNG seeded
/// with `seed`.
pub fn value_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    FastRng::new(seed).fill(&mut v);
    v
}

/// Compares two byte slices without printing megabytes on failure.
#[track_caller]
pub fn assert_bytes_eq(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if got != want {
        let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap();
        panic!(
            "{what}: differs first at byte {i} of {}: got {:#04x}, want {:#04x}",
            got.len(),
            got[i],
            want[i]
        );
    }
}

/// Starts a binary of this package with `args`, waits for the line on
/// stderr containing `marker`, and returns the child and that line.
pub fn spawn_and_wait_for(bin: &str, args: &[&str], marker: &str) -> (std::process::Child, String) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = err.read_line(&mut line).unwrap();
        assert!(n > 0, "{bin} exited before printing '{marker}'");
        if line.contains(marker) {
            break;
        }
    }
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = err.read_to_end(&mut sink);
    });
    (child, line.trim().to_owned())
}

/// The `host:port` after " on " in a "listening on ADDR" or "... on ADDR (" line.
pub fn addr_in(line: &str) -> String {
    let at = line.rfind(" on ").expect("address in the line") + 4;
    line[at..]
        .split_whitespace()
        .next()
        .unwrap()
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .to_owned()
}
