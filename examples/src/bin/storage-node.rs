//! `storage-node`: a blob storage node over pagerpc (`serve`) and its
//! client (`put`, `get`, `ls`, `rm`, `stats`). See `examples/README.md`.
#![forbid(unsafe_code)]

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pagerpc_examples::storage::{ClientOptions, NodeConfig, StorageClient, StorageNode};
use pagerpc_examples::util::{human_bytes, parse_size};

/// Blob storage over pagerpc: O_DIRECT on disk, CRC32C end to end, each
/// transfer one stream under pagerpc's per-stream credit, rendezvous
/// placement.
#[derive(Parser, Debug)]
#[command(name = "storage-node", version)]
struct Args {
    /// Nodes to use, comma-separated (client commands).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:7100"
    )]
    nodes: Vec<String>,
    /// Copies of each blob, on the top-ranked nodes (client commands).
    #[arg(long, global = true, default_value_t = 1)]
    replicas: usize,
    /// Chunk size for PUTs (a page multiple, 64KiB to 64MiB).
    #[arg(long, global = true, default_value = "4MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Zero-copy receive and send (on by default).
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    zerocopy: bool,
    /// No progress bars.
    #[arg(long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a node.
    Serve {
        /// Directory for the blobs (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:7100")]
        listen: String,
        /// Server pool threads (connection I/O and unary calls; each stream
        /// has a thread of its own).
        #[arg(long)]
        threads: Option<usize>,
        /// Bytes a client may send on one stream before the node releases
        /// some (the upload's flow control).
        #[arg(long, default_value = "16MiB", value_parser = parse_size)]
        stream_window: u64,
        /// Most streams open at once: uploads, reads and listings (must be
        /// larger than --max-uploads).
        #[arg(long, default_value_t = 256)]
        max_streams: usize,
        /// Use buffered I/O instead of O_DIRECT.
        #[arg(long)]
        no_direct: bool,
        /// Largest blob accepted (blobs must also fit the free disk space).
        #[arg(long, default_value = "1TiB", value_parser = parse_size)]
        max_blob_bytes: u64,
        /// Most uploads under way on the node (2 file descriptors and a
        /// stream each).
        #[arg(long, default_value_t = 128)]
        max_uploads: usize,
        /// Most uploads under way from one connection.
        #[arg(long, default_value_t = 16)]
        max_uploads_per_conn: usize,
        /// Most blob files kept open for reads (1 file descriptor each).
        #[arg(long, default_value_t = 128)]
        max_open_blobs: usize,
    },
    /// Store FILE as a blob (id: the file name unless --id).
    Put {
        /// The file to store.
        file: PathBuf,
        /// Blob id (A-Z a-z 0-9 . _ -).
        #[arg(long)]
        id: Option<String>,
    },
    /// Fetch blob ID into FILE.
    Get {
        /// Blob id.
        id: String,
        /// Where to write it.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List blobs over all nodes.
    Ls,
    /// Delete blob ID from every node.
    Rm {
        /// Blob id.
        id: String,
    },
    /// Show each node's statistics.
    Stats,
}

fn resolve(addrs: &[String]) -> Result<Vec<SocketAddr>, String> {
    addrs
        .iter()
        .map(|a| {
            a.to_socket_addrs()
                .map_err(|e| format!("cannot resolve {a}: {e}"))?
                .next()
                .ok_or_else(|| format!("{a} resolves to nothing"))
        })
        .collect()
}

fn serve(args: &Args) -> Result<(), String> {
    let Cmd::Serve {
        dir,
        listen,
        threads,
        stream_window,
        max_streams,
        no_direct,
        max_blob_bytes,
        max_uploads,
        max_uploads_per_conn,
        max_open_blobs,
    } = &args.cmd
    else {
        unreachable!("serve only")
    };
    let mut cfg = NodeConfig::new(dir);
    cfg.zerocopy = args.zerocopy;
    if let Some(t) = threads {
        cfg.threads = *t;
    }
    cfg.stream_window = *stream_window;
    cfg.max_streams = *max_streams;
    cfg.direct_io = !no_direct;
    cfg.max_blob_bytes = *max_blob_bytes;
    cfg.max_uploads = *max_uploads;
    cfg.max_uploads_per_conn = *max_uploads_per_conn;
    cfg.max_open_blobs = *max_open_blobs;
    let node = StorageNode::start(listen.as_str(), cfg)
        .map_err(|e| format!("cannot serve {} on {listen}: {e}", dir.display()))?;
    eprintln!(
        "storage-node: serving {} on {} ({}, zero-copy {}{})",
        dir.display(),
        node.local_addr(),
        if node.direct_io() {
            "O_DIRECT"
        } else {
            "buffered I/O: O_DIRECT refused or off"
        },
        if args.zerocopy { "on" } else { "off" },
        match node.temps_removed_at_start() {
            0 => String::new(),
            n => format!(", removed {n} unfinished uploads"),
        }
    );
    loop {
        std::thread::park();
    }
}

