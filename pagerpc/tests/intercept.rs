//! Interceptors over loopback: a client interceptor that adds a token, a
//! server interceptor that refuses calls without it (the handler never
//! runs, the caller gets exactly the interceptor's status), for unary calls
//! and every kind of stream; and a client interceptor that refuses a call
//! locally, handing the payload back.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, Code, Context, OutgoingCall, Pages, Payload, Reply, Server, Status,
};

const TOKEN_KEY: &str = "authorization";
const TOKEN: &[u8] = b"Bearer s3cret";

/// Handler runs, by method.
#[derive(Default)]
struct Runs {
    unary: AtomicUsize,
    client_stream: AtomicUsize,
    server_stream: AtomicUsize,
    bidi: AtomicUsize,
}

fn token_of(md: &[MetadataEntry]) -> Option<&[u8]> {
    md.iter()
        .find(|m| m.key == TOKEN_KEY)
        .map(|m| m.value.as_slice())
}

/// The server interceptor: calls without the token are refused.
fn require_token(ctx: &Context) -> Result<(), Status> {
    match token_of(ctx.metadata()) {
        Some(t) if t == TOKEN => Ok(()),
        Some(_) => Err(Status::unauthenticated("wrong token")),
        None => Err(Status::unauthenticated(format!(
            "no token on a call to {}",
            ctx.method()
        ))),
    }
}

