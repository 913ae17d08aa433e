//! `pagerpc-bench`: measures pagerpc through its real RPC path.
//!
//! - `bulk`: a loopback bulk transfer; the receiving (server) process prints
//!   one line in the format of the kernel's tcp_mmap tool, then the whole
//!   machine's CPU over the same interval.
//! - `stream`: a client stream and a server stream over loopback, each
//!   measured in its receiving process, in the same format.
//! - `pingpong`: sequential calls, latency percentiles.
//! - `concurrent`: many calls in flight on one connection.
#![forbid(unsafe_code)]

mod async_calls;
mod pin;
mod soak;
mod stream;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use pagerpc::netns::NetnsPair;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    Backend, CallOptions, Client, ClientConfig, CountersSnapshot, PageBuf, Payload, RecvConfig,
    Reply, SegmentAlign, SendConfig, Server, ServerConfig, Status,
};

use pagerpc_bench::meter::Meter;

#[derive(Parser)]
#[command(name = "pagerpc-bench", about = "Benchmarks for pagerpc")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// What both processes of a transfer use; the parent passes it on to its
/// child process as the same flags.
#[derive(Args, Clone, Debug)]
struct Transfer {
    /// Payload size of each call or message, in KiB.
    #[arg(long, default_value_t = 1024)]
    size_kib: usize,
    /// Bytes added to every payload after its KiB (0–4095: a payload that
    /// ends in a partial page, whose tail is copied).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..4096))]
    tail_bytes: u16,
    /// Receivers keep this many socket mappings per connection for reuse
    /// (`RecvConfig::kept_mappings`). Default: the library's (4).
    #[arg(long)]
    kept_mappings: Option<usize>,
    /// Total payload to send, in MiB.
    #[arg(long, default_value_t = 1024)]
    total_mib: usize,
    /// Zero-copy: MSG_ZEROCOPY sends, TCP_ZEROCOPY_RECEIVE receives.
    #[arg(long)]
    zerocopy: bool,
    /// Backend::Auto on the receivers (each connection maps or copies,
    /// whichever costs it less CPU); the senders may write with
    /// MSG_ZEROCOPY (as with --zerocopy) and do as the receiver asks.
    #[arg(long, conflicts_with = "zerocopy")]
    auto: bool,
    /// TCP_MAXSEG for both ends; 0 leaves the kernel's MSS. Default:
    /// page-aligned segments on loopback (4108 with timestamps).
    #[arg(long)]
    mss: Option<u32>,
    /// Smallest payload the sender sends with MSG_ZEROCOPY.
    #[arg(long)]
    zc_min: Option<usize>,
    /// Streams only: the per-stream credit window (`stream_window`) of
    /// both ends, in KiB. Default 8 MiB.
    #[arg(long)]
    window_kib: Option<u64>,
}

impl Transfer {
    /// Payload bytes per call or message.
    fn size(&self) -> usize {
        self.size_kib * 1024 + usize::from(self.tail_bytes)
    }

    /// Calls or messages to send.
    fn count(&self) -> usize {
        (self.total_mib * 1024 * 1024) / self.size().max(1)
    }

    /// The flags that give a child process the same settings.
    fn args(&self) -> Vec<String> {
        let mut a = vec![
            "--size-kib".to_owned(),
            self.size_kib.to_string(),
            "--total-mib".to_owned(),
            self.total_mib.to_string(),
        ];
        if self.zerocopy {
            a.push("--zerocopy".to_owned());
        }
        if self.auto {
            a.push("--auto".to_owned());
        }
        let opts = [
            ("--mss", self.mss.map(u64::from)),
            ("--zc-min", self.zc_min.map(|z| z as u64)),
            ("--window-kib", self.window_kib),
            ("--tail-bytes", Some(u64::from(self.tail_bytes))),
            ("--kept-mappings", self.kept_mappings.map(|k| k as u64)),
        ];
        for (name, v) in opts {
            if let Some(v) = v {
                a.extend([name.to_owned(), v.to_string()]);
            }
        }
        a
    }

    fn server_config(&self) -> ServerConfig {
        let mut c = self.pick(ServerConfig::zerocopy);
        self.tune(&mut c.send, &mut c.segments, &mut c.stream_window);
        self.tune_recv(&mut c.recv);
        c
    }

    fn client_config(&self) -> ClientConfig {
        let mut c = self.pick(ClientConfig::zerocopy);
        self.tune(&mut c.send, &mut c.segments, &mut c.stream_window);
        self.tune_recv(&mut c.recv);
        c
    }

