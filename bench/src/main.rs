//! `pagerpc-bench`: measures pagerpc through its real RPC path.
//!
//! - `bulk`: a loopback bulk transfer; the receiving (server) process prints
//!   one line in the format of the kernel's tcp_mmap tool.
//! - `pingpong`: sequential calls, latency percentiles.
//! - `concurrent`: many calls in flight on one connection.
#![forbid(unsafe_code)]

mod soak;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::sys::resource::{getrusage, UsageWho};
use pagerpc::netns::NetnsPair;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, ClientConfig, Counters, PageBuf, Payload, SegmentAlign, Server,
    ServerConfig, Status,
};

#[derive(Parser)]
#[command(name = "pagerpc-bench", about = "Benchmarks for pagerpc")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Loopback bulk transfer through the RPC layer; prints a tcp_mmap-style line.
    Bulk {
        /// Payload size of each call, in KiB.
        #[arg(long, default_value_t = 1024)]
        size_kib: usize,
        /// Total payload to send, in MiB.
        #[arg(long, default_value_t = 1024)]
        total_mib: usize,
        /// Calls the sender keeps in flight.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// Zero-copy: MSG_ZEROCOPY sends, TCP_ZEROCOPY_RECEIVE receives.
        #[arg(long)]
        zerocopy: bool,
        /// TCP_MAXSEG for both ends; 0 leaves the kernel's MSS. Default:
        /// page-aligned segments on loopback (4108 with timestamps).
        #[arg(long)]
        mss: Option<u32>,
        /// Run between two network namespaces joined by a veth pair with
        /// MTU 4148 instead of over loopback (needs root and iproute2; the
        /// namespaces are created and removed by the bench).
        #[arg(long)]
        netns: bool,
        /// With --zerocopy: do not pass TCP_RECEIVE_ZEROCOPY_FLAG_TLB_CLEAN_HINT.
        #[arg(long)]
        no_tlb_hint: bool,
        /// Server pool threads. One connection is served by one thread at a
        /// time; more threads only add cross-CPU TLB shootdowns when mapped
        /// pages are unmapped.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Receive with the patched kernel's consuming mmap() (kernel-patch/)
        /// instead of TCP_ZEROCOPY_RECEIVE; implies --zerocopy. On a stock
        /// kernel the connection falls back to TCP_ZEROCOPY_RECEIVE.
        #[arg(long)]
        mmap: bool,
        /// Exit with status 1 if fewer than this percentage of payload bytes
        /// were mapped (for scripted checks).
        #[arg(long)]
        min_mapped: Option<f64>,
        /// Smallest payload the sender sends with MSG_ZEROCOPY.
        #[arg(long)]
        zc_min: Option<usize>,
    },
    /// Sequential calls with a payload of SIZE bytes each way.
    Pingpong {
        /// Measured calls.
        #[arg(long, default_value_t = 20000)]
        calls: usize,
        /// Payload bytes per request and per response.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Unmeasured warm-up calls.
        #[arg(long, default_value_t = 1000)]
        warmup: usize,
    },
    /// C calls outstanding on one connection.
    Concurrent {
        /// Calls kept in flight.
        #[arg(long, default_value_t = 64)]
        inflight: usize,
        /// Measured calls.
        #[arg(long, default_value_t = 200000)]
        calls: usize,
        /// Payload bytes per request and per response.
        #[arg(long, default_value_t = 64)]
        size: usize,
    },
    /// A bounded mixed load with injected faults; reports calls, errors by
    /// kind, RSS over time, and leaked fds and mappings (exit 1 on a leak).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 180)]
        seconds: u64,
    },
    /// Internal: the sending process of `bulk`.
    #[command(hide = true)]
    BulkSend {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        size_kib: usize,
        #[arg(long)]
        total_mib: usize,
        #[arg(long)]
        inflight: usize,
        #[arg(long)]
        zerocopy: bool,
        #[arg(long)]
        mss: Option<u32>,
        /// Network namespace to enter before connecting.
        #[arg(long)]
        netns_name: Option<String>,
        #[arg(long)]
        zc_min: Option<usize>,
    },
}

