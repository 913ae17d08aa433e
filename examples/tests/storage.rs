//! The storage node on one machine: real files in a temp dir, real
//! loopback sockets, `O_DIRECT` on the temp dir's filesystem.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{addr_in, sha256_file, spawn_and_wait_for, wait_until, write_random_file, TempDir};
use pagerpc::prost::Message;
use pagerpc::{CallError, CallOptions, Client, ClientConfig, Code, Payload, PendingCall};
use pagerpc_examples::storage::format::BlobHeader;
use pagerpc_examples::storage::{
    method, BlobInfo, BlobList, BlobRef, ClientOptions, Empty, GetChunk, GetChunkResponse,
    ListRequest, NodeConfig, NodeStats, PutBegin, PutBeginResponse, PutChunk, PutChunkResponse,
    PutCommit, StorageClient, StorageNode, UploadRef,
};
use pagerpc_examples::util::FastRng;

fn node(dir: &std::path::Path) -> StorageNode {
    StorageNode::start("127.0.0.1:0", NodeConfig::new(dir)).unwrap()
}

fn client(nodes: &[&StorageNode]) -> (StorageClient, Arc<Mutex<Vec<String>>>) {
    let mut opts = ClientOptions::new(nodes.iter().map(|n| n.local_addr()).collect());
    opts.progress = false;
    let warnings = Arc::new(Mutex::new(Vec::new()));
    let w = warnings.clone();
    let c = StorageClient::new(opts).on_warning(move |m| w.lock().unwrap().push(m.to_owned()));
    (c, warnings)
}

fn visible_files(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn one_gib_file_round_trips_with_the_same_sha256() {
    let tmp = TempDir::new("gib");
    let n = node(&tmp.join("node"));
    assert!(
        n.direct_io(),
        "the temp dir's filesystem should take O_DIRECT"
    );
    let (c, warnings) = client(&[&n]);
    let src = tmp.join("src.bin");
    let dst = tmp.join("dst.bin");
    let size = 1u64 << 30;
    let want = write_random_file(&src, size, 1);
    let put = c.put_file(&src, "big").unwrap();
    assert_eq!(put.size, size);
    assert_eq!(put.stored_on, vec![n.local_addr()]);
    let get = c.get_to_file("big", &dst).unwrap();
    assert_eq!(sha256_file(&dst), want, "SHA-256 of the copy");
    assert_eq!(get.crc32c, put.crc32c);
    assert!(warnings.lock().unwrap().is_empty(), "{warnings:?}");
    let stats = n.stats().unwrap();
    assert_eq!(
        stats.direct_write_copies, 0,
        "O_DIRECT wrote from the received pages"
    );
    println!(
        "storage loopback: PUT 1 GiB in {:.2} s = {:.0} MiB/s, node mapped {:.1} %; GET in {:.2} s = \
         {:.0} MiB/s, client mapped {:.1} %",
        put.elapsed.as_secs_f64(),
        put.bytes_per_sec() / (1 << 20) as f64,
        put.node_mapped_percent(),
        get.elapsed.as_secs_f64(),
        get.bytes_per_sec() / (1 << 20) as f64,
        get.mapped_percent()
    );
    fs::remove_file(&src).unwrap();
    fs::remove_file(&dst).unwrap();
}

#[test]
fn odd_sizes_round_trip_with_tails_and_small_chunks() {
    let tmp = TempDir::new("odd");
    let n = node(&tmp.join("node"));
    let (c, _) = client(&[&n]);
    let mut opts = c.options().clone();
    opts.chunk_size = 64 << 10;
    let c = StorageClient::new(opts);
    let cs = 64u64 << 10;
    for (i, size) in [
        0,
        1,
        4095,
        4096,
        4097,
        cs - 1,
        cs,
        cs + 1,
        3 * cs + 123,
        5 << 20,
    ]
    .into_iter()
    .enumerate()
    {
        let src = tmp.join(&format!("src{i}"));
        let dst = tmp.join(&format!("dst{i}"));
        let want = write_random_file(&src, size, i as u64);
        let id = format!("odd-{i}");
        c.put_file(&src, &id).unwrap();
        let blob = fs::metadata(n.blob_path(&id)).unwrap().len();
        assert_eq!(blob, 4096 + size, "header page + data, size {size}");
        c.get_to_file(&id, &dst).unwrap();
        assert_eq!(sha256_file(&dst), want, "size {size}");
    }
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 10);
    assert!(listed.iter().all(|b| b.problems.is_empty()));
    // Replacing a blob publishes the new content whole.
    let src = tmp.join("src-replace");
    let want = write_random_file(&src, 200_000, 99);
    c.put_file(&src, "odd-3").unwrap();
    let dst = tmp.join("dst-replace");
    c.get_to_file("odd-3", &dst).unwrap();
    assert_eq!(sha256_file(&dst), want);
    // Delete, then it is gone everywhere.
    assert_eq!(c.delete("odd-3").unwrap(), vec![n.local_addr()]);
    assert_eq!(
        c.get_to_file("odd-3", &dst).unwrap_err().code,
        Code::NotFound
    );
    assert_eq!(c.delete("odd-3").unwrap_err().code, Code::NotFound);
    assert!(!visible_files(n.dir()).iter().any(|f| f.starts_with(".tmp")));
}