    /// The zero-copy settings with `--zerocopy` or `--auto`, the defaults
    /// without.
    fn pick<C: Default>(&self, zerocopy: fn() -> C) -> C {
        if self.zerocopy || self.auto {
            zerocopy()
        } else {
            C::default()
        }
    }

    /// What both ends' receive configs take from the flags.
    fn tune_recv(&self, recv: &mut RecvConfig) {
        if self.auto {
            recv.backend = Backend::Auto;
        }
        if let Some(k) = self.kept_mappings {
            recv.kept_mappings = k;
        }
    }

    /// What both ends' configs take from the flags.
    fn tune(&self, send: &mut SendConfig, segs: &mut SegmentAlign, window: &mut u64) {
        *segs = segments(self.mss);
        if let Some(z) = self.zc_min {
            send.zerocopy_min = z;
        }
        if let Some(w) = self.window_kib {
            *window = w * 1024;
        }
    }

    /// The payload every call or message sends: one page-aligned buffer,
    /// shared.
    fn payload(&self) -> std::io::Result<pagerpc::Pages> {
        let mut buf = PageBuf::new(self.size())?;
        buf.fill(b'p');
        Ok(buf.freeze())
    }
}

/// Where the two processes of a transfer run.
#[derive(Args, Clone, Copy, Debug)]
struct Pin {
    /// Pin the receiving process (all its threads) to this CPU.
    #[arg(long)]
    receiver_cpu: Option<usize>,
    /// Pin the sending process (all its threads) to this CPU.
    #[arg(long)]
    sender_cpu: Option<usize>,
}

/// Which streams `stream` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Direction {
    /// A client stream: the client sends, the server's handler drops.
    Client,
    /// A server stream: the server's handler sends, the client drops.
    Server,
    /// Both, one after the other.
    Both,
}

