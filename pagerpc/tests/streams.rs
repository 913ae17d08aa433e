//! Streaming calls over loopback: every shape, flow control, and every way
//! a stream can end early. A stream cut short must never look complete.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, Code, Pages, Payload, Reply, Server, ServerBuilder, ServerConfig, Status,
};
use sha2::{Digest, Sha256};

const KIB: usize = 1024;
const MIB: usize = 1 << 20;

fn payload(i: u64, len: usize) -> Payload {
    Payload::Vec(pattern(len, i))
}

/// Server-streaming "count": sends `n` (from the request key) messages of
/// `len` bytes (from the value's length... see below), message i with
/// pattern seed i. Fails with Aborted after `fail_after` if the key says so.
fn builder() -> ServerBuilder {
    Server::builder()
        .register_server_stream("count", |ctx, body, _pages, out| {
            let req: MetadataEntry = pagerpc::prost::Message::decode(body)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut it = req.key.split(',').map(|x| x.parse::<usize>().unwrap());
            let (n, len, fail_after) = (it.next().unwrap(), it.next().unwrap(), it.next());
            for i in 0..n {
                if fail_after == Some(i) {
                    return Err(Status::aborted(format!("failed after {i} messages")));
                }
                if ctx.is_cancelled() {
                    return Err(Status::cancelled("cancelled"));
                }
                out.send(&msg(format!("m{i}")), payload(i as u64, len))?;
            }
            Ok(vec![msg("trailer")])
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
        .register_bidi_stream("echo-stream", |_ctx, rx, tx| {
            while let Some(m) = rx.recv()? {
                tx.send_raw(m.body, Payload::Pages(m.payload))?;
            }
            Ok(Vec::new())
        })
        .register("ping", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
}

fn start(cfg: ServerConfig, b: ServerBuilder) -> (Server, Client) {
    let server = b.config(cfg).bind("127.0.0.1:0").unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    (server, client)
}

#[test]
fn server_stream_delivers_every_message_then_ends_ok() {
    let (_server, client) = start(config(2), builder());
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
        assert_bytes_eq(&p, &pattern(64 * KIB, i), "server stream message");
        i += 1;
    }
    assert_eq!(i, 200);
    assert_eq!(rx.trailers(), &[msg("trailer")], "the handler's trailers");
    assert!(rx.recv().unwrap().is_none(), "the end stays the end");
    assert_eq!(client.pending_calls(), 0, "the call is over");
}

#[test]
fn client_stream_and_bidi_are_byte_exact() {
    let (_server, client) = start(config(2), builder());
    let (mut tx, resp) = client
        .client_stream("sum", &CallOptions::default())
        .unwrap();
    let mut want = Sha256::new();
    for i in 0..100u64 {
        let p = pattern(100 * KIB + i as usize, i);
        want.update(&p);
        tx.send(&msg("c"), Payload::Vec(p)).unwrap();
    }
    tx.finish().unwrap();
    let r = resp.wait::<MetadataEntry>().unwrap();
    assert_eq!(r.message.key, "100");
    assert_eq!(r.message.value, want.finalize().to_vec());

    let (mut tx, mut rx) = client
        .bidi_stream("echo-stream", &CallOptions::default())
        .unwrap();
    let sender = std::thread::spawn(move || {
        for i in 0..300u64 {
            tx.send(&msg(format!("b{i}")), payload(i, 10 * KIB))
                .unwrap();
        }
        tx.finish().unwrap();
    });
    let mut i = 0u64;
    while let Some((m, p)) = rx.recv_typed::<MetadataEntry>().unwrap() {
        assert_eq!(m.key, format!("b{i}"));
        assert_bytes_eq(&p, &pattern(10 * KIB, i), "bidi echo");
        i += 1;
    }
    sender.join().unwrap();
    assert_eq!(i, 300);
    assert_eq!(client.pending_calls(), 0);
}

#[test]
fn a_server_error_mid_stream_is_an_error_not_an_end() {
    let (_server, client) = start(config(2), builder());
    let mut rx = client
        .server_stream(
            "count",
            &msg("1000,4096,100"),
            Payload::Empty,
            &CallOptions::default(),
        )
        .unwrap();
    let mut got = 0;
    let err = loop {
        match rx.recv() {
            Ok(Some(_)) => got += 1,
            Ok(None) => panic!("a failed stream was reported complete after {got} messages"),
            Err(e) => break e,
        }
    };
    assert_eq!(got, 100);
    assert_eq!(err.code(), Code::Aborted, "{err}");
    assert!(err.message().contains("failed after 100"), "{err}");
}

#[test]
fn cancellation_from_either_side() {
    // The client drops its receiver mid-stream: the server's handler sees
    // the cancellation and stops sending.
    let seen = Arc::new(AtomicBool::new(false));
    let s2 = seen.clone();
    let b = Server::builder().register_server_stream("forever", move |ctx, _b, _p, out| {
        let mut i = 0u64;
        loop {
            if let Err(e) = out.send(&msg("x"), payload(i, 4096)) {
                assert!(ctx.is_cancelled() || !out.is_open(), "{e}");
                s2.store(true, Ordering::SeqCst);
                return Err(e.status);
            }
            i += 1;
        }
    });
    let (_server, client) = start(config(2), b);
    let mut rx = client
        .server_stream("forever", &msg(""), Payload::Empty, &CallOptions::default())
        .unwrap();
    for _ in 0..50 {
        rx.recv().unwrap().unwrap();
    }
    drop(rx);
    assert!(wait_until(Duration::from_secs(10), || seen.load(Ordering::SeqCst)));

    // The client aborts its sending half with a status: the server's
    // handler gets that status from recv(), never a clean end.
    let got = Arc::new(std::sync::Mutex::new(None));
    let g2 = got.clone();
    let b = Server::builder().register_client_stream("upload", move |_ctx, rx| {
        let r = loop {
            match rx.recv() {
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(s) => break Err(s),
            }
        };
        *g2.lock().unwrap() = Some(r.clone());
        r.map(|()| Reply::default())
    });
    let (_server, client) = start(config(2), b);
    let (mut tx, resp) = client
        .client_stream("upload", &CallOptions::default())
        .unwrap();
    for i in 0..10 {
        tx.send(&msg("u"), payload(i, 8192)).unwrap();
    }
    tx.abort(Status::data_loss("the source file went away"));
    let err = resp.wait::<MetadataEntry>().unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err}");
    assert!(wait_until(Duration::from_secs(10), || got
        .lock()
        .unwrap()
        .is_some()));
    let server_saw = got.lock().unwrap().clone().unwrap().unwrap_err();
    assert_eq!(server_saw.code(), Code::DataLoss, "{server_saw}");
    assert!(server_saw.message().contains("went away"), "{server_saw}");

    // Dropping the sender without finishing cancels too.
    let (mut tx, resp) = client
        .client_stream("upload", &CallOptions::default())
        .unwrap();
    tx.send(&msg("u"), payload(0, 8192)).unwrap();
    drop(tx);
    let err = resp.wait::<MetadataEntry>().unwrap_err();
    assert_eq!(err.code(), Code::Cancelled, "{err}");
}

#[test]
fn the_deadline_bounds_the_whole_stream() {
    let (_server, client) = start(config(2), builder());
    let opts = CallOptions {
        timeout: Some(Duration::from_millis(300)),
        ..CallOptions::default()
    };
    // Never finished: the client stops sending and waits for the response.
    let (mut tx, resp) = client.client_stream("sum", &opts).unwrap();
    tx.send(&msg("c"), payload(0, 4096)).unwrap();
    let err = resp.wait::<MetadataEntry>().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    drop(tx);
    // The connection is fine afterwards.
    let r = client
        .call::<_, MetadataEntry>("ping", &msg("after"), Payload::Empty)
        .unwrap();
    assert_eq!(r.message.key, "after");
}

#[test]
fn a_stalled_consumer_stops_its_sender_and_nothing_else() {
    // 16 messages of 256 KiB.
    let window = 4 * MIB as u64;
    let sent = Arc::new(AtomicUsize::new(0));
    let s2 = sent.clone();
    let b = builder().register_server_stream("big", move |_ctx, _b, _p, out| {
        for i in 0..64u64 {
            out.send(&msg("x"), payload(i, 256 * KIB))?;
            s2.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Vec::new())
    });
    let server = b.config(config(2)).bind("127.0.0.1:0").unwrap();
    let cfg = pagerpc::ClientConfig {
        stream_window: window,
        ..pagerpc::ClientConfig::default()
    };
    let client = Client::connect_with(server.local_addr(), cfg).unwrap();
    let mut rx = client
        .server_stream("big", &msg(""), Payload::Empty, &CallOptions::default())
        .unwrap();
    // Take 10 messages and keep them: their credit is not given back.
    let kept: Vec<_> = (0..10).map(|_| rx.recv().unwrap().unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let stalled_at = sent.load(Ordering::SeqCst);
    // Never more than the window: the 10 the consumer holds plus 6 more
    // that arrived and were not taken.
    assert!(
        stalled_at <= 16,
        "the server kept sending past the window: {stalled_at} messages"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sent.load(Ordering::SeqCst),
        stalled_at,
        "the sender must stay stopped"
    );
    // Other calls on the same connection go on.
    for i in 0..20 {
        let r = client
            .call::<_, MetadataEntry>("ping", &msg(format!("p{i}")), Payload::Empty)
            .unwrap();
        assert_eq!(r.message.key, format!("p{i}"));
    }
    // Draining resumes the stream, which completes whole.
    drop(kept);
    let mut n = 10;
    while let Some(m) = rx.recv().unwrap() {
        assert_bytes_eq(&m.payload, &pattern(256 * KIB, n), "after the stall");
        n += 1;
    }
    assert_eq!(n, 64);
}

#[test]
fn the_wrong_shape_is_refused_with_a_clear_error() {
    let (_server, client) = start(config(2), builder());
    // A unary method called as a client stream.
    let (tx, resp) = client
        .client_stream("ping", &CallOptions::default())
        .unwrap();
    let err = resp.wait::<MetadataEntry>().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("unary"), "{err}");
    drop(tx);
    // A client-streaming method called as server-streaming.
    let mut rx = client
        .server_stream("sum", &msg(""), Payload::Empty, &CallOptions::default())
        .unwrap();
    let err = rx.recv().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    assert!(err.message().contains("client-streaming"), "{err}");
}

#[test]
fn a_server_killed_mid_stream_is_never_a_complete_stream() {
    let (server, client) = start(config(2), builder());
    let mut rx = client
        .server_stream(
            "count",
            &msg("100000,4096"),
            Payload::Empty,
            &CallOptions::default(),
        )
        .unwrap();
    for _ in 0..10 {
        rx.recv().unwrap().unwrap();
    }
    // Abrupt: the server goes away with the stream open.
    std::thread::spawn(move || server.shutdown_timeout(Duration::from_millis(1)));
    let err = loop {
        match rx.recv() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("a stream cut short was reported complete"),
            Err(e) => break e,
        }
    };
    assert!(
        matches!(err.code(), Code::Unavailable | Code::Cancelled),
        "{err}"
    );
}

