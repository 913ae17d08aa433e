//! The storage node on one machine: real files in a temp dir, real
//! loopback sockets, `O_DIRECT` on the temp dir's filesystem. PUT, GET and
//! listing are pagerpc streams (the `Put`, `Get` and `List` rpcs of the
//! `Storage` service); the protocol-level tests below drive them with the
//! generated typed client of one node, and a fake node is hand-written on
//! pagerpc's string API with the generated `storage_methods` names.

mod common;

use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{addr_in, sha256_file, spawn_and_wait_for, wait_until, write_random_file, TempDir};
use pagerpc::prost::Message;
use pagerpc::typed::{NoPayload, PendingResponse, Receiver, Sender, WithPayload};
use pagerpc::{CallError, CallOptions, ClientConfig, Code, Payload, Server, Status};
use pagerpc_examples::storage::format::BlobHeader;
// The generated typed client of one node (`StorageClient` here is the
// multi-node client built on it).
use pagerpc_examples::storage::messages::StorageClient as NodeClient;
use pagerpc_examples::storage::{
    get_message, rank_nodes, storage_methods, BlobInfo, BlobList, BlobRef, ClientOptions,
    DeleteResponse, Empty, GetChunk, GetMessage, GetRequest, ListRequest, NodeConfig, NodeStats,
    PutChunk, PutEnd, PutHeader, PutMessage, StorageClient, StorageNode,
};
use pagerpc_examples::util::FastRng;

fn node(dir: &std::path::Path) -> StorageNode {
    StorageNode::start("127.0.0.1:0", NodeConfig::new(dir)).unwrap()
}

fn client(nodes: &[&StorageNode]) -> (StorageClient, Arc<Mutex<Vec<String>>>) {
    client_for(nodes.iter().map(|n| n.local_addr()).collect())
}

