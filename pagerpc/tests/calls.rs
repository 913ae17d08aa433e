//! Call semantics over loopback: statuses, unknown methods, panics,
//! deadlines, cancellation, shutdown, and payloads handed back on failure.

mod common;

use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, ClientConfig, Code, Limits, PageBuf, Payload, Reply, Response, Server,
    ServerBuilder, ServerConfig, Status,
};

fn echo_ok(client: &Client, key: &str) {
    let data = pattern(5000, 9);
    let resp: Response<MetadataEntry> = client
        .call("echo", &msg(key), data.clone())
        .unwrap_or_else(|e| panic!("echo '{key}' failed: {e}"));
    assert_eq!(resp.message.key, key);
    assert_bytes_eq(&resp.payload, &data, key);
}

// ---------------------------------------------------------------- statuses

fn status_server() -> Server {
    echo_builder()
        .config(config(3))
        .register("fail", |_ctx, req: MetadataEntry, _pages| {
            let code: u32 = req.key.parse().expect("code");
            let message = String::from_utf8(req.value).expect("utf8");
            Err::<(MetadataEntry, Payload), _>(Status::new(Code::from_u32(code), message))
        })
        .register("not_found", |_ctx, _req: MetadataEntry, _pages| {
            Err::<(MetadataEntry, Payload), _>(Status::not_found("x"))
        })
        .register(
            "panic",
            |_ctx, req: MetadataEntry, _pages| -> Result<(MetadataEntry, Payload), Status> {
                panic!("handler panic requested by test ({})", req.key)
            },
        )
        .register_raw("garbage_reply", |_ctx, _body, _pages| {
            Ok(Reply {
                body: vec![0xff; 12],
                ..Reply::default()
            })
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

#[test]
fn handler_status_reaches_caller_with_code_and_message() {
    let server = status_server();
    let client = Client::connect(server.local_addr()).unwrap();

    let err = client
        .call::<_, MetadataEntry>("not_found", &msg("k"), Payload::Empty)
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(err.message(), "x");

    for code in 1..=16u32 {
        let text = format!("status {code} from the handler");
        let req = MetadataEntry {
            key: code.to_string(),
            value: text.clone().into_bytes(),
        };
        let err = client
            .call::<_, MetadataEntry>("fail", &req, pattern(300, 1))
            .unwrap_err();
        assert_eq!(err.code().as_u32(), code, "{err}");
        assert_eq!(err.message(), text);
        assert!(err.to_string().contains(&text));
    }
    echo_ok(&client, "after statuses");
}

#[test]
fn ok_status_as_error_becomes_unknown_and_long_messages_are_cut() {
    let server = status_server();
    let client = Client::connect(server.local_addr()).unwrap();
    let req = MetadataEntry {
        key: "0".into(),
        value: b"an error with code Ok".to_vec(),
    };
    let err = client
        .call::<_, MetadataEntry>("fail", &req, Payload::Empty)
        .unwrap_err();
    assert_eq!(
        err.code(),
        Code::Unknown,
        "an Err(Ok status) must not look like success"
    );
    assert_eq!(err.message(), "an error with code Ok");

    // 1 + 2 * 3000 bytes; the server keeps at most 1024, cut on a char boundary.
    let long = format!("a{}", "é".repeat(3000));
    let req = MetadataEntry {
        key: "9".into(),
        value: long.clone().into_bytes(),
    };
    let err = client
        .call::<_, MetadataEntry>("fail", &req, Payload::Empty)
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(err.message(), &long[..1023]);
    echo_ok(&client, "after long message");
}

#[test]
fn unknown_method_is_unimplemented() {
    let server = status_server();
    let client = Client::connect(server.local_addr()).unwrap();
    let err = client
        .call::<_, MetadataEntry>("no.such/method", &msg("k"), pattern(10_000, 2))
        .unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented);
    assert!(err.message().contains("no.such/method"), "{err}");
    echo_ok(&client, "after unknown method");
}

#[test]
fn undecodable_messages_are_rejected() {
    let server = status_server();
    let client = Client::connect(server.local_addr()).unwrap();
    // A request body that is not a MetadataEntry: the handler is not called.
    let err = client
        .start_call(
            "echo",
            vec![0xff; 12],
            Payload::Empty,
            &CallOptions::default(),
        )
        .unwrap()
        .wait_typed::<MetadataEntry>()
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("undecodable request"), "{err}");
    // A response body that is not a MetadataEntry.
    let err = client
        .call::<_, MetadataEntry>("garbage_reply", &msg("k"), Payload::Empty)
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal);
    assert!(err.message().contains("undecodable response"), "{err}");
    echo_ok(&client, "after undecodable messages");
}