/// A client that announces a huge window and reads nothing must not make
/// the server queue a huge stream: the server also bounds what it has
/// outstanding by its own `stream_window`.
#[test]
fn a_huge_client_window_does_not_make_the_server_queue_the_stream() {
    let sent = Arc::new(AtomicUsize::new(0));
    let s2 = sent.clone();
    let b = Server::builder().register_server_stream("big", move |_ctx, _b, _p, out| {
        for i in 0..64u64 {
            out.send(&msg("x"), payload(i, 256 * KIB))?;
            s2.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Vec::new())
    });
    let mut cfg = config(2);
    cfg.stream_window = MIB as u64;
    let server = b.config(cfg).bind("127.0.0.1:0").unwrap();
    let ccfg = pagerpc::ClientConfig {
        stream_window: 1 << 30,
        ..pagerpc::ClientConfig::default()
    };
    let client = Client::connect_with(server.local_addr(), ccfg).unwrap();
    let mut rx = client
        .server_stream("big", &msg(""), Payload::Empty, &CallOptions::default())
        .unwrap();
    // Nothing read: whatever the server sent sits in sockets or in its
    // queue. It stops at its own window (1 MiB: three messages of 256 KiB
    // and a body each, the fourth would pass it).
    assert!(wait_until(Duration::from_secs(10), || sent
        .load(Ordering::SeqCst)
        >= 3));
    std::thread::sleep(Duration::from_millis(300));
    let n = sent.load(Ordering::SeqCst);
    assert!(
        n <= 4,
        "the server queued {n} messages for a client that reads nothing"
    );
    let mut got = 0;
    while let Some(m) = rx.recv().unwrap() {
        assert_bytes_eq(&m.payload, &pattern(256 * KIB, got), "after the stall");
        got += 1;
    }
    assert_eq!(got, 64);
}

