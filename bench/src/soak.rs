//! `pagerpc-bench soak`: a bounded mixed load with injected faults, reporting
//! calls, errors by kind, RSS over time, and fds and mappings at the end
//! against the start.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pagerpc::codec::{encode_head, Flags, Header, Kind, Limits};
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, ClientConfig, PageBuf, Pages, Payload, Server, ServerConfig, Status};

type Res = Result<(), Box<dyn std::error::Error>>;

fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1 << 20) as f64
}

fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count())
}

#[derive(Default)]
struct Tally {
    ok: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn ok(&mut self, what: &'static str) {
        *self.ok.entry(what).or_default() += 1;
    }
    fn err(&mut self, what: &str, e: &pagerpc::CallError) {
        *self
            .errors
            .entry(format!("{what}: {:?}", e.code()))
            .or_default() += 1;
    }
}

/// Runs the soak for `seconds`; fails if anything leaked.
pub fn soak(seconds: u64) -> Res {
    let server = Server::builder()
        .config(ServerConfig {
            header_timeout: Some(Duration::from_secs(2)),
            ..ServerConfig::zerocopy()
        })
        .register("echo", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(p)))
        })
        .register("put", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")?;
    let addr = server.local_addr();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(seconds);
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let faults = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    let only = std::env::var("SOAK_ONLY").unwrap_or_default();
    let on = |w: &str| only.is_empty() || only.split(',').any(|o| o == w);

    // Bulk: 1 MiB zero-copy calls.
    if on("bulk") {
        let (stop, tally) = (stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            let c = Client::connect_with(addr, ClientConfig::zerocopy()).expect("connect");
            let mut b = PageBuf::new(1 << 20).expect("buffer");
            b.fill(0x42);
            let p = b.freeze();
            while !stop.load(Ordering::Relaxed) {
                match c.call::<_, MetadataEntry>("put", &MetadataEntry::default(), p.clone()) {
                    Ok(_) => tally.lock().unwrap().ok("bulk 1 MiB"),
                    Err(e) => tally.lock().unwrap().err("bulk", &e),
                }
            }
        }));
    }
    // Small calls on two connections.
    for _ in 0..if on("small") { 2 } else { 0 } {
        let (stop, tally) = (stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            let c = Client::connect(addr).expect("connect");
            while !stop.load(Ordering::Relaxed) {
                match c.call::<_, MetadataEntry>("echo", &MetadataEntry::default(), vec![7u8; 64]) {
                    Ok(r) if r.payload.len() == 64 => tally.lock().unwrap().ok("small 64 B"),
                    Ok(_) => {
                        *tally
                            .lock()
                            .unwrap()
                            .errors
                            .entry("small: short echo".into())
                            .or_default() += 1
                    }
                    Err(e) => tally.lock().unwrap().err("small", &e),
                }
            }
        }));
    }
    // Connection churn.
    if on("churn") {
        let (stop, tally) = (stop.clone(), tally.clone());
        workers.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match Client::connect(addr) {
                    Ok(c) => match c.call::<_, MetadataEntry>(
                        "echo",
                        &MetadataEntry::default(),
                        vec![1u8; 5000],
                    ) {
                        Ok(_) => tally.lock().unwrap().ok("churn connect+call+close"),
                        Err(e) => tally.lock().unwrap().err("churn", &e),
                    },
                    Err(_) => {
                        *tally
                            .lock()
                            .unwrap()
                            .errors
                            .entry("churn: connect failed".into())
                            .or_default() += 1
                    }
                }
            }
        }));
    }
    // Injected faults: garbage, peers cut mid-frame, lying lengths.
    if on("faults") {
        let (stop, faults) = (stop.clone(), faults.clone());
        workers.push(std::thread::spawn(move || {
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let Ok(mut s) = TcpStream::connect(addr) else {
                    continue;
                };
                let h = Header {
                    call_id: n,
                    kind: Kind::Request as i32,
                    method: "put".into(),
                    ..Default::default()
                };
                let mut wire = Vec::new();
                let lie = Limits {
                    max_payload_bytes: u64::MAX,
                    ..Limits::default()
                };
                let _ = match n % 3 {
                    0 => s.write_all(b"GARBAGE GARBAGE GARBAGE"),
                    1 => {
                        let _ = encode_head(&h, 1 << 20, Flags::NONE, &lie, &mut wire);
                        wire.resize(wire.len() + (n as usize * 7919) % (1 << 20), 0xee);
                        s.write_all(&wire)
                    }
                    _ => {
                        let _ = encode_head(&h, 1 << 50, Flags::NONE, &lie, &mut wire);
                        s.write_all(&wire)
                    }
                };
                faults.fetch_add(1, Ordering::Relaxed);
                drop(s);
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }

    // The baseline is taken under load, after a warm-up: thread stacks,
    // malloc arenas and the small-payload pool that the load needs exist by
    // then, and must not grow after it.
    let warm = Duration::from_secs((seconds / 10).clamp(1, 10));
    std::thread::sleep(warm);
    let (fds0, maps0) = (fds(), maps());
    println!(
        "soak: {seconds} s; baseline after {warm:?} of load: {fds0} fds, {maps0} mappings, RSS {:.1} MiB",
        rss_mib()
    );
    let mut peak: f64 = 0.0;
    let step = Duration::from_secs((seconds / 12).clamp(1, 15));
    while Instant::now() < end {
        std::thread::sleep(step.min(end.saturating_duration_since(Instant::now())));
        let rss = rss_mib();
        peak = peak.max(rss);
        let t = tally.lock().unwrap();
        println!(
            "soak: t={:>4.0}s RSS {:>7.1} MiB, {} fds, {} mappings, {} calls ok, {} errors, {} faults injected",
            t0.elapsed().as_secs_f64(),
            rss,
            fds(),
            maps(),
            t.ok.values().sum::<u64>(),
            t.errors.values().sum::<u64>(),
            faults.load(Ordering::Relaxed)
        );
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    let wait = Instant::now();
    while server.connections() > 0 && wait.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    // Recycled payload mappings are memory kept on purpose; drop them
    // before comparing.
    pagerpc::set_cache_limit(0);
    // A pool thread may still be dropping the last connection it served.
    let settle = Instant::now();
    while (fds() > fds0 || maps() > maps0) && settle.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let (fds1, maps1) = (fds(), maps());
    let t = tally.lock().unwrap();
    println!("soak: calls completed:");
    for (k, v) in &t.ok {
        println!("  {k}: {v}");
    }
    println!(
        "soak: errors by kind:{}",
        if t.errors.is_empty() { " none" } else { "" }
    );
    for (k, v) in &t.errors {
        println!("  {k}: {v}");
    }
    println!(
        "soak: faults injected {}, peak RSS {:.1} MiB, fds {} -> {} (leaked {}), mappings {} -> {} (leaked {})",
        faults.load(Ordering::Relaxed),
        peak,
        fds0,
        fds1,
        fds1 as i64 - fds0 as i64,
        maps0,
        maps1,
        maps1 as i64 - maps0 as i64
    );
    server.shutdown();
    if fds1 > fds0 || maps1 > maps0 {
        return Err("resources leaked".into());
    }
    Ok(())
}
