//! The async client (feature `tokio`) against the blocking server (and a
//! raw peer where a test needs one), over real loopback sockets.
//!
//! The tests run one at a time (`SERIAL`): the idle test measures the
//! process's CPU time, which other tests running beside it would spoil.
#![cfg(feature = "tokio")]

mod common;

use std::future::Future;
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    AsyncClient, CallOptions, ClientConfig, Code, PageBuf, Pages, Payload, Reply, Server,
    ServerConfig, Status,
};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use common::*;

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a fresh multi-thread runtime, failing after `limit`.
fn run<F: Future<Output = ()>>(limit: Duration, f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(limit, f)
            .await
            .expect("the test did not finish in time (hang)");
    });
}

fn timeout(d: Duration) -> CallOptions {
    CallOptions {
        timeout: Some(d),
        ..CallOptions::default()
    }
}

/// The size of call `i` of task `t`: mostly small (inline and separate
/// payloads), some 64 KiB, a few 1 MiB.
fn size_of_call(t: usize, i: usize) -> usize {
    const SMALL: [usize; 8] = [0, 1, 37, 512, 4095, 4096, 4097, 10_000];
    if i % 250 == t % 250 {
        MIB
    } else if i % 25 == 3 {
        64 * KIB + 11
    } else {
        SMALL[(i + t) % SMALL.len()]
    }
}

#[test]
fn many_tasks_share_one_connection_byte_exact() {
    let _s = serial();
    let server = echo_builder()
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    run(Duration::from_secs(240), async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        let mut tasks = Vec::new();
        for t in 0..100usize {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut bytes = 0usize;
                for i in 0..1000usize {
                    let len = size_of_call(t, i);
                    let seed = (t * 1000 + i) as u64;
                    let data = pattern(len, seed);
                    let key = format!("t{t}-c{i}");
                    let r = client
                        .call::<_, MetadataEntry>("echo", &msg(key.clone()), data.clone())
                        .await
                        .unwrap_or_else(|e| panic!("task {t} call {i} ({len} B): {e}"));
                    assert_eq!(r.message.key, key);
                    assert_bytes_eq(&r.payload, &data, &key);
                    bytes += len;
                }
                bytes
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        assert!(total > 500 * MIB, "the mix carried {total} bytes");
        assert_eq!(client.pending_calls(), 0);
    });
}

