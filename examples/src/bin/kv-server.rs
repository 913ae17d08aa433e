//! `kv-server`: an in-memory key-value server over pagerpc that keeps the
//! payload pages it receives as its values. See `examples/README.md`.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use pagerpc_examples::kv::{KvConfig, KvServer};
use pagerpc_examples::util::{human_bytes, parse_size};

/// An in-memory key-value server; values are kept as the received pages.
#[derive(Parser, Debug)]
#[command(name = "kv-server", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: String,
    /// Memory cap: most bytes (keys plus values) to hold, e.g. 512MiB.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    max_bytes: u64,
    /// Zero-copy receive and send (on by default; `--zerocopy false` turns it off).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    zerocopy: bool,
    /// Server pool threads (default: the number of CPUs, at least 2).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = KvConfig {
        max_bytes: args.max_bytes,
        zerocopy: args.zerocopy,
        threads: args.threads,
    };
    let server = match KvServer::start(args.listen.as_str(), &cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kv-server: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "kv-server: listening on {} (zero-copy {}, memory cap {})",
        server.local_addr(),
        if cfg.zerocopy { "on" } else { "off" },
        human_bytes(cfg.max_bytes)
    );
    // Serve until killed.
    loop {
        std::thread::park();
    }
}
