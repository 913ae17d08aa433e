//! `pagerpc doctor`: tells whether this machine can receive pagerpc payloads
//! without copying them, and if bytes were copied, why, in plain words.
#![forbid(unsafe_code)]

use std::time::Instant;

use clap::{Parser, Subcommand};
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    Client, ClientConfig, CountersSnapshot, PageBuf, Pages, Payload, SegmentAlign, Server,
    ServerConfig, Status,
};

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
    },
}

fn main() {
    let Cli {
        cmd:
            Cmd::Doctor {
                mss,
                no_zerocopy_send,
                size_kib,
                count,
            },
    } = Cli::parse();
    if let Err(e) = doctor(mss, !no_zerocopy_send, size_kib * 1024, count) {
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
    out
}