#[test]
fn handler_panic_is_internal_and_server_keeps_serving() {
    with_watchdog(Duration::from_secs(30), "panics", || {
        let server = status_server();
        let client = Client::connect(server.local_addr()).unwrap();
        // More panics than pool threads: none of them may kill a pool thread.
        for i in 0..10 {
            let err = client
                .call::<_, MetadataEntry>("panic", &msg(format!("p{i}")), pattern(5000, 3))
                .unwrap_err();
            assert_eq!(err.code(), Code::Internal);
            assert!(err.message().contains("panicked"), "{err}");
            echo_ok(&client, &format!("after panic {i}"));
        }
        // Panics and normal calls at the same time, from other connections too.
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let addr = server.local_addr();
                std::thread::spawn(move || {
                    let client = Client::connect(addr).unwrap();
                    for i in 0..10 {
                        if (i + t) % 2 == 0 {
                            let err = client
                                .call::<_, MetadataEntry>("panic", &msg("p"), Payload::Empty)
                                .unwrap_err();
                            assert_eq!(err.code(), Code::Internal);
                        } else {
                            echo_ok(&client, &format!("t{t}-{i}"));
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        echo_ok(&client, "after concurrent panics");
    });
}

// --------------------------------------------------------------- deadlines

/// "sleep": sleeps for `value` (decimal milliseconds), reports the deadline
/// it saw, then echoes.
fn sleepy_server(threads: usize, seen: mpsc::Sender<(String, Option<Duration>)>) -> Server {
    let seen = Mutex::new(seen);
    echo_builder()
        .config(config(threads))
        .register("sleep", move |ctx, req: MetadataEntry, pages| {
            let left = ctx
                .deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            let _ = seen.lock().unwrap().send((req.key.clone(), left));
            let ms: u64 = std::str::from_utf8(&req.value).unwrap().parse().unwrap();
            std::thread::sleep(Duration::from_millis(ms));
            Ok::<_, Status>((req, Payload::Pages(pages)))
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

fn sleep_req(key: &str, ms: u64) -> MetadataEntry {
    MetadataEntry {
        key: key.into(),
        value: ms.to_string().into_bytes(),
    }
}

#[test]
fn deadline_expires_promptly_and_connection_survives() {
    with_watchdog(Duration::from_secs(30), "deadline", || {
        let (tx, seen) = mpsc::channel();
        let server = sleepy_server(4, tx);
        let client = Client::connect(server.local_addr()).unwrap();
        let timeout = Duration::from_millis(300);
        let opts = CallOptions {
            timeout: Some(timeout),
            ..CallOptions::default()
        };
        let t0 = Instant::now();
        let err = client
            .call_with::<_, MetadataEntry>(
                "sleep",
                &sleep_req("slow", 2000),
                pattern(9000, 1),
                &opts,
            )
            .unwrap_err();
        let took = t0.elapsed();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
        assert!(
            took >= timeout - Duration::from_millis(20),
            "gave up early: {took:?}"
        );
        assert!(
            took < timeout + Duration::from_secs(1),
            "gave up late: {took:?}"
        );
        // The server was told the budget.
        let (key, left) = seen.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(key, "slow");
        let left = left.expect("handler must see a deadline");
        assert!(
            left <= timeout && left > Duration::ZERO,
            "deadline left {left:?}"
        );
        assert_eq!(client.pending_calls(), 0);

        // The connection still works, while the slow handler is still running.
        echo_ok(&client, "after deadline");
        // A call that fits its deadline succeeds.
        let resp: Response<MetadataEntry> = client
            .call_with(
                "sleep",
                &sleep_req("quick", 10),
                pattern(10, 2),
                &CallOptions {
                    timeout: Some(Duration::from_secs(10)),
                    ..CallOptions::default()
                },
            )
            .unwrap();
        assert_eq!(resp.message.key, "quick");
        // The late response of the expired call (if sent) is not mistaken for
        // another call's response.
        std::thread::sleep(Duration::from_millis(1900));
        echo_ok(&client, "after the slow handler finished");
    });
}

#[test]
fn default_timeout_applies() {
    with_watchdog(Duration::from_secs(30), "default timeout", || {
        let (tx, _seen) = mpsc::channel();
        let server = sleepy_server(4, tx);
        let cfg = ClientConfig {
            default_timeout: Some(Duration::from_millis(200)),
            ..ClientConfig::default()
        };
        let client = Client::connect_with(server.local_addr(), cfg).unwrap();
        let t0 = Instant::now();
        let err = client
            .call::<_, MetadataEntry>("sleep", &sleep_req("slow", 1500), Payload::Empty)
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded);
        assert!(
            t0.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t0.elapsed()
        );
        echo_ok(&client, "after default timeout");
    });
}

/// A caller with a deadline that is *not* the connection's reader (another
/// thread is reading for its own, slower call) still gives up on time.
#[test]
fn deadline_while_another_thread_reads() {
    with_watchdog(Duration::from_secs(30), "deadline, not reader", || {
        let (tx, seen) = mpsc::channel();
        let server = sleepy_server(4, tx);
        let client = Client::connect(server.local_addr()).unwrap();
        let reader = {
            let client = client.clone();
            std::thread::spawn(move || {
                client.call::<_, MetadataEntry>("sleep", &sleep_req("long", 1500), pattern(7000, 4))
            })
        };
        // Make sure the first call is being handled (its caller is reading).
        assert_eq!(seen.recv_timeout(Duration::from_secs(5)).unwrap().0, "long");
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        let err = client
            .call_with::<_, MetadataEntry>(
                "sleep",
                &sleep_req("short", 3000),
                Payload::Empty,
                &CallOptions {
                    timeout: Some(Duration::from_millis(200)),
                    ..CallOptions::default()
                },
            )
            .unwrap_err();
        assert_eq!(err.code(), Code::DeadlineExceeded);
        assert!(
            t0.elapsed() < Duration::from_millis(1200),
            "{:?}",
            t0.elapsed()
        );
        let resp = reader.join().unwrap().unwrap();
        assert_eq!(resp.message.key, "long");
        assert_bytes_eq(&resp.payload, &pattern(7000, 4), "long call");
        echo_ok(&client, "after");
    });
}

/// When the reading caller gives up, the reader role must pass to a caller
/// that is still waiting, even if every other waiter gives up at about the
/// same moment. Here sixteen callers with a 300 ms deadline and one caller
/// with a 3 s deadline wait together on one connection; the long call's
/// handler answers after about 600 ms, and its caller must get that answer
/// then, not fail at its own deadline.
#[test]
fn reader_role_survives_waiters_timing_out_together() {
    with_watchdog(Duration::from_secs(60), "reader hand-off", || {
        let (b, _started, _finished) = spin_builder(Duration::from_secs(3));
        let (done_tx, done) = mpsc::channel();
        let done_tx = Mutex::new(done_tx);
        let server = b
            .config(config(24))
            .register("sleep", move |_ctx, req: MetadataEntry, _pages| {
                std::thread::sleep(Duration::from_millis(600));
                let _ = done_tx.lock().unwrap().send(Instant::now());
                Ok::<_, Status>((req, Payload::Empty))
            })
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        for round in 0..8 {
            let barrier = Arc::new(std::sync::Barrier::new(16));
            let short: Vec<_> = (0..16)
                .map(|i| {
                    let (client, barrier) = (client.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        // "spin" stops as soon as the server sees the cancel
                        // sent at the deadline, so it does not hold the pool.
                        client.call_with::<_, MetadataEntry>(
                            "spin",
                            &msg(format!("short{i}")),
                            Payload::Empty,
                            &CallOptions {
                                timeout: Some(Duration::from_millis(300)),
                                ..CallOptions::default()
                            },
                        )
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(20));
            let t0 = Instant::now();
            let resp = client.call_with::<_, MetadataEntry>(
                "sleep",
                &msg("long"),
                Payload::Empty,
                &CallOptions {
                    timeout: Some(Duration::from_secs(3)),
                    ..CallOptions::default()
                },
            );
            let took = t0.elapsed();
            for h in short {
                let err = h.join().unwrap().unwrap_err();
                assert_eq!(err.code(), Code::DeadlineExceeded);
            }
            let answered = done
                .recv_timeout(Duration::from_secs(1))
                .expect("the long handler finished")
                .duration_since(t0);
            let resp = resp.unwrap_or_else(|e| {
                panic!(
                    "round {round}: the server answered the long call after {answered:?}, \
                     but its caller gave up after {took:?}: {e}"
                )
            });
            assert_eq!(resp.message.key, "long");
            assert!(
                took < answered + Duration::from_secs(1),
                "round {round}: answered after {answered:?}, delivered after {took:?}"
            );
        }
    });
}

/// The docs ask for a pool of (blocking handlers + 1) threads. Calls that
/// arrive together on one connection must then all run at once, not queue
/// behind a blocked handler while other pool threads sit idle.
#[test]
fn queued_calls_do_not_wait_behind_a_blocking_handler() {
    with_watchdog(Duration::from_secs(30), "pool starvation", || {
        use pagerpc::codec::{encode_head, Flags, Header, Kind};
        use std::io::Write;
        const CALLS: usize = 8;
        let release = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = mpsc::channel();
        let started_tx = Mutex::new(started_tx);
        let server = {
            let release = release.clone();
            echo_builder()
                .config(config(CALLS + 2))
                .register("block", move |_ctx, req: MetadataEntry, _pages| {
                    let _ = started_tx.lock().unwrap().send(req.key.clone());
                    let t0 = Instant::now();
                    while !release.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(10)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    Ok::<_, Status>((req, Payload::Empty))
                })
                .bind("127.0.0.1:0")
                .unwrap()
        };
        // Write the requests in one go so the server reads them as one batch.
        let mut wire = Vec::new();
        for i in 0..CALLS {
            let h = Header {
                call_id: i as u64 + 1,
                kind: Kind::Request as i32,
                method: "block".into(),
                body: msg(format!("b{i}")).encode_to_vec(),
                ..Default::default()
            };
            encode_head(&h, 0, Flags::NONE, &Limits::default(), &mut wire).unwrap();
        }
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        raw.write_all(&wire).unwrap();
        let mut seen = Vec::new();
        while let Ok(k) = started.recv_timeout(Duration::from_secs(3)) {
            seen.push(k);
            if seen.len() == CALLS {
                break;
            }
        }
        release.store(true, Ordering::SeqCst);
        seen.sort();
        assert_eq!(
            seen.len(),
            CALLS,
            "with {} pool threads only {seen:?} of {CALLS} blocking calls started",
            CALLS + 2
        );
        drop(raw);
    });
}

// ------------------------------------------------------------ cancellation

struct SpinServer {
    server: Server,
    started: mpsc::Receiver<String>,
    finished: mpsc::Receiver<(String, bool)>,
}

/// "spin": reports that it started, then polls `is_cancelled` for up to
/// `cap`, and reports whether it saw the cancellation.
fn spin_builder(
    cap: Duration,
) -> (
    ServerBuilder,
    mpsc::Receiver<String>,
    mpsc::Receiver<(String, bool)>,
) {
    let (started_tx, started) = mpsc::channel();
    let (finished_tx, finished) = mpsc::channel();
    let (started_tx, finished_tx) = (Mutex::new(started_tx), Mutex::new(finished_tx));
    let b = echo_builder().register("spin", move |ctx, req: MetadataEntry, _pages| {
        let _ = started_tx.lock().unwrap().send(req.key.clone());
        let t0 = Instant::now();
        while !ctx.is_cancelled() && t0.elapsed() < cap {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = finished_tx
            .lock()
            .unwrap()
            .send((req.key.clone(), ctx.is_cancelled()));
        Ok::<_, Status>((req, Payload::Empty))
    });
    (b, started, finished)
}

fn spin_server(threads: usize) -> SpinServer {
    let (b, started, finished) = spin_builder(Duration::from_secs(10));
    SpinServer {
        server: b.config(config(threads)).bind("127.0.0.1:0").unwrap(),
        started,
        finished,
    }
}

#[test]
fn cancel_reaches_the_handler() {
    with_watchdog(Duration::from_secs(30), "cancel", || {
        let s = spin_server(4);
        let client = Client::connect(s.server.local_addr()).unwrap();
        let call = client
            .start_call(
                "spin",
                msg("c1").encode_to_vec(),
                pattern(8000, 1),
                &CallOptions::default(),
            )
            .unwrap();
        assert_eq!(
            s.started.recv_timeout(Duration::from_secs(5)).unwrap(),
            "c1"
        );
        let t0 = Instant::now();
        call.cancel();
        let (key, cancelled) = s.finished.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(key, "c1");
        assert!(cancelled, "handler never saw the cancellation");
        assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
        assert_eq!(client.pending_calls(), 0);
        echo_ok(&client, "after cancel");
    });
}

#[test]
fn dropping_a_pending_call_cancels_it() {
    with_watchdog(Duration::from_secs(30), "drop cancel", || {
        let s = spin_server(4);
        let client = Client::connect(s.server.local_addr()).unwrap();
        let call = client
            .start_call(
                "spin",
                msg("d1").encode_to_vec(),
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap();
        assert_eq!(
            s.started.recv_timeout(Duration::from_secs(5)).unwrap(),
            "d1"
        );
        drop(call);
        let (key, cancelled) = s.finished.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(key, "d1");
        assert!(cancelled, "handler never saw the cancellation");
        // Other calls, including another spin that is not cancelled, still work.
        echo_ok(&client, "after drop");
        let keep = client
            .start_call(
                "spin",
                msg("d2").encode_to_vec(),
                Payload::Empty,
                &CallOptions::default(),
            )
            .unwrap();
        assert_eq!(
            s.started.recv_timeout(Duration::from_secs(5)).unwrap(),
            "d2"
        );
        echo_ok(&client, "while d2 spins");
        assert!(
            s.finished.recv_timeout(Duration::from_millis(200)).is_err(),
            "d2 was not cancelled"
        );
        drop(keep);
        assert_eq!(
            s.finished.recv_timeout(Duration::from_secs(5)).unwrap(),
            ("d2".to_string(), true)
        );
    });
}

#[test]
fn closing_the_connection_cancels_its_calls() {
    with_watchdog(Duration::from_secs(30), "close cancels", || {
        let s = spin_server(4);
        let client = Client::connect(s.server.local_addr()).unwrap();
        let waiter = {
            let client = client.clone();
            std::thread::spawn(move || {
                client.call::<_, MetadataEntry>("spin", &msg("x1"), Payload::Empty)
            })
        };
        assert_eq!(
            s.started.recv_timeout(Duration::from_secs(5)).unwrap(),
            "x1"
        );
        client.close();
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Cancelled);
        let (key, cancelled) = s.finished.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(key, "x1");
        assert!(cancelled, "closing the connection must cancel its calls");
        // Later calls on the closed client fail at once, handing the payload back.
        let mut err = client
            .call::<_, MetadataEntry>("echo", &msg("late"), vec![1u8, 2, 3])
            .unwrap_err();
        assert_eq!(err.code(), Code::Cancelled);
        assert_eq!(err.take_payload().unwrap().as_slice(), [1, 2, 3]);
        // The server serves new connections.
        let other = Client::connect(s.server.local_addr()).unwrap();
        echo_ok(&other, "new connection");
        assert!(wait_until(Duration::from_secs(5), || s
            .server
            .connections()
            == 1));
    });
}

// ---------------------------------------------------------------- shutdown

#[test]
fn graceful_shutdown_finishes_inflight_calls() {
    with_watchdog(Duration::from_secs(60), "graceful shutdown", || {
        let release = Arc::new(AtomicBool::new(false));
        let (started_tx, started) = mpsc::channel();
        let started_tx = Mutex::new(started_tx);
        let handled = Arc::new(AtomicUsize::new(0));
        let server = {
            let (release, handled) = (release.clone(), handled.clone());
            echo_builder()
                .config(config(8))
                .register("block", move |_ctx, req: MetadataEntry, pages| {
                    let _ = started_tx.lock().unwrap().send(req.key.clone());
                    let t0 = Instant::now();
                    while !release.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(20)
                    {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    handled.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, Status>((req, Payload::Pages(pages)))
                })
                .bind("127.0.0.1:0")
                .unwrap()
        };
        let addr = server.local_addr();
        let client = Client::connect(addr).unwrap();
        let other = Client::connect(addr).unwrap();
        echo_ok(&other, "before shutdown");

        // Four slow calls, one per connection (calls pipelined on one
        // connection can queue behind each other on the server; see
        // queued_calls_do_not_wait_behind_a_blocking_handler).
        let mut slow = Vec::new();
        for i in 0..4 {
            let c = match i {
                0 => client.clone(),
                1 => other.clone(),
                _ => Client::connect(addr).unwrap(),
            };
            slow.push(std::thread::spawn(move || {
                let data = pattern(20_000 + i, i as u64);
                let r = c.call::<_, MetadataEntry>("block", &msg(format!("slow{i}")), data.clone());
                (i, data, r)
            }));
        }
        for _ in 0..4 {
            started.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert_eq!(server.inflight(), 4);

        let stopper = std::thread::spawn(move || {
            let t0 = Instant::now();
            server.shutdown();
            t0.elapsed()
        });
        // Shutdown has begun once the listener is gone.
        assert!(
            wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_err()),
            "the listener was not closed"
        );
        let e = Client::connect(addr).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
        // New calls on open connections are refused while in-flight ones drain.
        let err = client
            .call::<_, MetadataEntry>("echo", &msg("during"), pattern(100, 1))
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert!(err.message().contains("shutting down"), "{err}");
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !stopper.is_finished(),
            "shutdown must wait for in-flight calls"
        );
        assert_eq!(handled.load(Ordering::SeqCst), 0);

        release.store(true, Ordering::SeqCst);
        for h in slow {
            let (i, data, r) = h.join().unwrap();
            let resp = r.unwrap_or_else(|e| panic!("in-flight call {i} failed: {e}"));
            assert_eq!(resp.message.key, format!("slow{i}"));
            assert_bytes_eq(&resp.payload, &data, "in-flight call");
        }
        let took = stopper.join().unwrap();
        assert!(took < Duration::from_secs(10), "shutdown took {took:?}");
        assert_eq!(handled.load(Ordering::SeqCst), 4);

        // Afterwards: existing connections are closed, new ones refused.
        for c in [&client, &other] {
            let err = c
                .call::<_, MetadataEntry>("echo", &msg("after"), Payload::Empty)
                .unwrap_err();
            assert_eq!(err.code(), Code::Unavailable, "{err}");
        }
        let e = Client::connect(addr).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    });
}

/// `shutdown_timeout` gives running calls `grace`, then cancels them and
/// closes their connections. A handler that stops when `is_cancelled()`
/// turns true (as the docs ask) must therefore be told to stop, and the
/// shutdown must return soon after `grace`.
#[test]
fn shutdown_timeout_cancels_overdue_calls() {
    with_watchdog(Duration::from_secs(60), "shutdown_timeout", || {
        let (b, started, finished) = spin_builder(Duration::from_secs(4));
        let server = b.config(config(4)).bind("127.0.0.1:0").unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        let waiter = {
            let client = client.clone();
            std::thread::spawn(move || {
                client.call::<_, MetadataEntry>("spin", &msg("s"), Payload::Empty)
            })
        };
        assert_eq!(started.recv_timeout(Duration::from_secs(5)).unwrap(), "s");
        let grace = Duration::from_millis(300);
        let t0 = Instant::now();
        let clean = server.shutdown_timeout(grace);
        let took = t0.elapsed();
        let (_, cancelled) = finished.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(
            !clean,
            "a call was still running at the end of the grace period"
        );
        assert!(
            cancelled,
            "the overdue handler was never cancelled (shutdown took {took:?})"
        );
        assert!(
            took < grace + Duration::from_secs(2),
            "shutdown_timeout({grace:?}) took {took:?}"
        );
        let err = waiter.join().unwrap().unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
    });
}

// --------------------------------------------- payloads handed back on failure

#[test]
fn refused_send_hands_the_payload_back() {
    let server = echo_builder()
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let long = "m".repeat(Limits::default().max_method_len as usize + 1);

    let data = pattern(10_000, 5);
    let mut err = client
        .call::<_, MetadataEntry>(&long, &msg("k"), data.clone())
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("max_method_len"), "{err}");
    match err.take_payload() {
        Some(Payload::Vec(v)) => assert_bytes_eq(&v, &data, "handed-back Vec"),
        other => panic!("expected the Vec back, got {other:?}"),
    }
    assert!(
        err.take_payload().is_none(),
        "the payload is handed back once"
    );

    // A page-aligned buffer comes back as the same kind, same bytes.
    let data = pattern(70_000, 6);
    let mut buf = PageBuf::new(data.len()).unwrap();
    buf.copy_from_slice(&data);
    let mut err = client
        .start_call(
            &long,
            Vec::new(),
            Payload::Buf(buf),
            &CallOptions::default(),
        )
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    match err.take_payload() {
        Some(Payload::Buf(b)) => assert_bytes_eq(&b, &data, "handed-back PageBuf"),
        other => panic!("expected the PageBuf back, got {other:?}"),
    }
    // An empty method name is refused the same way.
    let err = client
        .call::<_, MetadataEntry>("", &msg("k"), Payload::Empty)
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");

    // Nothing reached the wire but the SETTINGS sent at connect: the
    // connection is fine.
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(client.counters().frames_sent, 1);
    echo_ok(&client, "after refused sends");
}

#[test]
fn payload_over_the_peer_limit_is_refused_locally() {
    let server = echo_builder()
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let mut cfg = ClientConfig::default();
    cfg.send.limits.max_payload_bytes = 64 * 1024;
    let client = Client::connect_with(server.local_addr(), cfg).unwrap();
    let data = pattern(64 * 1024 + 1, 8);
    let mut err = client
        .call::<_, MetadataEntry>("echo", &msg("big"), data.clone())
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("max_payload_bytes"), "{err}");
    assert_bytes_eq(err.take_payload().unwrap().as_slice(), &data, "handed back");
    echo_ok(&client, "after refused payload");
}

#[test]
fn reply_over_the_client_limit_is_resource_exhausted() {
    // The client announces (SETTINGS) that it takes payloads of 8 KiB.
    let server = echo_builder()
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let mut ccfg = ClientConfig::default();
    ccfg.limits.max_payload_bytes = 8192;
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let err = client
        .call::<_, MetadataEntry>("echo", &msg("big"), pattern(8193, 1))
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("max_payload_bytes"), "{err}");
    // Only that call failed.
    let resp: Response<MetadataEntry> = client.call("echo", &msg("ok"), pattern(8192, 2)).unwrap();
    assert_bytes_eq(&resp.payload, &pattern(8192, 2), "reply at the limit");
}

#[test]
fn max_connections_is_enforced() {
    let cfg = ServerConfig {
        max_connections: 1,
        ..config(2)
    };
    let server = echo_builder().config(cfg).bind("127.0.0.1:0").unwrap();
    let first = Client::connect(server.local_addr()).unwrap();
    echo_ok(&first, "first");
    let second = Client::connect(server.local_addr()).unwrap();
    let err = second
        .call::<_, MetadataEntry>("echo", &msg("second"), Payload::Empty)
        .unwrap_err();
    assert!(
        matches!(err.code(), Code::ResourceExhausted | Code::Unavailable),
        "{err}"
    );
    if err.code() == Code::ResourceExhausted {
        assert!(err.message().contains("max_connections"), "{err}");
    }
    echo_ok(&first, "first, again");
    assert_eq!(server.connections(), 1);
}
