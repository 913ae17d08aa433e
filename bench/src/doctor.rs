//! `pagerpc doctor`: tells whether this machine can receive pagerpc payloads
//! without copying them, and if bytes were copied, why, in plain words.
//! With `--cost`, it also measures what receiving costs this host's CPU by
//! copy and by zero-copy at four payload sizes, and says from which size
//! zero-copy pays, if any.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use clap::{Parser, Subcommand};
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, ClientConfig, CountersSnapshot, PageBuf, Pages, Payload, SegmentAlign,
    Server, ServerConfig, Status,
};
use pagerpc_bench::meter::{Meter, Sample};

#[derive(Parser)]
#[command(name = "pagerpc", about = "pagerpc tools")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Checks zero-copy support and runs a short loopback self-test.
    Doctor {
        /// TCP_MAXSEG for the self-test; 0 leaves the kernel's MSS.
        /// Default: page-aligned segments (4108 with timestamps).
        #[arg(long)]
        mss: Option<u32>,
        /// Send without MSG_ZEROCOPY in the self-test.
        #[arg(long)]
        no_zerocopy_send: bool,
        /// Payload size of the self-test, in KiB.
        #[arg(long, default_value_t = 1024)]
        size_kib: usize,
        /// Payloads the self-test sends.
        #[arg(long, default_value_t = 64)]
        count: usize,
        /// Then measure the receiving process's CPU per MB of copy receive
        /// and of zero-copy receive at 16 KiB, 64 KiB, 1 MiB and 16 MiB
        /// payloads over loopback (the sender is a child process), and say
        /// from which size zero-copy pays. About 10 s with the defaults.
        /// Segments are page-aligned there; --mss and --no-zerocopy-send
        /// apply to the self-test only.
        #[arg(long)]
        cost: bool,
        /// With --cost: MiB sent per payload size and receive path in each
        /// round (at least 2 payloads).
        #[arg(long, default_value_t = 512, requires = "cost")]
        cost_mib: usize,
        /// With --cost: rounds, each measuring every size and path in turn;
        /// the report gives the medians.
        #[arg(long, default_value_t = 3, requires = "cost")]
        cost_rounds: usize,
    },
    /// Internal: the sending process of `doctor --cost`.
    #[command(hide = true)]
    CostSend {
        #[arg(long)]
        addr: SocketAddr,
        /// Payload bytes per call.
        #[arg(long)]
        size: usize,
        /// Calls to make.
        #[arg(long)]
        count: usize,
        /// Send with MSG_ZEROCOPY (what zero-copy receive needs).
        #[arg(long)]
        zerocopy: bool,
    },
}