/// A server whose every method counts its runs and checks the token is
/// there (it must be, if the interceptor let the call through).
fn server(runs: &Arc<Runs>) -> Server {
    let (r1, r2, r3, r4) = (runs.clone(), runs.clone(), runs.clone(), runs.clone());
    Server::builder()
        .interceptor(require_token)
        .register("echo", move |ctx, req: MetadataEntry, pages: Pages| {
            r1.unary.fetch_add(1, Ordering::SeqCst);
            assert_eq!(token_of(ctx.metadata()), Some(TOKEN));
            Ok::<_, Status>((req, Payload::Pages(pages)))
        })
        .register_client_stream("sum", move |ctx, rx| {
            r2.client_stream.fetch_add(1, Ordering::SeqCst);
            assert_eq!(token_of(ctx.metadata()), Some(TOKEN));
            let mut n = 0usize;
            while let Some(m) = rx.recv()? {
                n += m.payload.len();
            }
            Ok(Reply {
                body: pagerpc::prost::Message::encode_to_vec(&msg(n.to_string())),
                ..Reply::default()
            })
        })
        .register_server_stream("count", move |ctx, _body, _pages, out| {
            r3.server_stream.fetch_add(1, Ordering::SeqCst);
            assert_eq!(token_of(ctx.metadata()), Some(TOKEN));
            for i in 0..3 {
                out.send(&msg(format!("m{i}")), vec![i as u8; 4096])?;
            }
            Ok(Vec::new())
        })
        .register_bidi_stream("chat", move |ctx, rx, tx| {
            r4.bidi.fetch_add(1, Ordering::SeqCst);
            assert_eq!(token_of(ctx.metadata()), Some(TOKEN));
            while let Some(m) = rx.recv()? {
                tx.send_raw(m.body, Payload::Pages(m.payload))?;
            }
            Ok(Vec::new())
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

fn add_token(call: &mut OutgoingCall<'_>) -> Result<(), Status> {
    call.insert_metadata(TOKEN_KEY, TOKEN);
    Ok(())
}

fn total(runs: &Runs) -> usize {
    runs.unary.load(Ordering::SeqCst)
        + runs.client_stream.load(Ordering::SeqCst)
        + runs.server_stream.load(Ordering::SeqCst)
        + runs.bidi.load(Ordering::SeqCst)
}

#[test]
fn unary_calls_without_the_token_are_refused_before_the_handler() {
    let runs = Arc::new(Runs::default());
    let server = server(&runs);
    let plain = Client::connect(server.local_addr()).unwrap();
    let authed = plain.clone().with_interceptor(add_token);

    for _ in 0..3 {
        let e = plain
            .call::<_, MetadataEntry>("echo", &msg("hi"), vec![1u8; 8192])
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        assert_eq!(e.message(), "no token on a call to echo");
    }
    // A wrong token is refused too, with the interceptor's own status.
    let opts = CallOptions {
        metadata: vec![MetadataEntry {
            key: TOKEN_KEY.into(),
            value: b"nope".to_vec(),
        }],
        ..CallOptions::default()
    };
    let e = plain
        .call_with::<_, MetadataEntry>("echo", &msg("hi"), Payload::Empty, &opts)
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unauthenticated, "wrong token")
    );
    assert_eq!(runs.unary.load(Ordering::SeqCst), 0, "a refused call ran");

    // The interceptor replaces the wrong token with the right one.
    let data = pattern(1 << 20, 3);
    let r = authed
        .call_with::<_, MetadataEntry>("echo", &msg("hi"), data.clone(), &opts)
        .unwrap();
    assert_eq!(r.message.key, "hi");
    assert_bytes_eq(&r.payload, &data, "echo");
    assert_eq!(runs.unary.load(Ordering::SeqCst), 1);

    // Handles cloned from the intercepted one run it; the plain one still
    // does not (they share one connection).
    let cloned = authed.clone();
    cloned
        .call::<_, MetadataEntry>("echo", &msg("again"), Payload::Empty)
        .unwrap();
    assert_eq!(runs.unary.load(Ordering::SeqCst), 2);
    let e = plain
        .call::<_, MetadataEntry>("echo", &msg("hi"), Payload::Empty)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(runs.unary.load(Ordering::SeqCst), 2);
    assert_eq!(server.connections(), 1);
}

#[test]
fn stream_calls_without_the_token_are_refused_before_the_handler() {
    let runs = Arc::new(Runs::default());
    let server = server(&runs);
    let plain = Client::connect(server.local_addr()).unwrap();
    let authed = plain.clone().with_interceptor(add_token);
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(20)),
        ..CallOptions::default()
    };

    // Client-streaming: the refusal is the call's response.
    let (mut tx, resp) = plain.client_stream("sum", &opts).unwrap();
    // Sends may or may not go through before the refusal arrives.
    let _ = tx.send(&msg("a"), vec![1u8; 4096]);
    let _ = tx.finish();
    let e = resp.wait::<MetadataEntry>().unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert_eq!(e.message(), "no token on a call to sum");

    // Server-streaming: the refusal ends the stream before any message.
    let mut rx = plain
        .server_stream("count", &msg("x"), Payload::Empty, &opts)
        .unwrap();
    let e = rx.recv().unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert_eq!(e.message(), "no token on a call to count");

    // Bidirectional.
    let (mut tx, mut rx) = plain.bidi_stream("chat", &opts).unwrap();
    let _ = tx.send(&msg("a"), vec![2u8; 4096]);
    let e = rx.recv().unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    assert_eq!(e.message(), "no token on a call to chat");
    drop(tx);

    assert_eq!(total(&runs), 0, "a refused stream's handler ran");

    // With the token, every shape goes through.
    let (mut tx, resp) = authed.client_stream("sum", &opts).unwrap();
    for i in 0..4u8 {
        tx.send(&msg("c"), vec![i; 8192]).unwrap();
    }
    tx.finish().unwrap();
    assert_eq!(resp.wait::<MetadataEntry>().unwrap().message.key, "32768");

    let mut rx = authed
        .server_stream("count", &msg("x"), Payload::Empty, &opts)
        .unwrap();
    let mut got = 0;
    while let Some(m) = rx.recv().unwrap() {
        assert_eq!(m.payload.len(), 4096);
        got += 1;
    }
    assert_eq!(got, 3);

    let (mut tx, mut rx) = authed.bidi_stream("chat", &opts).unwrap();
    for i in 0..3u8 {
        let data = pattern(10_000, u64::from(i));
        tx.send(&msg("b"), data.clone()).unwrap();
        let m = rx.recv().unwrap().unwrap();
        assert_bytes_eq(&m.payload, &data, "chat");
    }
    tx.finish().unwrap();
    assert!(rx.recv().unwrap().is_none());

    assert_eq!(runs.client_stream.load(Ordering::SeqCst), 1);
    assert_eq!(runs.server_stream.load(Ordering::SeqCst), 1);
    assert_eq!(runs.bidi.load(Ordering::SeqCst), 1);
}