fn client_for(nodes: Vec<std::net::SocketAddr>) -> (StorageClient, Arc<Mutex<Vec<String>>>) {
    let mut opts = ClientOptions::new(nodes);
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

fn temp_files(dir: &std::path::Path) -> Vec<String> {
    let mut v = visible_files(dir);
    v.retain(|f| f.starts_with(".tmp-"));
    v
}

/// The ids of the uploads under way in `dir`, from their temporary files'
/// names (`.tmp-<id>-<16 hex digits>`).
fn uploading(dir: &std::path::Path) -> HashSet<String> {
    temp_files(dir)
        .iter()
        .map(|f| f[".tmp-".len()..f.len() - 17].to_owned())
        .collect()
}

fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

/// A put header for `size` bytes in 64 KiB chunks, version 1.
fn header(id: &str, size: u64) -> PutHeader {
    PutHeader {
        id: id.into(),
        size,
        crc32c: None,
        chunk_size: 64 << 10,
        version: 1,
    }
}

/// The client's half of a put stream.
type PutTx = Sender<PutMessage, WithPayload>;
/// The node's answer to a put stream.
type PutResp = PendingResponse<BlobInfo, NoPayload>;
/// The node's half of a get stream.
type GetRx = Receiver<GetMessage, WithPayload>;

/// Opens a put stream on `c` and sends its header.
fn open_put(c: &NodeClient, h: PutHeader) -> (PutTx, PutResp) {
    let (mut tx, resp) = c.put().unwrap();
    tx.send(&PutMessage::header(h), Payload::Empty).unwrap();
    (tx, resp)
}

/// Half-closes a put stream and waits for the node's answer.
fn finish(tx: PutTx, resp: PutResp) -> Result<BlobInfo, CallError> {
    // Refused when the node already ended the stream; its answer says why.
    let _ = tx.finish();
    resp.wait().map(|r| r.message)
}

/// A whole put stream: the header, `data` in chunks of the header's
/// chunk size (each with its CRC32C), the end message with `end_crc`, the
/// half-close, and the node's answer.
fn raw_put(
    c: &NodeClient,
    h: PutHeader,
    data: &[u8],
    end_crc: Option<u32>,
) -> Result<BlobInfo, CallError> {
    let cs = h.chunk_size as usize;
    let (mut tx, resp) = open_put(c, h);
    for chunk in data.chunks(cs) {
        if tx
            .send(&PutMessage::chunk(Some(crc(chunk))), chunk.to_vec())
            .is_err()
        {
            return resp.wait().map(|r| r.message);
        }
    }
    if tx.send(&PutMessage::end(end_crc), Payload::Empty).is_err() {
        return resp.wait().map(|r| r.message);
    }
    finish(tx, resp)
}

fn stat(c: &NodeClient, id: &str) -> Result<BlobInfo, CallError> {
    c.stat(&BlobRef { id: id.into() }).map(|r| r.message)
}

/// Opens a get stream and reads its first message, the info.
fn open_get(
    c: &NodeClient,
    id: &str,
    offset: u64,
    version: u64,
) -> Result<(BlobInfo, GetRx), CallError> {
    let req = GetRequest {
        id: id.into(),
        offset,
        version,
    };
    let mut rx = c.get(&req)?;
    match rx.recv()? {
        Some((
            GetMessage {
                kind: Some(get_message::Kind::Info(info)),
            },
            _,
        )) => Ok((info, rx)),
        other => panic!("a get stream starts with the info, not {other:?}"),
    }
}

/// The rest of a get stream: each chunk message and its bytes.
fn read_rest(rx: &mut GetRx) -> Result<Vec<(GetChunk, Vec<u8>)>, CallError> {
    let mut out = Vec::new();
    while let Some((m, pages)) = rx.recv()? {
        match m.kind {
            Some(get_message::Kind::Chunk(c)) => out.push((c, pages.to_vec())),
            other => panic!("a chunk, not {other:?}"),
        }
    }
    Ok(out)
}

fn concat(chunks: &[(GetChunk, Vec<u8>)]) -> Vec<u8> {
    chunks.iter().flat_map(|(_, b)| b.iter().copied()).collect()
}

/// A whole get stream from `offset`: the info and the bytes.
fn raw_get(
    c: &NodeClient,
    id: &str,
    offset: u64,
    version: u64,
) -> Result<(BlobInfo, Vec<u8>), CallError> {
    let (info, mut rx) = open_get(c, id, offset, version)?;
    Ok((info, concat(&read_rest(&mut rx)?)))
}

/// The whole list stream: each message.
fn list_stream(c: &NodeClient, start_after: &str, limit: u32) -> Vec<BlobList> {
    let req = ListRequest {
        start_after: start_after.into(),
        limit,
    };
    let mut rx = c.list(&req).unwrap();
    let mut pages = Vec::new();
    while let Some(p) = rx.recv().unwrap() {
        pages.push(p);
    }
    pages
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

/// An upload is bound to its stream: a stream cut short (the connection
/// lost, the sender dropped, the client's abort) discards the upload and
/// its temporary file at once, and so does a `storage-node put` process
/// killed with SIGKILL; a node that crashed mid-upload removes the
/// leftovers when it starts again.
#[test]
fn a_put_stream_cut_short_leaves_no_blob_and_no_temporary_file() {
    let tmp = TempDir::new("dead");
    let dir = tmp.join("node");
    let n = node(&dir);
    let (c, _) = client(&[&n]);
    let cs = 1u64 << 20;
    let stats = || n.stats().unwrap();

    // 1. Three ways a stream can end short, after 3 chunks of 8.
    for (i, how) in ["connection lost", "sender dropped", "aborted"]
        .into_iter()
        .enumerate()
    {
        let raw = NodeClient::connect_with(n.local_addr(), ClientConfig::zerocopy()).unwrap();
        let id = format!("half-{i}");
        let (mut tx, resp) = open_put(
            &raw,
            PutHeader {
                chunk_size: cs,
                ..header(&id, 8 * cs)
            },
        );
        for k in 0..3u8 {
            let chunk = vec![k; cs as usize];
            tx.send(&PutMessage::chunk(Some(crc(&chunk))), chunk)
                .unwrap();
        }
        assert!(
            wait_until(Duration::from_secs(5), || uploading(&dir).contains(&id)),
            "{how}: the upload is under way: {:?}",
            visible_files(&dir)
        );
        match i {
            0 => {
                raw.inner().close();
                drop((tx, resp));
            }
            1 => {
                drop(tx);
                let e = resp.wait().unwrap_err();
                assert_eq!(e.code(), Code::Cancelled, "{e}");
            }
            _ => {
                tx.abort(Status::aborted("the client gave up"));
                assert_eq!(resp.wait().unwrap_err().code(), Code::Aborted);
            }
        }
        assert!(
            wait_until(Duration::from_secs(5), || visible_files(&dir).is_empty()
                && stats().uploads == 0),
            "{how}: the upload is discarded at once: {:?}, {:?}",
            visible_files(&dir),
            stats()
        );
        assert_eq!(stats().uploads_cut_short, i as u64 + 1, "{how}");
        assert!(c.list().unwrap().is_empty(), "{how}: no blob is visible");
        assert!(!n.blob_path(&id).exists());
    }

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
    assert!(
        wait_until(Duration::from_secs(5), || visible_files(&dir).is_empty()),
        "temporary file removed: {:?}",
        visible_files(&dir)
    );
    assert!(c.list().unwrap().is_empty(), "no blob is visible");
    assert!(!n.blob_path("killed").exists());
    assert_eq!(stats().uploads_cut_short, 4);

    // 3. A node that died mid-upload removes the temporary files at startup.
    drop(n);
    fs::write(dir.join(".tmp-crashed-0123456789abcdef"), b"partial").unwrap();
    let n = node(&dir);
    assert_eq!(n.temps_removed_at_start(), 1);
    assert!(visible_files(&dir).is_empty());
}

/// Nothing but its own stream reaches an upload: another stream for the
/// same id, on the same connection or another, has an upload of its own;
/// uploads of one id commit whole, the last to commit wins, and a stream
/// aborted after sending every byte is still not committed.
#[test]
fn an_upload_belongs_to_its_stream() {
    let tmp = TempDir::new("bound");
    let dir = tmp.join("node");
    let n = node(&dir);
    let (a, b) = (
        NodeClient::connect(n.local_addr()).unwrap(),
        NodeClient::connect(n.local_addr()).unwrap(),
    );
    let cs = 64usize << 10;
    let v1 = common::value_bytes(3 * cs, 1);
    let v2 = common::value_bytes(2 * cs + 5, 2);

    // A starts 'same' and sends the first of its three chunks.
    let (mut tx_a, resp_a) = open_put(&a, header("same", v1.len() as u64));
    tx_a.send(&PutMessage::chunk(Some(crc(&v1[..cs]))), v1[..cs].to_vec())
        .unwrap();
    // Another stream for 'same' on A's connection ends at once: its own
    // upload (with no chunk) is discarded, A's is untouched.
    let e = raw_put(&a, header("same", v1.len() as u64), &[], Some(crc(&v1))).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message().contains("ended after 0 of") && e.message().contains("discarded"),
        "{e}"
    );
    // B stores 'same' whole meanwhile.
    let info = raw_put(&b, header("same", v2.len() as u64), &v2, Some(crc(&v2))).unwrap();
    assert_eq!(info.size, v2.len() as u64);
    assert_eq!(raw_get(&b, "same", 0, 0).unwrap().1, v2);
    // A goes on from where it was and commits: its blob replaces B's, whole.
    for chunk in v1[cs..].chunks(cs) {
        tx_a.send(&PutMessage::chunk(Some(crc(chunk))), chunk.to_vec())
            .unwrap();
    }
    tx_a.send(&PutMessage::end(Some(crc(&v1))), Payload::Empty)
        .unwrap();
    let info = finish(tx_a, resp_a).unwrap();
    assert_eq!((info.size, info.crc32c), (v1.len() as u64, crc(&v1)));
    assert_eq!(raw_get(&b, "same", 0, 0).unwrap().1, v1);

    // A stream that sent every byte and its end message, then aborts: not
    // committed, nothing left behind.
    let (mut tx, resp) = open_put(&b, header("same", v2.len() as u64));
    for chunk in v2.chunks(cs) {
        tx.send(&PutMessage::chunk(Some(crc(chunk))), chunk.to_vec())
            .unwrap();
    }
    tx.send(&PutMessage::end(Some(crc(&v2))), Payload::Empty)
        .unwrap();
    assert!(wait_until(Duration::from_secs(5), || n
        .stats()
        .unwrap()
        .uploads
        == 1));
    tx.abort(Status::aborted("changed my mind"));
    assert_eq!(resp.wait().unwrap_err().code(), Code::Aborted);
    assert!(
        wait_until(Duration::from_secs(5), || temp_files(&dir).is_empty()),
        "{:?}",
        visible_files(&dir)
    );
    assert_eq!(raw_get(&a, "same", 0, 0).unwrap().1, v1, "still A's blob");
    assert_eq!(visible_files(&dir), vec!["same.blob".to_owned()]);
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
fn checksum_mismatches_and_malformed_streams_are_refused_and_discarded() {
    let tmp = TempDir::new("crc");
    let dir = tmp.join("node");
    let n = node(&dir);
    let raw = NodeClient::connect(n.local_addr()).unwrap();
    let cs = 64usize << 10;
    let data: Vec<u8> = {
        let mut v = vec![0u8; cs + 100];
        FastRng::new(1).fill(&mut v);
        v
    };
    let size = data.len() as u64;
    let no_temps = |what: &str| {
        assert!(
            wait_until(Duration::from_secs(5), || temp_files(&dir).is_empty()),
            "{what}: {:?}",
            visible_files(&dir)
        );
    };

    // A chunk whose CRC does not match its bytes is refused, and the
    // upload discarded.
    let (mut tx, resp) = open_put(&raw, header("a", size));
    let _ = tx.send(&PutMessage::chunk(Some(12345)), data[..cs].to_vec());
    let e = finish(tx, resp).unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.message().contains("CRC32C"), "{e}");
    no_temps("a chunk with a wrong CRC");
    // The wrong whole-blob CRC: refused and discarded.
    let e = raw_put(&raw, header("a", size), &data, Some(crc(&data) ^ 1)).unwrap_err();
    assert_eq!(e.code(), Code::DataLoss, "{e}");
    assert!(e.message().contains("discarded"), "{e}");
    no_temps("a wrong blob CRC");
    // A stream that ends before the last byte: refused and discarded.
    let e = raw_put(&raw, header("b", size), &data[..cs], Some(crc(&data))).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    assert!(
        e.message()
            .contains(&format!("ended after {cs} of its {size} bytes")),
        "{e}"
    );
    no_temps("a stream ending short");
    // A chunk of the wrong length, a chunk past the end, and messages out
    // of order are InvalidArgument.
    let (mut tx, resp) = open_put(&raw, header("c", size));
    let _ = tx.send(&PutMessage::chunk(None), data[..cs - 1].to_vec());
    let e = finish(tx, resp).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("it must have 65536"), "{e}");
    let e = raw_put(&raw, header("c", cs as u64), &data, None).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("already has all"), "{e}");
    let (mut tx, resp) = raw.put().unwrap();
    let _ = tx.send(&PutMessage::chunk(None), data[..cs].to_vec());
    let e = finish(tx, resp).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("first message"), "{e}");
    let (mut tx, resp) = open_put(&raw, header("c", size));
    let _ = tx.send(&PutMessage::header(header("c", size)), Payload::Empty);
    let e = finish(tx, resp).unwrap_err();
    assert!(e.message().contains("a second header"), "{e}");
    let (mut tx, resp) = open_put(&raw, header("c", 0));
    let _ = tx.send(&PutMessage::end(Some(0)), Payload::Empty);
    let _ = tx.send(&PutMessage::chunk(None), data[..10].to_vec());
    let e = finish(tx, resp).unwrap_err();
    assert!(e.message().contains("after the end message"), "{e}");
    // An undecodable message (a hand-written peer's bytes) is the node's
    // refusal, not a stream cut short.
    let (tx, resp) = open_put(&raw, header("c", size));
    let mut tx = tx.into_inner();
    let _ = tx.send_raw(vec![0xff, 0xff, 0xff], Payload::Empty);
    let _ = tx.finish();
    let e = resp.wait().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("undecodable"), "{e}");
    no_temps("malformed streams");
    assert_eq!(n.stats().unwrap().uploads_cut_short, 0);
    // No CRC anywhere: refused; one in the header alone is enough.
    let e = raw_put(&raw, header("d", size), &data, None).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("no CRC32C"), "{e}");
    let with_crc = PutHeader {
        crc32c: Some(crc(&data)),
        ..header("d", size)
    };
    let info = raw_put(&raw, with_crc, &data, None).unwrap();
    assert_eq!(info.size, size);
    assert_eq!(raw_get(&raw, "d", 0, 0).unwrap().1, data);
    // Bad ids and chunk sizes are refused at the header.
    let e = raw_put(&raw, header("../etc", 1), &[1], None).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let bad_cs = PutHeader {
        chunk_size: 5000,
        ..header("x", 1)
    };
    let e = raw_put(&raw, bad_cs, &[1], None).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("chunk size 5000"), "{e}");
    no_temps("refused headers");
    assert_eq!(visible_files(&dir), vec!["d.blob".to_owned()]);
    assert_eq!(n.stats().unwrap().uploads_rejected, 2);
}

