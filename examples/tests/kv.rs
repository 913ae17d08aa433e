//! The key-value server over real loopback sockets: mixed-size PUT/GET
//! round trips compared byte for byte, the memory cap, concurrent clients,
//! streamed listings (bounded chunks, a stalled reader, listings cut
//! short), and the command-line programs.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{addr_in, assert_bytes_eq, spawn_and_wait_for, value_bytes, wait_until, TempDir};
use pagerpc::prost::Message;
use pagerpc::{CallOptions, Code, PageBuf, Pages, Payload};
use pagerpc_examples::kv::{self, BenchOptions, KvClient, KvConfig, KvServer};
use pagerpc_examples::util::FastRng;

fn server(max_bytes: u64) -> KvServer {
    KvServer::start(
        "127.0.0.1:0",
        &KvConfig {
            max_bytes,
            ..KvConfig::default()
        },
    )
    .unwrap()
}

/// What storing `value` under `key` costs against the cap: the store
/// compacts values of at most 64 KiB, as `Pages::compact` does here.
fn cost_of(key: &str, value: &[u8]) -> u64 {
    let p = Pages::copy_from_slice(value)
        .unwrap()
        .compact(kv::DEFAULT_COMPACT_BELOW);
    kv::entry_cost(key, &p)
}

fn page_buf(bytes: &[u8]) -> PageBuf {
    let mut b = PageBuf::new(bytes.len()).unwrap();
    b.copy_from_slice(bytes);
    b
}

/// Sizes from 0 B to 4 MiB, weighted toward small ones: about 350 MiB over
/// 10,000 values.
fn mixed_size(rng: &mut FastRng) -> usize {
    let r = rng.below(1000);
    (match r {
        0..740 => rng.below(4097),
        740..940 => 4097 + rng.below(65536 - 4096),
        940..995 => 65537 + rng.below(512 * 1024 - 65536),
        _ => 512 * 1024 + rng.below(4 * 1024 * 1024 - 512 * 1024 + 1),
    }) as usize
}

