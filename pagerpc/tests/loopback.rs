//! Happy-path behaviour over real loopback sockets: payload sizes, many
//! concurrent calls on one connection, many connections, metadata, ping.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use pagerpc::prost::Message;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, PageBuf, Pages, Payload, PendingCall, Reply, Response, Server, Status,
};

const SIZES: [usize; 7] = [0, 1, 4095, 4096, 4097, (1 << 20) + 13, 64 << 20];

#[test]
fn echo_payload_sizes_byte_for_byte() {
    with_watchdog(Duration::from_secs(120), "payload sizes", || {
        let server = echo_builder()
            .config(config(4))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        for (k, &len) in SIZES.iter().enumerate() {
            let data = pattern(len, k as u64);
            let key = format!("size-{len}");
            let resp: Response<MetadataEntry> = client
                .call("echo", &msg(key.clone()), data.clone())
                .unwrap_or_else(|e| panic!("echo of {len} bytes failed: {e}"));
            assert_eq!(resp.message.key, key);
            assert_bytes_eq(&resp.payload, &data, &format!("echo of {len} bytes"));
            if len > 0 {
                assert_eq!(
                    resp.payload.as_ptr() as usize % 4096,
                    0,
                    "received payload of {len} bytes is not page-aligned"
                );
            }
        }
        assert_eq!(client.pending_calls(), 0);
    });
}

/// The same sizes sent from page-aligned buffers and from received pages.
#[test]
fn echo_sizes_from_pagebuf_and_pages() {
    with_watchdog(Duration::from_secs(120), "pagebuf sizes", || {
        let server = echo_builder()
            .config(config(4))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        for (k, &len) in SIZES.iter().enumerate().filter(|(_, &l)| l <= (2 << 20)) {
            let data = pattern(len, 100 + k as u64);
            let mut buf = PageBuf::new(len).unwrap();
            buf.copy_from_slice(&data);
            let resp: Response<MetadataEntry> =
                client.call("echo", &msg("buf"), Payload::Buf(buf)).unwrap();
            assert_bytes_eq(&resp.payload, &data, &format!("PageBuf echo of {len}"));

            // Send the received pages straight back.
            let pages: Pages = resp.payload;
            let again: Response<MetadataEntry> = client
                .call("echo", &msg("pages"), Payload::Pages(pages.clone()))
                .unwrap();
            assert_bytes_eq(&again.payload, &data, &format!("Pages echo of {len}"));
            // Sending pages does not consume the caller's clone.
            assert_bytes_eq(&pages, &data, "caller's clone of sent pages");
        }
    });
}

fn id_payload(i: usize) -> Vec<u8> {
    let len = match i % 4 {
        0 => 0,
        1 => 8 + i % 50,
        2 => 4097 + i % 13,
        _ => 20_000 + i,
    };
    pattern(len, i as u64)
}

fn check_echo(resp: Response<MetadataEntry>, key: &str, i: usize) {
    assert_eq!(resp.message.key, key, "response matched to the wrong call");
    assert_eq!(resp.message.value, (i as u64).to_le_bytes());
    assert_bytes_eq(&resp.payload, &id_payload(i), key);
}

fn id_msg(key: &str, i: usize) -> MetadataEntry {
    MetadataEntry {
        key: key.to_owned(),
        value: (i as u64).to_le_bytes().to_vec(),
    }
}

/// Calls without a deadline, alternating large and small responses: a
/// small response right after a large one must not wait for more bytes
/// than it has.
#[test]
fn small_responses_after_large_ones() {
    with_watchdog(Duration::from_secs(20), "small after large", || {
        let server = echo_builder()
            .config(config(2))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        for (k, len) in [(1 << 20) + 13, 10, 300_000, 0, 70_000, 4097, 2 << 20, 1]
            .into_iter()
            .enumerate()
        {
            let data = pattern(len, k as u64);
            let resp: Response<MetadataEntry> = client
                .call("echo", &msg(format!("n{k}")), data.clone())
                .unwrap();
            assert_eq!(resp.message.key, format!("n{k}"));
            assert_bytes_eq(&resp.payload, &data, &format!("echo of {len} bytes"));
        }
    });
}