/// Flow control is pagerpc's per-stream credit: a GET whose client stops
/// reading (keeps the chunks it got and asks for no more) makes the node
/// stop after one stream window, and the node goes on serving others.
#[test]
fn a_get_whose_client_stops_reading_holds_at_most_one_window() {
    let tmp = TempDir::new("window");
    let n = node(&tmp.join("node"));
    let (c, _) = client(&[&n]);
    let mut opts = c.options().clone();
    opts.chunk_size = 256 << 10;
    let c = StorageClient::new(opts);
    let src = tmp.join("src");
    write_random_file(&src, 16 << 20, 1);
    c.put_file(&src, "big").unwrap();
    let window = 1u64 << 20;
    let cfg = ClientConfig {
        stream_window: window,
        ..ClientConfig::default()
    };
    let raw = NodeClient::connect_with(n.local_addr(), cfg).unwrap();
    let sent_before = n.counters().payload_bytes_sent;
    // The stream's deadline ends the test's wait for more.
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(3)),
        ..CallOptions::default()
    };
    let req = GetRequest {
        id: "big".into(),
        offset: 0,
        version: 0,
    };
    let mut rx = raw.get_with(&req, &opts).unwrap();
    let mut kept = Vec::new();
    kept.push(rx.recv().unwrap().expect("the info").1);
    kept.push(rx.recv().unwrap().expect("the first chunk").1);
    // While that stream is stalled, the node serves others.
    let dst = tmp.join("dst");
    c.get_to_file("big", &dst).unwrap();
    assert_eq!(sha256_file(&dst), sha256_file(&src));
    let e = loop {
        match rx.recv() {
            Ok(Some((_, pages))) => kept.push(pages),
            Ok(None) => panic!("the whole blob arrived though nothing was released"),
            Err(e) => break e,
        }
    };
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    let got: u64 = kept.iter().map(|p| p.len() as u64).sum();
    let sent = n.counters().payload_bytes_sent - sent_before - (16 << 20);
    println!(
        "a GET of 16 MiB whose client keeps everything: {} messages, {got} payload bytes \
         received, {sent} sent by the node, window {window}",
        kept.len()
    );
    assert!(got > 0 && got <= window, "{got} bytes received");
    assert!(sent <= window, "the node sent {sent} bytes");
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

    /// Peak resident memory of the node process, in KiB (`VmHWM`).
    fn peak_rss_kib(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let line = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .expect("VmHWM in /proc/PID/status");
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

/// A put stream's header comes from the peer: an absurd size is refused by
/// the node's limits, naming the limit and the value, without allocating
/// anything for it (an old node allocated a CRC table of one entry per
/// announced chunk: 34 GB for 2^32-1 chunks, and died), and the node keeps
/// serving.
#[test]
fn a_put_stream_announcing_an_absurd_size_is_refused_without_allocating() {
    let tmp = TempDir::new("huge");
    let node = NodeProc::start(&tmp.join("node"), &[]);
    let raw = NodeClient::connect(node.addr).unwrap();
    let stats = |raw: &NodeClient| -> NodeStats { raw.node_stats(&Empty {}).unwrap().message };
    stats(&raw);
    let rss_before = node.rss_kib();
    // The header, then a first chunk as a client would send it, then the
    // half-close: the answer is the refusal.
    let put = |raw: &NodeClient, size: u64, chunk_size: u64| {
        let h = PutHeader {
            chunk_size,
            ..header("huge", size)
        };
        let (mut tx, resp) = open_put(raw, h);
        let _ = tx.send(&PutMessage::chunk(None), vec![0u8; chunk_size as usize]);
        finish(tx, resp).unwrap_err()
    };
    // 2^60 bytes: over max_blob_bytes (default 1 TiB).
    let e = put(&raw, 1 << 60, 64 << 10);
    println!("a put stream announcing 2^60 bytes: {e}");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(
        e.message().contains("max_blob_bytes")
            && e.message().contains(&(1u64 << 60).to_string())
            && e.message().contains(&(1u64 << 40).to_string()),
        "the message names the limit and the value: {e}"
    );
    // (2^32 - 1) chunks of 64 KiB, the size that made the old node
    // allocate 34 GB.
    let e = put(&raw, u64::from(u32::MAX) * (64 << 10), 64 << 10);
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
    let raw = NodeClient::connect(node.addr).unwrap();
    stats(&raw);
    let rss_before = node.rss_kib();
    for (size, cs) in [
        (1u64 << 60, 64u64 << 20),
        (u64::from(u32::MAX) * (64 << 10), 64 << 10),
    ] {
        let e = put(&raw, size, cs);
        println!("a put stream of {size} bytes on a node without a size cap: {e}");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        assert!(
            e.message().contains("bytes free") && e.message().contains(&size.to_string()),
            "the message names the free space and the size: {e}"
        );
    }
    let rss_after = node.rss_kib();
    println!("node RSS: {rss_before} KiB before the absurd put streams, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(node.alive(), "the node is still running");
    let s = stats(&raw);
    assert_eq!(s.uploads, 0);
    assert_eq!(s.uploads_refused, 2);
    assert!(temp_files(&tmp.join("uncapped")).is_empty());
    round_trip(&node.client(), &tmp, "after-huge");
}

/// One put stream per entry of `ids` on `c`, each with its header sent.
fn open_puts(c: &NodeClient, ids: &[String]) -> Vec<(String, PutTx, PutResp)> {
    ids.iter()
        .map(|id| {
            let (tx, resp) = open_put(c, header(id, 1 << 20));
            (id.clone(), tx, resp)
        })
        .collect()
}

/// 1,000 put streams at once on one connection, then 50 on each of 20
/// more connections: refused past `max_uploads_per_conn` (16) and
/// `max_uploads` (128) with ResourceExhausted naming the limit (or, in the
/// burst, pagerpc's `max_streams`, 256), the node's descriptors stay
/// within 2 per upload, it keeps serving, and aborted streams give their
/// descriptors and slots back at once.
#[test]
fn concurrent_uploads_are_bounded_per_connection_and_per_node() {
    let tmp = TempDir::new("uploads");
    let dir = tmp.join("node");
    let node = NodeProc::start(&dir, &[]);
    let client = node.client();
    round_trip(&client, &tmp, "existing");
    let fds_before = node.fds();
    let stats = || client.node_stats(node.addr).unwrap();
    // Uploads admitted, still streaming.
    let mut held: Vec<(PutTx, PutResp)> = Vec::new();

    // 1. 1,000 at once on one connection.
    let one = NodeClient::connect(node.addr).unwrap();
    let ids: Vec<String> = (0..1000).map(|i| format!("one-{i}")).collect();
    let streams = open_puts(&one, &ids);
    assert!(
        wait_until(Duration::from_secs(30), || stats().uploads == 16),
        "16 uploads admitted: {}",
        stats().uploads
    );
    // The temporary files name the admitted uploads; the others' streams
    // end with the node's (or the library's) refusal.
    let admitted = uploading(&dir);
    assert_eq!(admitted.len(), 16);
    let (mut per_conn, mut max_streams) = (0u64, 0u64);
    let mut example = None;
    for (id, tx, resp) in streams {
        if admitted.contains(&id) {
            held.push((tx, resp));
            continue;
        }
        let e = resp.wait().unwrap_err();
        drop(tx);
        assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
        if e.message().contains("(max_uploads_per_conn) is 16") {
            per_conn += 1;
            example.get_or_insert(e);
        } else if e.message().contains("max_streams limit of 256") {
            max_streams += 1;
        } else {
            panic!("unexpected refusal: {e}");
        }
    }
    println!(
        "1000 put streams on one connection: 16 admitted, {per_conn} refused by the node, \
         {max_streams} by pagerpc's max_streams; e.g. {}",
        example.unwrap()
    );
    assert_eq!(stats().uploads_refused, per_conn);
    let fds_one = node.fds();

    // 2. 50 on each of 20 more connections, one connection after the
    // other (so that the refused streams never add up to max_streams).
    let conns: Vec<NodeClient> = (0..20)
        .map(|_| NodeClient::connect(node.addr).unwrap())
        .collect();
    let (mut total, mut refused) = (16u64, per_conn);
    let mut node_refusals = 0;
    for (i, c) in conns.iter().enumerate() {
        let ids: Vec<String> = (0..50).map(|k| format!("many-{i}-{k}")).collect();
        let streams = open_puts(c, &ids);
        let admit = 16.min(128 - total);
        total += admit;
        refused += 50 - admit;
        assert!(
            wait_until(Duration::from_secs(30), || {
                let s = stats();
                s.uploads == total && s.uploads_refused == refused
            }),
            "connection {i}: {total} uploads admitted, {refused} refused: {:?}",
            stats()
        );
        let admitted = uploading(&dir);
        for (id, tx, resp) in streams {
            if admitted.contains(&id) {
                held.push((tx, resp));
                continue;
            }
            let e = resp.wait().unwrap_err();
            drop(tx);
            assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
            if e.message().contains("(max_uploads) is 128") {
                node_refusals += 1;
            } else {
                assert!(e.message().contains("max_uploads_per_conn"), "{e}");
            }
        }
    }
    assert_eq!(held.len(), 128, "max_uploads");
    assert!(node_refusals > 0);
    let fds_peak = node.fds();
    println!(
        "node descriptors: {fds_before} before, {fds_one} with 16 uploads, {fds_peak} with 128 \
         uploads and 21 more connections ({node_refusals} streams refused by max_uploads)"
    );
    assert!(
        fds_peak <= fds_before + 2 * 128 + 21 + 8,
        "{fds_peak} descriptors open"
    );

    // The node keeps serving everything but new uploads.
    let s = stats();
    assert_eq!(s.uploads, 128);
    let dst = tmp.join("existing.again");
    client.get_to_file("existing", &dst).unwrap();
    assert_eq!(client.list().unwrap().len(), 1);
    let src = tmp.join("existing.src");
    let e = client.put_file(&src, "one-more").unwrap_err();
    assert!(e.message.contains("(max_uploads) is 128"), "{e}");

    // Aborted streams give their descriptors and slots back at once.
    for (tx, resp) in held {
        tx.abort(Status::aborted("the test is done"));
        assert_eq!(resp.wait().unwrap_err().code(), Code::Aborted);
    }
    drop(conns);
    drop(one);
    assert!(
        wait_until(Duration::from_secs(10), || stats().uploads == 0
            && node.fds() <= fds_before + 2),
        "descriptors back to {fds_before}: {}",
        node.fds()
    );
    assert_eq!(stats().uploads_cut_short, 128);
    assert!(temp_files(&dir).is_empty(), "no temporary file is left");
    round_trip(&client, &tmp, "after-uploads");
}

/// A GET is one stream reading one open file: a blob replaced or deleted
/// during the read (by another process's rename or unlink, or through the
/// node) is never mixed with its new version; a read started afterwards
/// gets the new file (the open-file cache checks the path's identity), and
/// one that asks for the old version is refused with Aborted.
#[test]
fn a_blob_replaced_or_deleted_during_a_get_is_never_mixed_or_served_stale() {
    let tmp = TempDir::new("stale");
    let dir = tmp.join("node");
    let n = node(&dir);
    // A small window keeps the node a few chunks ahead of this client, so
    // most of the blob is read from disk after the replacement.
    let cfg = ClientConfig {
        stream_window: 256 << 10,
        ..ClientConfig::default()
    };
    let raw = NodeClient::connect_with(n.local_addr(), cfg).unwrap();
    let old = common::value_bytes(4 << 20, 1);
    let new = common::value_bytes(4 << 20, 2);
    write_blob_file(&dir, "x", Some("x"), &old, 10);

    let v10 = stat(&raw, "x").unwrap();
    assert_eq!(v10.version, 10);
    let (info, mut rx) = open_get(&raw, "x", 0, v10.version).unwrap();
    assert_eq!(info.version, 10);
    let (first, _) = rx.recv().unwrap().unwrap();
    assert!(matches!(first.kind, Some(get_message::Kind::Chunk(_))));
    // Another process replaces the file (rename over it) mid-read.
    write_blob_file(&dir, "x", Some("x"), &new, 11);
    let rest = concat(&read_rest(&mut rx).unwrap());
    assert!(
        rest[..] == old[64 << 10..],
        "the read goes on with the version it opened"
    );
    assert_eq!(
        stat(&raw, "x").unwrap().version,
        11,
        "stat sees the new file"
    );
    let e = raw_get(&raw, "x", 0, 10).unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    assert!(e.message().contains("replaced"), "{e}");
    let (info, bytes) = raw_get(&raw, "x", 0, 0).unwrap();
    assert_eq!(info.version, 11);
    assert!(bytes == new, "a new read gets the new content");

    // Deleted by another process mid-read: the read still finishes whole;
    // later ones find nothing.
    let (_, mut rx) = open_get(&raw, "x", 0, 11).unwrap();
    rx.recv().unwrap().unwrap();
    fs::remove_file(dir.join("x.blob")).unwrap();
    assert!(concat(&read_rest(&mut rx).unwrap())[..] == new[64 << 10..]);
    assert_eq!(stat(&raw, "x").unwrap_err().code(), Code::NotFound);
    assert_eq!(raw_get(&raw, "x", 0, 0).unwrap_err().code(), Code::NotFound);

    // Overwritten, then deleted, through the node, mid-read.
    let (c, _) = client(&[&n]);
    let mut opts = c.options().clone();
    opts.chunk_size = 64 << 10;
    let c = StorageClient::new(opts);
    let src = tmp.join("src");
    write_random_file(&src, 3 << 20, 3);
    let v1 = fs::read(&src).unwrap();
    c.put_file(&src, "y").unwrap();
    let (_, mut rx) = open_get(&raw, "y", 0, 0).unwrap();
    let (_, head) = rx.recv().unwrap().unwrap();
    write_random_file(&src, 3 << 20, 4);
    let v2 = fs::read(&src).unwrap();
    c.put_file(&src, "y").unwrap();
    let mut got = head.to_vec();
    got.extend(concat(&read_rest(&mut rx).unwrap()));
    assert!(
        got == v1,
        "the read begun before the overwrite returns version 1, whole"
    );
    assert!(raw_get(&raw, "y", 0, 0).unwrap().1 == v2);
    let (_, mut rx) = open_get(&raw, "y", 0, 0).unwrap();
    let (_, head) = rx.recv().unwrap().unwrap();
    c.delete("y").unwrap();
    let mut got = head.to_vec();
    got.extend(concat(&read_rest(&mut rx).unwrap()));
    assert!(
        got == v2,
        "the read begun before the delete returns version 2, whole"
    );
    assert_eq!(raw_get(&raw, "y", 0, 0).unwrap_err().code(), Code::NotFound);
}

/// `ls` over 5,000 blobs leaves the node's descriptors where they were (a
/// listing reads each header through a descriptor it closes at once, and
/// never fills the open-file cache); reads keep at most `max_open_blobs`
/// (128) files open.
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
    let raw = NodeClient::connect(node.addr).unwrap();
    for i in 0..300 {
        let id = format!("blob-{i:05}");
        if i % 2 == 0 {
            stat(&raw, &id).unwrap();
        } else {
            assert_eq!(raw_get(&raw, &id, 0, 0).unwrap().1, vec![i as u8; 100]);
        }
    }
    let s = client.node_stats(node.addr).unwrap();
    assert_eq!(s.open_blobs, 128);
    let fds_after_gets = node.fds();
    println!("after reading 300 blobs: {fds_after_gets} descriptors, 128 cached files");
    assert!(fds_after_gets <= fds_before + 128 + 3);
    round_trip(&client, &tmp, "after-ls");
}

/// `ls` streams the listing: 100,500 blobs (more than one directory scan
/// of `LIST_SCAN_BATCH`, 100,000 ids) list through the `storage-node ls`
/// command, in id order, once each, and the client prints them as they
/// come.
#[test]
fn ls_streams_100500_blobs() {
    let tmp = TempDir::new("ls100k");
    let dir = tmp.join("node");
    fs::create_dir_all(&dir).unwrap();
    let count = 100_500u32;
    let t0 = std::time::Instant::now();
    for i in 0..count {
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
    assert_eq!(lines.len(), count as usize);
    assert!(lines[0].contains(" b000000 ") && lines[0].trim_start().starts_with("10 "));
    assert!(lines[100_000].contains(" b100000 ") && lines[100_000].trim_start().starts_with("10 "));
    assert!(lines[100_499].contains(" b100499 "));
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "in id order, once each"
    );
    println!(
        "{count} blob files written in {:.1} s; `storage-node ls` listed them in {:.1} s",
        made.as_secs_f64(),
        listed.as_secs_f64()
    );
}

/// `ls` of a million blobs through `storage-node ls`: the node scans its
/// directory ten times (`LIST_SCAN_BATCH`) and the client prints as the
/// stream arrives, so neither holds the listing. Writes 1,000,000 blob
/// files (about 4 GiB) first, so it runs by hand: `cargo test --release -p
/// pagerpc-examples --test storage -- --ignored --nocapture`.
#[test]
#[ignore = "writes 1,000,000 blob files (about 4 GiB); run by hand"]
fn ls_streams_a_million_blobs() {
    let tmp = TempDir::new("ls1m");
    let dir = tmp.join("node");
    fs::create_dir_all(&dir).unwrap();
    let count = 1_000_000u32;
    let t0 = std::time::Instant::now();
    for i in 0..count {
        let id = format!("b{i:07}");
        write_blob_file(&dir, &id, Some(&id), b"", 1);
    }
    let made = t0.elapsed();
    let node = NodeProc::start(&dir, &[]);
    let node_rss_before = node.rss_kib();
    let t1 = std::time::Instant::now();
    let (ok, out, err) = node.run(&["ls"]);
    let listed = t1.elapsed();
    assert!(ok, "ls failed: {err}");
    let mut n = 0u32;
    let mut last = "";
    for l in out.lines() {
        let id = l.split_whitespace().nth(2).unwrap();
        assert!(id > last, "in id order, once each: {id} after {last}");
        last = id;
        n += 1;
    }
    assert_eq!(n, count);
    // The largest resident set of any child waited for so far: the client.
    let client_kib = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .unwrap()
        .max_rss();
    println!(
        "{count} blob files written in {:.0} s; `storage-node ls` listed them in {:.1} s; the \
         client's peak RSS {client_kib} KiB; the node's RSS {node_rss_before} KiB before, peak \
         {} KiB",
        made.as_secs_f64(),
        listed.as_secs_f64(),
        node.peak_rss_kib()
    );
}

/// Each `List` stream message stays under `MAX_LIST_PAGE_BYTES` (1 MiB) and
/// 10,000 entries however long the ids; `start_after` and `limit` select a
/// range; the whole stream visits every blob once.
#[test]
fn list_stream_pages_are_bounded_and_start_after_an_id() {
    let tmp = TempDir::new("pages");
    let dir = tmp.join("node");
    fs::create_dir_all(&dir).unwrap();
    let long = |i: usize| format!("{i:05}-{}", "x".repeat(194));
    // 12,000 entries of about 230 bytes: about 2.6 MiB in all.
    let count = 12_000;
    for i in 0..count {
        write_blob_file(&dir, &long(i), Some(&long(i)), b"", 1);
    }
    write_blob_file(&dir, "short", Some("short"), b"", 1);
    let n = node(&dir);
    let raw = NodeClient::connect(n.local_addr()).unwrap();
    let ids = |pages: &[BlobList]| -> Vec<String> {
        pages
            .iter()
            .flat_map(|p| p.blobs.iter().map(|b| b.id.clone()))
            .collect()
    };
    let all = list_stream(&raw, "", 0);
    let sizes: Vec<usize> = all.iter().map(|p| p.encoded_len()).collect();
    println!(
        "{} blobs listed in {} messages of {sizes:?} bytes",
        count + 1,
        all.len()
    );
    assert!(all.len() >= 3, "several messages");
    for p in &all {
        assert!(p.encoded_len() <= 1 << 20, "{}", p.encoded_len());
        assert!(p.blobs.len() <= 10_000);
    }
    let mut want: Vec<String> = (0..count).map(long).collect();
    want.push("short".into());
    assert_eq!(ids(&all), want);
    let tail = list_stream(&raw, &long(count - 1), 0);
    assert_eq!(ids(&tail), vec!["short".to_owned()]);
    assert_eq!(ids(&list_stream(&raw, "", 7)), want[..7].to_vec());
    assert_eq!(
        ids(&list_stream(&raw, &long(99), 700)),
        want[100..800].to_vec()
    );
    assert!(
        list_stream(&raw, "short", 0).is_empty(),
        "nothing after the last"
    );
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

/// A get stream from an offset (to resume on another replica) sends the info
/// and the chunks from there; an offset that is not a chunk boundary, or a
/// version the node does not hold, is refused before any chunk.
#[test]
fn a_get_stream_starts_at_a_chunk_boundary_of_the_version_asked_for() {
    let tmp = TempDir::new("resume");
    let dir = tmp.join("node");
    let n = node(&dir);
    let raw = NodeClient::connect(n.local_addr()).unwrap();
    let cs = 64usize << 10;
    let data = common::value_bytes(5 * cs + 99, 9);
    write_blob_file(&dir, "r", Some("r"), &data, 5);
    let (info, mut rx) = open_get(&raw, "r", 2 * cs as u64, 5).unwrap();
    assert_eq!((info.size, info.version), (data.len() as u64, 5));
    let chunks = read_rest(&mut rx).unwrap();
    let offsets: Vec<u64> = chunks.iter().map(|(c, _)| c.offset).collect();
    assert_eq!(
        offsets,
        vec![2 * cs as u64, 3 * cs as u64, 4 * cs as u64, 5 * cs as u64]
    );
    for (c, b) in &chunks {
        assert_eq!(c.crc32c, crc(b));
    }
    assert!(concat(&chunks)[..] == data[2 * cs..]);
    let (_, rest) = raw_get(&raw, "r", data.len() as u64, 0).unwrap();
    assert!(rest.is_empty(), "from the end: the info alone");
    let e = raw_get(&raw, "r", 1000, 0).unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("not a chunk boundary"), "{e}");
    let e = raw_get(&raw, "r", 0, 4).unwrap_err();
    assert_eq!(e.code(), Code::Aborted, "{e}");
    let e = raw_get(&raw, "nothing", 0, 0).unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e}");
}

