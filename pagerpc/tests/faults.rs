//! Misbehaving peers, played by raw `std::net` sockets speaking the wire
//! format through `pagerpc::codec`: truncated frames in both directions,
//! garbage, and frames sent the wrong way.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use pagerpc::codec::{decode_stream, encode_head, DecodedFrame, Flags, Header, Kind, Prefix};
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{Client, Code, Limits, Payload, Response, Server, Status};

const MIB: usize = 1 << 20;

/// Prefix and header of a frame (no payload bytes).
fn head(h: &Header, payload_len: u64) -> Vec<u8> {
    let mut out = Vec::new();
    encode_head(h, payload_len, Flags::NONE, &Limits::default(), &mut out).unwrap();
    out
}

fn request(id: u64, method: &str, body: &MetadataEntry) -> Header {
    Header {
        call_id: id,
        kind: Kind::Request as i32,
        method: method.into(),
        body: body.encode_to_vec(),
        ..Default::default()
    }
}

/// Reads from `s` until `n` whole frames have arrived.
fn read_frames(s: &mut TcpStream, n: usize) -> Vec<DecodedFrame> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SETTINGS frames are connection setup, not what the tests look at.
        let frames: Vec<_> = decode_stream(&bytes, Limits::default(), &[])
            .frames
            .into_iter()
            .filter(|f| !is_connection_frame(f))
            .collect();
        if frames.len() >= n {
            return frames;
        }
        let got = s.read(&mut buf).expect("read from peer");
        assert!(got > 0, "peer closed after {} of {n} frames", frames.len());
        bytes.extend_from_slice(&buf[..got]);
    }
}

/// Reads everything until the peer closes. A reset after the data counts
/// as a close.
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return bytes,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return bytes,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!(
                "waiting for the peer to close: {e} (got {} bytes)",
                bytes.len()
            ),
        }
    }
}

/// A fake server for one connection: reads one request, lets `respond`
/// write whatever it likes, then closes its side.
fn fake_server(
    respond: impl FnOnce(&mut TcpStream, &DecodedFrame) + Send + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let frames = read_frames(&mut s, 1);
        respond(&mut s, &frames[0]);
        s.flush().unwrap();
        let _ = s.shutdown(Shutdown::Write);
    });
    (addr, h)
}

// --------------------------------------- a server that hangs up mid-frame

fn response_head(call_id: u64, payload_len: usize) -> Vec<u8> {
    head(
        &Header {
            call_id,
            kind: Kind::Response as i32,
            body: msg("resp").encode_to_vec(),
            ..Default::default()
        },
        payload_len as u64,
    )
}

/// Calls a fake server that answers with a 1 MiB response of which only
/// the first `cut` bytes (head included) are sent.
fn call_truncated(
    cut: impl Fn(usize) -> usize + Send + 'static,
) -> Result<Response<MetadataEntry>, pagerpc::CallError> {
    let (addr, fake) = fake_server(move |s, req| {
        assert_eq!(req.head.kind(), Kind::Request);
        assert_eq!(req.head.header.method, "echo");
        let mut wire = response_head(req.head.call_id(), MIB);
        let head_len = wire.len();
        wire.extend_from_slice(&pattern(MIB, 1));
        s.write_all(&wire[..cut(head_len)]).unwrap();
    });
    let client = Client::connect(addr).unwrap();
    let r = client.call::<_, MetadataEntry>("echo", &msg("q"), pattern(5000, 2));
    fake.join().unwrap();
    if r.is_err() {
        // The connection is dead for later calls too, and says so.
        let mut err = client
            .call::<_, MetadataEntry>("echo", &msg("later"), vec![9u8; 10])
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err}");
        assert_eq!(err.take_payload().unwrap().as_slice(), [9u8; 10]);
    }
    r
}

#[test]
fn fake_server_sending_the_whole_response_works() {
    // The control case: the fake speaks the protocol correctly.
    let resp = with_watchdog(Duration::from_secs(30), "control", || {
        call_truncated(|head_len| head_len + MIB)
    })
    .expect("a complete response must be delivered");
    assert_eq!(resp.message.key, "resp");
    assert_bytes_eq(&resp.payload, &pattern(MIB, 1), "complete response");
}