fn run(args: Args) -> Result<(), String> {
    if matches!(args.cmd, Cmd::Serve { .. }) {
        return serve(&args);
    }
    let nodes = resolve(&args.nodes)?;
    let mut opts = ClientOptions::new(nodes.clone());
    opts.replicas = args.replicas;
    opts.chunk_size = args.chunk_size;
    opts.zerocopy = args.zerocopy;
    opts.progress = !args.quiet;
    let client = StorageClient::new(opts).on_warning(|m| eprintln!("storage-node: warning: {m}"));
    match &args.cmd {
        Cmd::Serve { .. } => unreachable!("handled above"),
        Cmd::Put { file, id } => {
            let id = match id {
                Some(i) => i.clone(),
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{} has no file name; pass --id", file.display()))?,
            };
            let r = client.put_file(file, &id).map_err(|e| e.to_string())?;
            let on: Vec<String> = r.stored_on.iter().map(ToString::to_string).collect();
            eprintln!(
                "stored '{}' ({}, crc32c {:#010x}) on {} in {:.2} s ({}/s); nodes mapped {:.1} % \
                 of the bytes they received",
                r.id,
                human_bytes(r.size),
                r.crc32c,
                on.join(", "),
                r.elapsed.as_secs_f64(),
                human_bytes(r.bytes_per_sec() as u64),
                r.node_mapped_percent()
            );
        }
        Cmd::Get { id, output } => {
            let r = client.get_to_file(id, output).map_err(|e| e.to_string())?;
            let from: Vec<String> = r
                .served_by
                .iter()
                .map(|(a, n)| format!("{a} ({})", human_bytes(*n)))
                .collect();
            eprintln!(
                "read '{}' ({}, crc32c {:#010x} ok) from {} in {:.2} s ({}/s); {:.1} % mmap'ed \
                 on receive",
                r.id,
                human_bytes(r.size),
                r.crc32c,
                if from.is_empty() {
                    "nowhere (empty blob)".to_owned()
                } else {
                    from.join(" then ")
                },
                r.elapsed.as_secs_f64(),
                human_bytes(r.bytes_per_sec() as u64),
                r.mapped_percent()
            );
        }
        Cmd::Ls => {
            // Printed as the nodes' streams deliver the blobs, so a listing
            // of any length needs about one page per node of memory.
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let mut write_err = None;
            let n = client
                .list_each(|b| {
                    if write_err.is_some() {
                        return;
                    }
                    let nodes: Vec<String> = b.nodes.iter().map(ToString::to_string).collect();
                    let mut line = format!(
                        "{:>14}  {:#010x}  {}  [{}]",
                        b.info.size,
                        b.info.crc32c,
                        b.info.id,
                        nodes.join(", ")
                    );
                    if !b.stale.is_empty() {
                        let s: Vec<String> = b.stale.iter().map(ToString::to_string).collect();
                        line.push_str(&format!(" stale on [{}]", s.join(", ")));
                    }
                    for (a, p) in &b.problems {
                        line.push_str(&format!(" PROBLEM on {a}: {p}"));
                    }
                    if let Err(e) = writeln!(out, "{line}") {
                        write_err = Some(e);
                    }
                })
                .map_err(|e| e.to_string())?;
            if let Some(e) = write_err.or_else(|| out.flush().err()) {
                return Err(format!("writing the listing: {e}"));
            }
            if n == 0 {
                eprintln!("(no blobs)");
            }
        }
        Cmd::Rm { id } => {
            let had = client.delete(id).map_err(|e| e.to_string())?;
            let on: Vec<String> = had.iter().map(ToString::to_string).collect();
            eprintln!("deleted '{id}' from {}", on.join(", "));
        }
        Cmd::Stats => {
            let mut any = false;
            for a in &nodes {
                match client.node_stats(*a) {
                    Ok(s) => {
                        any = true;
                        println!(
                            "{a}: {} blobs, {}; {} uploads under way; {}; received {} ({:.1} % \
                             mmap'ed), sent {}; {} chunks copied before O_DIRECT; {} corrupt \
                             chunks read; {} uploads rejected, {} cut short, {} refused by \
                             a limit; {} blob files open",
                            s.blobs,
                            human_bytes(s.bytes),
                            s.uploads,
                            if s.direct_io {
                                "O_DIRECT"
                            } else {
                                "buffered I/O"
                            },
                            human_bytes(s.payload_bytes_received),
                            s.mapped_percent(),
                            human_bytes(s.payload_bytes_sent),
                            s.direct_write_copies,
                            s.corrupt_chunks_read,
                            s.uploads_rejected,
                            s.uploads_cut_short,
                            s.uploads_refused,
                            s.open_blobs
                        );
                    }
                    Err(e) => eprintln!("storage-node: warning: {e}"),
                }
            }
            if !any {
                return Err("no node answered".into());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storage-node: error: {e}");
            ExitCode::FAILURE
        }
    }
}
