//! A generated client built on an intercepted `pagerpc::Client` runs the
//! interceptor on every rpc, unary and streaming, and a server interceptor
//! guards a generated service's handlers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use pagerpc::{Client, Code, Context, OutgoingCall, Server, Status};
use pagerpc_codegen_tests::lab::{Blob, LabClient, LabServer, Note};
use pagerpc_codegen_tests::{pattern_bytes, sha256_hex, LabImpl};

#[test]
fn a_generated_client_on_an_intercepted_client_sends_the_token() {
    let admitted = Arc::new(AtomicUsize::new(0));
    let a = admitted.clone();
    let server = Server::builder()
        .interceptor(move |ctx: &Context| {
            let ok = ctx
                .metadata()
                .iter()
                .any(|m| m.key == "token" && m.value == b"t0k");
            if !ok {
                return Err(Status::unauthenticated(format!(
                    "{} needs a token",
                    ctx.method()
                )));
            }
            a.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .add_service(LabServer::new(LabImpl))
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let plain = LabClient::new(client.clone());
    let intercepted_calls = Arc::new(AtomicUsize::new(0));
    let n = intercepted_calls.clone();
    let lab = LabClient::new(client.with_interceptor(move |call: &mut OutgoingCall<'_>| {
        n.fetch_add(1, Ordering::SeqCst);
        call.insert_metadata("token", b"t0k".to_vec());
        Ok(())
    }));

    // Without the token: refused, by the server, with its status.
    let e = plain
        .say(&Note {
            text: "hi".into(),
            seq: 1,
        })
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().ends_with("/Say needs a token"), "{e}");
    let (mut tx, resp) = plain.upload().unwrap();
    let _ = tx.send(
        &Blob {
            name: "x".into(),
            len: 4096,
            seq: 0,
        },
        vec![1u8; 4096],
    );
    let _ = tx.finish();
    assert_eq!(resp.wait().unwrap_err().code(), Code::Unauthenticated);
    assert_eq!(admitted.load(Ordering::SeqCst), 0);

    // Through the intercepted client: unary and client-streaming work.
    let r = lab
        .say(&Note {
            text: "hi".into(),
            seq: 1,
        })
        .unwrap();
    assert_eq!(r.message.text, "HI");
    let (mut tx, resp) = lab.upload().unwrap();
    let chunks: Vec<Vec<u8>> = (0..3u64).map(|i| pattern_bytes(10_000, i)).collect();
    for (i, c) in chunks.iter().enumerate() {
        tx.send(
            &Blob {
                name: "u".into(),
                len: c.len() as u64,
                seq: i as u64,
            },
            c.clone(),
        )
        .unwrap();
    }
    tx.finish().unwrap();
    let ack = resp.wait().unwrap().message;
    let parts: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
    assert_eq!(ack.sha256, sha256_hex(&parts));
    assert_eq!(admitted.load(Ordering::SeqCst), 2);
    assert_eq!(intercepted_calls.load(Ordering::SeqCst), 2);
}
