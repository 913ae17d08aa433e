//! The generated `Lab` client and server over loopback: every rpc shape,
//! with and without payloads, byte-exact; and the typed errors a
//! hand-written peer gets (or causes) when it breaks the service's types.

use std::time::{Duration, Instant};

use pagerpc::typed::Service;
use pagerpc::{
    CallOptions, ClientConfig, Code, Origin, PageBuf, Payload, Reply, Server, ServerConfig,
};
use pagerpc_codegen_tests::lab::{lab_methods, Ack, Blob, LabClient, LabServer, Note};
use pagerpc_codegen_tests::{pattern_bytes, LabImpl};
use prost::Message;

mod shapes;

const MIB: usize = 1 << 20;

fn start(server_cfg: ServerConfig, client_cfg: ClientConfig) -> (Server, LabClient) {
    let server = Server::builder()
        .config(server_cfg)
        .add_service(LabServer::new(LabImpl))
        .bind("127.0.0.1:0")
        .unwrap();
    let lab = LabClient::connect_with(server.local_addr(), client_cfg).unwrap();
    (server, lab)
}

fn lab() -> (Server, LabClient) {
    start(ServerConfig::default(), ClientConfig::default())
}

fn note(text: &str, seq: u64) -> Note {
    Note {
        text: text.into(),
        seq,
    }
}

fn blob(name: &str, len: usize, seq: u64) -> Blob {
    Blob {
        name: name.into(),
        len: len as u64,
        seq,
    }
}

#[test]
fn unary_methods_of_every_payload_direction_are_byte_exact() {
    let (_server, lab) = lab();
    shapes::unary_shapes(&lab);
}

#[test]
fn client_streams_with_and_without_payloads() {
    let (_server, lab) = lab();
    shapes::client_streams(&lab);
}

#[test]
fn server_streams_with_and_without_payloads() {
    let (_server, lab) = lab();
    shapes::server_streams(&lab);
}

#[test]
fn bidirectional_streams_with_and_without_payloads() {
    let (_server, lab) = lab();
    shapes::bidi_streams(&lab);
}

#[test]
fn names_on_the_wire_are_package_service_method() {
    assert_eq!(
        <LabServer<LabImpl> as Service>::NAME,
        "pagerpc.test.lab.Lab"
    );
    assert_eq!(lab_methods::SAY, "pagerpc.test.lab.Lab/Say");
    assert_eq!(lab_methods::TYPE, "pagerpc.test.lab.Lab/Type");
    // The string API reaches the generated server by that name.
    let (_server, lab) = lab();
    let r = lab
        .inner()
        .call::<_, Note>(lab_methods::SAY, &note("raw", 3), Payload::Empty)
        .unwrap();
    assert_eq!(r.message, note("RAW", 3));
}

#[test]
fn call_options_reach_the_server() {
    let (_server, lab) = lab();
    // A deadline already too short for 64 MiB of pattern to be built and
    // sent: the generated `_with` form carries it.
    let opts = CallOptions {
        timeout: Some(Duration::from_micros(1)),
        ..CallOptions::default()
    };
    let err = lab.fetch_with(&blob("f", 64 * MIB, 0), &opts).unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err}");
}

#[test]
fn a_hand_written_peer_gets_typed_errors() {
    let (_server, lab) = lab();
    let raw = lab.inner();
    let call = |method: &str, body: Vec<u8>, payload: Payload| {
        raw.start_call(method, body, payload, &CallOptions::default())
            .unwrap()
            .wait()
            .map(|_| ())
            .unwrap_err()
    };

    // Unknown methods, including the bare rpc name without its service.
    for m in [
        "pagerpc.test.lab.Lab/Nope",
        "Say",
        "pagerpc.test.lab.Other/Say",
    ] {
        let e = call(m, note("x", 0).encode_to_vec(), Payload::Empty);
        assert_eq!(e.code(), Code::Unimplemented, "{m}: {e}");
    }
    // The wrong message type: an Ack's field 1 is a varint where a Note
    // has a string.
    let ack = Ack {
        bytes: 5,
        ..Ack::default()
    };
    let e = call(lab_methods::SAY, ack.encode_to_vec(), Payload::Empty);
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("undecodable request"), "{e}");
    // Bytes that are no message at all.
    let e = call(lab_methods::STORE, vec![0x0a, 0xff], vec![1u8; 10].into());
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    // A payload where the method carries none.
    let e = call(
        lab_methods::SAY,
        note("x", 0).encode_to_vec(),
        vec![7u8; 4096].into(),
    );
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("carries none"), "{e}");
    assert!(e.message().contains(lab_methods::SAY), "{e}");

    // The same on a stream: a payload on a Count message, then a message
    // of the wrong type.
    let (mut tx, resp) = raw
        .client_stream(lab_methods::COUNT, &CallOptions::default())
        .unwrap();
    tx.send(&note("n", 0), vec![1u8; 100]).unwrap();
    let _ = tx.finish();
    let e = resp.wait::<Ack>().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    assert!(e.message().contains("carries none"), "{e}");
    let (mut tx, resp) = raw
        .client_stream(lab_methods::COUNT, &CallOptions::default())
        .unwrap();
    tx.send(&ack, Payload::Empty).unwrap();
    let _ = tx.finish();
    let e = resp.wait::<Ack>().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");

    // A unary method opened as a stream is refused for its shape.
    let (tx, resp) = raw
        .client_stream(lab_methods::SAY, &CallOptions::default())
        .unwrap();
    let e = resp.wait::<Note>().unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    drop(tx);

    // The connection is still good.
    assert_eq!(lab.say(&note("ok", 1)).unwrap().message, note("OK", 1));
}

