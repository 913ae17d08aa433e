//! Out of file descriptors: a server in a child process limited to 64
//! descriptors (`RLIMIT_NOFILE`) is flooded with 200 connections that stay
//! open. It must not busy-loop on `accept()` failing with `EMFILE`, its
//! default `max_connections` must fit the limit, and it must serve again
//! once the flood is gone.
//!
//! Each test re-executes this test binary (`--exact <test>`) with an
//! environment variable set; the child lowers its descriptor limit, starts
//! the server, prints its address on stdout, and serves until its stdin
//! closes. The parent floods it and measures its CPU time in `/proc`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::cpu_time;
use pagerpc::proto::MetadataEntry;
use pagerpc::{CallOptions, Client, Pages, Payload, Server, ServerConfig, Status};

/// Set in the child: "explicit" (max_connections 1024, so the descriptor
/// limit is what runs out) or "default" (the default max_connections).
const CHILD_ENV: &str = "PAGERPC_FD_EXHAUSTION_CHILD";
const NOFILE: u64 = 64;
const FLOOD: usize = 200;

/// The child's part: lower the descriptor limit, serve, report.
fn child(mode: &str) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, NOFILE, hard).unwrap();
    let default_max = ServerConfig::default().max_connections;
    let max_connections = if mode == "default" { default_max } else { 1024 };
    #[cfg(feature = "tokio")]
    if mode == "async" {
        async_child(max_connections, default_max);
    }
    let server = Server::builder()
        .config(ServerConfig {
            threads: 2,
            max_connections,
            ..ServerConfig::default()
        })
        .register("echo", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(p)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\nMAXCONN {default_max}").unwrap();
        writeln!(out, "ADDR {}", server.local_addr()).unwrap();
        out.flush().unwrap();
    }
    // Serve until the parent closes our stdin (or kills us).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

/// The child's part with the async server (same limit, same report).
#[cfg(feature = "tokio")]
fn async_child(max_connections: usize, default_max: usize) -> ! {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(
            pagerpc::AsyncServer::builder()
                .config(ServerConfig {
                    max_connections,
                    ..ServerConfig::default()
                })
                .register("echo", |_ctx, req: MetadataEntry, p: Pages| async move {
                    Ok::<_, Status>((req, Payload::Pages(p)))
                })
                .bind("127.0.0.1:0"),
        )
        .unwrap();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "\nMAXCONN {default_max}").unwrap();
        writeln!(out, "ADDR {}", server.local_addr()).unwrap();
        out.flush().unwrap();
    }
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

/// Kills and reaps the child when the test ends, however it ends.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Starts the child for `test` in `mode`; returns it, its default
/// max_connections and its address.
fn spawn_child(test: &str, mode: &str) -> (ChildGuard, usize, SocketAddr) {
    let mut child = ChildGuard(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads", "1"])
            .env(CHILD_ENV, mode)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    // Reads the child's report, then keeps draining its stdout so that it
    // never blocks on a full pipe.
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout);
        let mut max = None;
        let mut addr = None;
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            // libtest may print "test <name> ... " ahead of it on the line.
            if let Some(at) = line.find("MAXCONN ") {
                max = line[at + 8..].trim().parse::<usize>().ok();
            } else if let Some(at) = line.find("ADDR ") {
                addr = line[at + 5..].trim().parse::<SocketAddr>().ok();
            }
            if let (Some(m), Some(a)) = (max, addr) {
                let _ = tx.send((m, a));
                break;
            }
            line.clear();
        }
        let mut sink = Vec::new();
        let _ = lines.read_to_end(&mut sink);
    });
    let (max, addr) = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the child did not report its address within 60 s");
    (child, max, addr)
}

/// Connects and makes one echo call, retrying until `limit` passes.
fn call_eventually(addr: SocketAddr, limit: Duration) -> Result<(), String> {
    let end = Instant::now() + limit;
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(5)),
        ..CallOptions::default()
    };
    let req = MetadataEntry {
        key: "after the flood".into(),
        value: Vec::new(),
    };
    loop {
        let r = Client::connect(addr)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|c| {
                c.call_with::<_, MetadataEntry>("echo", &req, Vec::new(), &opts)
                    .map_err(|e| format!("call: {e}"))
            });
        match r {
            Ok(resp) => {
                assert_eq!(resp.message, req);
                return Ok(());
            }
            Err(e) if Instant::now() >= end => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Floods the child with connections kept open, checks its CPU use over
/// 2 s of that, then closes them and checks that it serves again.
fn flood_and_recover(child: &ChildGuard, addr: SocketAddr, expect_exhausted: bool) {
    let pid = child.0.id();
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            flood.push(s);
        }
    }
    assert!(
        flood.len() >= FLOOD / 2,
        "only {} of {FLOOD} flood connections were made",
        flood.len()
    );
    // Let the server take what it can.
    std::thread::sleep(Duration::from_millis(300));
    let fds = open_fds(pid);
    if expect_exhausted {
        // The scenario under test: the server really is out of descriptors.
        assert!(
            fds + 4 >= NOFILE as usize,
            "the child holds only {fds} descriptors of {NOFILE}: not exhausted"
        );
    }
    let t0 = cpu_time(Some(pid));
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_time(Some(pid)) - t0;
    let wall = w0.elapsed();
    assert!(
        used < wall / 2,
        "the server used {used:?} of CPU in {wall:?} with {} connections held \
         ({fds} descriptors open of {NOFILE}): it spins",
        flood.len()
    );
    let held = flood.len();
    drop(flood);
    let t = Instant::now();
    if let Err(e) = call_eventually(addr, Duration::from_secs(15)) {
        panic!("the server does not serve again after the flood closed: {e}");
    }
    eprintln!(
        "{held} connections held, {fds} descriptors open: {used:?} of CPU in {wall:?}; \
         served again {:?} after the flood closed",
        t.elapsed()
    );
}

/// The server's max_connections (1024) is above what its descriptors
/// allow: accept() fails with EMFILE while the backlog stays full. The old
/// code re-armed the listener at once and spun at 100 % of a core.
#[test]
fn accept_out_of_descriptors_does_not_spin() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
        return;
    }
    let (child, _, addr) = spawn_child("accept_out_of_descriptors_does_not_spin", "explicit");
    flood_and_recover(&child, addr, true);
}

/// With the default settings, max_connections fits the descriptor limit,
/// so a flood is refused connection by connection instead of exhausting
/// descriptors; the server stays idle and serves again afterwards.
#[test]
fn default_max_connections_fits_the_descriptor_limit() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
        return;
    }
    let (child, default_max, addr) = spawn_child(
        "default_max_connections_fits_the_descriptor_limit",
        "default",
    );
    assert!(
        default_max <= NOFILE as usize,
        "with RLIMIT_NOFILE {NOFILE}, the default max_connections is {default_max}"
    );
    flood_and_recover(&child, addr, false);
}

/// The async server out of descriptors: the same flood, the same limits.
/// Its accept loop must back off on `EMFILE` rather than spin, and it must
/// serve again once the flood is gone.
#[cfg(feature = "tokio")]
#[test]
fn the_async_server_out_of_descriptors_does_not_spin() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
        return;
    }
    let (child, _, addr) =
        spawn_child("the_async_server_out_of_descriptors_does_not_spin", "async");
    flood_and_recover(&child, addr, true);
}