/// Shutting down does not wait for a stream stalled on a client that
/// never gives credit back: its handler is told the server is going.
#[test]
fn shutdown_ends_a_stalled_stream() {
    let ended = Arc::new(std::sync::Mutex::new(None));
    let e2 = ended.clone();
    let b = Server::builder().register_server_stream("forever", move |_ctx, _b, _p, out| {
        let mut i = 0;
        loop {
            if let Err(e) = out.send(&msg("x"), payload(i, 64 * KIB)) {
                *e2.lock().unwrap() = Some(e.status.clone());
                return Err(e.status);
            }
            i += 1;
        }
    });
    let server = b.config(config(2)).bind("127.0.0.1:0").unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let mut rx = client
        .server_stream("forever", &msg(""), Payload::Empty, &CallOptions::default())
        .unwrap();
    // Keep the first messages: no credit goes back, the handler stalls.
    let _kept: Vec<_> = (0..4).map(|_| rx.recv().unwrap().unwrap()).collect();
    with_watchdog(Duration::from_secs(20), "shutdown", move || {
        server.shutdown()
    });
    let status = ended.lock().unwrap().clone().expect("the handler was told");
    assert_eq!(status.code(), Code::Unavailable, "{status}");
    // The client sees the end as an error, never as a complete stream.
    let err = loop {
        match rx.recv() {
            Ok(Some(_)) => {}
            Ok(None) => panic!("a stream cut by shutdown was reported complete"),
            Err(e) => break e,
        }
    };
    assert!(matches!(err.code(), Code::Unavailable), "{err}");
}