/// The segment setting for `--mss`.
fn segments(mss: Option<u32>) -> SegmentAlign {
    match mss {
        None => SegmentAlign::Auto,
        Some(0) => SegmentAlign::Off,
        Some(m) => SegmentAlign::Mss(m),
    }
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Bulk {
            size_kib,
            total_mib,
            inflight,
            zerocopy,
            mss,
            netns,
            no_tlb_hint,
            threads,
            mmap,
            min_mapped,
            zc_min,
        } => bulk(
            &BulkOpts {
                size_kib,
                total_mib,
                inflight,
                zerocopy: zerocopy || mmap,
                mss,
                mmap,
                min_mapped,
                zc_min,
            },
            netns,
            !no_tlb_hint,
            threads,
        ),
        Cmd::BulkSend {
            addr,
            size_kib,
            total_mib,
            inflight,
            zerocopy,
            mss,
            netns_name,
            zc_min,
        } => bulk_send(
            addr,
            netns_name.as_deref(),
            &BulkOpts {
                size_kib,
                total_mib,
                inflight,
                zerocopy,
                mss,
                mmap: false,
                min_mapped: None,
                zc_min,
            },
        ),
        Cmd::Pingpong {
            calls,
            size,
            warmup,
        } => pingpong(calls, size, warmup),
        Cmd::Soak { seconds } => soak::soak(seconds),
        Cmd::Concurrent {
            inflight,
            calls,
            size,
        } => concurrent(inflight, calls, size),
    };
    if let Err(e) = r {
        eprintln!("pagerpc-bench: {e}");
        std::process::exit(1);
    }
}

type Res = Result<(), Box<dyn std::error::Error>>;

fn empty() -> MetadataEntry {
    MetadataEntry::default()
}

/// CPU seconds (user+sys), voluntary+involuntary context switches.
fn usage() -> Result<(f64, i64), nix::Error> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok((
        secs(u.user_time()) + secs(u.system_time()),
        u.voluntary_context_switches() + u.involuntary_context_switches(),
    ))
}

struct BulkOpts {
    size_kib: usize,
    total_mib: usize,
    inflight: usize,
    zerocopy: bool,
    mss: Option<u32>,
    mmap: bool,
    min_mapped: Option<f64>,
    zc_min: Option<usize>,
}

fn bulk(o: &BulkOpts, netns: bool, tlb_hint: bool, threads: usize) -> Res {
    // With --netns the server lives in namespace a (this thread enters it
    // before binding) and the sender process in namespace b.
    let pair = if netns {
        let p = NetnsPair::create(&format!("pgb{}", std::process::id()), 4148)?;
        p.enter_a()?;
        Some(p)
    } else {
        None
    };
    let bind_addr = if netns {
        SocketAddr::new(NetnsPair::ADDR_A, 0)
    } else {
        SocketAddr::from(([127, 0, 0, 1], 0))
    };
    let size = o.size_kib * 1024;
    let n = (o.total_mib * 1024 * 1024) / size.max(1);
    let received = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let (r2, b2) = (received.clone(), bad.clone());
    let mut cfg = if o.zerocopy {
        ServerConfig::zerocopy()
    } else {
        ServerConfig::default()
    };
    cfg.segments = segments(o.mss);
    cfg.recv.zc_tlb_clean_hint = tlb_hint;
    cfg.threads = threads.max(1);
    if o.mmap {
        cfg.recv.backend = pagerpc::Backend::Mmap;
    }
    let server = Server::builder()
        .config(cfg)
        .register("bulk.put", move |_ctx, _req: MetadataEntry, pages| {
            if pages.len() != size {
                b2.fetch_add(1, Ordering::Relaxed);
                return Err(Status::invalid_argument("wrong payload size"));
            }
            r2.fetch_add(pages.len() as u64, Ordering::Relaxed);
            Ok((empty(), Payload::Empty))
        })
        .bind(bind_addr)?;
    let before = Counters::global().snapshot();
    let (cpu0, cs0) = usage()?;
    let t0 = Instant::now();
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "bulk-send",
        "--addr",
        &server.local_addr().to_string(),
        "--size-kib",
        &o.size_kib.to_string(),
        "--total-mib",
        &o.total_mib.to_string(),
        "--inflight",
        &o.inflight.to_string(),
    ]);
    if o.zerocopy {
        cmd.arg("--zerocopy");
    }
    if let Some(m) = o.mss {
        cmd.args(["--mss", &m.to_string()]);
    }
    if let Some(p) = &pair {
        cmd.args(["--netns-name", p.name_b()]);
    }
    if let Some(z) = o.zc_min {
        cmd.args(["--zc-min", &z.to_string()]);
    }
    let status = cmd.stdin(Stdio::null()).status()?;
    let secs = t0.elapsed().as_secs_f64();
    let (cpu1, cs1) = usage()?;
    if !status.success() {
        return Err(format!("sender process failed: {status}").into());
    }
    let c = Counters::global().snapshot().since(&before);
    let bytes = received.load(Ordering::Relaxed);
    if bytes != (n * size) as u64 || bad.load(Ordering::Relaxed) != 0 {
        return Err(format!("received {bytes} bytes, expected {}", n * size).into());
    }
    let mb = bytes as f64 / (1024.0 * 1024.0);
    let cpu = cpu1 - cpu0;
    println!(
        "received {} MB ({:.4} % mmap'ed) in {:.3} s, {:.2} Gbit, cpu {:.3} s, {:.1} usec per MB, {} c-switches",
        bytes >> 20,
        c.mapped_percent(),
        secs,
        bytes as f64 * 8.0 / secs / 1e9,
        cpu,
        cpu * 1e6 / mb,
        cs1 - cs0
    );
    server.shutdown();
    if let Some(min) = o.min_mapped {
        if c.mapped_percent() < min {
            return Err(format!(
                "{:.4} % mapped is below --min-mapped {min}",
                c.mapped_percent()
            )
            .into());
        }
    }
    Ok(())
}

