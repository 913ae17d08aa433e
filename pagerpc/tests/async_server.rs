//! The async server (feature `tokio`) over real sockets, with the blocking
//! `Client` as its peer.
#![cfg(feature = "tokio")]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pagerpc::proto::MetadataEntry;
use pagerpc::{
    AsyncServer, AsyncServerBuilder, CallOptions, Client, ClientConfig, Code, Origin, PageBuf,
    Pages, Payload, ServerConfig, Status,
};
use prost::Message;

use common::{
    assert_bytes_eq, msg, pattern, pattern_pages, raw_request, wait_until, with_watchdog,
};

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// An async builder with "echo": the request message and payload back,
/// after an `.await`.
fn async_echo() -> AsyncServerBuilder {
    AsyncServer::builder().register(
        "echo",
        |_ctx, req: MetadataEntry, pages: Pages| async move {
            tokio::task::yield_now().await;
            Ok::<_, Status>((req, Payload::Pages(pages)))
        },
    )
}

fn page_buf(data: &[u8]) -> PageBuf {
    let mut b = PageBuf::new(data.len()).unwrap();
    b.copy_from_slice(data);
    b
}

#[test]
fn unary_calls_are_byte_exact_from_many_threads() {
    with_watchdog(Duration::from_secs(120), "unary sizes", || {
        let rt = runtime(4);
        let server = rt.block_on(async_echo().bind("127.0.0.1:0")).unwrap();
        let addr = server.local_addr();
        let shared = Arc::new(Client::connect(addr).unwrap());
        let sizes = [
            0usize,
            1,
            100,
            4095,
            4096,
            4097,
            65_536,
            (1 << 20) - 1,
            1 << 20,
            (1 << 20) + 1,
            3 << 20,
            8 << 20,
        ];
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    // Half the threads share one connection, half have
                    // their own.
                    let own;
                    let client = if t % 2 == 0 {
                        &*shared
                    } else {
                        own = Client::connect(addr).unwrap();
                        &own
                    };
                    for round in 0..3u64 {
                        for &len in &sizes {
                            let seed = t * 1000 + round * 100 + len as u64 % 97;
                            let data = pattern(len, seed);
                            let key = format!("t{t} r{round} len {len}");
                            let r = client
                                .call::<_, MetadataEntry>("echo", &msg(key.clone()), data.clone())
                                .unwrap();
                            assert_eq!(r.message.key, key);
                            assert_bytes_eq(&r.payload, &data, &key);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        rt.block_on(server.shutdown());
    });
}

#[test]
fn awaiting_handlers_do_not_hold_up_other_calls() {
    with_watchdog(Duration::from_secs(60), "awaiting handlers", || {
        // Two runtime workers, sixteen handlers sleeping at once: only an
        // `.await` that yields its worker lets the fast calls through.
        let rt = runtime(2);
        let server = rt
            .block_on(
                async_echo()
                    .register("sleep", |_ctx, req: MetadataEntry, _p: Pages| async move {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                        Ok::<_, Status>((req, Payload::Empty))
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        let t0 = Instant::now();
        let slow: Vec<_> = (0..16)
            .map(|i| {
                client
                    .start_call(
                        "sleep",
                        msg(format!("s{i}")).encode_to_vec(),
                        Payload::Empty,
                        &CallOptions::default(),
                    )
                    .unwrap()
            })
            .collect();
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 16));
        // Fast calls on another connection and on the same one.
        let other = Client::connect(server.local_addr()).unwrap();
        for i in 0..50 {
            let data = pattern(10_000, i);
            for c in [&client, &other] {
                let r = c
                    .call::<_, MetadataEntry>("echo", &msg("fast"), data.clone())
                    .unwrap();
                assert_bytes_eq(&r.payload, &data, "fast call");
            }
        }
        let fast_done = t0.elapsed();
        assert!(
            fast_done < Duration::from_millis(1200),
            "100 fast calls took {fast_done:?} behind sleeping handlers"
        );
        // (A fast call's response can arrive just before it is retired.)
        assert!(
            wait_until(Duration::from_millis(200), || server.inflight() == 16),
            "the sleepers are still sleeping: {}",
            server.inflight()
        );
        for (i, call) in slow.into_iter().enumerate() {
            let r = call.wait_typed::<MetadataEntry>().unwrap();
            assert_eq!(r.message.key, format!("s{i}"));
        }
        let all = t0.elapsed();
        assert!(
            all >= Duration::from_millis(1500) && all < Duration::from_secs(4),
            "the sleepers ran concurrently: {all:?}"
        );
        rt.block_on(server.shutdown());
    });
}

#[test]
fn zero_copy_both_ways_maps_the_payloads() {
    with_watchdog(Duration::from_secs(120), "zero-copy", || {
        let rt = runtime(2);
        let kept = Arc::new(Mutex::new(Vec::new()));
        let k = kept.clone();
        let server = rt
            .block_on(
                AsyncServer::builder()
                    .config(ServerConfig::zerocopy())
                    .register("echo", move |_ctx, req: MetadataEntry, pages: Pages| {
                        let k = k.clone();
                        async move {
                            assert_eq!(pages.origin(), Origin::Socket);
                            k.lock().unwrap().push(pages.len());
                            // The received pages go back out as they are.
                            Ok::<_, Status>((req, Payload::Pages(pages)))
                        }
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
        assert_eq!(
            client.mss().unwrap(),
            4096,
            "loopback segments carry a page"
        );
        let data = pattern(1 << 20, 3);
        // Let receive-buffer autotuning settle, then measure.
        for _ in 0..8 {
            client
                .call::<_, MetadataEntry>("echo", &msg("warm"), page_buf(&data))
                .unwrap();
        }
        let (s0, c0) = (server.counters(), client.counters());
        for i in 0..64 {
            let r = client
                .call::<_, MetadataEntry>("echo", &msg("zc"), page_buf(&data))
                .unwrap();
            assert_eq!(r.payload.origin(), Origin::Socket, "call {i}");
            assert_bytes_eq(&r.payload, &data, "zero-copy echo");
        }
        let s = server.counters().since(&s0);
        let c = client.counters().since(&c0);
        assert_eq!(s.payload_bytes_received, 64 << 20);
        assert_eq!(c.payload_bytes_received, 64 << 20);
        assert!(
            s.mapped_percent() >= 99.0,
            "server mapped only {:.2}%: {s:?}",
            s.mapped_percent()
        );
        assert!(
            c.mapped_percent() >= 99.0,
            "client mapped only {:.2}%: {c:?}",
            c.mapped_percent()
        );
        // The server sent with MSG_ZEROCOPY, and reaped the completions
        // (ERROR readiness).
        assert!(s.zc_sends >= 64, "{s:?}");
        assert!(
            wait_until(Duration::from_secs(5), || {
                let t = server.counters();
                t.zc_send_completions > 0 && t.zc_send_completions >= t.zc_sends
            }),
            "completions not reaped: {:?}",
            server.counters()
        );
        assert_eq!(kept.lock().unwrap().len(), 72);
        rt.block_on(server.shutdown());
    });
}

#[test]
fn slow_readers_do_not_stall_others_and_are_closed() {
    with_watchdog(Duration::from_secs(60), "slow readers", || {
        const BUDGET: usize = 8 << 20;
        let rt = runtime(2);
        let big = pattern_pages(4 << 20);
        let server = rt
            .block_on(
                AsyncServer::builder()
                    .config(ServerConfig {
                        max_outbound_bytes_per_conn: BUDGET,
                        progress_timeout: Some(Duration::from_secs(3)),
                        ..ServerConfig::default()
                    })
                    .register("big", move |_ctx, req: MetadataEntry, _p: Pages| {
                        let big = big.clone();
                        async move { Ok::<_, Status>((req, Payload::Pages(big))) }
                    })
                    .register("ping", |_ctx, req: MetadataEntry, _p: Pages| async move {
                        Ok::<_, Status>((req, Payload::Empty))
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let addr = server.local_addr();
        // Two peers send 300 requests each for 4 MiB responses and never
        // read.
        let mut slow = Vec::new();
        for _ in 0..2 {
            let mut s = TcpStream::connect(addr).unwrap();
            let mut wire = Vec::new();
            for id in 1..=300u64 {
                wire.extend(raw_request(id, "big", b""));
            }
            s.write_all(&wire).unwrap();
            slow.push(s);
        }
        let healthy = Client::connect(addr).unwrap();
        let t_end = Instant::now() + Duration::from_secs(2);
        let mut calls = 0;
        while Instant::now() < t_end {
            let t = Instant::now();
            healthy
                .call::<_, MetadataEntry>("ping", &MetadataEntry::default(), Vec::new())
                .unwrap();
            assert!(
                t.elapsed() < Duration::from_secs(1),
                "a healthy call took {:?}",
                t.elapsed()
            );
            calls += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(calls > 10);
        // Backpressure: the slow peers' calls are deferred, not run.
        assert!(
            server.inflight() <= 2 * 300,
            "inflight {}",
            server.inflight()
        );
        // The progress timeout closes both slow peers.
        assert!(
            wait_until(Duration::from_secs(10), || server.connections() == 1),
            "slow peers still connected: {}",
            server.connections()
        );
        for mut s in slow {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut sink = vec![0u8; 1 << 20];
            loop {
                match s.read(&mut sink) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("slow peer not closed: {e}"),
                }
            }
        }
        healthy
            .call::<_, MetadataEntry>("ping", &MetadataEntry::default(), Vec::new())
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 0));
        rt.block_on(server.shutdown());
    });
}

#[test]
fn cancellation_reaches_the_async_handler() {
    with_watchdog(Duration::from_secs(30), "cancel", || {
        let rt = runtime(2);
        let (started_tx, started) = mpsc::channel::<String>();
        let (finished_tx, finished) = mpsc::channel::<(String, bool)>();
        let (started_tx, finished_tx) = (
            Arc::new(Mutex::new(started_tx)),
            Arc::new(Mutex::new(finished_tx)),
        );
        let server = rt
            .block_on(
                async_echo()
                    .register("spin", move |ctx, req: MetadataEntry, _p: Pages| {
                        let (s, f) = (started_tx.clone(), finished_tx.clone());
                        async move {
                            let _ = s.lock().unwrap().send(req.key.clone());
                            let t0 = Instant::now();
                            while !ctx.is_cancelled() && t0.elapsed() < Duration::from_secs(10) {
                                tokio::time::sleep(Duration::from_millis(2)).await;
                            }
                            let _ = f
                                .lock()
                                .unwrap()
                                .send((req.key.clone(), ctx.is_cancelled()));
                            Ok::<_, Status>((req, Payload::Empty))
                        }
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        for (i, how) in ["cancel", "drop"].into_iter().enumerate() {
            let key = format!("c{i}");
            let call = client
                .start_call(
                    "spin",
                    msg(key.clone()).encode_to_vec(),
                    pattern(8000, 1),
                    &CallOptions::default(),
                )
                .unwrap();
            assert_eq!(started.recv_timeout(Duration::from_secs(5)).unwrap(), key);
            let t0 = Instant::now();
            if how == "cancel" {
                call.cancel();
            } else {
                drop(call);
            }
            let (k, cancelled) = finished.recv_timeout(Duration::from_secs(5)).unwrap();
            assert_eq!(k, key);
            assert!(cancelled, "{how}: the handler never saw the cancellation");
            assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        }
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 0));
        let r = client
            .call::<_, MetadataEntry>("echo", &msg("after"), vec![5u8; 10])
            .unwrap();
        assert_eq!(&r.payload[..], &[5u8; 10]);
        rt.block_on(server.shutdown());
    });
}

#[test]
fn errors_unknown_methods_and_panics_are_answered() {
    with_watchdog(Duration::from_secs(30), "errors", || {
        let rt = runtime(2);
        let server = rt
            .block_on(
                async_echo()
                    .register("fail", |_ctx, _req: MetadataEntry, _p: Pages| async move {
                        tokio::task::yield_now().await;
                        Err::<(MetadataEntry, Payload), _>(Status::not_found("no such thing"))
                    })
                    .register("panic", |_ctx, _req: MetadataEntry, _p: Pages| async move {
                        tokio::task::yield_now().await;
                        if true {
                            panic!("handler bug");
                        }
                        Ok::<_, Status>((MetadataEntry::default(), Payload::Empty))
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        let code = |m: &str| {
            client
                .call::<_, MetadataEntry>(m, &msg("x"), Vec::new())
                .unwrap_err()
                .code()
        };
        assert_eq!(code("fail"), Code::NotFound);
        assert_eq!(code("panic"), Code::Internal);
        assert_eq!(code("nope"), Code::Unimplemented);
        // An undecodable request body.
        let r = client
            .start_call(
                "echo",
                vec![0xff; 3],
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap()
            .wait_typed::<MetadataEntry>();
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument);
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 0));
        rt.block_on(server.shutdown());
    });
}

#[test]
fn shutdown_waits_for_calls_in_flight() {
    with_watchdog(Duration::from_secs(30), "shutdown", || {
        let rt = runtime(2);
        let server = rt
            .block_on(
                async_echo()
                    .register("sleep", |_ctx, req: MetadataEntry, _p: Pages| async move {
                        tokio::time::sleep(Duration::from_millis(800)).await;
                        Ok::<_, Status>((req, Payload::Empty))
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let addr = server.local_addr();
        let client = Client::connect(addr).unwrap();
        let calls: Vec<_> = (0..4)
            .map(|i| {
                client
                    .start_call(
                        "sleep",
                        msg(format!("k{i}")).encode_to_vec(),
                        Payload::Empty,
                        &CallOptions::default(),
                    )
                    .unwrap()
            })
            .collect();
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 4));
        let t0 = Instant::now();
        let waiter = std::thread::spawn(move || {
            calls
                .into_iter()
                .map(|c| c.wait_typed::<MetadataEntry>().map(|r| r.message.key))
                .collect::<Vec<_>>()
        });
        rt.block_on(server.shutdown());
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(500),
            "shutdown returned after {took:?}, before the calls finished"
        );
        let keys = waiter.join().unwrap();
        for (i, k) in keys.into_iter().enumerate() {
            assert_eq!(k.unwrap(), format!("k{i}"), "call {i} finished cleanly");
        }
        // Nothing listens any more.
        assert!(
            Client::connect(addr).is_err() || {
                let c = Client::connect(addr).unwrap();
                c.call::<_, MetadataEntry>("echo", &msg("late"), Vec::new())
                    .is_err()
            }
        );
    });
}

#[test]
fn shutdown_timeout_cancels_calls_that_overrun() {
    with_watchdog(Duration::from_secs(30), "shutdown timeout", || {
        let rt = runtime(2);
        let server = rt
            .block_on(
                async_echo()
                    .register("spin", |ctx, req: MetadataEntry, _p: Pages| async move {
                        while !ctx.is_cancelled() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Ok::<_, Status>((req, Payload::Empty))
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        let call = client
            .start_call(
                "spin",
                msg("s").encode_to_vec(),
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 1));
        let t0 = Instant::now();
        let clean = rt.block_on(server.shutdown_timeout(Duration::from_millis(300)));
        assert!(!clean);
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
        assert!(call.wait_typed::<MetadataEntry>().is_err());
    });
}

/// `SinkExt::send`, by hand (futures-util's `sink` feature is off).
async fn sink_send<S, I>(s: &mut S, item: I) -> Result<(), S::Error>
where
    S: futures_sink::Sink<I> + Unpin,
{
    use std::pin::Pin;
    std::future::poll_fn(|cx| Pin::new(&mut *s).poll_ready(cx)).await?;
    Pin::new(&mut *s).start_send(item)?;
    std::future::poll_fn(|cx| Pin::new(&mut *s).poll_flush(cx)).await
}

/// Async stream handlers of every shape: "count" (server-streaming: `n`
/// messages of `len` bytes, from the request key "n,len"), "sum"
/// (client-streaming, read as a `Stream`: count and SHA-256 of the
/// payloads), "echo-stream" (bidi: each message back, through the `Sink`).
fn stream_builder() -> AsyncServerBuilder {
    use futures_util::StreamExt;
    use sha2::{Digest, Sha256};
    async_echo()
        .register_server_stream("count", |ctx, body, _pages, mut out| async move {
            let req = MetadataEntry::decode(&body[..])
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut it = req.key.split(',').map(|x| x.parse::<usize>().unwrap());
            let (n, len) = (it.next().unwrap(), it.next().unwrap());
            for i in 0..n {
                if ctx.is_cancelled() {
                    return Err(Status::cancelled("cancelled"));
                }
                out.send(&msg(format!("m{i}")), pattern(len, i as u64))
                    .await?;
            }
            Ok(vec![msg("trailer")])
        })
        .register_client_stream("sum", |_ctx, mut rx| async move {
            let mut h = Sha256::new();
            let mut n = 0u64;
            while let Some(m) = rx.next().await {
                h.update(&m?.payload[..]);
                n += 1;
            }
            Ok(pagerpc::Reply {
                body: MetadataEntry {
                    key: n.to_string(),
                    value: h.finalize().to_vec(),
                }
                .encode_to_vec(),
                ..pagerpc::Reply::default()
            })
        })
        .register_bidi_stream("echo-stream", |_ctx, mut rx, mut tx| async move {
            while let Some(m) = rx.recv().await? {
                sink_send(&mut tx, (m.body, Payload::Pages(m.payload))).await?;
            }
            Ok(Vec::new())
        })
}

#[test]
fn streams_of_every_shape_are_byte_exact() {
    use sha2::{Digest, Sha256};
    with_watchdog(Duration::from_secs(120), "streams", || {
        let rt = runtime(2);
        let server = rt.block_on(stream_builder().bind("127.0.0.1:0")).unwrap();
        let addr = server.local_addr();
        // Many streams at once from several threads: more than the
        // runtime has workers, and each larger than the stream window
        // (8 MiB), so handlers wait for credit without holding a thread.
        let threads: Vec<_> = (0..6u64)
            .map(|t| {
                std::thread::spawn(move || {
                    let client = Client::connect(addr).unwrap();
                    // Server-streaming: 200 x 64 KiB.
                    let mut rx = client
                        .server_stream(
                            "count",
                            &msg("200,65536"),
                            Payload::Empty,
                            &CallOptions::default(),
                        )
                        .unwrap();
                    let mut i = 0u64;
                    while let Some((m, p)) = rx.recv_typed::<MetadataEntry>().unwrap() {
                        assert_eq!(m.key, format!("m{i}"));
                        assert_bytes_eq(&p, &pattern(64 << 10, i), "server stream message");
                        i += 1;
                    }
                    assert_eq!(i, 200);
                    assert_eq!(rx.trailers(), &[msg("trailer")]);

                    // Client-streaming: 100 messages of ~100 KiB.
                    let (mut tx, resp) = client
                        .client_stream("sum", &CallOptions::default())
                        .unwrap();
                    let mut want = Sha256::new();
                    for i in 0..100u64 {
                        let p = pattern(100 * 1024 + i as usize, t * 1000 + i);
                        want.update(&p);
                        tx.send(&msg("c"), Payload::Vec(p)).unwrap();
                    }
                    tx.finish().unwrap();
                    let r = resp.wait::<MetadataEntry>().unwrap();
                    assert_eq!(r.message.key, "100");
                    assert_eq!(r.message.value, want.finalize().to_vec());

                    // Bidirectional: 300 x 10 KiB echoed.
                    let (mut tx, mut rx) = client
                        .bidi_stream("echo-stream", &CallOptions::default())
                        .unwrap();
                    let sender = std::thread::spawn(move || {
                        for i in 0..300u64 {
                            tx.send(&msg(format!("b{i}")), pattern(10 * 1024, i))
                                .unwrap();
                        }
                        tx.finish().unwrap();
                    });
                    let mut i = 0u64;
                    while let Some((m, p)) = rx.recv_typed::<MetadataEntry>().unwrap() {
                        assert_eq!(m.key, format!("b{i}"));
                        assert_bytes_eq(&p, &pattern(10 * 1024, i), "bidi echo");
                        i += 1;
                    }
                    sender.join().unwrap();
                    assert_eq!(i, 300);
                    assert_eq!(client.pending_calls(), 0);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 0));
        rt.block_on(server.shutdown());
    });
}

#[test]
fn a_stream_cut_short_is_seen_by_its_async_handler() {
    with_watchdog(Duration::from_secs(30), "stream cancel", || {
        let rt = runtime(2);
        let (seen_tx, seen) = mpsc::channel::<Status>();
        let seen_tx = Arc::new(Mutex::new(seen_tx));
        let server = rt
            .block_on(
                async_echo()
                    .register_bidi_stream("hold", move |_ctx, mut rx, _tx| {
                        let seen_tx = seen_tx.clone();
                        async move {
                            loop {
                                match rx.recv().await {
                                    Ok(Some(_)) => continue,
                                    Ok(None) => return Ok(Vec::new()),
                                    Err(status) => {
                                        let _ = seen_tx.lock().unwrap().send(status.clone());
                                        return Err(status);
                                    }
                                }
                            }
                        }
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        let (mut tx, rx) = client.bidi_stream("hold", &CallOptions::default()).unwrap();
        tx.send(&msg("one"), Payload::Empty).unwrap();
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 1));
        tx.abort(Status::cancelled("client gave up"));
        drop(rx);
        let status = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(status.code(), Code::Cancelled, "{status}");
        assert!(wait_until(Duration::from_secs(5), || server.inflight() == 0));
        // The connection carries on.
        let r = client
            .call::<_, MetadataEntry>("echo", &msg("after"), vec![1u8; 5000])
            .unwrap();
        assert_eq!(r.payload.len(), 5000);
        rt.block_on(server.shutdown());
    });
}

#[test]
fn the_held_bytes_cap_pauses_a_connection_and_releasing_resumes_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    with_watchdog(Duration::from_secs(60), "held cap", || {
        const CAP: usize = 4 << 20;
        let rt = runtime(2);
        let kept: Arc<Mutex<Vec<Pages>>> = Arc::default();
        let k = kept.clone();
        let server = rt
            .block_on(
                async_echo()
                    .config(ServerConfig {
                        max_held_bytes_per_conn: Some(CAP),
                        ..ServerConfig::default()
                    })
                    .register("hold", move |_ctx, req: MetadataEntry, p: Pages| {
                        let k = k.clone();
                        async move {
                            k.lock().unwrap().push(p);
                            Ok::<_, Status>((req, Payload::Empty))
                        }
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let greedy = Client::connect(server.local_addr()).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let (g, d) = (greedy.clone(), done.clone());
        let sender = std::thread::spawn(move || {
            let calls: Vec<_> = (0..12)
                .map(|i| {
                    g.start_call(
                        "hold",
                        msg(i.to_string()).encode_to_vec(),
                        vec![3u8; 1 << 20],
                        &CallOptions::default(),
                    )
                    .unwrap()
                })
                .collect();
            for c in calls {
                c.wait().unwrap();
                d.fetch_add(1, Ordering::SeqCst);
            }
        });
        std::thread::sleep(Duration::from_millis(500));
        let stalled_at = done.load(Ordering::SeqCst);
        assert!(stalled_at < 12, "nothing stalled");
        let held = server.held_payload_bytes();
        assert!(
            held <= CAP + (1 << 20) + 4096,
            "held {held} bytes, cap {CAP}"
        );
        // Other connections are served meanwhile.
        let other = Client::connect(server.local_addr()).unwrap();
        let data = pattern(2 << 20, 9);
        let r = other
            .call::<_, MetadataEntry>("echo", &msg("o"), data.clone())
            .unwrap();
        assert_bytes_eq(&r.payload, &data, "other connection");
        assert_eq!(done.load(Ordering::SeqCst), stalled_at, "still stalled");
        // Releasing the pages resumes it (a posted read wakes its task).
        let t0 = Instant::now();
        while done.load(Ordering::SeqCst) < 12 && t0.elapsed() < Duration::from_secs(20) {
            kept.lock().unwrap().clear();
            std::thread::sleep(Duration::from_millis(20));
        }
        sender.join().unwrap();
        assert_eq!(done.load(Ordering::SeqCst), 12);
        assert_eq!(server.receive_budget().0, 0, "nothing left reserved");
        rt.block_on(server.shutdown());
    });
}

#[test]
fn pre_shared_key_authentication_applies() {
    with_watchdog(Duration::from_secs(30), "auth", || {
        const KEY: &[u8] = b"a key shared by server and clients";
        let rt = runtime(2);
        let server = rt
            .block_on(
                async_echo()
                    .config(ServerConfig {
                        auth_key: Some(KEY.into()),
                        ..ServerConfig::default()
                    })
                    .bind("127.0.0.1:0"),
            )
            .unwrap();
        let good = Client::connect_with(
            server.local_addr(),
            ClientConfig {
                auth_key: Some(KEY.into()),
                ..ClientConfig::default()
            },
        )
        .unwrap();
        let data = pattern(300_000, 4);
        let r = good
            .call::<_, MetadataEntry>("echo", &msg("k"), data.clone())
            .unwrap();
        assert_bytes_eq(&r.payload, &data, "authenticated echo");
        let e = Client::connect_with(
            server.local_addr(),
            ClientConfig {
                auth_key: Some(b"the wrong key".as_slice().into()),
                ..ClientConfig::default()
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        // No key at all: refused, nothing dispatched.
        let none = Client::connect(server.local_addr()).unwrap();
        let e = none
            .call::<_, MetadataEntry>("echo", &msg("k"), Vec::new())
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        rt.block_on(server.shutdown());
    });
}