/// A client that opens a stream and then says nothing does not hold the
/// handler's thread forever: `stream_idle_timeout` ends the stream, naming
/// itself. A stream that keeps moving, however slowly, never hits it.
#[test]
fn a_silent_client_stream_ends_at_the_stream_idle_timeout() {
    let b = Server::builder().register_client_stream("upload", |_ctx, rx| {
        while rx.recv()?.is_some() {}
        Ok(Reply::default())
    });
    let mut cfg = config(2);
    cfg.stream_idle_timeout = Some(Duration::from_millis(300));
    let server = b.config(cfg).bind("127.0.0.1:0").unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let (tx, resp) = client
        .client_stream("upload", &CallOptions::default())
        .unwrap();
    let err = resp.wait::<MetadataEntry>().unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
    assert!(err.message().contains("stream_idle_timeout"), "{err}");
    drop(tx);
    // Slow but steady: a message every 100 ms for a second.
    let (mut tx, resp) = client
        .client_stream("upload", &CallOptions::default())
        .unwrap();
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        tx.send(&msg("slow"), payload(i, 4096)).unwrap();
    }
    tx.finish().unwrap();
    resp.wait::<MetadataEntry>().unwrap();
}

/// Shutting down waits for the stream handlers' threads (they run outside
/// the pool): when it returns, no handler is still running.
#[test]
fn shutdown_waits_for_stream_handler_threads() {
    let exited = Arc::new(AtomicBool::new(false));
    let started = Arc::new(AtomicBool::new(false));
    let (e2, s2) = (exited.clone(), started.clone());
    let b = Server::builder().register_client_stream("upload", move |_ctx, rx| {
        s2.store(true, Ordering::SeqCst);
        let r = loop {
            match rx.recv() {
                Ok(Some(_)) => {}
                Ok(None) => break Ok(Reply::default()),
                Err(s) => break Err(s),
            }
        };
        // Some cleanup after the stream is cut.
        std::thread::sleep(Duration::from_millis(30));
        e2.store(true, Ordering::SeqCst);
        r
    });
    let server = b.config(config(2)).bind("127.0.0.1:0").unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let (mut tx, _resp) = client
        .client_stream("upload", &CallOptions::default())
        .unwrap();
    tx.send(&msg("x"), payload(0, 4096)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || started.load(Ordering::SeqCst)));
    server.shutdown_timeout(Duration::from_millis(1));
    assert!(
        exited.load(Ordering::SeqCst),
        "shutdown returned while a stream handler was still running"
    );
}