/// The client treats a GET stream that ends before the last byte as the
/// node's failure, never as the end of the blob: with a (fake) node that
/// ends its stream early after one chunk, the GET goes on from that offset
/// on the next replica; with no other replica, it fails and leaves no
/// output file.
#[test]
fn a_get_stream_that_ends_early_is_an_error_and_the_next_replica_takes_over() {
    let tmp = TempDir::new("early");
    let n = node(&tmp.join("node"));
    let cs = 64u64 << 10;
    let (real, _) = client(&[&n]);
    let mut opts = real.options().clone();
    opts.chunk_size = cs;
    let real = StorageClient::new(opts);
    let src = tmp.join("src");
    let want = write_random_file(&src, 10 * cs + 7, 4);
    let data = fs::read(&src).unwrap();
    // A fake node holding the same version, whose stream stops after its
    // first chunk with status OK.
    let fake = |id: &str| {
        let raw = NodeClient::connect(n.local_addr()).unwrap();
        let info = stat(&raw, id).unwrap();
        let (i1, i2) = (info.clone(), info);
        let first = data[..cs as usize].to_vec();
        Server::builder()
            .register(storage_methods::STAT, move |_c, _req: BlobRef, _p| {
                Ok::<_, Status>((i1.clone(), Payload::Empty))
            })
            .register_server_stream(storage_methods::GET, move |_c, _body, _p, tx| {
                tx.send(&GetMessage::info(i2.clone()), Payload::Empty)?;
                tx.send(&GetMessage::chunk(0, crc(&first)), first.clone())?;
                Ok(Vec::new())
            })
            .bind("127.0.0.1:0")
            .unwrap()
    };
    // An id the fake ranks first for.
    let mut id = String::new();
    for i in 0.. {
        id = format!("early-{i}");
        real.put_file(&src, &id).unwrap();
        let f = fake(&id);
        let nodes = vec![f.local_addr(), n.local_addr()];
        if rank_nodes(&nodes, &id)[0] != f.local_addr() {
            real.delete(&id).unwrap();
            continue;
        }
        let (c, warnings) = client_for(nodes);
        let dst = tmp.join("dst");
        let r = c.get_to_file(&id, &dst).unwrap();
        assert_eq!(sha256_file(&dst), want);
        assert_eq!(
            r.served_by,
            vec![
                (f.local_addr(), cs),
                (n.local_addr(), data.len() as u64 - cs)
            ]
        );
        let w = warnings.lock().unwrap().clone();
        assert!(
            w.iter()
                .any(|m| m.contains("ended the get stream at 65536 of")
                    && m.contains(&format!(
                        "continuing from the replica on {}",
                        n.local_addr()
                    ))),
            "{w:?}"
        );
        // The fake alone: the GET fails, and leaves no output.
        let (c, _) = client_for(vec![f.local_addr()]);
        let dst = tmp.join("dst2");
        let e = c.get_to_file(&id, &dst).unwrap_err();
        println!("a get stream that ends early: {e}");
        assert!(
            e.message.contains("ended the get stream at 65536 of"),
            "{e}"
        );
        assert!(!dst.exists() && !tmp.join("dst2.partial").exists());
        break;
    }
    assert!(!id.is_empty());
}