fn bulk_send(addr: SocketAddr, netns: Option<&str>, o: &BulkOpts) -> Res {
    if let Some(name) = netns {
        pagerpc::netns::enter(name)?;
    }
    let size = o.size_kib * 1024;
    let n = (o.total_mib * 1024 * 1024) / size.max(1);
    let inflight = o.inflight;
    let mut cfg = if o.zerocopy {
        ClientConfig::zerocopy()
    } else {
        ClientConfig::default()
    };
    cfg.segments = segments(o.mss);
    if let Some(z) = o.zc_min {
        cfg.send.zerocopy_min = z;
    }
    let client = Client::connect_with(addr, cfg)?;
    let mut buf = PageBuf::new(size)?;
    buf.fill(b'p');
    let pages = buf.freeze();
    let body = pagerpc::prost::Message::encode_to_vec(&empty());
    let mut q = VecDeque::new();
    let opts = CallOptions::default();
    for _ in 0..n {
        if q.len() >= inflight.max(1) {
            let call: pagerpc::PendingCall = q.pop_front().ok_or("empty queue")?;
            call.wait()?;
        }
        q.push_back(client.start_call("bulk.put", body.clone(), pages.clone(), &opts)?);
    }
    for call in q {
        call.wait()?;
    }
    Ok(())
}

fn echo_server() -> Result<Server, std::io::Error> {
    Server::builder()
        .register("echo", |_ctx, req: MetadataEntry, pages| {
            Ok((req, Payload::Pages(pages)))
        })
        .bind("127.0.0.1:0")
}

fn report(name: String, lat: &mut [Duration], elapsed: Duration) {
    lat.sort_unstable();
    let n = lat.len();
    let pct = |p: usize| lat[((n * p).div_ceil(100)).max(1) - 1].as_secs_f64() * 1e6;
    let mean = lat.iter().map(|d| d.as_secs_f64()).sum::<f64>() / n as f64 * 1e6;
    println!(
        "{name}: {n} calls, p50 {:.1} us, p99 {:.1} us, mean {:.1} us, {:.0} calls/s",
        pct(50),
        pct(99),
        mean,
        n as f64 / elapsed.as_secs_f64()
    );
}

fn pingpong(calls: usize, size: usize, warmup: usize) -> Res {
    let server = echo_server()?;
    let client = Client::connect(server.local_addr())?;
    let payload = vec![b'x'; size];
    let req = empty();
    for _ in 0..warmup {
        client.call::<_, MetadataEntry>("echo", &req, payload.clone())?;
    }
    let mut lat = Vec::with_capacity(calls);
    let t0 = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        let r = client.call::<_, MetadataEntry>("echo", &req, payload.clone())?;
        lat.push(t.elapsed());
        if r.payload.len() != size {
            return Err("short echo".into());
        }
    }
    report(format!("pingpong {size} B"), &mut lat, t0.elapsed());
    drop(client);
    server.shutdown();
    Ok(())
}

fn concurrent(inflight: usize, calls: usize, size: usize) -> Res {
    let server = echo_server()?;
    let client = Client::connect(server.local_addr())?;
    let payload = vec![b'x'; size];
    let body = pagerpc::prost::Message::encode_to_vec(&empty());
    let opts = CallOptions::default();
    let mut q = VecDeque::with_capacity(inflight);
    let mut lat = Vec::with_capacity(calls);
    // Warm up, then measure.
    for round in 0..2 {
        let total = if round == 0 { calls / 10 } else { calls };
        lat.clear();
        let t0 = Instant::now();
        let mut started = 0;
        while started < total || !q.is_empty() {
            while started < total && q.len() < inflight.max(1) {
                let c = client.start_call("echo", body.clone(), payload.clone(), &opts)?;
                q.push_back((Instant::now(), c));
                started += 1;
            }
            if let Some((t, c)) = q.pop_front() {
                let f = c.wait()?;
                lat.push(t.elapsed());
                if f.payload.len() != size {
                    return Err("short echo".into());
                }
            }
        }
        if round == 1 {
            report(
                format!("concurrent {inflight} inflight {size} B"),
                &mut lat,
                t0.elapsed(),
            );
        }
    }
    drop(client);
    server.shutdown();
    Ok(())
}