#[derive(Subcommand)]
enum Cmd {
    /// Loopback bulk transfer through the RPC layer; prints a tcp_mmap-style
    /// line, then the whole machine's CPU per MB over the same interval.
    Bulk {
        #[command(flatten)]
        t: Transfer,
        /// Calls the sender keeps in flight.
        #[arg(long, default_value_t = 8)]
        inflight: usize,
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
        #[command(flatten)]
        pin: Pin,
    },
    /// Loopback streams: a client stream and a server stream of T MiB in
    /// S KiB messages, each consumer dropping what it gets; prints a
    /// tcp_mmap-style line per stream, measured in the receiving process.
    Stream {
        #[command(flatten)]
        t: Transfer,
        /// Which stream(s) to measure.
        #[arg(long, value_enum, default_value_t = Direction::Both)]
        direction: Direction,
        /// Server pool threads (as for bulk).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Exit with status 1 if fewer than this percentage of payload bytes
        /// were mapped.
        #[arg(long)]
        min_mapped: Option<f64>,
        #[command(flatten)]
        pin: Pin,
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
        /// Through `AsyncClient` and `AsyncServer` (tokio, one worker each).
        #[arg(long = "async")]
        use_async: bool,
        /// Call a `serve-echo` server at this address instead of one in
        /// this process (to measure each side apart, e.g. with strace).
        #[arg(long, conflicts_with = "use_async")]
        connect: Option<SocketAddr>,
    },
    /// C calls outstanding on each of N connections.
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
        /// Through `AsyncClient` and `AsyncServer` (tokio, one worker each).
        #[arg(long = "async")]
        use_async: bool,
        /// Client connections, each with `inflight` calls outstanding, each
        /// driven by its own thread.
        #[arg(long, default_value_t = 1, conflicts_with = "use_async")]
        connections: usize,
        /// Call a `serve-echo` server at this address instead of one in
        /// this process.
        #[arg(long, conflicts_with = "use_async")]
        connect: Option<SocketAddr>,
        /// Start each call with its own `start_call` (one write per
        /// request) instead of starting the free slots together in a
        /// `CallBatch`.
        #[arg(long, conflicts_with = "use_async")]
        no_batch: bool,
    },
    /// Serves the `echo` method that `pingpong` and `concurrent` call,
    /// printing `listening on ADDR`, until its stdin closes.
    ServeEcho {
        /// Server pool threads (default: as `ServerConfig::default()`).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// A bounded mixed load with injected faults; reports calls, errors by
    /// kind, RSS over time, and leaked fds and mappings (exit 1 on a leak).
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 180)]
        seconds: u64,
    },
    /// Internal: the sending process of `bulk` and of `stream --direction client`.
    #[command(hide = true)]
    BulkSend {
        #[command(flatten)]
        t: Transfer,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long, default_value_t = 8)]
        inflight: usize,
        /// Send everything as one client stream instead of unary calls.
        #[arg(long)]
        stream: bool,
        /// Network namespace to enter before connecting.
        #[arg(long)]
        netns_name: Option<String>,
        /// CPUs to pin to (comma-separated).
        #[arg(long)]
        cpus: Option<String>,
    },
    /// Internal: the sending (server) process of `stream --direction server`.
    /// Prints its address, serves one server stream, exits when its stdin
    /// closes.
    #[command(hide = true)]
    ServeStream {
        #[command(flatten)]
        t: Transfer,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// CPUs to pin to (comma-separated).
        #[arg(long)]
        cpus: Option<String>,
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
            mut t,
            inflight,
            netns,
            no_tlb_hint,
            threads,
            mmap,
            min_mapped,
            pin,
        } => {
            t.zerocopy |= mmap;
            pin::receiver(pin.receiver_cpu, pin.sender_cpu).and_then(|cpus| {
                bulk(
                    &BulkOpts {
                        t,
                        inflight,
                        stream: false,
                        threads,
                        tlb_hint: !no_tlb_hint,
                        mmap,
                        min_mapped,
                    },
                    netns,
                    cpus.as_deref(),
                )
            })
        }
        Cmd::Stream {
            t,
            direction,
            threads,
            min_mapped,
            pin,
        } => stream::run(&t, direction, threads, min_mapped, pin),
        Cmd::BulkSend {
            t,
            addr,
            inflight,
            stream,
            netns_name,
            cpus,
        } => bulk_send(
            &t,
            addr,
            inflight,
            stream,
            netns_name.as_deref(),
            cpus.as_deref(),
        ),
        Cmd::ServeStream { t, threads, cpus } => stream::serve(&t, threads, cpus.as_deref()),
        Cmd::Pingpong {
            calls,
            size,
            warmup,
            use_async: false,
            connect,
        } => pingpong(calls, size, warmup, connect),
        Cmd::Pingpong {
            calls,
            size,
            warmup,
            use_async: true,
            ..
        } => async_calls::pingpong(calls, size, warmup),
        Cmd::Soak { seconds } => soak::soak(seconds),
        Cmd::Concurrent {
            inflight,
            calls,
            size,
            use_async: false,
            connections,
            connect,
            no_batch,
        } => concurrent(inflight, calls, size, connections, connect, !no_batch),
        Cmd::Concurrent {
            inflight,
            calls,
            size,
            use_async: true,
            ..
        } => async_calls::concurrent(inflight, calls, size),
        Cmd::ServeEcho { threads } => serve_echo(threads),
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

/// A command running this binary's subcommand `sub` (a child process of a
/// transfer).
fn child(sub: &str) -> std::io::Result<Command> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg(sub);
    Ok(cmd)
}

/// How `bulk` (and the client stream of `stream`) runs.
struct BulkOpts {
    t: Transfer,
    inflight: usize,
    /// The sender sends everything as one client stream.
    stream: bool,
    threads: usize,
    tlb_hint: bool,
    mmap: bool,
    min_mapped: Option<f64>,
}

