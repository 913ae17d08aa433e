//! The key-value server over real loopback sockets: mixed-size PUT/GET
//! round trips compared byte for byte, the memory cap, concurrent clients,
//! LIST, and the command-line programs.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use common::{addr_in, assert_bytes_eq, spawn_and_wait_for, value_bytes, TempDir};
use pagerpc::{Code, PageBuf};
use pagerpc_examples::kv::{self, BenchOptions, KvClient, KvConfig, KvServer};
use pagerpc_examples::util::FastRng;

fn server(max_bytes: u64) -> KvServer {
    KvServer::start(
        "127.0.0.1:0",
        &KvConfig {
            max_bytes,
            zerocopy: true,
            threads: None,
        },
    )
    .unwrap()
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
    assert_eq!(s.bytes, (total + 10_000 * 7) as u64);
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
    c.put("a", page_buf(&a)).unwrap();
    c.put("b", page_buf(&b)).unwrap();
    c.put("c", page_buf(&a)).unwrap();
    let before = c.stats().unwrap();
    assert_eq!(before.bytes, 900_003);

    let e = c.put("d", page_buf(&d)).unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("memory cap of 1048576 bytes") && e.message().contains("'d'"),
        "the error names the key and the cap: {}",
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
    // of a 300 kB one fits (1,000,003 bytes), a 500 kB one does not.
    let a2 = value_bytes(400_000, 4);
    let r = c.put("a", page_buf(&a2)).unwrap();
    assert!(r.replaced && r.old_len == 300_000 && r.stored_bytes == 1_000_003);
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
    assert!(c.delete("b").unwrap().existed);
    c.put("d", page_buf(&d)).unwrap();
    assert_bytes_eq(&c.get("d").unwrap().unwrap(), &d, "d");
    assert_eq!(c.stats().unwrap().bytes, 1_000_003);
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
                // LIST with this client's prefix shows exactly its keys.
                let l = c.list(&format!("c{t}/"), 0).unwrap();
                let mut listed: Vec<String> = l.entries.iter().map(|e| e.key.clone()).collect();
                let mut want: Vec<String> = mine.keys().cloned().collect();
                listed.sort();
                want.sort();
                assert_eq!(listed, want);
                for e in &l.entries {
                    assert_eq!(e.len as usize, mine[&e.key].0);
                }
                mine.len()
            })
        })
        .collect();
    let kept: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(srv.stats().keys as usize, kept);
}

#[test]
fn list_prefix_limit_and_errors() {
    let srv = server(1 << 30);
    let c = KvClient::connect(srv.local_addr(), false).unwrap();
    for k in ["apple", "apricot", "banana", "app", "b"] {
        c.put(k, k.as_bytes().to_vec()).unwrap();
    }
    let l = c.list("ap", 0).unwrap();
    let keys: Vec<&str> = l.entries.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(keys, ["app", "apple", "apricot"]);
    assert!(!l.more);
    let l = c.list("ap", 2).unwrap();
    assert_eq!(l.entries.len(), 2);
    assert!(l.more);
    assert_eq!(c.list("", 0).unwrap().entries.len(), 5);
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
