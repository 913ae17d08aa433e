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