#[test]
fn server_closing_mid_payload_fails_the_call() {
    for got in [0, 1, 4096, 300_000, MIB - 1] {
        let err = with_watchdog(Duration::from_secs(30), "mid-payload", move || {
            call_truncated(move |head_len| head_len + got)
        })
        .map(|r| r.payload.len())
        .expect_err("a truncated response must not be delivered");
        assert_eq!(err.code(), Code::Unavailable, "cut after {got}: {err}");
        let want = format!("payload: got {got} of {MIB} bytes");
        assert!(
            err.message().contains("connection lost") && err.message().contains(&want),
            "cut after {got} payload bytes: message should report the truncation: {err}"
        );
    }
}

#[test]
fn server_closing_mid_head_fails_the_call() {
    let err = with_watchdog(Duration::from_secs(30), "mid-prefix", || {
        call_truncated(|_| 11)
    })
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(
        err.message().contains("prefix: got 11 of 24 bytes"),
        "{err}"
    );

    let err = with_watchdog(Duration::from_secs(30), "mid-header", || {
        call_truncated(|_| pagerpc::codec::PREFIX_LEN + 1)
    })
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("header: got 1 of"), "{err}");

    // The response has a body: cut inside it.
    let err = with_watchdog(Duration::from_secs(30), "mid-body", || {
        call_truncated(|head_len| head_len - 1)
    })
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("body: got"), "{err}");

    // Closing between frames is a clean close, still an error for the call.
    let err = with_watchdog(Duration::from_secs(30), "no answer", || {
        call_truncated(|_| 0)
    })
    .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err}");
    assert!(err.message().contains("closed"), "{err}");
}

#[test]
fn server_sending_garbage_or_wrong_frames_fails_the_call() {
    // Not pagerpc at all.
    let (addr, fake) = fake_server(|s, _| {
        s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
    });
    let client = Client::connect(addr).unwrap();
    let err = client
        .call::<_, MetadataEntry>("echo", &msg("q"), Payload::Empty)
        .unwrap_err();
    fake.join().unwrap();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(
        err.message().contains("protocol error") && err.message().contains("magic"),
        "{err}"
    );

    // A frame only clients send.
    let (addr, fake) = fake_server(|s, req| {
        s.write_all(&head(&request(req.head.call_id(), "x", &msg("r")), 0))
            .unwrap();
    });
    let client = Client::connect(addr).unwrap();
    let err = client
        .call::<_, MetadataEntry>("echo", &msg("q"), Payload::Empty)
        .unwrap_err();
    fake.join().unwrap();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("Request"), "{err}");

    // A connection-level error (call id 0) fails every call with its status.
    let (addr, fake) = fake_server(|s, _| {
        let h = Header {
            call_id: 0,
            kind: Kind::Error as i32,
            status_code: Code::ResourceExhausted.as_u32(),
            status_message: "go away".into(),
            ..Default::default()
        };
        s.write_all(&head(&h, 0)).unwrap();
    });
    let client = Client::connect(addr).unwrap();
    let err = client
        .call::<_, MetadataEntry>("echo", &msg("q"), Payload::Empty)
        .unwrap_err();
    fake.join().unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert_eq!(err.message(), "go away");
}

/// A response whose last bytes arrive late (a slow link, a busy server) is
/// delivered once they arrive, with or without a deadline. The fake server
/// keeps the connection open afterwards, so a receiver that waits for more
/// bytes than the frame has is not rescued by the close.
fn late_tail(
    total: usize,
    tail: usize,
    timeout: Option<Duration>,
) -> (Duration, Result<usize, String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let req = &read_frames(&mut s, 1)[0];
        let mut wire = response_head(req.head.call_id(), total);
        let data = pattern(total, 1);
        wire.extend_from_slice(&data[..total - tail]);
        s.write_all(&wire).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        s.write_all(&data[total - tail..]).unwrap();
        // Hold the connection open until the client goes (at most 6 s).
        s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
        let _ = s.read(&mut [0u8; 64]);
    });
    let client = Client::connect(addr).unwrap();
    let opts = pagerpc::CallOptions {
        timeout,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let r = client
        .call_with::<_, MetadataEntry>("echo", &msg("q"), Payload::Empty, &opts)
        .map_err(|e| e.to_string())
        .map(|resp| {
            assert_bytes_eq(&resp.payload, &pattern(total, 1), "late-tail response");
            resp.payload.len()
        });
    let took = t0.elapsed();
    drop(client);
    fake.join().unwrap();
    (took, r)
}