/// A hand-written server under the Lab names that breaks the types: the
/// generated client reports each break as an error, never as a response.
#[test]
fn the_generated_client_refuses_what_the_service_does_not_allow() {
    let server = Server::builder()
        .register_raw(lab_methods::SAY, |_ctx, _body, _pages| {
            Ok(Reply {
                body: note("with a payload", 0).encode_to_vec(),
                payload: vec![9u8; 5000].into(),
                metadata: Vec::new(),
            })
        })
        .register_raw(lab_methods::TYPE, |_ctx, _body, _pages| {
            Ok(Reply {
                body: vec![0x0a, 0xff],
                ..Reply::default()
            })
        })
        .register_server_stream(lab_methods::COUNTDOWN, |_ctx, _body, _pages, tx| {
            tx.send(&note("fine", 2), Payload::Empty)?;
            tx.send(&note("payload", 1), vec![1u8; 4096])?;
            Ok(Vec::new())
        })
        .register_server_stream(lab_methods::DOWNLOAD, |_ctx, _body, _pages, tx| {
            // An undecodable message, then a good one.
            tx.send_raw(vec![0x0a, 0xff], Payload::Empty)?;
            tx.send(&Blob::default(), vec![2u8; 10])?;
            Ok(Vec::new())
        })
        .register_client_stream(lab_methods::COUNT, |_ctx, rx| {
            while rx.recv()?.is_some() {}
            Ok(Reply {
                body: Ack::default().encode_to_vec(),
                payload: vec![3u8; 10].into(),
                metadata: Vec::new(),
            })
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let lab = LabClient::connect(server.local_addr()).unwrap();

    let e = lab.say(&note("x", 0)).unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.message().contains("carries none"), "{e}");
    let e = lab.r#type(&note("x", 0)).unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.message().contains("undecodable response"), "{e}");

    let mut rx = lab.countdown(&note("x", 2)).unwrap();
    assert_eq!(rx.recv().unwrap(), Some(note("fine", 2)));
    let e = rx.recv().unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");

    let (tx, resp) = lab.count().unwrap();
    tx.finish().unwrap();
    let e = resp.wait().unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.message().contains("carries none"), "{e}");

    // An undecodable stream message from the server is the server's fault:
    // Internal, as for an undecodable response (it was InvalidArgument).
    let mut rx = lab.download(&Blob::default()).unwrap();
    let e = rx.recv().unwrap_err();
    assert_eq!(e.code(), Code::Internal, "{e}");
    assert!(e.message().contains("undecodable"), "{e}");
}

#[test]
fn dropping_a_typed_receiver_cancels_the_stream() {
    let (server, lab) = lab();
    let mut rx = lab.countdown(&note("long", u64::MAX)).unwrap();
    for _ in 0..3 {
        assert!(rx.recv().unwrap().is_some());
    }
    drop(rx);
    // The handler's sends fail once the cancel arrives, and it ends.
    let t0 = Instant::now();
    while server.inflight() > 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the handler still runs"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(lab.say(&note("after", 1)).unwrap().message.seq, 1);
}

#[test]
fn payloads_map_through_generated_code() {
    // Zero-copy both ways: payloads in page-aligned buffers go out with
    // MSG_ZEROCOPY, so on loopback the receiver gets whole pages it can
    // map (a payload copied into the socket lands at arbitrary offsets).
    let (server, lab) = start(ServerConfig::zerocopy(), ClientConfig::zerocopy());
    let data = pattern_bytes(MIB, 5);
    let page_buf = || {
        let mut pb = PageBuf::new(MIB).unwrap();
        pb.copy_from_slice(&data);
        pb
    };
    // Warm-up, then 32 MiB each way in 1 MiB payloads.
    for _ in 0..4 {
        lab.mirror(&blob("w", MIB, 0), page_buf()).unwrap();
    }
    let (s0, c0) = (server.counters(), lab.inner().counters());
    for _ in 0..32 {
        let r = lab.mirror(&blob("m", MIB, 0), page_buf()).unwrap();
        assert_eq!(r.payload.origin(), Origin::Socket);
        assert!(r.payload.iter().rev().eq(data.iter()), "mirror differs");
    }
    let (s1, c1) = (server.counters(), lab.inner().counters());
    for (side, a, b) in [("server", s0, s1), ("client", c0, c1)] {
        let mapped = b.bytes_mapped - a.bytes_mapped;
        let copied = b.bytes_copied() - a.bytes_copied();
        assert_eq!(mapped + copied, 32 * MIB as u64, "{side}: {b:?}");
        assert!(
            mapped * 100 >= 99 * 32 * MIB as u64,
            "{side}: only {mapped} of {} bytes mapped: {b:?}",
            32 * MIB
        );
    }
}