/// A raw peer that ignores flow control and floods a stream past its
/// window gets that stream ended with `ResourceExhausted` naming the
/// window; its connection stays usable.
#[test]
fn a_peer_flooding_a_stream_past_its_window_gets_an_error() {
    use pagerpc::codec::{encode_head, Flags, Header, Kind, Limits};
    use std::io::Write;
    let b = Server::builder()
        .register_client_stream("upload", |_ctx, rx| {
            // Holds what it gets: no credit goes back.
            let mut kept = Vec::new();
            while let Some(m) = rx.recv()? {
                kept.push(m);
            }
            Ok(Reply::default())
        })
        .register("ping", |_ctx, req: MetadataEntry, _p: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        });
    let mut cfg = config(2);
    cfg.stream_window = MIB as u64;
    let server = b.config(cfg).bind("127.0.0.1:0").unwrap();
    let mut s = std::net::TcpStream::connect(server.local_addr()).unwrap();
    let frame = |h: &Header, payload: &[u8]| {
        let mut w = Vec::new();
        encode_head(
            h,
            payload.len() as u64,
            Flags::NONE,
            &Limits::default(),
            &mut w,
        )
        .unwrap();
        w.extend_from_slice(payload);
        w
    };
    let open = Header {
        call_id: 5,
        kind: Kind::Request as i32,
        method: "upload".into(),
        client_stream: true,
        ..Default::default()
    };
    let chunk = Header {
        call_id: 5,
        kind: Kind::StreamChunk as i32,
        ..Default::default()
    };
    let data = vec![7u8; 600 * 1024];
    let mut wire = frame(&open, b"");
    for _ in 0..3 {
        wire.extend(frame(&chunk, &data));
    }
    s.write_all(&wire).unwrap();
    let frames = read_raw_frames(&mut s, 1, Duration::from_secs(10));
    let h = &frames[0].head.header;
    assert_eq!((h.call_id, h.kind), (5, Kind::Error as i32));
    assert_eq!(h.status_code, Code::ResourceExhausted.as_u32());
    assert!(
        h.status_message.contains("stream_window"),
        "{}",
        h.status_message
    );
    // The connection goes on.
    s.write_all(&raw_request(6, "ping", b"")).unwrap();
    let frames = read_raw_frames(&mut s, 1, Duration::from_secs(10));
    assert_eq!(frames[0].head.call_id(), 6);
    assert_eq!(frames[0].head.kind(), Kind::Response);
}

/// The server answers a client stream before reading it all: after the
/// client took that answer, its sender is told the call is over instead of
/// sending into a stream nobody reads (and, out of credit, waiting for
/// credit that never comes).
#[test]
fn after_an_early_answer_the_sender_is_told_the_call_is_over() {
    let b = Server::builder().register_client_stream("early", |_ctx, _rx| {
        Ok(Reply {
            body: pagerpc::prost::Message::encode_to_vec(&msg("done")),
            ..Reply::default()
        })
    });
    let (_server, client) = start(config(2), b);
    let (mut tx, resp) = client
        .client_stream("early", &CallOptions::default())
        .unwrap();
    assert_eq!(resp.wait::<MetadataEntry>().unwrap().message.key, "done");
    let e = tx.send(&msg("late"), vec![1u8; 1000]).unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
}