#[test]
fn response_with_a_late_tail_is_delivered_when_it_arrives() {
    with_watchdog(Duration::from_secs(60), "late tail", || {
        for (total, tail) in [(100_000, 13), (100_000, 5000), (1 << 20, 13), (20_000, 13)] {
            for timeout in [Some(Duration::from_secs(20)), None] {
                let (took, r) = late_tail(total, tail, timeout);
                assert_eq!(
                    r,
                    Ok(total),
                    "{total}-byte response, last {tail} bytes 300 ms late, timeout {timeout:?}"
                );
                assert!(
                    took < Duration::from_secs(3),
                    "{total}-byte response whose last {tail} bytes came 300 ms late \
                     (timeout {timeout:?}) took {took:?}: the reader kept waiting after \
                     the whole frame had arrived, until the peer closed"
                );
            }
        }
    });
}

// --------------------------------------- a client that hangs up mid-frame

struct Recorder {
    server: Server,
    /// (key, payload length, bytes matched the pattern) for every call the
    /// handler saw.
    seen: Arc<Mutex<Vec<(String, usize, bool)>>>,
}

/// "record": the request's value holds the payload length (u64 LE) and the
/// payload is `pattern(len, 0)`.
fn recorder() -> Recorder {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let server = echo_builder()
        .config(config(4))
        .register(
            "record",
            move |_ctx, req: MetadataEntry, pages: pagerpc::Pages| {
                let ok = *pages == *pattern(pages.len(), 0);
                s2.lock().unwrap().push((req.key.clone(), pages.len(), ok));
                Ok::<_, Status>((req, Payload::Empty))
            },
        )
        .bind("127.0.0.1:0")
        .unwrap();
    Recorder { server, seen }
}

fn record_req(id: u64, key: &str, len: usize) -> (Header, Vec<u8>) {
    let body = MetadataEntry {
        key: key.into(),
        value: (len as u64).to_le_bytes().to_vec(),
    };
    (request(id, "record", &body), pattern(len, 0))
}

#[test]
fn client_closing_mid_request_never_reaches_the_handler() {
    with_watchdog(Duration::from_secs(60), "client truncation", || {
        let r = recorder();
        let addr = r.server.local_addr();
        let good = Client::connect(addr).unwrap();
        echo_ok(&good, "before");

        // The raw client speaks correctly first.
        let mut raw = TcpStream::connect(addr).unwrap();
        let (h, payload) = record_req(1, "full-raw", 100_000);
        let mut wire = head(&h, payload.len() as u64);
        wire.extend_from_slice(&payload);
        raw.write_all(&wire).unwrap();
        let resp = &read_frames(&mut raw, 1)[0];
        assert_eq!(resp.head.kind(), Kind::Response);
        assert_eq!(resp.head.call_id(), 1);
        assert_eq!(
            MetadataEntry::decode(&*resp.head.header.body).unwrap().key,
            "full-raw"
        );
        drop(raw);

        // Now requests cut short at every section.
        let (h, payload) = record_req(7, "cut", MIB);
        let head_bytes = head(&h, MIB as u64);
        let hl = head_bytes.len();
        let cuts = [
            5,
            20,
            hl - 1,
            hl,
            hl + 1,
            hl + 4096,
            hl + 300_000,
            hl + MIB - 1,
        ];
        for cut in cuts {
            let mut wire = head_bytes.clone();
            wire.extend_from_slice(&payload);
            let mut raw = TcpStream::connect(addr).unwrap();
            raw.write_all(&wire[..cut]).unwrap();
            raw.shutdown(Shutdown::Write).unwrap();
            // The server closes its side once it sees the truncation.
            let answer = read_to_close(&mut raw);
            let out = decode_stream(&answer, Limits::default(), &[]);
            assert!(
                out.frames
                    .iter()
                    .all(|f| f.head.call_id() != 7 || f.head.kind() != Kind::Response),
                "cut at {cut}: a truncated request was answered: {:?}",
                out.frames
            );
            echo_ok(&good, &format!("after cut at {cut}"));
        }
        assert!(
            wait_until(Duration::from_secs(5), || r.server.connections() == 1),
            "truncated connections were not closed: {} open",
            r.server.connections()
        );

        // A normal client can still use the method.
        let (_, payload) = record_req(0, "", 250_000);
        let resp: Response<MetadataEntry> = good
            .call(
                "record",
                &MetadataEntry {
                    key: "full-client".into(),
                    value: vec![],
                },
                payload,
            )
            .unwrap();
        assert_eq!(resp.message.key, "full-client");

        let seen = r.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec![
                ("full-raw".to_string(), 100_000, true),
                ("full-client".to_string(), 250_000, true)
            ],
            "the handler must see only whole payloads"
        );
    });
}

