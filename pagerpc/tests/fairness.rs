//! Fairness: connections that keep their sockets full of pipelined
//! requests must not starve another connection on the same pool thread.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::raw_request;
use pagerpc::proto::MetadataEntry;
use pagerpc::{CallOptions, Client, Pages, Payload, Server, ServerConfig, Status};

/// A raw client that writes tiny echo requests as fast as the socket takes
/// them, and reads (and discards) the responses so that backpressure never
/// throttles it. Stopped on drop.
struct Flood {
    stop: Arc<AtomicBool>,
    sock: TcpStream,
    /// Response bytes read so far.
    received: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl Flood {
    fn start(addr: std::net::SocketAddr) -> Flood {
        let sock = TcpStream::connect(addr).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut w = sock.try_clone().unwrap();
        let mut r = sock.try_clone().unwrap();
        let (stop_w, stop_r, rec) = (stop.clone(), stop.clone(), received.clone());
        let writer = std::thread::spawn(move || {
            // Encoded once, so that writing costs the flood next to
            // nothing: call ids repeat every 100,000 requests, long after
            // the earlier calls with those ids finished.
            let mut wire = Vec::new();
            for id in 1..=100_000u64 {
                wire.extend(raw_request(id, "echo", b"x"));
            }
            while !stop_w.load(Ordering::Relaxed) {
                if w.write_all(&wire).is_err() {
                    return;
                }
            }
        });
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            while !stop_r.load(Ordering::Relaxed) {
                match r.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        rec.fetch_add(n as u64, Ordering::Relaxed);
                    }
                }
            }
        });
        Flood {
            stop,
            sock,
            received,
            threads: vec![writer, reader],
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Unblocks the writer and the reader.
        let _ = self.sock.shutdown(Shutdown::Both);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Runs 80 ping-pong calls on a 1-thread server beside `n_floods` flooding
/// connections; every call must complete within 2 s (a liveness bound: a
/// starved call waits for as long as the floods last) while the floods are
/// being served.
fn ping_pong_beside_floods(n_floods: usize) {
    let server = Server::builder()
        .config(ServerConfig {
            threads: 1,
            ..ServerConfig::default()
        })
        .register("echo", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(p)))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(5)),
        ..CallOptions::default()
    };
    let req = MetadataEntry {
        key: "ping".into(),
        value: Vec::new(),
    };
    let client = Client::connect(addr).unwrap();
    // Warm up before the floods start.
    client
        .call_with::<_, MetadataEntry>("echo", &req, Vec::new(), &opts)
        .unwrap();

    let floods: Vec<Flood> = (0..n_floods).map(|_| Flood::start(addr)).collect();
    let received = || -> u64 {
        floods
            .iter()
            .map(|f| f.received.load(Ordering::Relaxed))
            .sum()
    };
    // The floods are under way once responses come back.
    let t = Instant::now();
    while let Some(k) = floods
        .iter()
        .position(|f| f.received.load(Ordering::Relaxed) < 64 << 10)
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "flood {k} got only {} response bytes in 10 s: starved",
            floods[k].received.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = received();
    let mut lat = Vec::new();
    for i in 0..80 {
        let t = Instant::now();
        let r = client.call_with::<_, MetadataEntry>("echo", &req, Vec::new(), &opts);
        let took = t.elapsed();
        let r = r.unwrap_or_else(|e| {
            panic!("ping-pong call {i} failed after {took:?} beside the flood: {e}")
        });
        assert_eq!(r.message, req);
        assert!(
            took < Duration::from_secs(2),
            "ping-pong call {i} took {took:?} beside the flood"
        );
        lat.push(took);
    }
    let during = received() - before;
    // The floods really were being served meanwhile.
    assert!(
        during > 64 << 10,
        "the floods got only {during} response bytes during the ping-pong calls"
    );
    drop(floods);
    lat.sort();
    eprintln!(
        "ping-pong beside {} flood(s): p50 {:?}, p99 {:?}, max {:?}; floods got {during} response bytes meanwhile",
        n_floods,
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100],
        lat[lat.len() - 1]
    );
}

/// With one pool thread, clients flooding pipelined requests must leave
/// room for a ping-pong client. The old code read a connection for as long
/// as it had requests and queued them all ahead of everyone else; with two
/// floods the ping-pong client (or the second flood) never got a turn.
#[test]
fn flooding_connections_do_not_starve_a_ping_pong_client() {
    ping_pong_beside_floods(2);
}
