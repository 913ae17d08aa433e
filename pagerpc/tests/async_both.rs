//! `AsyncClient` against `AsyncServer`: zero-copy both ways, and
//! interceptors on both async halves.
#![cfg(feature = "tokio")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pagerpc::proto::MetadataEntry;
use pagerpc::{
    AsyncClient, AsyncServer, ClientConfig, Code, Context, OutgoingCall, PageBuf, Payload,
    ServerConfig, Status,
};

const MIB: usize = 1 << 20;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn page_buf(data: &[u8]) -> PageBuf {
    let mut pb = PageBuf::new(data.len()).unwrap();
    pb.copy_from_slice(data);
    pb
}

/// Of 32 MiB each way between the counters `a` and `b` of each side, all
/// bytes are accounted for and at least `pct` % were mapped.
fn check_mapped(
    s0: pagerpc::CountersSnapshot,
    s1: pagerpc::CountersSnapshot,
    c0: pagerpc::CountersSnapshot,
    c1: pagerpc::CountersSnapshot,
    pct: u64,
) {
    for (side, a, b) in [("server", s0, s1), ("client", c0, c1)] {
        let mapped = b.bytes_mapped - a.bytes_mapped;
        let copied = b.bytes_copied() - a.bytes_copied();
        assert_eq!(mapped + copied, 32 * MIB as u64, "{side}: {b:?}");
        assert!(
            mapped * 100 >= pct * 32 * MIB as u64,
            "{side}: {mapped} of {} bytes mapped: {b:?}",
            32 * MIB
        );
    }
}

#[test]
fn zero_copy_through_the_async_client_and_the_async_server() {
    runtime().block_on(async {
        let server = AsyncServer::builder()
            .config(ServerConfig::zerocopy())
            .register("echo", |_ctx, req: MetadataEntry, pages| async move {
                Ok((req, Payload::Pages(pages)))
            })
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        let client = AsyncClient::connect_with(server.local_addr(), ClientConfig::zerocopy())
            .await
            .unwrap();
        let data: Vec<u8> = (0..MIB).map(|i| (i * 31 % 251) as u8).collect();
        for _ in 0..4 {
            let r = client
                .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), page_buf(&data))
                .await
                .unwrap();
            assert!(r.payload[..] == data[..]);
        }
        // 32 MiB each way, one call at a time: at least 99 % mapped.
        let (s0, c0) = (server.counters(), client.counters());
        for _ in 0..32 {
            let r = client
                .call::<_, MetadataEntry>("echo", &MetadataEntry::default(), page_buf(&data))
                .await
                .unwrap();
            assert!(r.payload[..] == data[..], "echo differs");
        }
        let (s1, c1) = (server.counters(), client.counters());
        check_mapped(s0, s1, c0, c1, 99);
        // Then 4 calls in flight. Concurrent zero-copy bursts on loopback
        // can meet a segment that is not whole pages (after reordering);
        // the receiver then copies the rest of that one payload
        // (docs/zero-copy.md), up to 1 MiB of 32 here: in CI, 624 KiB of
        // one payload (98.1 %) once. So: byte-exact, every byte accounted
        // for, and at least 90 % mapped.
        let (s0, c0) = (s1, c1);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let (client, data) = (client.clone(), data.clone());
            tasks.push(tokio::spawn(async move {
                for _ in 0..8 {
                    let r = client
                        .call::<_, MetadataEntry>(
                            "echo",
                            &MetadataEntry::default(),
                            page_buf(&data),
                        )
                        .await
                        .unwrap();
                    assert!(r.payload[..] == data[..], "echo differs");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let (s1, c1) = (server.counters(), client.counters());
        check_mapped(s0, s1, c0, c1, 90);
        assert!(s1.zc_sends > s0.zc_sends && c1.zc_sends > c0.zc_sends);
        server.shutdown().await;
    });
}

#[test]
fn async_interceptors_add_a_token_and_refuse_calls_without_one() {
    runtime().block_on(async {
        let ran = Arc::new(AtomicUsize::new(0));
        let r2 = ran.clone();
        let server = AsyncServer::builder()
            .interceptor(|ctx: &Context| {
                match ctx.metadata().iter().find(|m| m.key == "authorization") {
                    Some(m) if m.value == b"secret" => Ok(()),
                    _ => Err(Status::unauthenticated("no valid token")),
                }
            })
            .register("work", move |_ctx, req: MetadataEntry, _pages| {
                r2.fetch_add(1, Ordering::SeqCst);
                async move { Ok((req, Payload::Empty)) }
            })
            .bind("127.0.0.1:0")
            .await
            .unwrap();
        let plain = AsyncClient::connect(server.local_addr()).await.unwrap();
        let e = plain
            .call::<_, MetadataEntry>("work", &MetadataEntry::default(), Payload::Empty)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        assert_eq!(ran.load(Ordering::SeqCst), 0, "the handler ran");
        // A streaming call is refused the same way.
        let mut rx = plain
            .server_stream(
                "work",
                &MetadataEntry::default(),
                Payload::Empty,
                &Default::default(),
            )
            .unwrap();
        let e = rx.recv().await.unwrap_err();
        assert_ne!(e.code(), Code::Ok);
        // The same connection, through a handle that adds the token.
        let authed = plain.with_interceptor(|call: &mut OutgoingCall<'_>| {
            call.insert_metadata("authorization", b"secret".to_vec());
            Ok(())
        });
        authed
            .call::<_, MetadataEntry>("work", &MetadataEntry::default(), Payload::Empty)
            .await
            .unwrap();
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        // A client interceptor refusing locally hands the payload back.
        let refusing = authed.with_interceptor(|_call: &mut OutgoingCall<'_>| {
            Err(Status::permission_denied("not from this task"))
        });
        let mut e = refusing
            .call::<_, MetadataEntry>("work", &MetadataEntry::default(), vec![5u8; 4096])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied);
        assert_eq!(e.take_payload().map(|p| p.len()), Some(4096));
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        server.shutdown().await;
    });
}

