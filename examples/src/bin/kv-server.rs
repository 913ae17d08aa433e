//! `kv-server`: an in-memory key-value server over pagerpc that keeps the
//! payload pages it receives as its values. See `examples/README.md`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pagerpc_examples::kv::{self, KvConfig, KvServer};
use pagerpc_examples::util::{human_bytes, parse_size};

/// An in-memory key-value server; values are kept as the received pages.
#[derive(Parser, Debug)]
#[command(name = "kv-server", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Memory cap: most bytes to hold, e.g. 512MiB. Each entry counts its
    /// key, the memory its value holds (whole pages, or its pool slot once
    /// compacted) and a fixed bookkeeping cost.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    max_bytes: u64,
    /// Copy values of at most this size (64KiB at most takes effect) into
    /// a shared pool instead of keeping the pages they arrived in, each of
    /// which is a mapping of its own; 0 keeps every value as received.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    compact_below: u64,
    /// Zero-copy receive and send (on by default; `--zerocopy false` turns it off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    zerocopy: bool,
    /// Server pool threads (default: the number of CPUs, at least 2).
    #[arg(long)]
    threads: Option<usize>,
}

/// Warns when the cap lets values that keep a mapping of their own (those
/// not compacted) come near the process's `vm.max_map_count`, past which
/// no value can be mapped or compacted and the server falls back to
/// copying into what memory it has.
fn warn_about_mappings(cfg: &KvConfig) {
    let Some(max_maps) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    // The smallest value that is not compacted holds this much.
    let smallest = (cfg.compact_below.min(kv::DEFAULT_COMPACT_BELOW) as u64 + 1)
        .next_multiple_of(4096)
        + kv::ENTRY_OVERHEAD;
    let worst = cfg.max_bytes / smallest;
    if worst > max_maps / 2 {
        eprintln!(
            "kv-server: warning: the cap lets up to {worst} values keep a mapping each \
             (values over {} are not compacted), near vm.max_map_count ({max_maps})",
            human_bytes(cfg.compact_below.min(kv::DEFAULT_COMPACT_BELOW) as u64)
        );
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = KvConfig {
        max_bytes: args.max_bytes,
        zerocopy: args.zerocopy,
        threads: args.threads,
        compact_below: usize::try_from(args.compact_below).unwrap_or(usize::MAX),
    };
    warn_about_mappings(&cfg);
    let server = match KvServer::start(args.listen.as_str(), &cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kv-server: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "kv-server: listening on {} (zero-copy {}, memory cap {}, compacting values up to {})",
        server.local_addr(),
        if cfg.zerocopy { "on" } else { "off" },
        human_bytes(cfg.max_bytes),
        human_bytes(cfg.compact_below.min(kv::DEFAULT_COMPACT_BELOW) as u64)
    );
    // Serve until killed.
    loop {
        std::thread::park();
    }
}
