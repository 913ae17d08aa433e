//! The generated async server trait (`LabAsync`, registered with
//! `LabAsyncServer` on a `pagerpc::AsyncServer`) answering the generated
//! blocking client: every rpc shape byte-exact, and the same typed errors
//! for a hand-written peer as the blocking server gives.

mod shapes;

use std::time::Duration;

use pagerpc::typed::AsyncService;
use pagerpc::{AsyncServer, CallOptions, Code, Payload};
use pagerpc_codegen_tests::lab::{lab_methods, Ack, LabAsyncServer, LabClient, Note};
use pagerpc_codegen_tests::LabImpl;
use prost::Message;

/// A runtime with the async Lab server on it, and a blocking client.
fn lab_async() -> (tokio::runtime::Runtime, AsyncServer, LabClient) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt
        .block_on(
            AsyncServer::builder()
                .add_service(LabAsyncServer::new(LabImpl))
                .bind("127.0.0.1:0"),
        )
        .unwrap();
    let lab = LabClient::connect(server.local_addr()).unwrap();
    (rt, server, lab)
}

#[test]
fn every_shape_through_the_async_server() {
    let (rt, server, lab) = lab_async();
    assert_eq!(
        <LabAsyncServer<LabImpl> as AsyncService>::NAME,
        "pagerpc.test.lab.Lab"
    );
    shapes::unary_shapes(&lab);
    shapes::client_streams(&lab);
    shapes::server_streams(&lab);
    shapes::bidi_streams(&lab);
    rt.block_on(server.shutdown());
}

#[test]
fn the_async_server_refuses_what_the_service_does_not_allow() {
    let (rt, server, lab) = lab_async();
    let raw = lab.inner();
    let call = |method: &str, body: Vec<u8>, payload: Payload| {
        raw.start_call(method, body, payload, &CallOptions::default())
            .unwrap()
            .wait()
            .map(|_| ())
            .unwrap_err()
    };
    let note = Note {
        text: "x".into(),
        seq: 0,
    };
    let e = call(
        "pagerpc.test.lab.Lab/Nope",
        note.encode_to_vec(),
        Payload::Empty,
    );
    assert_eq!(e.code(), Code::Unimplemented, "{e}");
    let ack = Ack {
        bytes: 5,
        ..Ack::default()
    };
    let e = call(lab_methods::SAY, ack.encode_to_vec(), Payload::Empty);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    let e = call(
        lab_methods::SAY,
        note.encode_to_vec(),
        vec![7u8; 4096].into(),
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("carries none"), "{e}");
    // A payload on a Count stream message.
    let (mut tx, resp) = raw
        .client_stream(lab_methods::COUNT, &CallOptions::default())
        .unwrap();
    tx.send(&note, vec![1u8; 100]).unwrap();
    let _ = tx.finish();
    let e = resp.wait::<Ack>().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("carries none"), "{e}");
    // The connection still serves.
    let r = lab.say(&note).unwrap();
    assert_eq!(r.message.text, "X");
    assert!(rt.block_on(server.shutdown_timeout(Duration::from_secs(5))));
}

/// The generated async client against the generated async server and
/// against the generated blocking server: unary rpcs with payloads both
/// ways, and every stream shape, byte-exact.
#[test]
fn the_async_client_against_both_servers() {
    use futures_util::StreamExt;
    use pagerpc::{PageBuf, Server};
    use pagerpc_codegen_tests::lab::{Blob, LabAsyncClient, LabServer};
    use pagerpc_codegen_tests::{pattern_bytes, sha256_hex};

    let (rt, async_server, _lab) = lab_async();
    let blocking = Server::builder()
        .add_service(LabServer::new(LabImpl))
        .bind("127.0.0.1:0")
        .unwrap();
    for addr in [async_server.local_addr(), blocking.local_addr()] {
        rt.block_on(async move {
            let lab = LabAsyncClient::connect(addr).await.unwrap();
            let r = lab
                .say(&Note {
                    text: "hi".into(),
                    seq: 3,
                })
                .await
                .unwrap();
            assert_eq!((r.message.text.as_str(), r.message.seq), ("HI", 3));
            for len in [0usize, 4095, 1 << 20] {
                let data = pattern_bytes(len, 9);
                let mut pb = PageBuf::new(len).unwrap();
                pb.copy_from_slice(&data);
                let r = lab.mirror(&blob(len), pb).await.unwrap();
                assert!(r.payload.iter().rev().eq(data.iter()), "mirror {len}");
                let r = lab.store(&blob(len), data.clone()).await.unwrap();
                assert_eq!(r.message.sha256, sha256_hex(&[&data]));
            }
            // Client stream.
            let (mut tx, resp) = lab.upload().unwrap();
            let chunks: Vec<Vec<u8>> = (0..8)
                .map(|i| pattern_bytes(100_000 + i, i as u64))
                .collect();
            for c in &chunks {
                tx.send(&blob(c.len()), c.clone()).await.unwrap();
            }
            tx.finish().await.unwrap();
            let parts: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
            assert_eq!(
                resp.wait().await.unwrap().message.sha256,
                sha256_hex(&parts)
            );
            // Server stream, as a futures Stream.
            let rx = lab
                .download(&Blob {
                    name: "d".into(),
                    len: 65536,
                    seq: 5,
                })
                .unwrap();
            let got: Vec<_> = rx.map(|m| m.unwrap()).collect().await;
            assert_eq!(got.len(), 5);
            for (i, (msg, pages)) in got.iter().enumerate() {
                assert_eq!(msg.seq, i as u64);
                assert!(pages[..] == pattern_bytes(65536, i as u64)[..]);
            }
            // Bidirectional without payloads, with trailers.
            let (mut tx, mut rx) = lab.chat().unwrap();
            for i in 0..20 {
                tx.send(&Note {
                    text: "abc".into(),
                    seq: i,
                })
                .await
                .unwrap();
                let n = rx.recv().await.unwrap().unwrap();
                assert_eq!((n.text.as_str(), n.seq), ("ABC", i));
            }
            tx.finish().await.unwrap();
            assert!(rx.recv().await.unwrap().is_none());
            assert_eq!(rx.trailers()[0].value, b"20");
        });
    }
    blocking.shutdown();
    rt.block_on(async_server.shutdown());
}

fn blob(len: usize) -> pagerpc_codegen_tests::lab::Blob {
    pagerpc_codegen_tests::lab::Blob {
        name: "b".into(),
        len: len as u64,
        seq: 0,
    }
}

/// The async typed receiver after an undecodable message: the error, then
/// the next message, then the clean end. It used to answer `Ok(None)`
/// right after the error, as if the stream had ended whole.
#[test]
fn an_error_on_the_async_receiver_is_not_followed_by_a_false_end() {
    use pagerpc::{Payload, Server};
    use pagerpc_codegen_tests::lab::{Blob, LabAsyncClient};
    let server = Server::builder()
        .register_server_stream(lab_methods::DOWNLOAD, |_ctx, _body, _pages, tx| {
            tx.send_raw(vec![0x0a, 0xff], Payload::Empty)?;
            tx.send(&Blob::default(), vec![2u8; 10])?;
            Ok(Vec::new())
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let addr = server.local_addr();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let lab = LabAsyncClient::connect(addr).await.unwrap();
        let mut rx = lab.download(&Blob::default()).unwrap();
        let e = rx.recv().await.unwrap_err();
        assert_eq!(e.code(), Code::Internal, "{e}");
        let (_, pages) = rx.recv().await.unwrap().expect("the next message");
        assert_eq!(pages.len(), 10);
        assert!(rx.recv().await.unwrap().is_none());
    });
    server.shutdown();
}