#[test]
fn ten_thousand_mixed_size_puts_and_gets_round_trip() {
    let srv = server(2 << 30);
    let c = KvClient::connect(srv.local_addr(), true).unwrap();
    let mut rng = FastRng::new(7);
    // Edge sizes first: empty, around a page, around the inline limit, and
    // the 4 MiB maximum.
    let edges = [
        0,
        1,
        4095,
        4096,
        4097,
        8192,
        16383,
        16384,
        16385,
        65536,
        65537,
        1 << 20,
        4 << 20,
    ];
    let sizes: Vec<usize> = (0..10_000)
        .map(|i| {
            edges
                .get(i)
                .copied()
                .unwrap_or_else(|| mixed_size(&mut rng))
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let t0 = Instant::now();
    for (i, &len) in sizes.iter().enumerate() {
        let key = format!("k/{i:05}");
        let want = value_bytes(len, i as u64);
        let r = c.put(&key, page_buf(&want)).unwrap();
        assert!(!r.replaced);
        let got = c.get(&key).unwrap().expect("value just stored");
        assert_bytes_eq(&got, &want, &key);
    }
    let elapsed = t0.elapsed();
    // Every value is still intact after all the others went in.
    for (i, &len) in sizes.iter().enumerate() {
        let key = format!("k/{i:05}");
        let got = c.get(&key).unwrap().expect("value stored");
        assert_bytes_eq(&got, &value_bytes(len, i as u64), &key);
    }
    let s = c.stats().unwrap();
    assert_eq!(s.keys, 10_000);
    assert_eq!(s.value_bytes, total as u64);
    let want_cost: u64 = sizes
        .iter()
        .enumerate()
        .map(|(i, &len)| cost_of(&format!("k/{i:05}"), &vec![0u8; len]))
        .sum();
    assert_eq!(s.bytes, want_cost);
    assert_eq!(s.bytes, s.memory + 10_000 * (7 + kv::ENTRY_OVERHEAD));
    assert_eq!(s.payload_bytes_received, total as u64);
    let cs = c.inner().counters();
    println!(
        "kv round trips: 10000 PUT/GET pairs, {:.1} MiB each way in {:.2} s; server mapped {:.1} % \
         of received bytes, client mapped {:.1} %",
        total as f64 / (1 << 20) as f64,
        elapsed.as_secs_f64(),
        s.mapped_percent(),
        cs.mapped_percent()
    );
    assert!(
        s.mapped_percent() > 80.0,
        "zero-copy receive should map most bytes: {s:?}"
    );
}

#[test]
fn memory_cap_refuses_a_put_clearly_and_keeps_what_is_stored() {
    let cap = 1 << 20;
    let srv = server(cap);
    let c = KvClient::connect(srv.local_addr(), true).unwrap();
    let a = value_bytes(300_000, 1);
    let b = value_bytes(300_000, 2);
    let d = value_bytes(300_000, 3);
    // 300,000 bytes hold 74 pages (303,104 bytes), plus the key and the
    // bookkeeping.
    let entry = 303_104 + 1 + kv::ENTRY_OVERHEAD;
    assert_eq!(cost_of("a", &a), entry);
    c.put("a", page_buf(&a)).unwrap();
    c.put("b", page_buf(&b)).unwrap();
    c.put("c", page_buf(&a)).unwrap();
    let before = c.stats().unwrap();
    assert_eq!(before.bytes, 3 * entry);
    assert_eq!(before.value_bytes, 900_000);

    let e = c.put("d", page_buf(&d)).unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("memory cap of 1048576 bytes")
            && e.message().contains("'d'")
            && e.message()
                .contains("(300000 bytes) holds 296 KiB of memory"),
        "the error names the key, the value, its memory and the cap: {}",
        e.message()
    );
    assert_eq!(c.get("d").unwrap(), None, "the refused value is not stored");
    assert_bytes_eq(&c.get("a").unwrap().unwrap(), &a, "a");
    assert_bytes_eq(&c.get("b").unwrap().unwrap(), &b, "b");
    assert_bytes_eq(&c.get("c").unwrap().unwrap(), &a, "c");
    let after = c.stats().unwrap();
    assert_eq!(after.bytes, before.bytes);
    assert_eq!(after.keys, 3);
    assert_eq!(after.puts_refused, 1);

    // Replacing a key counts only the difference: a 400 kB value in place
    // of a 300 kB one fits (1,008,219 bytes), a 500 kB one does not.
    let a2 = value_bytes(400_000, 4);
    let r = c.put("a", page_buf(&a2)).unwrap();
    assert!(r.replaced && r.old_len == 300_000);
    assert_eq!(r.stored_bytes, 2 * entry + cost_of("a", &a2));
    let e = c.put("a", page_buf(&value_bytes(500_000, 5))).unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert_bytes_eq(
        &c.get("a").unwrap().unwrap(),
        &a2,
        "a after refused replace",
    );
    // At the cap, replacing with a value of the same size still works.
    c.put("a", page_buf(&a2)).unwrap();

    // Freeing room lets the refused PUT in.
    let freed = c.delete("b").unwrap();
    assert!(freed.existed);
    assert_eq!(freed.freed, entry);
    c.put("d", page_buf(&d)).unwrap();
    assert_bytes_eq(&c.get("d").unwrap().unwrap(), &d, "d");
    assert_eq!(c.stats().unwrap().bytes, 2 * entry + cost_of("a", &a2));
}

#[test]
fn concurrent_clients_see_their_own_data() {
    let srv = Arc::new(server(1 << 30));
    let addr = srv.local_addr();
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            std::thread::spawn(move || {
                let c = KvClient::connect(addr, true).unwrap();
                let mut rng = FastRng::new(100 + t);
                let mut mine: HashMap<String, (usize, u64)> = HashMap::new();
                for i in 0..400u64 {
                    let key = format!("c{t}/{}", rng.below(40));
                    match rng.below(10) {
                        0..5 => {
                            let len = mixed_size(&mut rng).min(256 * 1024);
                            let seed = t << 32 | i;
                            c.put(&key, page_buf(&value_bytes(len, seed))).unwrap();
                            mine.insert(key, (len, seed));
                        }
                        5..9 => match (c.get(&key).unwrap(), mine.get(&key)) {
                            (Some(v), Some(&(len, seed))) => {
                                assert_bytes_eq(&v, &value_bytes(len, seed), &key)
                            }
                            (None, None) => {}
                            (got, want) => panic!("{key}: got {got:?}, expected {want:?}"),
                        },
                        _ => {
                            let r = c.delete(&key).unwrap();
                            assert_eq!(r.existed, mine.remove(&key).is_some(), "{key}");
                        }
                    }
                }
                // A listing of this client's prefix shows exactly its keys,
                // in byte order.
                let listed: Vec<kv::ListEntry> =
                    c.keys(&format!("c{t}/")).map(Result::unwrap).collect();
                let mut want: Vec<&String> = mine.keys().collect();
                want.sort();
                assert_eq!(listed.iter().map(|e| &e.key).collect::<Vec<_>>(), want);
                for e in &listed {
                    assert_eq!(e.len as usize, mine[&e.key].0);
                }
                mine.len()
            })
        })
        .collect();
    let kept: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(srv.stats().keys as usize, kept);
}

/// The keys of a listing, unwrapped.
fn listed(keys: kv::Keys) -> Vec<String> {
    keys.map(|e| e.unwrap().key).collect()
}

/// A listing with `prefix`, `start_after` and `limit`.
fn list(c: &KvClient, prefix: &str, start_after: &str, limit: u64) -> Vec<String> {
    let req = kv::ListRequest {
        prefix: prefix.into(),
        limit,
        start_after: start_after.into(),
    };
    listed(c.list(&req, &CallOptions::default()))
}

/// The chunks of a `List` call, received with the generated client,
/// checked against the bounds the protocol promises.
fn raw_chunks(c: &KvClient, prefix: &str) -> Vec<kv::ListChunk> {
    let req = kv::ListRequest {
        prefix: prefix.into(),
        ..Default::default()
    };
    let mut rx = c.rpc().list(&req).unwrap();
    let mut chunks = Vec::new();
    // A chunk carries no payload: List's responses carry none, so the
    // generated receiver would fail on one.
    while let Some(chunk) = rx.recv().unwrap() {
        assert!(!chunk.entries.is_empty(), "an empty chunk");
        assert!(chunk.entries.len() <= kv::LIST_CHUNK_KEYS);
        assert!(chunk.encoded_len() <= kv::LIST_CHUNK_BYTES);
        chunks.push(chunk);
    }
    chunks
}

