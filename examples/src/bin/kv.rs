//! `kv`: the command-line client of `kv-server`. See `examples/README.md`.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pagerpc::{CallOptions, PageBuf};
use pagerpc_examples::kv::{self, BenchOptions, KvClient, ListRequest};
use pagerpc_examples::util::{call_error, human_bytes, parse_size};

/// Client for kv-server.
#[derive(Parser, Debug)]
#[command(name = "kv", version)]
struct Args {
    /// Server address.
    #[arg(long, global = true, default_value = "127.0.0.1:7070")]
    addr: String,
    /// Zero-copy receive and send (on by default).
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set)]
    zerocopy: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Store the contents of FILE (or stdin: `-` or no FILE) under KEY.
    Put {
        /// The key.
        key: String,
        /// The file to store; `-` or nothing reads stdin.
        file: Option<PathBuf>,
    },
    /// Print the value of KEY (or write it to FILE with -o).
    Get {
        /// The key.
        key: String,
        /// Write the value here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Delete KEY.
    Del {
        /// The key.
        key: String,
    },
    /// List keys (with their sizes) starting with PREFIX, in byte order, as
    /// the server streams them. Exits with an error, after the keys already
    /// printed, if the listing is cut short.
    Ls {
        /// Only keys starting with this.
        #[arg(default_value = "")]
        prefix: String,
        /// Most keys to list (0: all of them).
        #[arg(long, default_value_t = 0)]
        limit: u64,
    },
    /// Show the server's store and transfer statistics.
    Stats,
    /// Measure PUT/GET throughput and latency.
    Bench {
        /// Concurrent clients (one connection and thread each).
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Bytes per value, e.g. 4096, 64k, 1MiB.
        #[arg(long, default_value = "4KiB", value_parser = parse_size)]
        value_size: u64,
        /// Operations in all (half PUTs, half GETs).
        #[arg(long, default_value_t = 100_000)]
        ops: u64,
        /// Distinct keys per client.
        #[arg(long, default_value_t = 16)]
        keys: u64,
    },
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to nothing"))
}