#[test]
fn dropped_call_futures_cancel_on_the_server_and_leak_nothing() {
    let _s = serial();
    let (started_tx, mut started_rx) = mpsc::unbounded_channel::<u64>();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<u64>();
    let started_tx = Mutex::new(started_tx);
    let seen_tx = Mutex::new(seen_tx);
    let server = echo_builder()
        .register("wait", move |ctx, req: MetadataEntry, _p: Pages| {
            let _ = started_tx.lock().unwrap().send(ctx.call_id());
            let end = std::time::Instant::now() + Duration::from_secs(20);
            while std::time::Instant::now() < end {
                if ctx.is_cancelled() {
                    let _ = seen_tx.lock().unwrap().send(ctx.call_id());
                    return Err(Status::cancelled("seen"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Ok::<_, Status>((req, Payload::Empty))
        })
        .config(config(4))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let server = Arc::new(server);
    let srv = server.clone();
    run(Duration::from_secs(120), async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        // One call mid-flight in the handler: abort its task (dropping the
        // future), and the handler sees is_cancelled().
        let c = client.clone();
        let task = tokio::spawn(async move {
            c.call::<_, MetadataEntry>("wait", &msg("w"), Payload::Empty)
                .await
        });
        let id = started_rx.recv().await.unwrap();
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(seen_rx.recv().await, Some(id), "the handler saw the cancel");
        assert_eq!(client.pending_calls(), 0);

        // 10,000 dropped calls, at every stage: before the request is
        // written, in flight, and with the response on its way.
        let data = pattern(64 * KIB, 9);
        for i in 0..10_000usize {
            let payload: Payload = match i % 4 {
                0 => Payload::Empty,
                1 => pattern(100, i as u64).into(),
                _ => data.clone().into(),
            };
            let method = if i % 50 == 0 { "wait" } else { "echo" };
            let mut fut = Box::pin(client.call::<_, MetadataEntry>(method, &msg("d"), payload));
            if i % 2 == 0 {
                // Written (or queued) and dropped at once (unless the
                // answer was already there).
                if let std::task::Poll::Ready(r) = futures_util::poll!(fut.as_mut()) {
                    r.unwrap();
                }
            } else if i % 3 == 0 {
                // Let the driver and the server get going first.
                let _ = tokio::time::timeout(Duration::from_micros(200), fut.as_mut()).await;
            }
            drop(fut);
        }
        assert_eq!(
            client.pending_calls(),
            0,
            "every dropped call's slot is free"
        );
        // The connection is intact afterwards.
        for i in 0..20 {
            let d = pattern(4 * KIB * i, i as u64);
            let r = client
                .call::<_, MetadataEntry>("echo", &msg(format!("after{i}")), d.clone())
                .await
                .unwrap();
            assert_bytes_eq(&r.payload, &d, "after the drops");
        }
        assert_eq!(client.pending_calls(), 0);
        let srv2 = srv.clone();
        let drained = tokio::task::spawn_blocking(move || {
            wait_until(Duration::from_secs(30), || srv2.inflight() == 0)
        })
        .await
        .unwrap();
        assert!(drained, "server in-flight stays at {}", srv.inflight());
        // Every "wait" call that reached its handler saw the cancel.
        let mut started = 0;
        while started_rx.try_recv().is_ok() {
            started += 1;
        }
        let mut seen = 0;
        while seen_rx.try_recv().is_ok() {
            seen += 1;
        }
        assert_eq!(seen, started, "handlers that started saw their cancel");
    });
    drop(server);
}

#[test]
fn deadlines_use_the_runtime_clock_and_reach_the_server() {
    let _s = serial();
    let (tx, mut rx) = mpsc::unbounded_channel::<(Option<Duration>, bool)>();
    let tx = Mutex::new(tx);
    let server = echo_builder()
        .register("slow", move |ctx, req: MetadataEntry, _p: Pages| {
            let budget = ctx
                .deadline()
                .map(|d| d.saturating_duration_since(std::time::Instant::now()));
            let end = std::time::Instant::now() + Duration::from_secs(10);
            while !ctx.is_cancelled() && std::time::Instant::now() < end {
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = tx.lock().unwrap().send((budget, ctx.is_cancelled()));
            Ok::<_, Status>((req, Payload::Empty))
        })
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    run(Duration::from_secs(60), async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        let t0 = tokio::time::Instant::now();
        let err = client
            .call_with::<_, MetadataEntry>(
                "slow",
                &msg("s"),
                Payload::Empty,
                &timeout(Duration::from_millis(300)),
            )
            .await
            .unwrap_err();
        let took = t0.elapsed();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(
            took >= Duration::from_millis(300),
            "gave up early: {took:?}"
        );
        assert!(took < Duration::from_secs(3), "gave up late: {took:?}");
        let (budget, cancelled) = rx.recv().await.unwrap();
        let budget = budget.expect("the server was told the deadline");
        assert!(
            budget <= Duration::from_millis(300) && budget > Duration::from_millis(100),
            "the server's budget: {budget:?}"
        );
        assert!(cancelled, "the server handler saw the call cancelled");
        // A default timeout applies to calls without one, and the
        // connection is fine.
        let r = client
            .call_with::<_, MetadataEntry>(
                "echo",
                &msg("ok"),
                vec![1u8; 100_000],
                &timeout(Duration::from_secs(10)),
            )
            .await
            .unwrap();
        assert_eq!(r.payload.len(), 100_000);
    });
    let cfg = ClientConfig {
        default_timeout: Some(Duration::from_millis(200)),
        ..ClientConfig::default()
    };
    run(Duration::from_secs(60), async move {
        let client = AsyncClient::connect_with(addr, cfg).await.unwrap();
        let err = client
            .call::<_, MetadataEntry>("slow", &msg("s"), Payload::Empty)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    });
    drop(server);
}

/// A peer that accepts and never reads: requests pile up in the client.
/// One of which nothing was written comes back with its payload at its
/// deadline; when the peer goes away, every pending call fails with
/// Unavailable.
#[test]
fn unsent_requests_come_back_and_a_lost_connection_fails_every_call() {
    let _s = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || listener.accept().unwrap().0);
    run(Duration::from_secs(60), async move {
        let cfg = ClientConfig {
            conn_window: 0,
            ..ClientConfig::default()
        };
        let client = AsyncClient::connect_with(addr, cfg).await.unwrap();
        let peer = tokio::task::spawn_blocking(move || peer.join().unwrap())
            .await
            .unwrap();
        // Fill the socket: 32 MiB the peer never reads.
        let c = client.clone();
        let big = tokio::spawn(async move {
            c.call::<_, MetadataEntry>("echo", &msg("big"), vec![5u8; 32 * MIB])
                .await
        });
        // The big request is in the socket (partly) before the next one.
        while client.counters().frames_sent < 2 {
            tokio::task::yield_now().await;
        }
        let data = pattern(MIB, 3);
        let mut err = client
            .call_with::<_, MetadataEntry>(
                "echo",
                &msg("small"),
                data.clone(),
                &timeout(Duration::from_millis(300)),
            )
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        match err.take_payload() {
            Some(Payload::Vec(v)) => assert_bytes_eq(&v, &data, "handed back"),
            other => panic!("the unsent request's payload was not handed back: {other:?}"),
        }
        assert_eq!(client.pending_calls(), 1, "the big call is still pending");
        // The peer goes away: the pending call fails with Unavailable, and
        // so does a new one.
        drop(peer);
        let err = big.await.unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        let err = client
            .call::<_, MetadataEntry>("echo", &msg("late"), Payload::Empty)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert_eq!(client.pending_calls(), 0);
    });
}

/// The server's "keep" and "give" methods for the zero-copy tests.
fn zc_server() -> Server {
    Server::builder()
        .register("keep", |_ctx, req: MetadataEntry, pages: Pages| {
            assert_eq!(pages.len(), MIB);
            Ok::<_, Status>((req, Payload::Empty))
        })
        .register("give", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Pages(pattern_pages(MIB))))
        })
        .register("echo", |_ctx, req: MetadataEntry, pages: Pages| {
            Ok::<_, Status>((req, Payload::Pages(pages)))
        })
        .config(ServerConfig {
            threads: 2,
            ..ServerConfig::zerocopy()
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

fn page_buf(data: &[u8]) -> PageBuf {
    let mut b = PageBuf::new(data.len()).unwrap();
    b.copy_from_slice(data);
    b
}

#[test]
fn zero_copy_both_ways_through_the_async_client() {
    let _s = serial();
    let server = zc_server();
    let addr = server.local_addr();
    let server = Arc::new(server);
    let srv = server.clone();
    run(Duration::from_secs(120), async move {
        let client = AsyncClient::connect_with(addr, ClientConfig::zerocopy())
            .await
            .unwrap();
        assert_eq!(
            client.mss().unwrap(),
            4096,
            "loopback segments carry one page"
        );
        let data = pattern_pages(MIB);
        // Warm-up: let autotuning settle, as in any bulk transfer.
        for _ in 0..8 {
            client
                .call::<_, MetadataEntry>("keep", &msg("w"), page_buf(&data))
                .await
                .unwrap();
            client
                .call::<_, MetadataEntry>("give", &msg("w"), Payload::Empty)
                .await
                .unwrap();
        }
        // Client to server.
        let before = srv.counters();
        let sent_before = client.counters();
        for _ in 0..32 {
            client
                .call::<_, MetadataEntry>("keep", &msg("k"), page_buf(&data))
                .await
                .unwrap();
        }
        let c = srv.counters().since(&before);
        assert_eq!(c.payload_bytes_received, 32 * MIB as u64);
        assert!(
            c.mapped_percent() >= 99.0,
            "server mapped only {:.2}%: {c:?}",
            c.mapped_percent()
        );
        let cs = client.counters().since(&sent_before);
        assert!(
            cs.zc_sends >= 32,
            "the client sent with MSG_ZEROCOPY: {cs:?}"
        );
        // Eight calls in flight at once: the socket fills, the driver waits
        // for writable readiness while completions (EPOLLERR) keep coming.
        let before = srv.counters();
        let mut tasks = Vec::new();
        for t in 0..8 {
            let client = client.clone();
            let data = data.clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..4 {
                    client
                        .call::<_, MetadataEntry>("keep", &msg(format!("{t}")), page_buf(&data))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let c = srv.counters().since(&before);
        assert_eq!(c.payload_bytes_received, 32 * MIB as u64);
        assert!(
            c.mapped_percent() >= 99.0,
            "server mapped only {:.2}% with calls in flight: {c:?}",
            c.mapped_percent()
        );
        // Server to client, several calls in flight at once.
        let before = client.counters();
        let mut tasks = Vec::new();
        for t in 0..4 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..8 {
                    let r = client
                        .call::<_, MetadataEntry>("give", &msg(format!("{t}/{i}")), Payload::Empty)
                        .await
                        .unwrap();
                    assert_eq!(r.payload.origin(), pagerpc::Origin::Socket);
                    assert_bytes_eq(&r.payload, &pattern_pages(MIB), "given");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let c = client.counters().since(&before);
        assert_eq!(c.payload_bytes_received, 32 * MIB as u64);
        assert!(
            c.mapped_percent() >= 99.0,
            "client mapped only {:.2}%: {c:?}",
            c.mapped_percent()
        );
    });
    drop(server);
}

#[test]
fn idle_is_idle_after_zero_copy_calls() {
    let _s = serial();
    let server = zc_server();
    let addr = server.local_addr();
    run(Duration::from_secs(120), async move {
        let client = AsyncClient::connect_with(addr, ClientConfig::zerocopy())
            .await
            .unwrap();
        let data = pattern_pages(MIB);
        for rep in 0..3 {
            for _ in 0..10 {
                let r = client
                    .call::<_, MetadataEntry>("echo", &msg("e"), data.clone())
                    .await
                    .unwrap();
                assert_eq!(r.payload.len(), MIB);
            }
            let t0 = cpu_time(None);
            // Measuring, not synchronising: nothing is expected to happen.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let used = cpu_time(None) - t0;
            assert!(
                used <= Duration::from_millis(60),
                "repetition {rep}: {used:?} of CPU in 3 s of idle"
            );
        }
        assert!(client.counters().zc_sends > 0, "zero-copy sends were made");
        let stats = client.zerocopy_send_stats();
        assert_eq!(
            stats.pending_payloads, 0,
            "completions were reaped: {stats:?}"
        );
    });
    drop(server);
}

fn payload(i: u64, len: usize) -> Payload {
    Payload::Vec(pattern(len, i))
}

fn stream_server(window: u64, gate: Arc<AtomicBool>, sent: Arc<AtomicUsize>) -> Server {
    let cancelled = Arc::new(AtomicBool::new(false));
    Server::builder()
        .register_server_stream("count", |_ctx, body, _pages, out| {
            let req: MetadataEntry = pagerpc::prost::Message::decode(body)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut it = req.key.split(',').map(|x| x.parse::<usize>().unwrap());
            let (n, len) = (it.next().unwrap(), it.next().unwrap());
            for i in 0..n {
                out.send(&msg(format!("m{i}")), payload(i as u64, len + i))?;
            }
            Ok(vec![msg("trailer")])
        })
        .register_server_stream("big", move |_ctx, _b, _p, out| {
            for i in 0..64u64 {
                out.send(&msg("x"), payload(i, 256 * KIB))?;
                sent.fetch_add(1, SeqCst);
            }
            Ok(Vec::new())
        })
        .register_client_stream("sum", |_ctx, rx| {
            let mut h = Sha256::new();
            let mut n = 0u64;
            while let Some(m) = rx.recv()? {
                h.update(&m.payload[..]);
                n += 1;
            }
            Ok(Reply {
                body: pagerpc::prost::Message::encode_to_vec(&MetadataEntry {
                    key: n.to_string(),
                    value: h.finalize().to_vec(),
                }),
                ..Reply::default()
            })
        })
        .register_client_stream("gated", move |_ctx, rx| {
            // Reads nothing until the test opens the gate.
            while !gate.load(SeqCst) {
                std::thread::sleep(Duration::from_millis(2));
            }
            let mut n = 0u64;
            while rx.recv()?.is_some() {
                n += 1;
            }
            Ok(Reply {
                body: pagerpc::prost::Message::encode_to_vec(&msg(n.to_string())),
                ..Reply::default()
            })
        })
        .register_bidi_stream("echo-stream", |_ctx, rx, tx| {
            while let Some(m) = rx.recv()? {
                tx.send_raw(m.body, Payload::Pages(m.payload))?;
            }
            Ok(vec![msg("bidi-done")])
        })
        .register_bidi_stream("until-cancel", move |ctx, rx, _tx| {
            let r = loop {
                match rx.recv() {
                    Ok(Some(_)) => {}
                    Ok(None) => break Ok(Vec::new()),
                    Err(s) => break Err(s),
                }
            };
            cancelled.store(ctx.is_cancelled(), SeqCst);
            r
        })
        .config(ServerConfig {
            stream_window: window,
            ..config(4)
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

#[test]
fn streams_of_every_shape_are_byte_exact() {
    let _s = serial();
    let server = stream_server(8 * MIB as u64, Arc::default(), Arc::default());
    let addr = server.local_addr();
    run(Duration::from_secs(120), async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        // Server streaming, as a futures Stream.
        let mut rx = client
            .server_stream(
                "count",
                &msg("40,60000"),
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap();
        let mut n = 0;
        while let Some(m) = rx.next().await {
            let m = m.unwrap();
            assert_eq!(m.decode::<MetadataEntry>().unwrap().key, format!("m{n}"));
            assert_bytes_eq(&m.payload, &pattern(60000 + n, n as u64), "server stream");
            n += 1;
        }
        assert_eq!(n, 40);
        assert_eq!(rx.trailers().len(), 1);
        assert_eq!(rx.trailers()[0].key, "trailer");
        assert!(rx.next().await.is_none(), "ended");

        // Client streaming: `send` and the Sink, then the response.
        let (mut tx, resp) = client
            .client_stream("sum", &CallOptions::default())
            .unwrap();
        let mut want = Sha256::new();
        for i in 0..30u64 {
            let data = pattern((i as usize) * 37 * KIB, i);
            want.update(&data);
            if i % 2 == 0 {
                tx.send(&msg("c"), data).await.unwrap();
            } else {
                SinkExt::send(&mut tx, (Vec::new(), Payload::Vec(data)))
                    .await
                    .unwrap();
            }
        }
        SinkExt::close(&mut tx).await.unwrap();
        drop(tx);
        let r = resp.wait::<MetadataEntry>().await.unwrap();
        assert_eq!(r.message.key, "30");
        assert_eq!(r.message.value, want.finalize().to_vec());

        // Bidirectional: a sending task and a receiving task at once.
        let (mut tx, mut rx) = client
            .bidi_stream("echo-stream", &CallOptions::default())
            .unwrap();
        let sender = tokio::spawn(async move {
            for i in 0..200u64 {
                let len = [0, 100, 4096, 100_000, MIB][i as usize % 5];
                tx.send(&msg(format!("b{i}")), payload(i, len))
                    .await
                    .unwrap();
            }
            tx.finish().await.unwrap();
        });
        let mut n = 0u64;
        while let Some(m) = rx.recv().await.unwrap() {
            let len = [0, 100, 4096, 100_000, MIB][n as usize % 5];
            assert_eq!(m.decode::<MetadataEntry>().unwrap().key, format!("b{n}"));
            assert_bytes_eq(&m.payload, &pattern(len, n), "bidi");
            n += 1;
        }
        sender.await.unwrap();
        assert_eq!(n, 200);
        assert_eq!(rx.trailers()[0].key, "bidi-done");
        assert_eq!(client.pending_calls(), 0);
    });
    drop(server);
}

#[test]
fn credit_stops_a_stalled_consumers_sender() {
    let _s = serial();
    let gate = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    // The server's window for what the client sends: 1 MiB.
    let server = stream_server(MIB as u64, gate.clone(), sent.clone());
    let addr = server.local_addr();
    run(Duration::from_secs(120), async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        // The server's SETTINGS (its window) arrive ahead of any answer: a
        // stream opened after one uses the announced window.
        let settled = client
            .server_stream(
                "count",
                &msg("1,10"),
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap()
            .collect::<Vec<_>>()
            .await;
        assert_eq!(settled.len(), 1);
        // The client's sender: the handler reads nothing, so after one
        // window (four 256 KiB messages) the fifth send waits for credit.
        let (mut tx, resp) = client
            .client_stream("gated", &CallOptions::default())
            .unwrap();
        for i in 0..4 {
            tx.send(&msg(""), payload(i, 256 * KIB - 16)).await.unwrap();
        }
        {
            let m = msg("");
            let mut fifth = std::pin::pin!(tx.send(&m, payload(4, 256 * KIB - 16)));
            // Checking that nothing happens needs a bounded wait.
            let r = tokio::time::timeout(Duration::from_millis(500), fifth.as_mut()).await;
            assert!(r.is_err(), "the fifth message went out without credit");
            // Other calls on the connection go on meanwhile.
            let (_, r) = tokio::join!(async {}, async {
                client
                    .server_stream(
                        "count",
                        &msg("3,10"),
                        Payload::Empty,
                        &CallOptions::default(),
                    )
                    .unwrap()
                    .collect::<Vec<_>>()
                    .await
            });
            assert_eq!(r.len(), 3);
            gate.store(true, SeqCst);
            fifth.await.unwrap();
        }
        for i in 5..20 {
            tx.send(&msg(""), payload(i, 256 * KIB - 16)).await.unwrap();
        }
        tx.finish().await.unwrap();
        assert_eq!(
            resp.wait::<MetadataEntry>().await.unwrap().message.key,
            "20"
        );

        // The client as the stalled consumer: it keeps what it received,
        // so the server stops after the client's window (1 MiB here: three
        // messages of 256 KiB and a body each); dropping the pages gives
        // the credit back and the stream completes whole.
        let cfg = ClientConfig {
            stream_window: MIB as u64,
            ..ClientConfig::default()
        };
        let client = AsyncClient::connect_with(addr, cfg).await.unwrap();
        let mut rx = client
            .server_stream("big", &msg(""), Payload::Empty, &CallOptions::default())
            .unwrap();
        let mut kept = Vec::new();
        for _ in 0..3 {
            kept.push(rx.next().await.unwrap().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stalled_at = sent.load(SeqCst);
        assert!(
            stalled_at <= 4,
            "the server sent past the window: {stalled_at}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sent.load(SeqCst), stalled_at, "the sender stays stopped");
        drop(kept);
        let mut n = 3;
        while let Some(m) = rx.next().await {
            assert_bytes_eq(
                &m.unwrap().payload,
                &pattern(256 * KIB, n),
                "after the stall",
            );
            n += 1;
        }
        assert_eq!(n, 64);
    });
    drop(server);
}

#[test]
fn dropping_stream_handles_cancels() {
    let _s = serial();
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(bool, Code)>();
    let seen_tx = Mutex::new(seen_tx);
    let server = Server::builder()
        .register_server_stream("forever", move |ctx, _b, _p, out| {
            let mut i = 0u64;
            loop {
                if let Err(e) = out.send(&msg("x"), payload(i, 4096)) {
                    let _ = seen_tx
                        .lock()
                        .unwrap()
                        .send((ctx.is_cancelled(), e.status.code()));
                    return Err(e.status);
                }
                i += 1;
            }
        })
        .register_client_stream("upload", |_ctx, rx| {
            while rx.recv()?.is_some() {}
            Ok(Reply::default())
        })
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    run(Duration::from_secs(60), async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        // Dropping the receiver mid-stream: the server's handler sees the
        // cancellation.
        let mut rx = client
            .server_stream("forever", &msg(""), Payload::Empty, &CallOptions::default())
            .unwrap();
        for _ in 0..50 {
            rx.next().await.unwrap().unwrap();
        }
        drop(rx);
        let (cancelled, code) = seen_rx.recv().await.unwrap();
        assert!(cancelled, "the handler saw is_cancelled() ({code:?})");

        // Dropping the sender before finishing cancels: the response is
        // Cancelled, never a success.
        let (mut tx, resp) = client
            .client_stream("upload", &CallOptions::default())
            .unwrap();
        tx.send(&msg("u"), payload(0, 8192)).await.unwrap();
        drop(tx);
        let err = resp.wait::<MetadataEntry>().await.unwrap_err();
        assert_eq!(err.code(), Code::Cancelled, "{err}");

        // Aborting with a status.
        let (mut tx, resp) = client
            .client_stream("upload", &CallOptions::default())
            .unwrap();
        tx.send(&msg("u"), payload(0, 8192)).await.unwrap();
        tx.abort(Status::data_loss("the source went away"));
        let err = resp.wait::<MetadataEntry>().await.unwrap_err();
        assert_eq!(err.code(), Code::DataLoss, "{err}");

        // Dropping the response handle of a client stream, and a stream's
        // deadline.
        let (tx, resp) = client
            .client_stream("upload", &CallOptions::default())
            .unwrap();
        drop(resp);
        drop(tx);
        let (mut tx, resp) = client
            .client_stream("upload", &timeout(Duration::from_millis(300)))
            .unwrap();
        tx.send(&msg("u"), payload(0, 100)).await.unwrap();
        let err = resp.wait::<MetadataEntry>().await.unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        drop(tx);
        assert_eq!(client.pending_calls(), 0);
        // The connection is fine afterwards.
        let mut rx = client
            .server_stream("forever", &msg(""), Payload::Empty, &CallOptions::default())
            .unwrap();
        rx.next().await.unwrap().unwrap();
    });
    drop(server);
}

/// A server that stops reading: a call without a deadline fails once the
/// socket has taken nothing for the write timeout, with every call behind
/// it, instead of waiting for ever (as the blocking client does).
#[test]
fn a_server_that_stops_reading_fails_the_connection_after_the_write_timeout() {
    let _s = serial();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || listener.accept().unwrap().0);
    run(Duration::from_secs(30), async move {
        let mut cfg = ClientConfig {
            conn_window: 0,
            ..ClientConfig::default()
        };
        cfg.send.write_timeout = Some(Duration::from_millis(500));
        let client = AsyncClient::connect_with(addr, cfg).await.unwrap();
        let _peer = tokio::task::spawn_blocking(move || peer.join().unwrap())
            .await
            .unwrap();
        let big = {
            let c = client.clone();
            tokio::spawn(async move {
                c.call_raw(
                    "echo",
                    Vec::new(),
                    vec![7u8; 64 * MIB],
                    &CallOptions::default(),
                )
                .await
            })
        };
        // A call queued behind it, no deadline either.
        let behind = {
            let c = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                c.call_raw("echo", Vec::new(), vec![1u8; 64], &CallOptions::default())
                    .await
            })
        };
        let t0 = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(10), big)
            .await
            .expect("the call waited for ever on a server that does not read")
            .unwrap()
            .expect_err("nothing was answered");
        assert_eq!(e.code(), Code::Unavailable, "{e}");
        assert!(e.message().contains("took no data"), "{e}");
        let e2 = behind.await.unwrap().expect_err("the connection failed");
        assert_eq!(e2.code(), Code::Unavailable, "{e2}");
        assert!(
            t0.elapsed() >= Duration::from_millis(400),
            "failed before the timeout"
        );
    });
}