/// Runs the server in this process and the sender in a child process, and
/// prints the receiving side's line (after `label: ` for a stream).
/// `sender_cpus`: what the sender pins itself to (see [`pin::receiver`]).
fn bulk(o: &BulkOpts, netns: bool, sender_cpus: Option<&str>) -> Res {
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
    let size = o.t.size();
    let n = o.t.count();
    let received = Arc::new(AtomicU64::new(0));
    let bad = Arc::new(AtomicU64::new(0));
    let mut cfg = o.t.server_config();
    cfg.recv.zc_tlb_clean_hint = o.tlb_hint;
    cfg.threads = o.threads.max(1);
    if o.mmap {
        cfg.recv.backend = pagerpc::Backend::Mmap;
    }
    let sink = Sink {
        size,
        received: received.clone(),
        bad: bad.clone(),
    };
    let s2 = sink.clone();
    let server = Server::builder()
        .config(cfg)
        .register("bulk.put", move |_ctx, _req: MetadataEntry, pages| {
            if !sink.take(&pages) {
                return Err(Status::invalid_argument("wrong payload size"));
            }
            Ok((empty(), Payload::Empty))
        })
        .register_client_stream("bulk.stream", move |_ctx, rx| {
            while let Some(m) = rx.recv()? {
                s2.take(&m.payload);
            }
            Ok(Reply::default())
        })
        .bind(bind_addr)?;
    let counters_before = server.counters();
    let meter = Meter::start()?;
    let mut cmd = child("bulk-send")?;
    cmd.args(o.t.args()).args([
        "--addr",
        &server.local_addr().to_string(),
        "--inflight",
        &o.inflight.to_string(),
    ]);
    if o.stream {
        cmd.arg("--stream");
    }
    if let Some(p) = &pair {
        cmd.args(["--netns-name", p.name_b()]);
    }
    if let Some(c) = sender_cpus {
        cmd.args(["--cpus", c]);
    }
    let status = cmd.stdin(Stdio::null()).status()?;
    let bytes = received.load(Ordering::Relaxed);
    let sample = meter.stop(bytes)?;
    if !status.success() {
        return Err(format!("sender process failed: {status}").into());
    }
    if bytes != (n * size) as u64 || bad.load(Ordering::Relaxed) != 0 {
        return Err(format!("received {bytes} bytes, expected {}", n * size).into());
    }
    println!(
        "{}",
        sample.line(if o.stream { "client-stream" } else { "" })
    );
    if !o.stream {
        // A line of its own: scripts parse the one above.
        println!("{}", sample.machine_line(""));
    }
    let counters = server.counters().since(&counters_before);
    if o.t.auto {
        println!("{}", auto_line(&counters));
    }
    if counters.socket_maps_made + counters.socket_maps_reused > 0 {
        println!(
            "socket mappings: {} made, {} reused; payload tails copied by the mapping call: {}",
            counters.socket_maps_made, counters.socket_maps_reused, counters.tails_copied_with_map
        );
    }
    server.shutdown();
    Ok(sample.check_mapped(o.min_mapped)?)
}

/// What `Backend::Auto` did with the payloads received: payloads and MB
/// per path and reason, and what the receivers asked their peers.
fn auto_line(c: &CountersSnapshot) -> String {
    let a = &c.auto;
    let mb = |b: u64| b as f64 / 1e6;
    format!(
        "auto: map chosen {} ({:.0} MB), map sample {} ({:.0} MB), copy chosen {} ({:.0} MB), \
         copy sample {} ({:.0} MB), below floor {} ({:.0} MB); mapped {:.0} MB, copied {:.0} MB; \
         asked the sender: copy {}, zerocopy {}",
        a.map_chosen,
        mb(a.map_chosen_bytes),
        a.map_sample,
        mb(a.map_sample_bytes),
        a.copy_chosen,
        mb(a.copy_chosen_bytes),
        a.copy_sample,
        mb(a.copy_sample_bytes),
        a.below_floor,
        mb(a.below_floor_bytes),
        mb(c.bytes_mapped),
        mb(c.bytes_copied()),
        c.asked_peer_copy,
        c.asked_peer_zerocopy,
    )
}

/// Counts what a receiving handler got.
#[derive(Clone)]
struct Sink {
    size: usize,
    received: Arc<AtomicU64>,
    bad: Arc<AtomicU64>,
}