fn read_input(file: Option<&PathBuf>) -> Result<PageBuf, String> {
    match file {
        Some(p) if p.as_os_str() != "-" => {
            let mut f = File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
            let len = f
                .metadata()
                .map_err(|e| format!("cannot stat {}: {e}", p.display()))?
                .len() as usize;
            // Read straight into page-aligned memory so the send is zero-copy.
            let mut buf = PageBuf::new(len).map_err(|e| e.to_string())?;
            f.read_exact(&mut buf)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            Ok(buf)
        }
        _ => {
            let mut v = Vec::new();
            io::stdin()
                .read_to_end(&mut v)
                .map_err(|e| format!("cannot read stdin: {e}"))?;
            let mut buf = PageBuf::new(v.len()).map_err(|e| e.to_string())?;
            buf.copy_from_slice(&v);
            Ok(buf)
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let addr = resolve(&args.addr)?;
    if let Cmd::Bench {
        clients,
        value_size,
        ops,
        keys,
    } = args.cmd
    {
        let report = kv::bench(
            addr,
            &BenchOptions {
                clients,
                value_size: value_size as usize,
                ops,
                keys_per_client: keys,
                zerocopy: args.zerocopy,
                progress: true,
            },
        )?;
        println!("{report}");
        return Ok(());
    }
    let c = KvClient::connect(addr, args.zerocopy)
        .map_err(|e| format!("cannot connect to {addr}: {e} (is kv-server running?)"))?;
    match args.cmd {
        Cmd::Put { key, file } => {
            let value = read_input(file.as_ref())?;
            let len = value.len();
            let r = c
                .put(&key, value)
                .map_err(|e| format!("put '{key}' failed: {}", call_error(&e)))?;
            eprintln!(
                "stored '{key}' ({}){}",
                human_bytes(len as u64),
                if r.replaced {
                    format!(", replacing {}", human_bytes(r.old_len))
                } else {
                    String::new()
                }
            );
        }
        Cmd::Get { key, output } => {
            let v = c
                .get(&key)
                .map_err(|e| format!("get '{key}' failed: {}", call_error(&e)))?
                .ok_or_else(|| format!("no key '{key}'"))?;
            match output {
                Some(p) if p.as_os_str() != "-" => std::fs::write(&p, &*v)
                    .map_err(|e| format!("cannot write {}: {e}", p.display()))?,
                _ => io::stdout()
                    .lock()
                    .write_all(&v)
                    .map_err(|e| format!("cannot write stdout: {e}"))?,
            }
        }
        Cmd::Del { key } => {
            let r = c
                .delete(&key)
                .map_err(|e| format!("del '{key}' failed: {}", call_error(&e)))?;
            if !r.existed {
                return Err(format!("no key '{key}'"));
            }
            eprintln!("deleted '{key}' (freed {})", human_bytes(r.freed));
        }
        Cmd::Ls { prefix, limit } => {
            let mut out = io::BufWriter::new(io::stdout().lock());
            let mut listed = 0u64;
            let mut more = false;
            // With a limit, ask for one more key than shown, to tell
            // whether more match; the listing still runs to its end, so a
            // listing cut short is an error even then.
            let req = ListRequest {
                prefix,
                limit: if limit == 0 {
                    0
                } else {
                    limit.saturating_add(1)
                },
                start_after: String::new(),
            };
            for e in c.list(&req, &CallOptions::default()) {
                let e = match e {
                    Ok(e) => e,
                    Err(e) => {
                        // What was printed stays printed; the error says
                        // the list is incomplete.
                        let _ = out.flush();
                        return Err(format!(
                            "ls failed after {listed} keys, the list is incomplete: {}",
                            call_error(&e)
                        ));
                    }
                };
                if limit > 0 && listed == limit {
                    more = true;
                    continue;
                }
                writeln!(out, "{:>12}  {}", e.len, e.key)
                    .map_err(|e| format!("cannot write stdout: {e}"))?;
                listed += 1;
            }
            out.flush()
                .map_err(|e| format!("cannot write stdout: {e}"))?;
            if more {
                eprintln!("(more keys match; raise --limit to see them)");
            } else if listed == 0 {
                eprintln!("(no keys)");
            }
        }
        Cmd::Stats => {
            let s = c
                .stats()
                .map_err(|e| format!("stats failed: {}", call_error(&e)))?;
            println!("keys            {}", s.keys);
            println!(
                "bytes           {} ({} bytes) of {} cap ({} bytes)",
                human_bytes(s.bytes),
                s.bytes,
                human_bytes(s.max_bytes),
                s.max_bytes
            );
            println!(
                "memory          {} held by {} of values ({} compacted, {} in mappings of their own)",
                human_bytes(s.memory),
                human_bytes(s.value_bytes),
                s.compacted,
                s.own_mappings
            );
            println!(
                "operations      {} puts ({} refused), {} gets, {} deletes",
                s.puts, s.puts_refused, s.gets, s.deletes
            );
            println!(
                "received        {} payload bytes: {} mapped, {} copied ({:.1} % mmap'ed)",
                s.payload_bytes_received,
                s.bytes_mapped,
                s.bytes_copied,
                s.mapped_percent()
            );
            println!(
                "sent            {} payload bytes ({} MSG_ZEROCOPY sends, {} of them copied by the kernel)",
                s.payload_bytes_sent, s.zc_sends, s.zc_send_copied
            );
            println!(
                "listings        {} completed, {} cut short, {} under way ({} of keys sent)",
                s.lists_completed,
                s.lists_cut_short,
                s.lists_open,
                human_bytes(s.list_bytes_sent)
            );
        }
        Cmd::Bench { .. } => unreachable!("handled above"),
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kv: {e}");
            ExitCode::FAILURE
        }
    }
}