/// A page received on a stream, sent on as a call's payload through the
/// same client: the sender drops it once written, while it holds the send
/// half, and the release gives stream credit back. That used to take the
/// send half's lock again on the same thread and hang the client for good.
#[test]
fn forwarding_a_received_page_on_the_same_client_does_not_deadlock() {
    use pagerpc::{Client, Pages, Server};
    let server = Server::builder()
        .register_server_stream("pages", |_ctx, _body, _pages, tx| {
            for i in 0..4u8 {
                tx.send(&MetadataEntry::default(), vec![i; 64 * 1024])?;
            }
            Ok(Vec::new())
        })
        .register("keep", |_ctx, req: MetadataEntry, p: Pages| {
            Ok::<_, Status>((
                MetadataEntry {
                    key: p.len().to_string(),
                    ..req
                },
                Payload::Empty,
            ))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let client = AsyncClient::connect(addr).await.unwrap();
            let mut rx = client
                .server_stream(
                    "pages",
                    &MetadataEntry::default(),
                    Payload::Empty,
                    &Default::default(),
                )
                .unwrap();
            let mut forwarded = 0;
            while let Some(m) = rx.recv().await.unwrap() {
                let r = client
                    .call::<_, MetadataEntry>(
                        "keep",
                        &MetadataEntry::default(),
                        Payload::Pages(m.payload),
                    )
                    .await
                    .unwrap();
                assert_eq!(r.message.key, (64 * 1024).to_string());
                forwarded += 1;
            }
            done.send(forwarded).unwrap();
        });
    });
    let forwarded = finished
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("the client hung forwarding a received page");
    assert_eq!(forwarded, 4);
    drop(Client::connect(addr).unwrap());
    server.shutdown();
}

/// The async client after the server answered a client stream early, and
/// after the server ended a bidirectional stream: the sender is told the
/// call is over (the end used to be taken away, leaving the sender to send
/// into a dead stream or wait for credit forever).
#[test]
fn after_the_servers_end_the_async_sender_is_told_the_call_is_over() {
    use pagerpc::{Code, Reply, Server};
    let server = Server::builder()
        .register_client_stream("early", |_ctx, _rx| Ok(Reply::default()))
        .register_bidi_stream("short", |_ctx, _rx, _tx| Ok(Vec::new()))
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    runtime().block_on(async move {
        let client = AsyncClient::connect(addr).await.unwrap();
        let (mut tx, resp) = client.client_stream("early", &Default::default()).unwrap();
        resp.wait::<MetadataEntry>().await.unwrap();
        let e = tx
            .send(&MetadataEntry::default(), vec![1u8; 1000])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");

        let (mut tx, mut rx) = client.bidi_stream("short", &Default::default()).unwrap();
        assert!(rx.recv().await.unwrap().is_none());
        let e = tx
            .send(&MetadataEntry::default(), vec![1u8; 1000])
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    });
    server.shutdown();
}