#[test]
fn thousand_pipelined_calls_on_one_connection() {
    with_watchdog(Duration::from_secs(60), "1000 pipelined calls", || {
        let server = echo_builder()
            .config(config(4))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        const N: usize = 1000;
        let mut calls: Vec<Option<PendingCall>> = (0..N)
            .map(|i| {
                let body = id_msg(&format!("call-{i}"), i).encode_to_vec();
                Some(
                    client
                        .start_call("echo", body, id_payload(i), &CallOptions::default())
                        .unwrap(),
                )
            })
            .collect();
        assert_eq!(client.pending_calls(), N);
        let mut ids: Vec<u64> = calls.iter().map(|c| c.as_ref().unwrap().id()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), N, "call ids must be unique");
        // Wait in a scrambled order so responses are parked for later callers.
        for k in 0..N {
            let i = (k * 7919) % N;
            let call = calls[i].take().expect("each call waited once");
            let resp = call.wait_typed::<MetadataEntry>().unwrap();
            check_echo(resp, &format!("call-{i}"), i);
        }
        assert_eq!(client.pending_calls(), 0);
    });
}

#[test]
fn many_threads_share_one_client() {
    with_watchdog(Duration::from_secs(20), "shared client", || {
        let server = echo_builder()
            .config(config(4))
            .bind("127.0.0.1:0")
            .unwrap();
        let client = Client::connect(server.local_addr()).unwrap();
        const THREADS: usize = 16;
        const CALLS: usize = 63;
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = client.clone();
                std::thread::spawn(move || {
                    let mut c = 0;
                    while c < CALLS {
                        if t % 2 == 0 {
                            // One call at a time.
                            let i = t * 1000 + c;
                            let key = format!("t{t}-c{c}");
                            let resp: Response<MetadataEntry> = client
                                .call("echo", &id_msg(&key, i), id_payload(i))
                                .unwrap();
                            check_echo(resp, &key, i);
                            c += 1;
                        } else {
                            // A few calls in flight from this thread too.
                            let batch: Vec<_> = (c..(c + 7).min(CALLS))
                                .map(|c| {
                                    let i = t * 1000 + c;
                                    let key = format!("t{t}-c{c}");
                                    let body = id_msg(&key, i).encode_to_vec();
                                    let call = client
                                        .start_call(
                                            "echo",
                                            body,
                                            id_payload(i),
                                            &CallOptions::default(),
                                        )
                                        .unwrap();
                                    (key, i, call)
                                })
                                .collect();
                            c += batch.len();
                            for (key, i, call) in batch.into_iter().rev() {
                                check_echo(call.wait_typed().unwrap(), &key, i);
                            }
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(client.pending_calls(), 0);
    });
}

#[test]
fn thirty_two_clients_at_once() {
    with_watchdog(Duration::from_secs(60), "32 clients", || {
        let server = Arc::new(
            echo_builder()
                .config(config(4))
                .bind("127.0.0.1:0")
                .unwrap(),
        );
        let addr = server.local_addr();
        const CLIENTS: usize = 32;
        let connected = Arc::new(Barrier::new(CLIENTS + 1));
        let checked = Arc::new(Barrier::new(CLIENTS + 1));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let (connected, checked) = (connected.clone(), checked.clone());
                std::thread::spawn(move || {
                    let client = Client::connect(addr).unwrap();
                    for c in 0..20 {
                        let i = t * 100 + c;
                        let key = format!("client{t}-call{c}");
                        let resp: Response<MetadataEntry> = client
                            .call("echo", &id_msg(&key, i), id_payload(i))
                            .unwrap();
                        check_echo(resp, &key, i);
                        if c == 0 {
                            connected.wait();
                            checked.wait();
                        }
                    }
                    client.counters()
                })
            })
            .collect();
        connected.wait();
        assert_eq!(
            server.connections(),
            CLIENTS,
            "every client has its own connection"
        );
        checked.wait();
        for h in handles {
            let counters = h.join().unwrap();
            // 20 calls, each side's SETTINGS, and the connection credit
            // each side gives back for the other's payloads (at most one
            // per payload).
            assert!((21..=41).contains(&counters.frames_sent), "{counters:?}");
            assert!(
                (21..=41).contains(&counters.frames_received),
                "{counters:?}"
            );
        }
    });
}

#[test]
fn metadata_round_trips() {
    let server = Server::builder()
        .config(config(2))
        .register_raw("meta", |ctx, body, pages| {
            let mut metadata = ctx.metadata().to_vec();
            metadata.push(MetadataEntry {
                key: "method".into(),
                value: ctx.method().as_bytes().to_vec(),
            });
            Ok(Reply {
                body: body.to_vec(),
                payload: Payload::Pages(pages),
                metadata,
            })
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    let md = vec![
        MetadataEntry {
            key: "a".into(),
            value: b"1".to_vec(),
        },
        MetadataEntry {
            key: "binary".into(),
            value: vec![0, 255, 7],
        },
    ];
    let opts = CallOptions {
        metadata: md.clone(),
        ..CallOptions::default()
    };
    let data = pattern(10_000, 3);
    let resp: Response<MetadataEntry> = client
        .call_with("meta", &msg("m"), data.clone(), &opts)
        .unwrap();
    assert_eq!(resp.message.key, "m");
    assert_bytes_eq(&resp.payload, &data, "meta payload");
    assert_eq!(resp.metadata.len(), 3);
    assert_eq!(resp.metadata[..2], md[..]);
    assert_eq!(resp.metadata[2].key, "method");
    assert_eq!(resp.metadata[2].value, b"meta");
}

#[test]
fn ping_works() {
    let server = echo_builder()
        .config(config(2))
        .bind("127.0.0.1:0")
        .unwrap();
    let client = Client::connect(server.local_addr()).unwrap();
    for _ in 0..20 {
        let rtt = client.ping(Duration::from_secs(5)).unwrap();
        assert!(rtt < Duration::from_secs(5), "rtt {rtt:?}");
    }
    // Pings interleave with calls in flight.
    let call = client
        .start_call(
            "echo",
            msg("x").encode_to_vec(),
            pattern(100_000, 1),
            &CallOptions::default(),
        )
        .unwrap();
    client.ping(Duration::from_secs(5)).unwrap();
    let resp = call.wait_typed::<MetadataEntry>().unwrap();
    assert_bytes_eq(&resp.payload, &pattern(100_000, 1), "echo after ping");
    assert_eq!(client.pending_calls(), 0);
    assert_eq!(client.peer_addr(), server.local_addr());
}

#[test]
fn handler_sees_call_context() {
    let server = Server::builder()
        .config(config(2))
        .register("whoami", |ctx, _req: MetadataEntry, _pages| {
            let resp = MetadataEntry {
                key: format!("{}|{}|{}", ctx.method(), ctx.call_id(), ctx.peer()),
                value: vec![u8::from(ctx.deadline().is_some())],
            };
            Ok::<_, Status>((resp, Payload::Empty))
        })
        .bind("127.0.0.1:0")
        .unwrap();
    let stream = std::net::TcpStream::connect(server.local_addr()).unwrap();
    let local = stream.local_addr().unwrap();
    let client = Client::from_stream(stream, Default::default()).unwrap();
    let call = client
        .start_call(
            "whoami",
            msg("").encode_to_vec(),
            Payload::Empty,
            &CallOptions::default(),
        )
        .unwrap();
    let id = call.id();
    let resp = call.wait_typed::<MetadataEntry>().unwrap();
    assert_eq!(resp.message.key, format!("whoami|{id}|{local}"));
    assert_eq!(resp.message.value, [0], "no deadline was set");
    assert!(resp.payload.is_empty());
}