// ------------------------------------------------------ a client that babbles

fn prefix_bytes(flags: u8, header_len: u32, payload_len: u64) -> Vec<u8> {
    let mut p = Prefix {
        flags: Flags::NONE,
        header_len,
        body_len: 0,
        payload_len,
    }
    .encode()
    .to_vec();
    p[5] = flags;
    p
}

/// A request encoded without the encoder's checks.
fn unchecked_frame(h: &Header) -> Vec<u8> {
    let body = h.encode_to_vec();
    let mut out = prefix_bytes(0, body.len() as u32, 0);
    out.extend_from_slice(&body);
    out
}

fn garbage_cases() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    let good = prefix_bytes(0, 10, 0);
    let with = |i: usize, v: u8| {
        let mut b = good.clone();
        b[i] = v;
        b.extend_from_slice(&[0; 10]);
        b
    };
    let long_method = unchecked_frame(&request(3, &"m".repeat(300), &msg("")));
    let mut many = request(4, "echo", &msg(""));
    many.metadata = (0..65)
        .map(|i| MetadataEntry {
            key: format!("k{i}"),
            value: vec![],
        })
        .collect();
    let mut malformed = prefix_bytes(0, 3, 0);
    malformed.extend_from_slice(&[0x1a, 0x7f, b'a']);
    vec![
        (
            "http",
            b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec(),
            "magic",
        ),
        ("noise", pattern(200, 77), "magic"),
        ("version", with(4, 9), "version"),
        ("flags", with(5, 0x80), "flag"),
        ("reserved", with(6, 1), "reserved"),
        ("empty header", prefix_bytes(0, 0, 0), "empty header"),
        (
            "huge header",
            prefix_bytes(0, 1 << 30, 0),
            "max_header_bytes",
        ),
        (
            "huge payload",
            prefix_bytes(0, 10, 1 << 40),
            "max_payload_bytes",
        ),
        (
            "huge inline",
            prefix_bytes(1, 10, MIB as u64),
            "max_inline_payload_bytes",
        ),
        ("malformed header", malformed, "malformed header"),
        (
            "unknown kind",
            unchecked_frame(&Header {
                call_id: 5,
                kind: 99,
                ..Default::default()
            }),
            "unknown frame kind 99",
        ),
        (
            "no method",
            unchecked_frame(&request(6, "", &msg(""))),
            "method",
        ),
        ("long method", long_method, "max_method_len"),
        (
            "many metadata",
            unchecked_frame(&many),
            "max_metadata_entries",
        ),
    ]
}

