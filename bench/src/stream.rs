//! `pagerpc-bench stream`: a client stream and a server stream over
//! loopback, each measured in the process that receives it.
//!
//! - Client stream: `bulk`'s server (this process) with the sender child
//!   sending everything as one client stream (`bulk-send --stream`).
//! - Server stream: a child process (`serve-stream`) serves one server
//!   stream; this process is the client, receives and drops.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use pagerpc::{CallOptions, Client, Payload, Server, Status};

use crate::{bulk, child, empty, pin, BulkOpts, Direction, Pin, Res, Transfer};
use pagerpc_bench::meter::Meter;

/// Runs the streams `direction` asks for.
pub fn run(
    t: &Transfer,
    direction: Direction,
    threads: usize,
    min_mapped: Option<f64>,
    pin: Pin,
) -> Res {
    let sender_cpus = pin::receiver(pin.receiver_cpu, pin.sender_cpu)?;
    let sender_cpus = sender_cpus.as_deref();
    if direction != Direction::Server {
        let o = BulkOpts {
            t: t.clone(),
            inflight: 1,
            stream: true,
            threads,
            tlb_hint: true,
            mmap: false,
            min_mapped,
        };
        bulk(&o, false, sender_cpus)?;
    }
    if direction != Direction::Client {
        server_stream(t, threads, min_mapped, sender_cpus)?;
    }
    Ok(())
}

/// The server stream: this process receives.
fn server_stream(
    t: &Transfer,
    threads: usize,
    min_mapped: Option<f64>,
    sender_cpus: Option<&str>,
) -> Res {
    let mut cmd = child("serve-stream")?;
    cmd.args(t.args()).args(["--threads", &threads.to_string()]);
    if let Some(c) = sender_cpus {
        cmd.args(["--cpus", c]);
    }
    let mut server = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
    let mut line = String::new();
    if let Some(out) = server.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    let addr: std::net::SocketAddr = line
        .trim()
        .parse()
        .map_err(|e| format!("serve-stream printed {line:?}, not its address: {e}"))?;
    let meter = Meter::start()?;
    let client = Client::connect_with(addr, t.client_config())?;
    let mut rx = client.server_stream(
        "bulk.source",
        &empty(),
        Payload::Empty,
        &CallOptions::default(),
    )?;
    let (mut bytes, mut bad) = (0u64, 0usize);
    while let Some(m) = rx.recv()? {
        bad += usize::from(m.payload.len() != t.size());
        bytes += m.payload.len() as u64;
    }
    let sample = meter.stop(bytes)?;
    drop(server.stdin.take());
    let status = server.wait()?;
    if !status.success() {
        return Err(format!("server process failed: {status}").into());
    }
    let want = (t.count() * t.size()) as u64;
    if bytes != want || bad != 0 {
        return Err(format!("received {bytes} bytes, expected {want}").into());
    }
    println!("{}", sample.line("server-stream"));
    Ok(sample.check_mapped(min_mapped)?)
}

/// The `serve-stream` child: serves `bulk.source`, a server stream of
/// `t.count()` messages of `t.size()` bytes, until its stdin closes.
pub fn serve(t: &Transfer, threads: usize, cpus: Option<&str>) -> Res {
    if let Some(c) = cpus {
        pin::apply(c)?;
    }
    let pages = t.payload()?;
    let n = t.count();
    let mut cfg = t.server_config();
    cfg.threads = threads.max(1);
    let server = Server::builder()
        .config(cfg)
        .register_server_stream("bulk.source", move |_ctx, _req, _pages, tx| {
            let body = pagerpc::prost::Message::encode_to_vec(&empty());
            for _ in 0..n {
                tx.send_raw(body.clone(), Payload::Pages(pages.clone()))
                    .map_err(Status::from)?;
            }
            Ok(Vec::new())
        })
        .bind("127.0.0.1:0")?;
    println!("{}", server.local_addr());
    // Wait for the parent to close stdin (or die).
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink())?;
    server.shutdown();
    Ok(())
}