#[test]
fn a_client_that_dies_mid_put_leaves_no_visible_blob() {
    let tmp = TempDir::new("dead");
    let dir = tmp.join("node");
    let mut cfg = NodeConfig::new(&dir);
    cfg.upload_timeout = Duration::from_millis(500);
    let n = StorageNode::start("127.0.0.1:0", cfg).unwrap();

    // 1. A client drops its connection after a few chunks of 8.
    let cs = 1u64 << 20;
    let raw = Client::connect_with(n.local_addr(), ClientConfig::zerocopy()).unwrap();
    let begin: PutBeginResponse = raw
        .call(
            method::PUT_BEGIN,
            &PutBegin {
                id: "half".into(),
                size: 8 * cs,
                crc32c: None,
                chunk_size: cs,
                version: 1,
            },
            Payload::Empty,
        )
        .unwrap()
        .message;
    assert!(begin.credits >= 1);
    for i in 0..3 {
        let chunk = vec![i as u8; cs as usize];
        raw.call::<_, PutChunkResponse>(
            method::PUT_CHUNK,
            &PutChunk {
                upload: begin.upload,
                offset: i * cs,
                crc32c: Some(crc32c::crc32c(&chunk)),
            },
            chunk,
        )
        .unwrap();
    }
    let files = visible_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(".tmp-half-"), "{files:?}");
    drop(raw);
    let (c, _) = client(&[&n]);
    assert!(c.list().unwrap().is_empty(), "no blob is visible");
    assert!(!n.blob_path("half").exists());
    assert!(
        wait_until(Duration::from_secs(5), || visible_files(&dir).is_empty()),
        "the idle upload's temporary file is removed: {:?}",
        visible_files(&dir)
    );
    assert_eq!(n.stats().unwrap().uploads_expired, 1);

    // 2. A `storage-node put` process killed with SIGKILL mid-transfer.
    let src = tmp.join("src.bin");
    write_random_file(&src, 256 << 20, 5);
    let before = n.counters().payload_bytes_received;
    let mut child = Command::new(env!("CARGO_BIN_EXE_storage-node"))
        .args([
            "--nodes",
            &n.local_addr().to_string(),
            "--chunk-size",
            "64KiB",
            "--quiet",
            "put",
            src.to_str().unwrap(),
            "--id",
            "killed",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || n
            .counters()
            .payload_bytes_received
            > before + (1 << 20)),
        "the child started sending"
    );
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert!(!status.success(), "the put was killed before it finished");
    assert!(c.list().unwrap().is_empty(), "no blob is visible");
    assert!(!n.blob_path("killed").exists());
    assert!(
        wait_until(Duration::from_secs(5), || visible_files(&dir).is_empty()),
        "temporary file removed: {:?}",
        visible_files(&dir)
    );

    // 3. A node that died mid-upload removes the temporary files at startup.
    drop(n);
    fs::write(dir.join(".tmp-crashed-0123456789abcdef"), b"partial").unwrap();
    let n = node(&dir);
    assert_eq!(n.temps_removed_at_start(), 1);
    assert!(visible_files(&dir).is_empty());
}

#[test]
fn corrupting_one_byte_on_disk_makes_get_fail_its_checksum() {
    let tmp = TempDir::new("corrupt");
    let n = node(&tmp.join("node"));
    let (c, _) = client(&[&n]);
    let src = tmp.join("src.bin");
    write_random_file(&src, 10 << 20, 3);
    c.put_file(&src, "photo").unwrap();
    let path = n.blob_path("photo");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut hdr = vec![0u8; 4096];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let header = BlobHeader::decode(&hdr).unwrap();
    // Flip one byte in the middle of the second chunk.
    let at = header.len() + (6 << 20) + 12345;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
    drop(f);

    let dst = tmp.join("dst.bin");
    let e = c.get_to_file("photo", &dst).unwrap_err();
    assert_eq!(e.code, Code::DataLoss, "{e}");
    assert!(
        e.message.contains("corrupt")
            && e.message.contains("chunk 1")
            && e.message.contains("CRC32C"),
        "the error says what failed: {e}"
    );
    println!("corrupt blob: {e}");
    assert!(!dst.exists(), "no output file");
    assert!(
        !tmp.join("dst.bin.partial").exists(),
        "no partial file left"
    );
    assert_eq!(n.stats().unwrap().corrupt_chunks_read, 1);

    // A corrupt header is caught too, by its own checksum.
    c.put_file(&src, "doc").unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(n.blob_path("doc"))
        .unwrap();
    f.write_all_at(&[0xff], 20).unwrap();
    drop(f);
    // A fresh node (no cached header) reads it from disk.
    let dir = n.dir().to_owned();
    drop(n);
    let n = node(&dir);
    let (c, _) = client(&[&n]);
    let e = c.get_to_file("doc", &dst).unwrap_err();
    assert_eq!(e.code, Code::DataLoss, "{e}");
    assert!(e.message.contains("header"), "{e}");
    let listed = c.list().unwrap();
    let doc = listed.iter().find(|b| b.info.id == "doc").unwrap();
    assert_eq!(doc.problems.len(), 1, "ls flags the corrupt copy");
}