impl Sink {
    /// Counts one payload (and drops it); false if it has the wrong size.
    fn take(&self, pages: &pagerpc::Pages) -> bool {
        if pages.len() != self.size {
            self.bad.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.received
            .fetch_add(pages.len() as u64, Ordering::Relaxed);
        true
    }
}

fn bulk_send(
    t: &Transfer,
    addr: SocketAddr,
    inflight: usize,
    stream: bool,
    netns: Option<&str>,
    cpus: Option<&str>,
) -> Res {
    if let Some(c) = cpus {
        pin::apply(c)?;
    }
    if let Some(name) = netns {
        pagerpc::netns::enter(name)?;
    }
    let n = t.count();
    let client = Client::connect_with(addr, t.client_config())?;
    let pages = t.payload()?;
    let body = pagerpc::prost::Message::encode_to_vec(&empty());
    let opts = CallOptions::default();
    if stream {
        let (mut tx, resp) = client.client_stream("bulk.stream", &opts)?;
        for _ in 0..n {
            tx.send_raw(body.clone(), Payload::Pages(pages.clone()))?;
        }
        tx.finish()?;
        resp.wait::<MetadataEntry>()?;
        return Ok(());
    }
    let mut q = VecDeque::new();
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

fn echo_server(threads: usize) -> Result<Server, std::io::Error> {
    let cfg = ServerConfig {
        threads,
        ..ServerConfig::default()
    };
    Server::builder()
        .config(cfg)
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

/// The echo server `pingpong` and `concurrent` call: in this process, or
/// none when they call one at `connect`.
fn echo_target(
    connect: Option<SocketAddr>,
) -> Result<(Option<Server>, SocketAddr), std::io::Error> {
    match connect {
        Some(addr) => Ok((None, addr)),
        None => {
            let server = echo_server(ServerConfig::default().threads)?;
            let addr = server.local_addr();
            Ok((Some(server), addr))
        }
    }
}

/// `serve-echo`: the echo server in a process of its own.
fn serve_echo(threads: Option<usize>) -> Res {
    let server = echo_server(threads.unwrap_or(ServerConfig::default().threads))?;
    println!("listening on {}", server.local_addr());
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    server.shutdown();
    Ok(())
}

fn pingpong(calls: usize, size: usize, warmup: usize, connect: Option<SocketAddr>) -> Res {
    let (server, addr) = echo_target(connect)?;
    let client = Client::connect(addr)?;
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
    if let Some(server) = server {
        server.shutdown();
    }
    Ok(())
}

fn concurrent(
    inflight: usize,
    calls: usize,
    size: usize,
    connections: usize,
    connect: Option<SocketAddr>,
    batch: bool,
) -> Res {
    let (server, addr) = echo_target(connect)?;
    let connections = connections.max(1);
    let clients = (0..connections)
        .map(|_| Client::connect(addr))
        .collect::<Result<Vec<_>, _>>()?;
    // Warm up, then measure: every connection's thread runs its share.
    for round in 0..2 {
        let total = if round == 0 { calls / 10 } else { calls };
        let t0 = Instant::now();
        let threads: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, client)| {
                let client = client.clone();
                let share = total / connections + usize::from(i < total % connections);
                std::thread::spawn(move || keep_in_flight(&client, inflight, share, size, batch))
            })
            .collect();
        let mut lat = Vec::with_capacity(total);
        for t in threads {
            lat.extend(t.join().map_err(|_| "a client thread panicked")??);
        }
        if round == 1 {
            let name = if connections == 1 {
                format!("concurrent {inflight} inflight {size} B")
            } else {
                format!("concurrent {connections} connections x {inflight} inflight {size} B")
            };
            report(name, &mut lat, t0.elapsed());
        }
    }
    drop(clients);
    if let Some(server) = server {
        server.shutdown();
    }
    Ok(())
}

/// Makes `calls` echo calls on `client`, keeping `inflight` outstanding;
/// returns their latencies. With `batch`, the free slots are filled
/// together in one [`pagerpc::CallBatch`] after taking every response that
/// is already here; without, each call is started on its own as soon as
/// its slot frees.
fn keep_in_flight(
    client: &Client,
    inflight: usize,
    calls: usize,
    size: usize,
    batch: bool,
) -> Result<Vec<Duration>, String> {
    let payload = vec![b'x'; size];
    let body = pagerpc::prost::Message::encode_to_vec(&empty());
    let opts = CallOptions::default();
    let inflight = inflight.max(1);
    let mut q = VecDeque::with_capacity(inflight);
    let mut lat = Vec::with_capacity(calls);
    let mut started = 0;
    let done = |lat: &mut Vec<Duration>, t: Instant, c: pagerpc::PendingCall| {
        let f = c.wait().map_err(|e| e.to_string())?;
        lat.push(t.elapsed());
        if f.payload.len() != size {
            return Err("short echo".to_string());
        }
        Ok(())
    };
    while started < calls || !q.is_empty() {
        if batch {
            let mut b = client.batch();
            while started < calls && q.len() + b.len() < inflight {
                b.add("echo", body.clone(), payload.clone(), &opts)
                    .map_err(|e| e.to_string())?;
                started += 1;
            }
            let t = Instant::now();
            for c in b.send() {
                q.push_back((t, c.map_err(|e| e.to_string())?));
            }
        } else {
            while started < calls && q.len() < inflight {
                let c = client
                    .start_call("echo", body.clone(), payload.clone(), &opts)
                    .map_err(|e| e.to_string())?;
                q.push_back((Instant::now(), c));
                started += 1;
            }
        }
        if let Some((t, c)) = q.pop_front() {
            done(&mut lat, t, c)?;
        }
        while batch && q.front().is_some_and(|(_, c)| c.is_ready()) {
            if let Some((t, c)) = q.pop_front() {
                done(&mut lat, t, c)?;
            }
        }
    }
    Ok(lat)
}