#[test]
fn garbage_gets_a_protocol_error_and_a_close() {
    with_watchdog(Duration::from_secs(60), "garbage", || {
        let server = echo_builder()
            .config(config(4))
            .bind("127.0.0.1:0")
            .unwrap();
        let addr = server.local_addr();
        let good = Client::connect(addr).unwrap();
        echo_ok(&good, "before");

        // A well-behaved client keeps calling the whole time.
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicUsize::new(0));
        let busy = {
            let (good, stop, calls) = (good.clone(), stop.clone(), calls.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    echo_ok(&good, "during");
                    calls.fetch_add(1, Ordering::SeqCst);
                }
            })
        };

        for (name, bytes, want) in garbage_cases() {
            let mut raw = TcpStream::connect(addr).unwrap();
            raw.write_all(&bytes).unwrap();
            let answer = read_to_close(&mut raw);
            let mut out = decode_stream(&answer, Limits::default(), &[]);
            out.frames.retain(|f| !is_connection_frame(f));
            assert_eq!(
                out.error, None,
                "{name}: the server's answer is not clean frames"
            );
            assert_eq!(
                out.frames.len(),
                1,
                "{name}: expected one ERROR frame, got {:?}",
                out.frames
            );
            let f = &out.frames[0];
            assert_eq!(f.head.kind(), Kind::Error, "{name}");
            assert_eq!(
                f.head.call_id(),
                0,
                "{name}: a connection-level error has call id 0"
            );
            assert_eq!(
                Code::from_u32(f.head.header.status_code),
                Code::InvalidArgument,
                "{name}: {}",
                f.head.header.status_message
            );
            let m = &f.head.header.status_message;
            assert!(m.contains("protocol error"), "{name}: {m}");
            assert!(
                m.contains(want),
                "{name}: message should mention '{want}': {m}"
            );
            assert!(f.payload.is_empty());
        }
        let before = calls.load(Ordering::SeqCst);
        assert!(wait_until(Duration::from_secs(5), || calls
            .load(Ordering::SeqCst)
            > before + 2));
        stop.store(true, Ordering::SeqCst);
        busy.join().unwrap();
        echo_ok(&good, "after");
        assert!(
            wait_until(Duration::from_secs(5), || server.connections() == 1),
            "garbage connections were not closed: {} open",
            server.connections()
        );
    });
}

#[test]
fn wrong_way_frames_are_answered_and_the_connection_stays_open() {
    with_watchdog(Duration::from_secs(30), "wrong-way frames", || {
        let server = echo_builder()
            .config(config(2))
            .bind("127.0.0.1:0")
            .unwrap();
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        let kinds = [
            (11, Kind::Response, Code::InvalidArgument),
            (12, Kind::Pong, Code::InvalidArgument),
        ];
        for (id, kind, code) in kinds {
            let h = Header {
                call_id: id,
                kind: kind as i32,
                ..Default::default()
            };
            raw.write_all(&head(&h, 0)).unwrap();
            let f = &read_frames(&mut raw, 1)[0];
            assert_eq!(f.head.kind(), Kind::Error, "{kind:?}");
            assert_eq!(f.head.call_id(), id);
            assert_eq!(Code::from_u32(f.head.header.status_code), code, "{kind:?}");
        }
        // Stream frames for calls that are not (or no longer) streams are
        // dropped: they may have crossed the call's end on the wire.
        for (id, kind) in [(13, Kind::StreamChunk), (14, Kind::StreamEnd)] {
            let h = Header {
                call_id: id,
                kind: kind as i32,
                ..Default::default()
            };
            raw.write_all(&head(&h, 0)).unwrap();
        }
        // Still a working connection: ping, then a real call with a payload.
        let ping = Header {
            call_id: 21,
            kind: Kind::Ping as i32,
            ..Default::default()
        };
        raw.write_all(&head(&ping, 0)).unwrap();
        let f = &read_frames(&mut raw, 1)[0];
        assert_eq!((f.head.kind(), f.head.call_id()), (Kind::Pong, 21));

        let data = pattern(50_000, 4);
        let mut wire = head(&request(22, "echo", &msg("raw")), data.len() as u64);
        wire.extend_from_slice(&data);
        raw.write_all(&wire).unwrap();
        let f = &read_frames(&mut raw, 1)[0];
        assert_eq!((f.head.kind(), f.head.call_id()), (Kind::Response, 22));
        assert_bytes_eq(&f.payload, &data, "raw echo");
        // A cancel for a call that does not exist is ignored.
        let cancel = Header {
            call_id: 999,
            kind: Kind::Cancel as i32,
            ..Default::default()
        };
        raw.write_all(&head(&cancel, 0)).unwrap();
        raw.write_all(&head(&ping, 0)).unwrap();
        let f = &read_frames(&mut raw, 1)[0];
        assert_eq!((f.head.kind(), f.head.call_id()), (Kind::Pong, 21));
    });
}

fn echo_ok(client: &Client, key: &str) {
    let data = pattern(5000, 9);
    let resp: Response<MetadataEntry> = client
        .call("echo", &msg(key), data.clone())
        .unwrap_or_else(|e| panic!("echo '{key}' failed: {e}"));
    assert_eq!(resp.message.key, key);
    assert_bytes_eq(&resp.payload, &data, key);
}