#[test]
fn listing_streams_by_prefix_start_and_limit_in_bounded_chunks() {
    let srv = server(1 << 30);
    let c = KvClient::connect(srv.local_addr(), false).unwrap();
    for k in ["apple", "apricot", "banana", "app", "b"] {
        c.put(k, k.as_bytes().to_vec()).unwrap();
    }
    assert_eq!(listed(c.keys("ap")), ["app", "apple", "apricot"]);
    assert_eq!(
        listed(c.keys("")),
        ["app", "apple", "apricot", "b", "banana"]
    );
    assert_eq!(listed(c.keys("zzz")), Vec::<String>::new());
    let e: Vec<kv::ListEntry> = c.keys("ban").map(Result::unwrap).collect();
    assert_eq!((e[0].key.as_str(), e[0].len), ("banana", 6));
    // A limit, and a start after a key; a start before the prefix starts
    // at the prefix.
    assert_eq!(list(&c, "ap", "", 2), ["app", "apple"]);
    assert_eq!(list(&c, "ap", "app", 0), ["apple", "apricot"]);
    assert_eq!(list(&c, "b", "a", 0), ["b", "banana"]);
    assert_eq!(list(&c, "ap", "apricot", 0), Vec::<String>::new());
    assert_eq!(list(&c, "", "apricot", 1), ["b"]);
    // Short keys: chunks of LIST_CHUNK_KEYS entries.
    for i in 0..2500 {
        c.put(&format!("short/{i:04}"), vec![1u8]).unwrap();
    }
    let chunks = raw_chunks(&c, "short/");
    let sizes: Vec<usize> = chunks.iter().map(|c| c.entries.len()).collect();
    assert_eq!(sizes, [1000, 1000, 500]);
    let all = listed(c.keys("short/"));
    assert_eq!(all.len(), 2500);
    assert!(all.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(list(&c, "short/", "short/0999", 1001).len(), 1001);
    // Long keys: a chunk ends before it encodes to more than
    // LIST_CHUNK_BYTES.
    for i in 0..300 {
        c.put(&format!("long/{i:04}{}", "x".repeat(1000)), vec![1u8])
            .unwrap();
    }
    let chunks = raw_chunks(&c, "long/");
    assert!(
        chunks.len() >= 300 * 1000 / kv::LIST_CHUNK_BYTES,
        "{}",
        chunks.len()
    );
    let long: Vec<String> = chunks
        .into_iter()
        .flat_map(|c| c.entries)
        .map(|e| e.key)
        .collect();
    assert_eq!(long, listed(c.keys("long/")));
    assert_eq!(long.len(), 300);
    assert!(long.windows(2).all(|w| w[0] < w[1]));
    let s = c.stats().unwrap();
    assert_eq!((s.lists_open, s.lists_cut_short), (0, 0), "{s:?}");
    assert_eq!(s.lists_completed, 14);
    // Errors.
    assert_eq!(c.get("nope").unwrap(), None);
    assert!(!c.delete("nope").unwrap().existed);
    assert_eq!(
        c.put("", vec![1u8]).unwrap_err().code(),
        Code::InvalidArgument
    );
    assert_eq!(
        c.put(&"k".repeat(kv::MAX_KEY_LEN + 1), vec![1u8])
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
    // A hand-written peer speaking the wire names: a payload on a method
    // whose requests carry none is refused, not ignored.
    let e = c
        .inner()
        .call::<_, kv::GetResponse>(
            kv::kv_methods::GET,
            &kv::KeyRequest { key: "b".into() },
            vec![1u8],
        )
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // The old protocol's methods are gone: a client of it is told so
    // instead of misreading a stream. These names are deliberately
    // strings: they are a hand-written peer of the old protocol, which no
    // generated code names.
    for old in ["kv.list", "kv.list_stream", "kv.get"] {
        let e = c
            .inner()
            .call::<_, kv::ListChunk>(old, &kv::ListRequest::default(), Payload::Empty)
            .unwrap_err();
        assert_eq!(e.code(), Code::Unimplemented, "{old}: {e}");
    }
}

#[test]
fn bench_reports_throughput_latency_and_mapping() {
    let srv = server(1 << 30);
    for (size, ops) in [(4096usize, 20_000u64), (1 << 20, 2_000)] {
        let r = kv::bench(
            srv.local_addr(),
            &BenchOptions {
                clients: 4,
                value_size: size,
                ops,
                keys_per_client: 16,
                zerocopy: true,
                progress: false,
            },
        )
        .unwrap();
        println!("{r}");
        assert_eq!(r.ops, ops);
        assert!(r.p50 <= r.p99);
        assert_eq!(r.server_received, ops / 2 * size as u64);
    }
    // The bench deletes its keys.
    assert_eq!(srv.stats().keys, 0);
}

#[test]
fn command_line_programs() {
    let dir = TempDir::new("kv-cli");
    let (mut server, line) = spawn_and_wait_for(
        env!("CARGO_BIN_EXE_kv-server"),
        &["--listen", "127.0.0.1:0", "--max-bytes", "8MiB"],
        "listening on",
    );
    let addr = addr_in(&line);
    let kv = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kv"))
            .arg("--addr")
            .arg(&addr)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let input = dir.join("in");
    let data = value_bytes(100_000, 9);
    std::fs::write(&input, &data).unwrap();
    let (ok, _, err) = kv(&["put", "photo", input.to_str().unwrap()]);
    assert!(ok, "{err}");
    let output = dir.join("out");
    let (ok, _, err) = kv(&["get", "photo", "-o", output.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_bytes_eq(&std::fs::read(&output).unwrap(), &data, "kv get -o");
    let (ok, out, _) = kv(&["ls", "ph"]);
    assert!(ok && out.contains("100000  photo"), "{out}");
    let (ok, out, _) = kv(&["stats"]);
    assert!(ok && out.contains("keys            1"), "{out}");
    let big = dir.join("big");
    std::fs::write(&big, vec![0u8; 9 << 20]).unwrap();
    let (ok, _, err) = kv(&["put", "big", big.to_str().unwrap()]);
    assert!(
        !ok && err.contains("ResourceExhausted") && err.contains("memory cap"),
        "{err}"
    );
    let (ok, out, err) = kv(&[
        "bench",
        "--clients",
        "2",
        "--value-size",
        "8k",
        "--ops",
        "200",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("ops/s") && out.contains("mmap'ed"), "{out}");
    let (ok, _, err) = kv(&["del", "photo"]);
    assert!(ok, "{err}");
    let (ok, _, err) = kv(&["get", "photo"]);
    assert!(!ok && err.contains("no key 'photo'"), "{err}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Kills and reaps a server process when the test ends, however it ends.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the real `kv-server` with `args`; returns it and its address.
fn kv_server_process(args: &[&str]) -> (ChildGuard, String) {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let (child, line) = spawn_and_wait_for(env!("CARGO_BIN_EXE_kv-server"), &all, "listening on");
    (ChildGuard(child), addr_in(&line))
}

/// Resident memory of process `pid`, in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib * 1024
}

/// Mappings of process `pid` (lines of `/proc/<pid>/maps`), which the
/// kernel caps at `vm.max_map_count`.
fn map_count(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .count()
}

const MIB: u64 = 1 << 20;

/// Regression: the cap counted `key.len() + value.len()`, but a one-byte
/// value received on its own holds a whole 4 KiB page: 100,000 one-byte
/// PUTs under a 4 MiB cap were all stored and took the server to 413 MiB
/// of RSS. Now the cap counts the memory each entry really holds (values
/// compacted into 16-byte pool slots), refuses PUTs clearly once it is
/// reached, and the process stays near it.
#[test]
fn one_byte_values_are_refused_at_the_cap_and_rss_stays_bounded() {
    const CAP: u64 = 4 * MIB;
    let (server, addr) = kv_server_process(&["--max-bytes", "4MiB"]);
    let pid = server.0.id();
    let c = KvClient::connect(addr.as_str(), true).unwrap();
    let rss0 = rss(pid);
    let mut stored = 0u64;
    let mut first_refused = None;
    for i in 0..100_000u64 {
        let key = format!("k{i:06}");
        match c.put(&key, vec![i as u8]) {
            Ok(r) => {
                assert!(
                    first_refused.is_none(),
                    "{key} stored after {first_refused:?} was refused"
                );
                assert!(r.stored_bytes <= CAP);
                stored += 1;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{key}: {e}");
                let m = e.message();
                assert!(
                    m.contains(&format!("PUT '{key}' refused"))
                        && m.contains("the value of 1 B (1 bytes)")
                        && m.contains("memory cap of 4194304 bytes (--max-bytes 4194304)")
                        && m.contains("nothing was changed"),
                    "the refusal names the key, the value and the cap: {m}"
                );
                first_refused.get_or_insert(i);
            }
        }
    }
    let s = c.stats().unwrap();
    let rss1 = rss(pid);
    println!(
        "100000 one-byte PUTs under a 4 MiB cap: {stored} stored, {} refused; {} accounted, \
         {} of value memory; server RSS {:.1} MiB -> {:.1} MiB",
        s.puts_refused,
        s.bytes,
        s.memory,
        rss0 as f64 / MIB as f64,
        rss1 as f64 / MIB as f64
    );
    assert!(
        first_refused.is_some(),
        "all 100000 one-byte values fit a 4 MiB cap: the cap does not count what they hold"
    );
    assert_eq!(s.keys, stored);
    assert_eq!(s.puts_refused, 100_000 - stored);
    assert!(s.bytes <= CAP);
    // Full: another entry like these would not fit.
    assert!(s.bytes + 7 + 16 + kv::ENTRY_OVERHEAD > CAP, "{s:?}");
    assert_eq!(s.compacted, stored, "every value went to the pool");
    assert_eq!(
        s.memory,
        16 * stored,
        "a one-byte value holds a 16-byte slot"
    );
    assert!(
        rss1 < rss0 + 3 * CAP,
        "server RSS grew by {} MiB under a {} MiB cap",
        (rss1 - rss0) / MIB,
        CAP / MIB
    );
    // What was stored is intact.
    for i in (0..stored).step_by(97) {
        let v = c.get(&format!("k{i:06}")).unwrap().expect("stored value");
        assert_eq!(*v, [i as u8][..]);
    }
}

/// 4 KiB values, each with its own first bytes so that mix-ups show.
fn numbered_page(i: u64) -> PageBuf {
    let mut b = PageBuf::new(4096).unwrap();
    FastRng::new(i).fill(&mut b);
    b[..8].copy_from_slice(&i.to_le_bytes());
    b
}

fn check_numbered_page(v: &[u8], i: u64) {
    assert_eq!(v.len(), 4096, "value {i}");
    assert_eq!(v[..8], i.to_le_bytes(), "value {i} holds another's bytes");
    let mut want = vec![0u8; 4096];
    FastRng::new(i).fill(&mut want);
    assert_bytes_eq(&v[8..], &want[8..], &format!("value {i}"));
}

/// Regression: every value kept from a zero-copy receive was a mapping of
/// its own, and after about 65,000 of them the server process reached
/// `vm.max_map_count` (65,530) and answered PUTs by closing the
/// connection. Now the store compacts them into shared pool slabs: 100,000
/// zero-copy 4 KiB values are all stored and readable with the server far
/// below the limit.
#[test]
fn hundred_thousand_zero_copy_values_use_few_mappings() {
    const N: u64 = 100_000;
    let (server, addr) = kv_server_process(&["--max-bytes", "2GiB"]);
    let pid = server.0.id();
    let c = KvClient::connect(addr.as_str(), true).unwrap();
    let maps0 = map_count(pid);
    let t0 = Instant::now();
    for i in 0..N {
        c.put(&format!("v{i:06}"), numbered_page(i))
            .unwrap_or_else(|e| {
                panic!(
                    "PUT {i} failed: {e} (server has {} mappings)",
                    map_count(pid)
                )
            });
    }
    let put_time = t0.elapsed();
    let maps1 = map_count(pid);
    let s = c.stats().unwrap();
    println!(
        "{N} zero-copy 4 KiB PUTs in {:.1} s: server mappings {maps0} -> {maps1}, {:.1} % of \
         received bytes mapped, {} values compacted, {} in mappings of their own",
        put_time.as_secs_f64(),
        s.mapped_percent(),
        s.compacted,
        s.own_mappings
    );
    assert_eq!(s.keys, N);
    assert!(
        s.mapped_percent() > 50.0,
        "the values should arrive zero-copy (mapped): {s:?}"
    );
    assert!(
        maps1 < 5_000,
        "{maps1} mappings for {N} values (vm.max_map_count is 65530)"
    );
    for i in 0..N {
        let v = c
            .get(&format!("v{i:06}"))
            .unwrap()
            .unwrap_or_else(|| panic!("value {i} missing"));
        check_numbered_page(&v, i);
    }
}

/// Regression: where mappings do run out (here: compaction off, so every
/// zero-copy value keeps its own mapping and 70,000 of them pass
/// `vm.max_map_count`), a PUT whose payload could not be mapped was
/// answered by closing the connection, silently, and the connection gave
/// zero-copy up for good. Now it is copied into memory the process still
/// has, every PUT is answered, and mapping resumes once mappings are free.
#[test]
fn puts_past_the_mapping_limit_are_answered_not_dropped() {
    const N: u64 = 70_000;
    let (server, addr) = kv_server_process(&["--max-bytes", "2GiB", "--compact-below", "0"]);
    let pid = server.0.id();
    let c = KvClient::connect(addr.as_str(), true).unwrap();
    let mut refused = 0u64;
    for i in 0..N {
        match c.put(&format!("v{i:06}"), numbered_page(i)) {
            Ok(_) => {}
            // A typed refusal is an answer too; a closed connection is not.
            Err(e) if e.code() == Code::ResourceExhausted => refused += 1,
            Err(e) => panic!(
                "PUT {i} failed: {e} (code {:?}; server has {} mappings)",
                e.code(),
                map_count(pid)
            ),
        }
    }
    let maps = map_count(pid);
    let s = c.stats().unwrap();
    println!(
        "{N} zero-copy 4 KiB PUTs without compaction: {} stored, {refused} refused, server at \
         {maps} mappings, {} values in mappings of their own",
        s.keys, s.own_mappings
    );
    assert!(
        maps > 65_000,
        "the test should take the server to vm.max_map_count: {maps} mappings"
    );
    assert_eq!(s.keys + refused, N);
    assert!(s.keys > 65_000, "{s:?}");
    for i in (0..N).step_by(7) {
        if let Some(v) = c.get(&format!("v{i:06}")).unwrap() {
            check_numbered_page(&v, i);
        }
    }
    // The shortage passes: once values are deleted, the same connection
    // maps payloads again (it used to give zero-copy up for good).
    for i in 0..10_000 {
        assert!(c.delete(&format!("v{i:06}")).unwrap().existed);
    }
    let before = c.stats().unwrap();
    for i in N..N + 5_000 {
        c.put(&format!("w{i:06}"), numbered_page(i)).unwrap();
    }
    let after = c.stats().unwrap();
    let mapped = after.bytes_mapped - before.bytes_mapped;
    println!(
        "after deleting 10000 values: {} of 5000 new values' bytes mapped, server at {} mappings",
        mapped / 4096,
        map_count(pid)
    );
    assert!(
        mapped >= 4_000 * 4096,
        "zero-copy should resume on the connection: only {mapped} bytes mapped"
    );
    for i in N..N + 5_000 {
        check_numbered_page(&c.get(&format!("w{i:06}")).unwrap().unwrap(), i);
    }
}

/// Regression: `kv ls` sent every key in one response, which failed once
/// the keys passed the 64 KiB header limit (1,000 keys of 64 bytes). Now
/// the server streams them in bounded chunks, in one `List` call.
#[test]
fn kv_ls_lists_a_hundred_thousand_keys_of_a_hundred_bytes() {
    const N: usize = 100_000;
    let (_server, addr) = kv_server_process(&[]);
    let c = KvClient::connect(addr.as_str(), false).unwrap();
    let key = |i: usize| format!("{i:08}{}", "k".repeat(92));
    for i in 0..N {
        c.put(&key(i), vec![(i % 251) as u8; 1 + i % 3]).unwrap();
    }
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["--addr", &addr, "ls"])
        .output()
        .unwrap();
    let elapsed = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kv ls failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    println!(
        "kv ls: {} keys of 100 bytes in {:.2} s",
        lines.len(),
        elapsed.as_secs_f64()
    );
    assert_eq!(lines.len(), N);
    for (i, line) in lines.iter().enumerate() {
        let (len, k) = line.trim_start().split_once("  ").unwrap();
        assert_eq!(k, key(i), "line {i}");
        assert_eq!(len, (1 + i % 3).to_string(), "line {i}");
    }
    // Through one stream, which the server counts.
    let s = c.stats().unwrap();
    assert_eq!(
        (s.lists_completed, s.lists_cut_short, s.lists_open),
        (1, 0, 0)
    );
    assert!(s.list_bytes_sent > (N * 100) as u64, "{s:?}");
    // --limit stops early, and says so.
    let out = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["--addr", &addr, "ls", "--limit", "2500", "0000"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2500);
    assert!(String::from_utf8_lossy(&out.stderr).contains("raise --limit"));
}

/// Key `i` of the big listings below: 1,000 bytes, in index order.
fn long_key(i: usize) -> String {
    format!("{i:08}{}", "l".repeat(992))
}

/// Stores `n` keys `long_key(0..n)` with 1-byte values over two
/// connections.
fn fill_long_keys(addr: &str, n: usize) {
    std::thread::scope(|s| {
        for t in 0..2 {
            s.spawn(move || {
                let c = KvClient::connect(addr, false).unwrap();
                for i in (t..n).step_by(2) {
                    c.put(&long_key(i), vec![1u8]).unwrap();
                }
            });
        }
    });
}

/// Checks that `keys` are `long_key(from..)`, in order.
#[track_caller]
fn check_long_keys(keys: &[String], from: usize) {
    for (j, k) in keys.iter().enumerate() {
        assert!(*k == long_key(from + j), "key {} is out of place", from + j);
    }
}

/// The stream window the server's listing gets from a default client:
/// the client announces it, and the server sends no further ahead.
fn client_window() -> u64 {
    pagerpc::ClientConfig::default().stream_window
}

/// A client that stops reading mid-listing: the server's listing stops
/// once about one stream window is unread (it does not go on queueing
/// the whole listing, of twelve windows, nor take a snapshot of the keys),
/// the server's memory grows by at most about that, and other connections
/// go on with PUTs, GETs and whole listings meanwhile. The stalled client
/// then reads on and gets every key, in order.
#[test]
fn a_stalled_listing_holds_about_one_stream_window() {
    const N: usize = 100_000; // 100 MB of keys to list: 12 windows
    let window = client_window();
    let (server, addr) = kv_server_process(&[]);
    let pid = server.0.id();
    fill_long_keys(&addr, N);
    let other = KvClient::connect(addr.as_str(), false).unwrap();
    // One whole listing first: what it sends is the listing's size, and
    // the server's memory is measured after it.
    let b0 = other.stats().unwrap().list_bytes_sent;
    let all = listed(other.keys(""));
    assert_eq!(all.len(), N);
    check_long_keys(&all, 0);
    drop(all);
    let b1 = other.stats().unwrap().list_bytes_sent;
    let listing = b1 - b0;
    assert!(
        listing > 10 * window,
        "the listing should be over 10 windows"
    );
    let rss0 = rss(pid);

    // Read a few keys, then stop reading.
    let stalled_client = KvClient::connect(addr.as_str(), false).unwrap();
    let mut stalled = stalled_client.keys("");
    let first: Vec<String> = stalled.by_ref().take(10).map(|e| e.unwrap().key).collect();
    check_long_keys(&first, 0);
    // The server sends until the window is spent.
    let sent = || other.stats().unwrap().list_bytes_sent - b1;
    assert!(
        wait_until(Duration::from_secs(60), || sent()
            >= window - kv::LIST_CHUNK_BYTES as u64),
        "the stalled listing sent only {} bytes",
        sent()
    );
    let rss1 = rss(pid);

    // Other connections go on: PUTs, GETs, DELETEs and a whole listing.
    let third = KvClient::connect(addr.as_str(), true).unwrap();
    for i in 0..1000 {
        let key = format!("other/{i}");
        third.put(&key, numbered_page(i)).unwrap();
        check_numbered_page(&third.get(&key).unwrap().unwrap(), i);
        assert!(third.delete(&key).unwrap().existed);
    }
    let again = listed(third.keys(""));
    assert_eq!(again.len(), N);
    check_long_keys(&again, 0);
    drop(again);
    let s = other.stats().unwrap();
    assert_eq!(s.lists_open, 1, "the stalled listing is still open: {s:?}");
    // What the stalled listing sent in all: nothing more after it stalled.
    let stalled_bytes = s.list_bytes_sent - b1 - listing;
    let rss2 = rss(pid);
    println!(
        "stalled listing: {:.1} MiB sent of a {:.1} MiB listing (window {:.1} MiB); server RSS \
         {:.1} -> {:.1} MiB when it stalled, {:.1} MiB after 1000 PUT/GET/DEL and a whole \
         listing on other connections",
        stalled_bytes as f64 / MIB as f64,
        listing as f64 / MIB as f64,
        window as f64 / MIB as f64,
        rss0 as f64 / MIB as f64,
        rss1 as f64 / MIB as f64,
        rss2 as f64 / MIB as f64
    );
    assert!(
        stalled_bytes <= window + 2 * kv::LIST_CHUNK_BYTES as u64,
        "the stalled listing sent {stalled_bytes} bytes, past its window of {window}"
    );
    assert!(
        rss1 < rss0 + window + 8 * MIB,
        "the server grew by {} MiB for a stalled listing (window {} MiB)",
        (rss1 - rss0) / MIB,
        window / MIB
    );

    // Reading on gets the rest, in order, to a clean end.
    let rest: Vec<String> = stalled.map(|e| e.unwrap().key).collect();
    assert_eq!(first.len() + rest.len(), N);
    check_long_keys(&rest, first.len());
    let s = other.stats().unwrap();
    assert_eq!(
        (s.lists_completed, s.lists_cut_short, s.lists_open),
        (3, 0, 0),
        "{s:?}"
    );
}

/// A listing cut short is an error, not a short list: the server killed
/// mid-listing makes `kv ls` fail after the keys it printed (a correct
/// prefix of the listing), and `KvClient::keys` end with an `Err`;
/// a listing dropped by its client, or past its deadline, is counted as cut
/// short by the server, whose stream ends and frees its thread.
#[test]
fn a_listing_cut_short_is_an_error_not_a_short_list() {
    const N: usize = 40_000; // 40 MB: several windows
    let (mut server, addr) = kv_server_process(&[]);
    fill_long_keys(&addr, N);
    let c = KvClient::connect(addr.as_str(), false).unwrap();

    // The client drops its listing part-way: the server sees the cancel.
    let mut keys = c.keys("");
    check_long_keys(&[keys.next().unwrap().unwrap().key], 0);
    drop(keys);
    assert!(
        wait_until(Duration::from_secs(30), || {
            let s = c.stats().unwrap();
            s.lists_open == 0 && s.lists_cut_short == 1
        }),
        "the dropped listing is not over on the server: {:?}",
        c.stats().unwrap()
    );
    assert_eq!(c.stats().unwrap().lists_completed, 0);

    // A deadline that passes while the client does not read: the keys
    // already received come out, then the error, never a quiet end.
    let opts = CallOptions {
        timeout: Some(Duration::from_millis(500)),
        ..CallOptions::default()
    };
    let mut keys = c.list(&kv::ListRequest::default(), &opts);
    check_long_keys(&[keys.next().unwrap().unwrap().key], 0);
    assert!(
        wait_until(Duration::from_secs(30), || c
            .stats()
            .unwrap()
            .lists_cut_short
            == 2),
        "the server's listing did not end at its deadline"
    );
    let rest: Vec<_> = keys.collect();
    let (last, got) = rest.split_last().unwrap();
    let e = last.as_ref().unwrap_err();
    assert_eq!(e.code(), Code::DeadlineExceeded, "{e}");
    assert!(got.len() + 1 < N, "{} keys before the deadline", got.len());
    let got: Vec<String> = got
        .iter()
        .map(|e| e.as_ref().unwrap().key.clone())
        .collect();
    check_long_keys(&got, 1);
    assert_eq!(c.stats().unwrap().lists_open, 0);

    // `kv ls`, with the server killed once the listing is under way. Its
    // stdout is a pipe read only after the kill, so it cannot have all
    // the keys by then.
    let mut ls = Command::new(env!("CARGO_BIN_EXE_kv"))
        .args(["--addr", &addr, "ls"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(ls.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(line.ends_with(&format!("{}\n", long_key(0))), "{line}");
    let mut keys_before_kill = c.keys("");
    assert!(keys_before_kill.next().unwrap().is_ok());
    server.0.kill().unwrap();
    server.0.wait().unwrap();
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    ls.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = ls.wait().unwrap();
    let printed: Vec<String> = std::iter::once(line.as_str())
        .chain(rest.lines())
        .map(|l| {
            l.trim_start()
                .split_once("  ")
                .unwrap()
                .1
                .trim_end()
                .to_owned()
        })
        .collect();
    println!(
        "kv ls with the server killed: printed {} of {N} keys, exit {status}, stderr: {}",
        printed.len(),
        err.trim()
    );
    assert!(!status.success(), "kv ls succeeded with a short list");
    assert!(
        err.contains(&format!("ls failed after {} keys", printed.len()))
            && err.contains("incomplete"),
        "{err}"
    );
    assert!(printed.len() < N);
    check_long_keys(&printed, 0);
    // The library client: the same, an Err as the last item.
    let rest: Vec<_> = keys_before_kill.collect();
    let (last, got) = rest.split_last().expect("an error after the kill");
    assert!(
        last.is_err(),
        "the listing ended quietly after {} keys",
        got.len()
    );
    assert!(got.iter().all(Result::is_ok) && got.len() + 1 < N);
}

/// A server shut down while a listing waits for its client: the shutdown
/// does not wait for the client (which may never read again) past its
/// grace, and the client's listing ends with an error after the keys it
/// had received, not with a quiet end.
#[test]
fn shutdown_cuts_a_stalled_listing_short_with_an_error() {
    const N: usize = 20_000; // 20 MB: more than a window
    let srv = server(1 << 30);
    let addr = srv.local_addr().to_string();
    fill_long_keys(&addr, N);
    let c = KvClient::connect(addr.as_str(), false).unwrap();
    let mut keys = c.keys("");
    check_long_keys(&[keys.next().unwrap().unwrap().key], 0);
    let window = client_window();
    assert!(wait_until(Duration::from_secs(60), || srv
        .stats()
        .list_bytes_sent
        >= window - kv::LIST_CHUNK_BYTES as u64));
    let t0 = Instant::now();
    // The library tells a stream handler waiting for credit that the
    // server is going, so the listing's handler ends (with an error for
    // the client) within the grace, or the grace cuts it: either way the
    // shutdown is quick and the listing is cut short.
    let _ = srv.shutdown_timeout(Duration::from_millis(300));
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
    let rest: Vec<_> = keys.collect();
    let (last, got) = rest.split_last().unwrap();
    assert!(
        last.is_err(),
        "the listing ended quietly after {} keys",
        got.len() + 1
    );
    assert!(got.len() + 1 < N);
    let got: Vec<String> = got
        .iter()
        .map(|e| e.as_ref().unwrap().key.clone())
        .collect();
    check_long_keys(&got, 1);
}

/// Library issue, not fixed here (hence ignored; run with `--ignored`):
/// the server's side of a stream sends as far as the *client's* announced
/// `stream_window` lets it, with no bound of its own. A client that
/// announces a 1 GiB window and stops reading makes the server queue the
/// whole listing (40 MB here; 96 MiB of queued chunks took `kv-server`
/// from 117 to 210 MiB of RSS) instead of about one
/// `ServerConfig::stream_window` (8 MiB). `max_outbound_bytes_per_conn`
/// (16 MiB) does not stop `OutStream::send` either; only
/// `progress_timeout` (30 s) ends it, by closing the connection.
#[test]
#[ignore = "pagerpc: OutStream::send is bounded only by the window the client announces"]
fn a_stalled_listing_is_bounded_by_the_servers_window_whatever_the_client_announces() {
    const N: usize = 40_000;
    let bound = pagerpc::ServerConfig::default().stream_window + 2 * kv::LIST_CHUNK_BYTES as u64;
    let (_server, addr) = kv_server_process(&[]);
    fill_long_keys(&addr, N);
    let c = KvClient::connect(addr.as_str(), false).unwrap();
    assert_eq!(listed(c.keys("")).len(), N);
    let listing = c.stats().unwrap().list_bytes_sent;
    let greedy = kv::proto::KvClient::new(
        pagerpc::Client::connect_with(
            addr.as_str(),
            pagerpc::ClientConfig {
                stream_window: 1 << 30,
                ..pagerpc::ClientConfig::default()
            },
        )
        .unwrap(),
    );
    let mut rx = greedy.list(&kv::ListRequest::default()).unwrap();
    rx.recv().unwrap().expect("a first chunk");
    // Then it stops reading. The listing reaches the bound either way...
    let sent = || c.stats().unwrap().list_bytes_sent - listing;
    assert!(wait_until(Duration::from_secs(60), || sent()
        >= bound - 3 * kv::LIST_CHUNK_BYTES as u64));
    // ...and, if the server bounds it, stays there while another whole
    // listing runs.
    assert_eq!(listed(c.keys("")).len(), N);
    let stalled = sent() - listing;
    let s = c.stats().unwrap();
    println!(
        "stalled client announcing a 1 GiB window: {stalled} bytes of a {listing}-byte listing \
         sent, bound {bound}; listings completed {}",
        s.lists_completed
    );
    assert!(
        stalled <= bound,
        "the server sent {stalled} bytes of the listing to a client that reads nothing"
    );
    drop(rx);
}