#[test]
fn a_client_interceptor_refusing_a_call_sends_nothing_and_hands_the_payload_back() {
    let runs = Arc::new(Runs::default());
    let server = server(&runs);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let client = Client::connect(server.local_addr())
        .unwrap()
        .with_interceptor(add_token)
        .with_interceptor(move |call: &mut OutgoingCall<'_>| {
            s.lock().unwrap().push((
                call.method().to_owned(),
                call.is_stream(),
                call.deadline().is_some(),
                token_of(call.metadata()).map(<[u8]>::to_vec),
            ));
            if call.method().starts_with("forbidden") {
                return Err(Status::permission_denied(format!(
                    "{} is not for this client",
                    call.method()
                )));
            }
            Ok(())
        });
    // A round trip first: the server has read every frame sent so far.
    client.ping(Duration::from_secs(5)).unwrap();
    let before = server.counters();

    let data = pattern(300_000, 9);
    let mut e = client
        .call::<_, MetadataEntry>("forbidden-echo", &msg("x"), data.clone())
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "forbidden-echo is not for this client");
    match e.take_payload() {
        Some(Payload::Vec(v)) => assert!(v == data, "the payload came back changed"),
        other => panic!("payload not handed back: {other:?}"),
    }

    let opts = CallOptions {
        timeout: Some(Duration::from_secs(5)),
        ..CallOptions::default()
    };
    let mut e = client
        .server_stream("forbidden-count", &msg("x"), vec![5u8; 4096], &opts)
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.take_payload().is_some_and(|p| p.len() == 4096));
    let e = client.bidi_stream("forbidden-chat", &opts).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = client.client_stream("forbidden-sum", &opts).unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // Nothing was sent: no call is pending, the server read no frame.
    assert_eq!(client.pending_calls(), 0);
    std::thread::sleep(Duration::from_millis(50));
    let after = server.counters();
    assert_eq!(after.frames_received, before.frames_received);
    assert_eq!(total(&runs), 0);

    // The second interceptor ran after the first (it saw the token), on
    // every kind of call, with the deadline where there was one.
    let tok = Some(TOKEN.to_vec());
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            ("forbidden-echo".to_owned(), false, false, tok.clone()),
            ("forbidden-count".to_owned(), true, true, tok.clone()),
            ("forbidden-chat".to_owned(), true, true, tok.clone()),
            ("forbidden-sum".to_owned(), true, true, tok.clone()),
        ]
    );

    // The connection is fine: allowed calls go through.
    let r = client
        .call::<_, MetadataEntry>("echo", &msg("ok"), data.clone())
        .unwrap();
    assert_bytes_eq(&r.payload, &data, "echo after refusals");
    assert_eq!(runs.unary.load(Ordering::SeqCst), 1);
}

#[test]
fn server_interceptors_run_in_order_and_the_first_refusal_wins() {
    let order = Arc::new(Mutex::new(Vec::new()));
    let runs = Arc::new(AtomicUsize::new(0));
    let (o1, o2, r) = (order.clone(), order.clone(), runs.clone());
    let server = Server::builder()
        .interceptor(move |ctx: &Context| {
            o1.lock().unwrap().push(format!("first {}", ctx.method()));
            if ctx.method() == "closed" {
                return Err(Status::unavailable("closed for maintenance"));
            }
            Ok(())
        })
        .interceptor(move |ctx: &Context| {
            o2.lock().unwrap().push(format!("second {}", ctx.method()));
            assert!(ctx.deadline().is_some());
            assert_eq!(ctx.peer().ip().to_string(), "127.0.0.1");
            Err(Status::resource_exhausted("quota"))
        })
        .register("closed", move |_ctx, req: MetadataEntry, _pages: Pages| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Status>((req, Payload::Empty))
        })
        .register("open", |_ctx, req: MetadataEntry, _pages: Pages| {
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let opts = CallOptions {
        timeout: Some(Duration::from_secs(5)),
        ..CallOptions::default()
    };
    let e = client
        .call_with::<_, MetadataEntry>("closed", &msg("x"), Payload::Empty, &opts)
        .unwrap_err();
    assert_eq!(
        (e.code(), e.message()),
        (Code::Unavailable, "closed for maintenance")
    );
    // "open" passes the first and is refused by the second.
    let e = client
        .call_with::<_, MetadataEntry>("open", &msg("x"), Payload::Empty, &opts)
        .unwrap_err();
    assert_eq!((e.code(), e.message()), (Code::ResourceExhausted, "quota"));
    // A method nobody registered has no handler to guard: it is answered
    // Unimplemented without running the interceptors.
    let e = client
        .call_with::<_, MetadataEntry>("nowhere", &msg("x"), Payload::Empty, &opts)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    assert_eq!(
        *order.lock().unwrap(),
        vec!["first closed", "first open", "second open"]
    );
}

#[test]
fn a_panicking_server_interceptor_fails_the_call_not_the_server() {
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    let server = echo_builder()
        .interceptor(|ctx: &Context| {
            if ctx.method() == "boom" {
                panic!("interceptor bug");
            }
            Ok(())
        })
        .register("boom", move |_ctx, req: MetadataEntry, _pages: Pages| {
            r.fetch_add(1, Ordering::SeqCst);
            Ok::<_, Status>((req, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let e = client
        .call::<_, MetadataEntry>("boom", &msg("x"), Payload::Empty)
        .unwrap_err();
    assert_eq!(e.code(), Code::Internal);
    assert_eq!(runs.load(Ordering::SeqCst), 0);
    let r = client
        .call::<_, MetadataEntry>("echo", &msg("fine"), vec![1u8; 100])
        .unwrap();
    assert_eq!(r.message.key, "fine");
}