#[test]
fn checksum_mismatches_are_refused_and_discarded() {
    let tmp = TempDir::new("crc");
    let dir = tmp.join("node");
    let n = node(&dir);
    let raw = Client::connect(n.local_addr()).unwrap();
    let cs = 64u64 << 10;
    let data: Vec<u8> = {
        let mut v = vec![0u8; (cs + 100) as usize];
        FastRng::new(1).fill(&mut v);
        v
    };
    let begin = |id: &str| -> PutBeginResponse {
        raw.call(
            method::PUT_BEGIN,
            &PutBegin {
                id: id.into(),
                size: data.len() as u64,
                crc32c: None,
                chunk_size: cs,
                version: 1,
            },
            Payload::Empty,
        )
        .unwrap()
        .message
    };
    let chunk = |upload: u64, off: u64, crc: Option<u32>| {
        let end = (off + cs).min(data.len() as u64) as usize;
        raw.call::<_, PutChunkResponse>(
            method::PUT_CHUNK,
            &PutChunk {
                upload,
                offset: off,
                crc32c: crc,
            },
            data[off as usize..end].to_vec(),
        )
    };
    // A chunk whose CRC does not match its bytes is refused.
    let up = begin("a").upload;
    let e = chunk(up, 0, Some(12345)).unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(e.message().contains("CRC32C"), "{}", e.message());
    // A commit with the wrong whole-blob CRC is refused and discarded.
    chunk(up, 0, None).unwrap();
    chunk(up, cs, None).unwrap();
    let e = raw
        .call::<_, pagerpc_examples::storage::BlobInfo>(
            method::PUT_COMMIT,
            &PutCommit {
                upload: up,
                crc32c: Some(crc32c::crc32c(&data) ^ 1),
            },
            Payload::Empty,
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::DataLoss);
    assert!(e.message().contains("discarded"), "{}", e.message());
    assert!(visible_files(&dir).is_empty(), "{:?}", visible_files(&dir));
    // A commit with chunks missing is refused, and the upload can go on.
    let up = begin("b").upload;
    chunk(up, 0, None).unwrap();
    let commit = PutCommit {
        upload: up,
        crc32c: Some(crc32c::crc32c(&data)),
    };
    let e = raw
        .call::<_, pagerpc_examples::storage::BlobInfo>(method::PUT_COMMIT, &commit, Payload::Empty)
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    chunk(up, cs, None).unwrap();
    let info = raw
        .call::<_, pagerpc_examples::storage::BlobInfo>(method::PUT_COMMIT, &commit, Payload::Empty)
        .unwrap()
        .message;
    assert_eq!(info.size, data.len() as u64);
    assert!(n.blob_path("b").exists());
    // Bad ids and chunk sizes are refused up front.
    let e = raw
        .call::<_, PutBeginResponse>(
            method::PUT_BEGIN,
            &PutBegin {
                id: "../etc".into(),
                size: 1,
                crc32c: None,
                chunk_size: cs,
                version: 1,
            },
            Payload::Empty,
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = raw
        .call::<_, PutBeginResponse>(
            method::PUT_BEGIN,
            &PutBegin {
                id: "x".into(),
                size: 1,
                crc32c: None,
                chunk_size: 5000,
                version: 1,
            },
            Payload::Empty,
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[test]
fn credits_shrink_as_transfers_are_added() {
    let tmp = TempDir::new("credits");
    let mut cfg = NodeConfig::new(tmp.join("node"));
    cfg.max_credits = 8;
    cfg.memory_budget = 32 << 20;
    let n = StorageNode::start("127.0.0.1:0", cfg).unwrap();
    let raw = Client::connect(n.local_addr()).unwrap();
    let mut credits = Vec::new();
    for i in 0..4 {
        let r: PutBeginResponse = raw
            .call(
                method::PUT_BEGIN,
                &PutBegin {
                    id: format!("c{i}"),
                    size: 1 << 30,
                    crc32c: None,
                    chunk_size: 4 << 20,
                    version: 1,
                },
                Payload::Empty,
            )
            .unwrap()
            .message;
        credits.push(r.credits);
    }
    // 32 MiB of 4 MiB chunks: 8 for the first transfer, 4 each for two,
    // then 2, never below 1.
    assert_eq!(credits, vec![8, 4, 2, 2]);
}

#[test]
fn command_line_serve_put_get_ls_rm() {
    let tmp = TempDir::new("cli");
    let dir = tmp.join("node");
    let (mut server, line) = spawn_and_wait_for(
        env!("CARGO_BIN_EXE_storage-node"),
        &[
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        "serving",
    );
    assert!(line.contains("O_DIRECT"), "{line}");
    let addr = addr_in(&line);
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_storage-node"))
            .args(["--nodes", &addr])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let src = tmp.join("report.pdf");
    let want = write_random_file(&src, 9_000_001, 8);
    let (ok, _, err) = run(&["put", src.to_str().unwrap()]);
    assert!(ok && err.contains("stored 'report.pdf'"), "{err}");
    let dst = tmp.join("copy.pdf");
    let (ok, _, err) = run(&["get", "report.pdf", "-o", dst.to_str().unwrap()]);
    assert!(ok && err.contains("ok"), "{err}");
    assert_eq!(sha256_file(&dst), want);
    let (ok, out, _) = run(&["ls"]);
    assert!(
        ok && out.contains("9000001") && out.contains("report.pdf"),
        "{out}"
    );
    let (ok, out, _) = run(&["stats"]);
    assert!(ok && out.contains("1 blobs"), "{out}");
    let (ok, _, err) = run(&["rm", "report.pdf"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["get", "report.pdf", "-o", dst.to_str().unwrap()]);
    assert!(!ok && err.contains("no blob 'report.pdf'"), "{err}");
    server.kill().unwrap();
    server.wait().unwrap();
}

// ---------------------------------------------------------------------------
// Helpers for the regression tests below.

/// A `storage-node serve` process on a loopback port, killed on drop.
struct NodeProc {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl NodeProc {
    fn start(dir: &std::path::Path, extra: &[&str]) -> NodeProc {
        let mut args = vec![
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--threads",
            "4",
        ];
        args.extend_from_slice(extra);
        let (child, line) =
            spawn_and_wait_for(env!("CARGO_BIN_EXE_storage-node"), &args, "serving");
        NodeProc {
            child,
            addr: addr_in(&line).parse().unwrap(),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the node process, in KiB (`VmRSS`).
    fn rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .expect("VmRSS in /proc/PID/status");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Open file descriptors of the node process.
    fn fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn client(&self) -> StorageClient {
        let mut opts = ClientOptions::new(vec![self.addr]);
        opts.progress = false;
        StorageClient::new(opts).on_warning(|_| {})
    }

    /// Runs the `storage-node` client binary against this node.
    fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_storage-node"))
            .args(["--nodes", &self.addr.to_string(), "--quiet"])
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes blob `id` straight into `dir` in the on-disk format (the same
/// bytes a commit writes), with `header_id` recorded in its header
/// (`None`: a format-1 file, which records no id).
fn write_blob_file(
    dir: &std::path::Path,
    id: &str,
    header_id: Option<&str>,
    data: &[u8],
    version: u64,
) {
    let cs = 64u64 << 10;
    let chunk_crcs: Vec<u32> = data.chunks(cs as usize).map(crc32c::crc32c).collect();
    let header = BlobHeader {
        id: header_id.map(str::to_owned),
        size: data.len() as u64,
        crc32c: crc32c::crc32c(data),
        chunk_size: cs,
        version,
        chunk_crcs,
    };
    let mut bytes = header.encode().unwrap().to_vec();
    bytes.extend_from_slice(data);
    // Written aside and renamed in, as a node publishes a blob.
    let tmp = dir.join(format!(".tmp-helper-{id}"));
    fs::write(&tmp, &bytes).unwrap();
    fs::rename(&tmp, dir.join(format!("{id}.blob"))).unwrap();
}

fn begin_req(id: &str, size: u64) -> PutBegin {
    PutBegin {
        id: id.into(),
        size,
        crc32c: None,
        chunk_size: 64 << 10,
        version: 1,
    }
}

/// Starts `n` `put.begin` calls on `c` without waiting, then waits for all.
fn pipelined_begins(
    c: &Client,
    prefix: &str,
    n: usize,
) -> Vec<Result<PutBeginResponse, CallError>> {
    let calls: Vec<PendingCall> = (0..n)
        .map(|i| {
            let body = begin_req(&format!("{prefix}-{i}"), 1 << 20).encode_to_vec();
            c.start_call(
                method::PUT_BEGIN,
                body,
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap()
        })
        .collect();
    calls
        .into_iter()
        .map(|call| call.wait_typed::<PutBeginResponse>().map(|r| r.message))
        .collect()
}

fn get_chunk(
    c: &Client,
    id: &str,
    info: &BlobInfo,
) -> Result<(GetChunkResponse, Vec<u8>), CallError> {
    let r = c.call::<_, GetChunkResponse>(
        method::GET_CHUNK,
        &GetChunk {
            id: id.into(),
            offset: 0,
            len: info.size.min(info.chunk_size),
            version: info.version,
        },
        Payload::Empty,
    )?;
    Ok((r.message, r.payload.to_vec()))
}

fn get_begin(c: &Client, id: &str) -> Result<BlobInfo, CallError> {
    c.call::<_, BlobInfo>(
        method::GET_BEGIN,
        &BlobRef { id: id.into() },
        Payload::Empty,
    )
    .map(|r| r.message)
}

/// A small PUT and GET through the node, to show it still serves.
fn round_trip(c: &StorageClient, tmp: &TempDir, id: &str) {
    let src = tmp.join(&format!("{id}.src"));
    let dst = tmp.join(&format!("{id}.dst"));
    let want = write_random_file(&src, 300_000, 77);
    c.put_file(&src, id).unwrap();
    c.get_to_file(id, &dst).unwrap();
    assert_eq!(sha256_file(&dst), want);
}

// ---------------------------------------------------------------------------
// Regression tests.

/// `put.begin`'s size comes from the peer: an absurd one is refused by the
/// node's limits, naming the limit and the value, without allocating
/// anything for it (the old node allocated a CRC table of one entry per
/// announced chunk: 34 GB for 2^32-1 chunks, and died).
#[test]
fn put_begin_with_an_absurd_size_is_refused_without_allocating() {
    let tmp = TempDir::new("huge");
    let node = NodeProc::start(&tmp.join("node"), &[]);
    let raw = Client::connect(node.addr).unwrap();
    let stats = || -> NodeStats {
        raw.call(method::STATS, &Empty {}, Payload::Empty)
            .unwrap()
            .message
    };
    stats();
    let rss_before = node.rss_kib();
    let begin = |size: u64, chunk_size: u64| {
        raw.call::<_, PutBeginResponse>(
            method::PUT_BEGIN,
            &PutBegin {
                chunk_size,
                ..begin_req("huge", size)
            },
            Payload::Empty,
        )
        .unwrap_err()
    };
    // 2^60 bytes: over max_blob_bytes (default 1 TiB).
    let e = begin(1 << 60, 64 << 10);
    println!("put.begin of 2^60 bytes: {e}");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains("max_blob_bytes")
            && e.message().contains(&(1u64 << 60).to_string())
            && e.message().contains(&(1u64 << 40).to_string()),
        "the message names the limit and the value: {e}"
    );
    // (2^32 - 1) chunks of 64 KiB, the size that made the old node
    // allocate 34 GB.
    let e = begin(u64::from(u32::MAX) * (64 << 10), 64 << 10);
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("max_blob_bytes"), "{e}");
    assert!(
        node.rss_kib() < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {} KiB",
        node.rss_kib()
    );

    // A node without a size cap still refuses what does not fit its disk.
    let mut node = NodeProc::start(
        &tmp.join("uncapped"),
        &["--max-blob-bytes", &u64::MAX.to_string()],
    );
    let raw = Client::connect(node.addr).unwrap();
    let rss_before = node.rss_kib();
    for (size, cs) in [
        (1u64 << 60, 64u64 << 20),
        (u64::from(u32::MAX) * (64 << 10), 64 << 10),
    ] {
        let e = raw
            .call::<_, PutBeginResponse>(
                method::PUT_BEGIN,
                &PutBegin {
                    chunk_size: cs,
                    ..begin_req("huge", size)
                },
                Payload::Empty,
            )
            .unwrap_err();
        println!("put.begin of {size} bytes on a node without a size cap: {e}");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(
            e.message().contains("bytes free") && e.message().contains(&size.to_string()),
            "the message names the free space and the size: {e}"
        );
    }
    let rss_after = node.rss_kib();
    println!("node RSS: {rss_before} KiB before the absurd put.begin calls, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(node.alive(), "the node is still running");
    let s: NodeStats = raw
        .call(method::STATS, &Empty {}, Payload::Empty)
        .unwrap()
        .message;
    assert_eq!(s.uploads, 0);
    assert_eq!(s.uploads_refused, 2);
    round_trip(&node.client(), &tmp, "after-huge");
}

/// 1,000 concurrent uploads from one connection, then 1,000 more over 20
/// connections: refused past `max_uploads_per_conn` (16) and `max_uploads`
/// (128) with ResourceExhausted naming the limit, the node's descriptors
/// stay within 2 per upload, and it keeps serving.
#[test]
fn concurrent_uploads_are_bounded_per_connection_and_per_node() {
    let tmp = TempDir::new("uploads");
    let node = NodeProc::start(&tmp.join("node"), &[]);
    let client = node.client();
    round_trip(&client, &tmp, "existing");
    let fds_before = node.fds();

    let one = Client::connect(node.addr).unwrap();
    let results = pipelined_begins(&one, "one", 1000);
    let ok: Vec<u64> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|b| b.upload))
        .collect();
    assert_eq!(ok.len(), 16, "max_uploads_per_conn");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(
            e.message().contains("max_uploads_per_conn") && e.message().contains("is 16"),
            "{e}"
        );
    }
    println!(
        "1000 uploads on one connection: 16 accepted; {}",
        results.iter().find_map(|r| r.as_ref().err()).unwrap()
    );
    let fds_one = node.fds();

    let conns: Vec<Client> = (0..20)
        .map(|_| Client::connect(node.addr).unwrap())
        .collect();
    let mut accepted = vec![(0usize, ok)];
    let mut node_refusals = 0;
    for (i, c) in conns.iter().enumerate() {
        let results = pipelined_begins(c, &format!("many-{i}"), 50);
        let ok: Vec<u64> = results
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|b| b.upload))
            .collect();
        assert!(ok.len() <= 16);
        for e in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
            if e.message().contains("(max_uploads) is 128") {
                node_refusals += 1;
            } else {
                assert!(e.message().contains("max_uploads_per_conn"), "{e}");
            }
        }
        accepted.push((i + 1, ok));
    }
    let total: usize = accepted.iter().map(|(_, v)| v.len()).sum();
    assert_eq!(total, 128, "max_uploads");
    assert!(node_refusals > 0);
    let fds_peak = node.fds();
    println!(
        "node descriptors: {fds_before} before, {fds_one} with 16 uploads, {fds_peak} with 128 \
         uploads and 21 more connections ({node_refusals} begins refused by max_uploads)"
    );
    assert!(
        fds_peak <= fds_before + 2 * 128 + 21 + 8,
        "{fds_peak} descriptors open"
    );

    // The node keeps serving everything but new uploads.
    let s = client.node_stats(node.addr).unwrap();
    assert_eq!(s.uploads, 128);
    assert_eq!(s.uploads_refused, 2000 - 128);
    let dst = tmp.join("existing.again");
    client.get_to_file("existing", &dst).unwrap();
    assert_eq!(client.list().unwrap().len(), 1);

    // Aborted uploads give their descriptors and slots back.
    for (i, handles) in accepted {
        let c = if i == 0 { &one } else { &conns[i - 1] };
        for h in handles {
            c.call::<_, Empty>(method::PUT_ABORT, &UploadRef { upload: h }, Payload::Empty)
                .unwrap();
        }
    }
    drop(conns);
    drop(one);
    assert!(
        wait_until(Duration::from_secs(10), || node.fds() <= fds_before + 2),
        "descriptors back to {fds_before}: {}",
        node.fds()
    );
    round_trip(&client, &tmp, "after-uploads");
    assert!(
        !visible_files(&tmp.join("node"))
            .iter()
            .any(|f| f.starts_with(".tmp")),
        "no temporary file is left"
    );
}

/// The open-file cache never serves a file its path no longer names: an
/// overwrite or a delete between `get.begin` and the next `get.chunk`
/// (here by another process's rename or unlink, then through the node) is
/// seen by that read.
#[test]
fn a_blob_replaced_or_deleted_after_get_begin_is_not_served_stale() {
    let tmp = TempDir::new("stale");
    let dir = tmp.join("node");
    let n = node(&dir);
    let raw = Client::connect(n.local_addr()).unwrap();
    let old = common::value_bytes(100_000, 1);
    let new = common::value_bytes(100_000, 2);
    write_blob_file(&dir, "x", Some("x"), &old, 10);

    // get.begin opens (and caches) the file of version 10.
    let v10 = get_begin(&raw, "x").unwrap();
    assert_eq!(v10.version, 10);
    // Another process replaces the file (rename over it) before the read.
    write_blob_file(&dir, "x", Some("x"), &new, 11);
    let e = get_chunk(&raw, "x", &v10).unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("replaced"), "{e}");
    let v11 = get_begin(&raw, "x").unwrap();
    assert_eq!(v11.version, 11, "get.begin sees the new file");
    let (_, bytes) = get_chunk(&raw, "x", &v11).unwrap();
    assert!(bytes == new[..bytes.len()], "the new content is served");

    // Deleted by another process between get.begin and the read.
    fs::remove_file(dir.join("x.blob")).unwrap();
    let e = get_chunk(&raw, "x", &v11).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
    assert_eq!(get_begin(&raw, "x").unwrap_err().code(), Code::NotFound);

    // Overwritten and deleted through the node, between begin and read.
    let (c, _) = client(&[&n]);
    let src = tmp.join("src");
    write_random_file(&src, 100_000, 3);
    c.put_file(&src, "y").unwrap();
    let first = get_begin(&raw, "y").unwrap();
    get_chunk(&raw, "y", &first).unwrap();
    write_random_file(&src, 100_000, 4);
    c.put_file(&src, "y").unwrap();
    assert_eq!(
        get_chunk(&raw, "y", &first).unwrap_err().code(),
        Code::Aborted
    );
    let second = get_begin(&raw, "y").unwrap();
    c.delete("y").unwrap();
    assert_eq!(
        get_chunk(&raw, "y", &second).unwrap_err().code(),
        Code::NotFound
    );
}

/// `ls` over 5,000 blobs leaves the node's descriptors where they were
/// (the old cache kept every file it listed open, up to 1,024, and PUTs
/// then failed for want of descriptors); GETs keep at most
/// `max_open_blobs` (128) open.
#[test]
fn ls_over_5000_blobs_leaves_no_descriptors_open() {
    let tmp = TempDir::new("fds");
    let dir = tmp.join("node");
    fs::create_dir_all(&dir).unwrap();
    for i in 0..5000 {
        let id = format!("blob-{i:05}");
        write_blob_file(&dir, &id, Some(&id), &[i as u8; 100], 1);
    }
    let node = NodeProc::start(&dir, &[]);
    let fds_before = node.fds();
    let (ok, out, err) = node.run(&["ls"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 5000);
    // The node closes the finished client's connection on its own time.
    let settled = wait_until(Duration::from_secs(5), || node.fds() <= fds_before + 2);
    let fds_after_ls = node.fds();
    println!("node descriptors: {fds_before} before `ls` over 5000 blobs, {fds_after_ls} after");
    assert!(
        settled,
        "{fds_after_ls} descriptors open after ls, {fds_before} before"
    );
    let client = node.client();

    // Reading 300 different blobs keeps at most 128 files open.
    let raw = Client::connect(node.addr).unwrap();
    for i in 0..300 {
        get_begin(&raw, &format!("blob-{i:05}")).unwrap();
    }
    let s = client.node_stats(node.addr).unwrap();
    assert_eq!(s.open_blobs, 128);
    let fds_after_gets = node.fds();
    println!("after get.begin of 300 blobs: {fds_after_gets} descriptors, 128 cached files");
    assert!(fds_after_gets <= fds_before + 128 + 3);
    round_trip(&client, &tmp, "after-ls");
}

/// A blob's header records its id: a file renamed (or copied) to another
/// blob's name is refused with DataLoss rather than served as that blob;
/// format-1 files, which record no id, are still read.
#[test]
fn a_blob_file_renamed_to_another_id_is_not_served_as_that_blob() {
    let tmp = TempDir::new("renamed");
    let n = node(&tmp.join("node"));
    let (c, _) = client(&[&n]);
    let (src_a, src_b) = (tmp.join("a"), tmp.join("b"));
    write_random_file(&src_a, 200_000, 1);
    write_random_file(&src_b, 200_000, 2);
    c.put_file(&src_a, "a").unwrap();
    c.put_file(&src_b, "b").unwrap();
    let dst = tmp.join("out");
    c.get_to_file("b", &dst).unwrap(); // now cached
    fs::rename(n.blob_path("a"), n.blob_path("b")).unwrap();
    let e = c.get_to_file("b", &dst).unwrap_err();
    println!("renamed file: {e}");
    assert_eq!(e.code, Code::DataLoss, "{e}");
    assert!(e.message.contains("holds blob 'a'"), "{e}");
    let listed = c.list().unwrap();
    assert_eq!(listed.len(), 1, "'a' is gone, 'b' is listed with a problem");
    assert_eq!(listed[0].info.id, "b");
    assert!(
        listed[0].problems[0].1.contains("holds blob 'a'"),
        "{listed:?}"
    );

    // A format-1 file (no id in its header) is still served.
    let data = common::value_bytes(70_000, 5);
    write_blob_file(n.dir(), "legacy", None, &data, 3);
    let out = tmp.join("legacy.out");
    let r = c.get_to_file("legacy", &out).unwrap();
    assert_eq!(r.size, 70_000);
    assert_eq!(fs::read(&out).unwrap(), data);
}

/// `ls` pages through the listing: 100,000 blobs list fine through the
/// `storage-node ls` command (the old listing was one response and failed
/// past its size limit).
#[test]
fn ls_lists_100000_blobs_page_by_page() {
    let tmp = TempDir::new("ls100k");
    let dir = tmp.join("node");
    fs::create_dir_all(&dir).unwrap();
    let t0 = std::time::Instant::now();
    for i in 0..100_000u32 {
        let id = format!("b{i:06}");
        let data: &[u8] = if i % 1000 == 0 { b"0123456789" } else { b"" };
        write_blob_file(&dir, &id, Some(&id), data, 1);
    }
    let made = t0.elapsed();
    let node = NodeProc::start(&dir, &[]);
    let t1 = std::time::Instant::now();
    let (ok, out, err) = node.run(&["ls"]);
    let listed = t1.elapsed();
    assert!(ok, "ls failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 100_000);
    assert!(lines[0].contains(" b000000 ") && lines[0].trim_start().starts_with("10 "));
    assert!(lines[99_999].contains(" b099999 "));
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in id order, once each"
    );
    println!(
        "100000 blob files written in {:.1} s; `storage-node ls` listed them in {:.1} s",
        made.as_secs_f64(),
        listed.as_secs_f64()
    );
}

/// Each `blob.list` page stays under `MAX_LIST_PAGE_BYTES` (1 MiB) however
/// long the ids, and paging with `start_after` visits every blob once.
#[test]
fn list_pages_are_bounded_and_resume_after_the_last_id() {
    let tmp = TempDir::new("pages");
    let dir = tmp.join("node");
    fs::create_dir_all(&dir).unwrap();
    let long = |i: usize| format!("{i:04}-{}", "x".repeat(195));
    // 5,000 entries of about 230 bytes: more than one page's 1 MiB.
    let count = 5000;
    for i in 0..count {
        write_blob_file(&dir, &long(i), Some(&long(i)), b"", 1);
    }
    let n = node(&dir);
    let raw = Client::connect(n.local_addr()).unwrap();
    let page = |start_after: &str, limit: u32| -> BlobList {
        raw.call(
            method::LIST,
            &ListRequest {
                start_after: start_after.into(),
                limit,
            },
            Payload::Empty,
        )
        .unwrap()
        .message
    };
    let first = page("", 10_000);
    println!(
        "first page of 10,000 asked: {} entries, {} bytes",
        first.blobs.len(),
        first.encoded_len()
    );
    assert!(
        first.more && first.blobs.len() < count,
        "a page is cut short"
    );
    assert!(first.encoded_len() <= 1 << 20, "{}", first.encoded_len());
    let small = page("", 7);
    assert_eq!(small.blobs.len(), 7);
    assert!(small.more);
    let mut seen = Vec::new();
    let mut after = String::new();
    loop {
        let p = page(&after, 700);
        assert!(p.blobs.len() <= 700);
        seen.extend(p.blobs.iter().map(|b| b.id.clone()));
        if !p.more {
            break;
        }
        after = p.blobs.last().unwrap().id.clone();
    }
    assert_eq!(seen, (0..count).map(long).collect::<Vec<_>>());
}

/// The protocol is defined in `examples/proto/storage.proto`, package
/// `pagerpc.examples.storage`: an outside client compiling that file gets
/// the messages this node speaks. Checks every message's fields (numbers
/// and wire types) against the bytes of the node's own encoding.
#[test]
fn the_protocol_is_defined_in_a_proto_file() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let fds = protox::compile(["storage.proto"], [dir]).expect("storage.proto compiles");
    let file = fds
        .file
        .iter()
        .find(|f| f.name() == "storage.proto")
        .unwrap();
    assert_eq!(file.package(), "pagerpc.examples.storage");
    // Encodings of every message with every field set, as the node and
    // client send them.
    let info = BlobInfo {
        id: "a".into(),
        size: 1,
        crc32c: 2,
        chunk_size: 3,
        version: 4,
        credits: 5,
        problem: "p".into(),
    };
    let samples: Vec<(&str, Vec<u8>)> = vec![
        ("Empty", Empty {}.encode_to_vec()),
        (
            "PutBegin",
            PutBegin {
                crc32c: Some(9),
                ..begin_req("a", 7)
            }
            .encode_to_vec(),
        ),
        (
            "PutBeginResponse",
            PutBeginResponse {
                upload: 1,
                credits: 2,
            }
            .encode_to_vec(),
        ),
        (
            "PutChunk",
            PutChunk {
                upload: 1,
                offset: 2,
                crc32c: Some(3),
            }
            .encode_to_vec(),
        ),
        (
            "PutChunkResponse",
            PutChunkResponse { received: 1 }.encode_to_vec(),
        ),
        (
            "PutCommit",
            PutCommit {
                upload: 1,
                crc32c: Some(2),
            }
            .encode_to_vec(),
        ),
        ("UploadRef", UploadRef { upload: 1 }.encode_to_vec()),
        ("BlobRef", BlobRef { id: "a".into() }.encode_to_vec()),
        ("BlobInfo", info.encode_to_vec()),
        (
            "GetChunk",
            GetChunk {
                id: "a".into(),
                offset: 1,
                len: 2,
                version: 3,
            }
            .encode_to_vec(),
        ),
        (
            "GetChunkResponse",
            GetChunkResponse { crc32c: 1 }.encode_to_vec(),
        ),
        (
            "ListRequest",
            ListRequest {
                start_after: "a".into(),
                limit: 1,
            }
            .encode_to_vec(),
        ),
        (
            "BlobList",
            BlobList {
                blobs: vec![info.clone()],
                more: true,
            }
            .encode_to_vec(),
        ),
        (
            "DeleteResponse",
            pagerpc_examples::storage::DeleteResponse { existed: true }.encode_to_vec(),
        ),
        (
            "NodeStats",
            NodeStats {
                blobs: 1,
                bytes: 2,
                uploads: 3,
                direct_io: true,
                payload_bytes_received: 5,
                payload_bytes_sent: 6,
                bytes_mapped: 7,
                bytes_copied: 8,
                direct_write_copies: 9,
                corrupt_chunks_read: 10,
                uploads_rejected: 11,
                uploads_expired: 12,
                uploads_refused: 13,
                open_blobs: 14,
            }
            .encode_to_vec(),
        ),
    ];
    assert_eq!(
        file.message_type.len(),
        samples.len(),
        "every message of the .proto is checked"
    );
    for (name, bytes) in samples {
        let msg = file
            .message_type
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("message {name} in storage.proto"));
        let on_wire = wire_fields(&bytes);
        let mut declared: Vec<(u64, u64)> = msg
            .field
            .iter()
            .map(|f| {
                // FieldDescriptorProto.Type: 8 bool, 9 string, 11 message,
                // 4 uint64, 13 uint32.
                let wire = match f.r#type.unwrap() {
                    9 | 11 => 2,
                    4 | 8 | 13 => 0,
                    t => panic!("{name}.{}: unexpected type {t}", f.name()),
                };
                (f.number() as u64, wire)
            })
            .collect();
        declared.sort();
        assert_eq!(
            on_wire, declared,
            "{name}: fields on the wire vs storage.proto"
        );
    }
}

/// The (field number, wire type) pairs of an encoded message, sorted.
fn wire_fields(mut b: &[u8]) -> Vec<(u64, u64)> {
    fn varint(b: &mut &[u8]) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[0];
            *b = &b[1..];
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return v;
            }
            shift += 7;
        }
    }
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b);
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(&mut b);
            }
            2 => {
                let len = varint(&mut b) as usize;
                b = &b[len..];
            }
            w => panic!("unexpected wire type {w}"),
        }
        out.push((field, wire));
    }
    out.sort();
    out.dedup();
    out
}