#[test]
fn max_streams_must_leave_room_for_reads() {
    let tmp = TempDir::new("streams");
    let mut cfg = NodeConfig::new(tmp.join("node"));
    cfg.max_streams = cfg.max_uploads;
    let e = StorageNode::start("127.0.0.1:0", cfg).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("max_streams (128)"), "{e}");
}

/// The protocol is defined in `examples/proto/storage.proto`, package
/// `pagerpc.examples.storage`: an outside client compiling that file (with
/// the `pagerpc/options.proto` it imports, which pagerpc-build provides)
/// gets the service and the messages this node speaks. Checks the service's
/// rpcs (wire names and shapes) against the generated `storage_methods`,
/// and every message's fields (numbers and wire types) against the bytes of
/// the node's own encoding (for a oneof, of each of its variants).
#[test]
fn the_protocol_is_defined_in_a_proto_file() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/proto");
    let includes = TempDir::new("proto-includes");
    fs::create_dir_all(includes.join("pagerpc")).unwrap();
    fs::write(
        includes.join("pagerpc/options.proto"),
        pagerpc_build::OPTIONS_PROTO,
    )
    .unwrap();
    let fds = protox::compile(
        ["storage.proto"],
        [std::path::Path::new(dir), includes.path()],
    )
    .expect("storage.proto compiles");
    let file = fds
        .file
        .iter()
        .find(|f| f.name() == "storage.proto")
        .unwrap();
    assert_eq!(file.package(), "pagerpc.examples.storage");
    // The service: each rpc's wire name and shape (client streaming,
    // server streaming).
    assert_eq!(file.service.len(), 1, "one service");
    let service = &file.service[0];
    assert_eq!(service.name(), "Storage");
    let rpcs: Vec<(String, bool, bool)> = service
        .method
        .iter()
        .map(|m| {
            (
                format!("{}.{}/{}", file.package(), service.name(), m.name()),
                m.client_streaming(),
                m.server_streaming(),
            )
        })
        .collect();
    let want = [
        (storage_methods::PUT, true, false),
        (storage_methods::GET, false, true),
        (storage_methods::LIST, false, true),
        (storage_methods::STAT, false, false),
        (storage_methods::DELETE, false, false),
        (storage_methods::NODE_STATS, false, false),
    ];
    let want: Vec<(String, bool, bool)> = want
        .iter()
        .map(|&(name, c, s)| (name.to_owned(), c, s))
        .collect();
    assert_eq!(rpcs, want, "the rpcs of storage.proto vs storage_methods");
    // Encodings of every message with every field set, as the node and
    // client send them.
    let info = BlobInfo {
        id: "a".into(),
        size: 1,
        crc32c: 2,
        chunk_size: 3,
        version: 4,
        problem: "p".into(),
    };
    let put_header = PutHeader {
        crc32c: Some(9),
        ..header("a", 7)
    };
    let samples: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("Empty", vec![Empty {}.encode_to_vec()]),
        ("PutHeader", vec![put_header.encode_to_vec()]),
        (
            "PutChunk",
            vec![PutChunk { crc32c: Some(1) }.encode_to_vec()],
        ),
        ("PutEnd", vec![PutEnd { crc32c: Some(1) }.encode_to_vec()]),
        (
            "PutMessage",
            vec![
                PutMessage::header(put_header.clone()).encode_to_vec(),
                PutMessage::chunk(Some(1)).encode_to_vec(),
                PutMessage::end(Some(1)).encode_to_vec(),
            ],
        ),
        ("BlobRef", vec![BlobRef { id: "a".into() }.encode_to_vec()]),
        ("BlobInfo", vec![info.encode_to_vec()]),
        (
            "GetRequest",
            vec![GetRequest {
                id: "a".into(),
                offset: 1,
                version: 2,
            }
            .encode_to_vec()],
        ),
        (
            "GetChunk",
            vec![GetChunk {
                offset: 1,
                crc32c: 2,
            }
            .encode_to_vec()],
        ),
        (
            "GetMessage",
            vec![
                GetMessage::info(info.clone()).encode_to_vec(),
                GetMessage::chunk(1, 2).encode_to_vec(),
            ],
        ),
        (
            "ListRequest",
            vec![ListRequest {
                start_after: "a".into(),
                limit: 1,
            }
            .encode_to_vec()],
        ),
        (
            "BlobList",
            vec![BlobList {
                blobs: vec![info.clone()],
            }
            .encode_to_vec()],
        ),
        (
            "DeleteResponse",
            vec![DeleteResponse { existed: true }.encode_to_vec()],
        ),
        (
            "NodeStats",
            vec![NodeStats {
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
                uploads_refused: 13,
                open_blobs: 14,
                uploads_cut_short: 15,
            }
            .encode_to_vec()],
        ),
    ];
    assert_eq!(
        file.message_type.len(),
        samples.len(),
        "every message of the .proto is checked"
    );
    for (name, encodings) in samples {
        let msg = file
            .message_type
            .iter()
            .find(|m| m.name() == name)
            .unwrap_or_else(|| panic!("message {name} in storage.proto"));
        let mut on_wire: Vec<(u64, u64)> = encodings.iter().flat_map(|b| wire_fields(b)).collect();
        on_wire.sort();
        on_wire.dedup();
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