fn main() {
    let r = match Cli::parse().cmd {
        Cmd::Doctor {
            mss,
            no_zerocopy_send,
            size_kib,
            count,
            cost,
            cost_mib,
            cost_rounds,
        } => doctor(mss, !no_zerocopy_send, size_kib * 1024, count).and_then(|()| {
            if cost {
                cost_report(cost_mib << 20, cost_rounds.max(1))
            } else {
                Ok(())
            }
        }),
        Cmd::CostSend {
            addr,
            size,
            count,
            zerocopy,
        } => cost_send(addr, size, count, zerocopy),
    };
    if let Err(e) = r {
        eprintln!("pagerpc doctor: {e}");
        std::process::exit(1);
    }
}

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn doctor(mss: Option<u32>, zc_send: bool, size: usize, count: usize) -> Res<()> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    println!("kernel: Linux {kernel}");
    let ts = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_timestamps")
        .map(|s| s.trim() != "0")
        .unwrap_or(true);
    println!(
        "tcp timestamps: {} ({} option bytes per segment)",
        if ts { "on" } else { "off" },
        if ts { 12 } else { 0 }
    );

    println!(
        "interfaces (MTU; page-sized segments need 4148 for IPv4, 4168 for IPv6, with timestamps):"
    );
    let mut ifs: Vec<_> = std::fs::read_dir("/sys/class/net")?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ifs.sort();
    for name in ifs {
        let mtu = std::fs::read_to_string(format!("/sys/class/net/{name}/mtu"))
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "?".into());
        let note = match mtu.as_str() {
            "4148" => "  page-aligned for IPv4",
            "4168" => "  page-aligned for IPv6",
            _ if name == "lo" => "  (loopback: pagerpc sets TCP_MAXSEG instead)",
            _ => "",
        };
        println!("  {name:<12} {mtu}{note}");
    }

    // The self-test: a real server and client over loopback.
    let segments = match mss {
        None => SegmentAlign::Auto,
        Some(0) => SegmentAlign::Off,
        Some(m) => SegmentAlign::Mss(m),
    };
    let mut scfg = ServerConfig::zerocopy();
    scfg.segments = segments;
    let server = Server::builder()
        .config(scfg)
        .register("doctor.put", |_ctx, req: MetadataEntry, _pages: Pages| {
            // Dropping the payload unmaps it.
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")?;
    let mut ccfg = ClientConfig::zerocopy();
    ccfg.segments = segments;
    ccfg.send.zerocopy = zc_send;
    let client = Client::connect_with(server.local_addr(), ccfg)?;
    let conn_mss = client.mss()?;
    let mut buf = PageBuf::new(size)?;
    buf.fill(0x5a);
    let pages = buf.freeze();
    let t0 = Instant::now();
    for _ in 0..count {
        client.call::<_, MetadataEntry>("doctor.put", &MetadataEntry::default(), pages.clone())?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let rx = server.counters();
    let tx = client.counters();
    let send_stats = client.zerocopy_send_stats();
    drop(client);
    server.shutdown();

    let zc_recv_works = rx.bytes_mapped > 0;
    let zc_send_works = tx.zc_sends > 0 && tx.zc_send_completions > 0;
    println!(
        "TCP_ZEROCOPY_RECEIVE: {}",
        if zc_recv_works {
            "works (payload pages were mapped)"
        } else {
            "no page was mapped in the self-test (see below)"
        }
    );
    println!(
        "MSG_ZEROCOPY: {}",
        if !zc_send {
            "not tried (--no-zerocopy-send)".to_owned()
        } else if zc_send_works {
            format!(
                "works ({} sends, {} completions, {} reported as copied by the kernel{})",
                tx.zc_sends,
                tx.zc_send_completions,
                tx.zc_send_copied,
                if tx.zc_send_copied > 0 {
                    "; loopback always copies at delivery, which keeps page alignment"
                } else {
                    ""
                }
            )
        } else {
            format!(
                "not used ({} payload(s) still held)",
                send_stats.pending_payloads
            )
        }
    );
    let mb = (size * count) as f64 / (1 << 20) as f64;
    println!(
        "self-test: {count} x {} KiB over loopback, connection MSS {conn_mss}: {:.4} % mmap'ed, {:.2} Gbit",
        size / 1024,
        rx.mapped_percent(),
        mb * 8.0 * 1.048576 / 1000.0 / secs
    );
    for line in explain(&rx, conn_mss, zc_send, size) {
        println!("  - {line}");
    }
    Ok(())
}

/// Why bytes were copied, in plain words.
fn explain(c: &CountersSnapshot, mss: u32, zc_send: bool, size: usize) -> Vec<String> {
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    let total = c.bytes_mapped + c.bytes_copied();
    let mut out = Vec::new();
    if total == 0 {
        out.push("no payload bytes were received".into());
        return out;
    }
    if c.bytes_copied() == 0 {
        out.push("every payload byte was mapped; nothing was copied".into());
        return out;
    }
    if c.copied_unmappable > 0 {
        let mut why = format!(
            "{:.1} MB ({:.1} %) were copied because the kernel could not map them: the TCP segments \
             that carried them did not hold whole, page-aligned pages.",
            mb(c.copied_unmappable),
            100.0 * c.copied_unmappable as f64 / total as f64
        );
        if !mss.is_multiple_of(4096) {
            why.push_str(&format!(
                " The connection's MSS is {mss} bytes of payload per segment, not a multiple of 4096: \
                 on loopback set TCP_MAXSEG to 4108 (the default; --mss 4108), on a real link set the \
                 MTU to 4148 (IPv4) or 4168 (IPv6)."
            ));
        } else if !zc_send {
            why.push_str(
                " Segments are page-sized, but the sender copied its payload into socket buffers at \
                 arbitrary offsets: send page-aligned memory with MSG_ZEROCOPY.",
            );
        } else {
            why.push_str(
                " Segments are page-sized; an odd-sized segment still appears when the receive window \
                 closes or segments are reordered and retransmitted.",
            );
        }
        out.push(why);
    }
    if c.copied_tail > 0 {
        out.push(format!(
            "{:.3} MB were payload tails (the bytes after the last whole page{}): always copied.",
            mb(c.copied_tail),
            if !size.is_multiple_of(4096) {
                format!("; {size} is not a multiple of 4096")
            } else {
                String::new()
            }
        ));
    }
    if c.copied_not_queued > 0 {
        out.push(format!(
            "{:.3} MB were copied because less than a page was queued at the head of the receive \
             queue (a segment smaller than a page, or the last bytes of a closing connection): the \
             kernel maps whole pages only.",
            mb(c.copied_not_queued)
        ));
    }
    if c.copied_backend_off > 0 {
        out.push(format!(
            "{:.1} MB were copied because zero-copy receive was off for the connection (not \
             supported by the kernel or the socket).",
            mb(c.copied_backend_off)
        ));
    }
    if c.copied_auto > 0 {
        out.push(format!(
            "{:.1} MB were copied because Backend::Auto chose to copy those payloads (copying \
             cost less, they were below its floor, or they were samples).",
            mb(c.copied_auto)
        ));
    }
    out
}

/// The payload sizes `--cost` measures.
const COST_SIZES: [usize; 4] = [16 << 10, 64 << 10, 1 << 20, 16 << 20];

/// What receiving cost at one payload size: the medians over the rounds.
#[derive(Clone, Copy, Debug)]
struct Point {
    size: usize,
    /// Receiving process's CPU µs per MB, copy receive.
    copy: f64,
    /// The same, zero-copy receive.
    zc: f64,
}

/// `--cost`: every size by copy and by zero-copy, `rounds` times in turn,
/// then the medians and the break-even in plain words.
fn cost_report(bytes: usize, rounds: usize) -> Res<()> {
    println!();
    println!(
        "receive cost over loopback, {} MiB per payload size and path, median of {rounds} round(s):",
        bytes >> 20
    );
    println!(
        "  µs/MB = the receiving process's CPU (user+sys) per MB; the sender is a child process"
    );
    println!(
        "  copy = plain sends, copy receive; zero-copy = MSG_ZEROCOPY sends, TCP_ZEROCOPY_RECEIVE \
         (`pagerpc-bench bulk` without and with --zerocopy)"
    );
    // samples[size index][0 copy, 1 zero-copy]
    let mut samples: Vec<[Vec<Sample>; 2]> =
        COST_SIZES.iter().map(|_| Default::default()).collect();
    for _ in 0..rounds {
        for (i, &size) in COST_SIZES.iter().enumerate() {
            let count = (bytes / size).max(2);
            for (j, zc) in [false, true].into_iter().enumerate() {
                samples[i][j].push(measure(size, count, zc)?);
            }
        }
    }
    println!(
        "  {:>8}  {:>11}  {:>16}  {:>7}  {:>9}  {:>24}",
        "payload",
        "copy µs/MB",
        "zero-copy µs/MB",
        "zc/copy",
        "zc mapped",
        "machine µs/MB copy / zc"
    );
    let mut points = Vec::new();
    let mut notes = Vec::new();
    let mut machine_ratios = Vec::new();
    for (&size, [copy, zc]) in COST_SIZES.iter().zip(&samples) {
        let p = Point {
            size,
            copy: median(copy.iter().map(Sample::usec_per_mb)),
            zc: median(zc.iter().map(Sample::usec_per_mb)),
        };
        let mapped = median(zc.iter().map(|s| s.counters.mapped_percent()));
        // The whole machine's median µs/MB, when /proc/stat was readable
        // and every run lasted at least 5 of its ticks (10 ms each at 100 Hz).
        let machine = |v: &[Sample]| {
            let long = v
                .iter()
                .all(|s| s.machine_cpu.as_ref().is_ok_and(|&c| c >= 0.05));
            let m: Vec<f64> = v.iter().filter_map(Sample::machine_usec_per_mb).collect();
            (long && !m.is_empty()).then(|| median(m.into_iter()))
        };
        let (mc, mz) = (machine(copy), machine(zc));
        let words = |m: Option<f64>| m.map_or("?".to_owned(), |v| format!("{v:.0}"));
        println!(
            "  {:>8}  {:>11.1}  {:>16.1}  {:>6.2}x  {:>7.1} %  {:>24}",
            human(size),
            p.copy,
            p.zc,
            p.zc / p.copy,
            mapped,
            format!("{} / {}", words(mc), words(mz)),
        );
        if let (Some(mc), Some(mz)) = (mc, mz) {
            machine_ratios.push(format!("{} {:.2}x", human(size), mz / mc));
        }
        if mapped < 90.0 {
            notes.push(format!(
                "zero-copy mapped only {mapped:.1} % of the bytes at {}, so its number there is \
                 partly the cost of copying (run `pagerpc doctor --size-kib {}` to see why; a \
                 fresh connection's first payloads often copy)",
                human(size),
                size >> 10
            ));
        }
        points.push(p);
    }
    println!("break-even: {}", verdict(&points));
    if machine_ratios.len() < points.len() {
        println!(
            "  (machine ?: /proc/stat unreadable, or runs too short for its ticks; raise --cost-mib)"
        );
    } else {
        println!(
            "  counting the whole machine (every CPU's user+nice+system+irq+softirq from /proc/stat, \
             so the sender and softirq too), zero-copy/copy: {}",
            machine_ratios.join(", ")
        );
    }
    for n in notes {
        println!("  note: {n}");
    }
    println!(
        "  (single runs vary by several percent, more when the machine is busy; more \
         --cost-rounds give a firmer answer)"
    );
    Ok(())
}

/// One transfer of `count` payloads of `size` bytes from a child process
/// (`cost-send`) to a one-thread server in this process, measured here.
fn measure(size: usize, count: usize, zc: bool) -> Res<Sample> {
    let mut cfg = if zc {
        ServerConfig::zerocopy()
    } else {
        ServerConfig::default()
    };
    // One thread per connection, as `pagerpc-bench bulk` measures it.
    cfg.threads = 1;
    let received = Arc::new(AtomicU64::new(0));
    let r2 = received.clone();
    let server = Server::builder()
        .config(cfg)
        .register(
            "doctor.put",
            move |_ctx, req: MetadataEntry, pages: Pages| {
                if pages.len() == size {
                    r2.fetch_add(size as u64, Ordering::Relaxed);
                }
                Ok::<_, Status>((req, Payload::Empty))
            },
        )
        .bind("127.0.0.1:0")?;
    let meter = Meter::start()?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args([
        "cost-send",
        "--addr",
        &server.local_addr().to_string(),
        "--size",
        &size.to_string(),
        "--count",
        &count.to_string(),
    ]);
    if zc {
        cmd.arg("--zerocopy");
    }
    let status = cmd.stdin(Stdio::null()).status()?;
    let bytes = received.load(Ordering::Relaxed);
    let sample = meter.stop(bytes)?;
    server.shutdown();
    if !status.success() {
        return Err(format!("the sending process failed: {status}").into());
    }
    if bytes != (size * count) as u64 {
        return Err(format!("received {bytes} payload bytes, expected {}", size * count).into());
    }
    Ok(sample)
}

/// The `cost-send` child: `count` calls with `size`-byte payloads, eight in
/// flight.
fn cost_send(addr: SocketAddr, size: usize, count: usize, zc: bool) -> Res<()> {
    let cfg = if zc {
        ClientConfig::zerocopy()
    } else {
        ClientConfig::default()
    };
    let client = Client::connect_with(addr, cfg)?;
    let mut buf = PageBuf::new(size)?;
    buf.fill(0x5a);
    let pages = buf.freeze();
    let body = pagerpc::prost::Message::encode_to_vec(&MetadataEntry::default());
    let opts = CallOptions::default();
    let mut q = VecDeque::new();
    for _ in 0..count {
        if q.len() >= 8 {
            let call: pagerpc::PendingCall = q.pop_front().ok_or("empty queue")?;
            call.wait()?;
        }
        q.push_back(client.start_call("doctor.put", body.clone(), pages.clone(), &opts)?);
    }
    for call in q {
        call.wait()?;
    }
    Ok(())
}

/// The median (the mean of the middle two for an even count); 0 for none.
fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// `16 KiB`, `1 MiB`.
fn human(size: usize) -> String {
    if size >= 1 << 20 && size.is_multiple_of(1 << 20) {
        format!("{} MiB", size >> 20)
    } else {
        format!("{} KiB", size >> 10)
    }
}

/// Sizes in words: `16 KiB`, `16 KiB and 64 KiB`, `16 KiB, 64 KiB and 1 MiB`.
fn list(sizes: &[usize]) -> String {
    let words: Vec<String> = sizes.iter().map(|&s| human(s)).collect();
    match words.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The break-even in plain words, from the medians at each size (ascending).
fn verdict(points: &[Point]) -> String {
    let ratios = points
        .iter()
        .map(|p| format!("{} {:.2}x", human(p.size), p.zc / p.copy))
        .collect::<Vec<_>>()
        .join(", ");
    let close: Vec<usize> = points
        .iter()
        .filter(|p| (p.zc / p.copy - 1.0).abs() < 0.10)
        .map(|p| p.size)
        .collect();
    let noise = if close.is_empty() {
        String::new()
    } else {
        format!(
            " At {} the two differ by less than 10 %, about what single runs vary by.",
            list(&close)
        )
    };
    let wins: Vec<bool> = points.iter().map(|p| p.zc < p.copy).collect();
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return "nothing was measured".into();
    };
    let range = format!("{} to {}", human(first.size), human(last.size));
    if wins.iter().all(|&w| !w) {
        return format!(
            "On this host zero-copy receive costs more CPU than copying at every size measured \
             ({range}; zero-copy/copy: {ratios}); keep Backend::Copy.{noise}"
        );
    }
    if wins.iter().all(|&w| w) {
        return format!(
            "On this host zero-copy receive costs less CPU than copying at every size measured \
             ({range}; zero-copy/copy: {ratios}): zero-copy pays from {} or less; use \
             Backend::ZeroCopy.{noise}",
            human(first.size)
        );
    }
    // Copy cheaper below some size and zero-copy from it on: one crossing.
    let k = wins.iter().position(|&w| w).unwrap_or(0);
    if k > 0 && wins[k..].iter().all(|&w| w) {
        let (a, b) = (points[k - 1], points[k]);
        let copy_sizes: Vec<usize> = points[..k].iter().map(|p| p.size).collect();
        let zc_sizes: Vec<usize> = points[k..].iter().map(|p| p.size).collect();
        return format!(
            "On this host zero-copy pays from about {} (between {} and {}): copying costs less \
             CPU at {}, zero-copy at {} (zero-copy/copy: {ratios}). Choose Backend::ZeroCopy \
             for connections that carry payloads of that size or more, Backend::Copy for those \
             that carry smaller ones.{noise}",
            human_round(crossing(a, b)),
            human(a.size),
            human(b.size),
            list(&copy_sizes),
            list(&zc_sizes),
        );
    }
    let zc_sizes: Vec<usize> = points
        .iter()
        .filter(|p| p.zc < p.copy)
        .map(|p| p.size)
        .collect();
    let copy_sizes: Vec<usize> = points
        .iter()
        .filter(|p| p.zc >= p.copy)
        .map(|p| p.size)
        .collect();
    format!(
        "On this host there is no single break-even size: zero-copy receive costs less CPU at {} \
         and more at {} (zero-copy/copy: {ratios}). Run again with more --cost-rounds before \
         choosing; without a clear gain, keep Backend::Copy.{noise}",
        list(&zc_sizes),
        list(&copy_sizes),
    )
}

/// Where zero-copy's cost ratio crosses 1 between two measured sizes,
/// interpolated linearly in log2(size).
fn crossing(a: Point, b: Point) -> f64 {
    let (da, db) = (a.zc / a.copy - 1.0, b.zc / b.copy - 1.0);
    let (la, lb) = ((a.size as f64).log2(), (b.size as f64).log2());
    let t = if da == db { 0.5 } else { da / (da - db) };
    (la + t.clamp(0.0, 1.0) * (lb - la)).exp2()
}

/// A size in bytes rounded to two significant digits, in KiB or MiB.
fn human_round(bytes: f64) -> String {
    let words = |v: f64, unit: &str| {
        let v = v.max(1.0);
        let mag = 10f64.powi(v.log10().floor() as i32 - 1);
        let r = (v / mag).round() * mag;
        if r < 10.0 && r.fract().abs() > 1e-9 {
            format!("{r:.1} {unit}")
        } else {
            format!("{r:.0} {unit}")
        }
    };
    if bytes >= (1 << 20) as f64 {
        words(bytes / (1 << 20) as f64, "MiB")
    } else {
        words(bytes / 1024.0, "KiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(pairs: [(f64, f64); 4]) -> Vec<Point> {
        COST_SIZES
            .iter()
            .zip(pairs)
            .map(|(&size, (copy, zc))| Point { size, copy, zc })
            .collect()
    }

    #[test]
    fn zero_copy_dearer_everywhere_says_keep_copy() {
        let v = verdict(&points([
            (900.0, 1300.0),
            (320.0, 480.0),
            (190.0, 225.0),
            (180.0, 200.0),
        ]));
        assert!(
            v.contains("costs more CPU than copying at every size measured"),
            "{v}"
        );
        assert!(v.contains("keep Backend::Copy"), "{v}");
        assert!(v.contains("16 KiB 1.44x"), "{v}");
    }

    #[test]
    fn zero_copy_cheaper_everywhere_says_it_pays_from_the_smallest() {
        let v = verdict(&points([
            (900.0, 800.0),
            (320.0, 200.0),
            (190.0, 100.0),
            (180.0, 90.0),
        ]));
        assert!(v.contains("pays from 16 KiB or less"), "{v}");
    }

    #[test]
    fn one_crossing_is_interpolated_between_its_sizes() {
        // Ratios 1.5 at 64 KiB and 0.5 at 1 MiB: the crossing is half way
        // in log2, at 256 KiB.
        let v = verdict(&points([
            (900.0, 1800.0),
            (300.0, 450.0),
            (200.0, 100.0),
            (180.0, 90.0),
        ]));
        assert!(
            v.contains("pays from about 260 KiB (between 64 KiB and 1 MiB)"),
            "{v}"
        );
        assert!(
            v.contains(
                "copying costs less CPU at 16 KiB and 64 KiB, zero-copy at 1 MiB and 16 MiB"
            ),
            "{v}"
        );
    }

    #[test]
    fn no_single_crossing_is_said_plainly_and_close_calls_flagged() {
        let v = verdict(&points([
            (900.0, 800.0),
            (320.0, 400.0),
            (190.0, 185.0),
            (180.0, 200.0),
        ]));
        assert!(v.contains("no single break-even size"), "{v}");
        assert!(v.contains("less CPU at 16 KiB and 1 MiB"), "{v}");
        assert!(
            v.contains("At 1 MiB the two differ by less than 10 %"),
            "{v}"
        );
    }

    #[test]
    fn sizes_read_as_words() {
        assert_eq!(human(16 << 10), "16 KiB");
        assert_eq!(human(16 << 20), "16 MiB");
        assert_eq!(
            list(&[16 << 10, 64 << 10, 1 << 20]),
            "16 KiB, 64 KiB and 1 MiB"
        );
        assert_eq!(human_round(3.3 * 1048576.0), "3.3 MiB");
        assert_eq!(human_round(262144.0), "260 KiB");
        assert_eq!(human_round(5.0 * 1024.0), "5 KiB");
        assert_eq!(human_round(100.0), "1 KiB");
        assert_eq!(median([3.0, 1.0, 2.0].into_iter()), 2.0);
        assert_eq!(median([4.0, 1.0].into_iter()), 2.5);
    }
}
