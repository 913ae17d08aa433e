//! `tracing` spans and events (feature `tracing`), with a small recording
//! subscriber installed for the whole test binary: each call makes exactly
//! one span on each side with the documented fields, a stream one span per
//! side with its sizes summed, and connections report open and close with
//! the peer and the reason.
#![cfg(feature = "tracing")]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    CallOptions, Client, ClientConfig, Code, Context, PageBuf, Pages, Payload, Server,
    ServerConfig, Status,
};
use prost::Message;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A span or event as recorded: its name, target and fields (strings
/// unquoted, numbers in decimal, the rest as `Debug`).
#[derive(Clone, Debug, Default)]
struct Rec {
    name: &'static str,
    target: String,
    fields: HashMap<String, String>,
}

impl Rec {
    fn get(&self, k: &str) -> &str {
        self.fields
            .get(k)
            .unwrap_or_else(|| panic!("{} has no field {k}: {self:?}", self.name))
    }
    fn num(&self, k: &str) -> u64 {
        self.get(k)
            .parse()
            .unwrap_or_else(|_| panic!("{k} is not a number: {self:?}"))
    }
}

impl Visit for Rec {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.fields
            .insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.fields
            .insert(field.name().to_owned(), value.to_owned());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.fields
            .insert(field.name().to_owned(), value.to_string());
    }
}

#[derive(Default)]
struct Recorder {
    next: AtomicU64,
    /// Open spans: the record and its reference count.
    open: Mutex<HashMap<u64, (Rec, usize)>>,
    closed: Mutex<Vec<Rec>>,
    events: Mutex<Vec<Rec>>,
}

struct Sub(Arc<Recorder>);

impl Subscriber for Sub {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rec = Rec {
            name: attrs.metadata().name(),
            target: attrs.metadata().target().to_owned(),
            ..Rec::default()
        };
        attrs.record(&mut rec);
        self.0.open.lock().unwrap().insert(id, (rec, 1));
        Id::from_u64(id)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some((rec, _)) = self.0.open.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(rec);
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut rec = Rec {
            name: event.metadata().name(),
            target: event.metadata().target().to_owned(),
            ..Rec::default()
        };
        event.record(&mut rec);
        self.0.events.lock().unwrap().push(rec);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
    fn clone_span(&self, id: &Id) -> Id {
        if let Some((_, n)) = self.0.open.lock().unwrap().get_mut(&id.into_u64()) {
            *n += 1;
        }
        id.clone()
    }
    fn try_close(&self, id: Id) -> bool {
        let mut open = self.0.open.lock().unwrap();
        let Some((_, n)) = open.get_mut(&id.into_u64()) else {
            return false;
        };
        *n -= 1;
        if *n > 0 {
            return false;
        }
        let (rec, _) = open.remove(&id.into_u64()).unwrap();
        drop(open);
        self.0.closed.lock().unwrap().push(rec);
        true
    }
}

/// The recorder, installed as the global default once for this binary
/// (tests run in parallel, so each looks only at its own methods and
/// peers).
fn recorder() -> &'static Arc<Recorder> {
    static R: OnceLock<Arc<Recorder>> = OnceLock::new();
    R.get_or_init(|| {
        let r = Arc::new(Recorder::default());
        tracing::subscriber::set_global_default(Sub(r.clone())).unwrap();
        r
    })
}

/// The closed `call` spans of `method` on `side`, waiting a little for the
/// server's (it closes its span when its answer is queued, which may be
/// just after the client has it).
fn spans(method: &str, side: &str, want: usize) -> Vec<Rec> {
    let find = || -> Vec<Rec> {
        recorder()
            .closed
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.name == "call" && r.get("method") == method && r.get("side") == side)
            .cloned()
            .collect()
    };
    wait_until(Duration::from_secs(5), || find().len() >= want);
    std::thread::sleep(Duration::from_millis(20));
    find()
}

fn events(name: &str, side: &str, peer: SocketAddr) -> Vec<Rec> {
    recorder()
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.name == name && r.get("side") == side && r.get("peer") == peer.to_string())
        .cloned()
        .collect()
}

/// `data` in page-aligned memory (what zero-copy send needs).
fn page_payload(data: &[u8]) -> Payload {
    if data.is_empty() {
        return Payload::Empty;
    }
    let mut b = PageBuf::new(data.len()).unwrap();
    b.copy_from_slice(data);
    b.into()
}

fn md(key: &str, len: usize) -> MetadataEntry {
    MetadataEntry {
        key: key.into(),
        value: vec![7; len],
    }
}

/// A server whose `<prefix>-sized` answers a payload of the size in the
/// request's key, `<prefix>-fail` fails with `Aborted`, and which refuses
/// calls with metadata `deny`.
fn server(prefix: &str, cfg: ServerConfig, peers: Arc<Mutex<Vec<SocketAddr>>>) -> Server {
    Server::builder()
        .config(cfg)
        .interceptor(|ctx: &Context| {
            if ctx.metadata().iter().any(|m| m.key == "deny") {
                return Err(Status::unauthenticated("denied"));
            }
            Ok(())
        })
        .register(
            &format!("{prefix}-sized"),
            move |ctx, req: MetadataEntry, _pages: Pages| {
                peers.lock().unwrap().push(ctx.peer());
                let n: usize = req.key.parse().unwrap();
                Ok::<_, Status>((md("r", 5), page_payload(&pattern(n, 1))))
            },
        )
        .register(
            &format!("{prefix}-fail"),
            |_ctx, _req: MetadataEntry, _pages: Pages| {
                Err::<(MetadataEntry, Payload), _>(Status::aborted("no"))
            },
        )
        .register_bidi_stream(&format!("{prefix}-chat"), |_ctx, rx, tx| {
            while let Some(m) = rx.recv()? {
                // Answer each message with twice its payload.
                let mut p = m.payload.to_vec();
                p.extend_from_slice(&m.payload);
                tx.send_raw(m.body, Payload::Vec(p))?;
            }
            Ok(Vec::new())
        })
        .bind("127.0.0.1:0")
        .unwrap()
}

#[test]
fn each_unary_call_has_one_span_per_side_with_its_fields() {
    recorder();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let server = server("u", ServerConfig::default(), peers);
    let client = Client::connect(server.local_addr()).unwrap();

    let sizes = [(0usize, 0usize), (100, 5000), (1 << 20, 3 * 4096 + 11)];
    let mut ids = Vec::new();
    for &(req_len, resp_len) in &sizes {
        let req = md(&resp_len.to_string(), 3);
        let call = client
            .start_call(
                "u-sized",
                req.encode_to_vec(),
                pattern(req_len, 2),
                &CallOptions::default(),
            )
            .unwrap();
        ids.push(call.id());
        let r = call.wait_typed::<MetadataEntry>().unwrap();
        assert_eq!(r.payload.len(), resp_len);
    }
    let client_spans = spans("u-sized", "client", sizes.len());
    let server_spans = spans("u-sized", "server", sizes.len());
    assert_eq!(client_spans.len(), sizes.len(), "{client_spans:?}");
    assert_eq!(server_spans.len(), sizes.len(), "{server_spans:?}");

    let resp_body = md("r", 5).encoded_len() as u64;
    for (k, &(req_len, resp_len)) in sizes.iter().enumerate() {
        let req_body = md(&resp_len.to_string(), 3).encoded_len() as u64;
        let id = ids[k].to_string();
        let c = client_spans
            .iter()
            .find(|s| s.get("call_id") == id)
            .unwrap();
        let s = server_spans
            .iter()
            .find(|s| s.get("call_id") == id)
            .unwrap();
        for span in [c, s] {
            assert_eq!(span.target, "pagerpc");
            assert_eq!(span.get("status"), "Ok");
            assert_eq!(span.num("request_bytes"), req_body + req_len as u64);
            assert_eq!(span.num("response_bytes"), resp_body + resp_len as u64);
            span.num("duration_us");
        }
        // Copy backend: every payload byte received was copied. The client
        // received the response payload, the server the request payload.
        assert_eq!(c.num("mapped_bytes"), 0);
        assert_eq!(c.num("copied_bytes"), resp_len as u64);
        assert_eq!(s.num("mapped_bytes"), 0);
        assert_eq!(s.num("copied_bytes"), req_len as u64);
        assert!(c.num("duration_us") >= s.num("duration_us"));
    }
}

#[test]
fn failed_and_refused_calls_record_their_status_on_both_sides() {
    recorder();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let server = server("f", ServerConfig::default(), peers);
    let client = Client::connect(server.local_addr()).unwrap();

    let e = client
        .call::<_, MetadataEntry>("f-fail", &md("x", 0), vec![1u8; 4096])
        .unwrap_err();
    assert_eq!(e.code(), Code::Aborted);
    let opts = CallOptions {
        metadata: vec![md("deny", 1)],
        ..CallOptions::default()
    };
    let e = client
        .call_with::<_, MetadataEntry>("f-sized", &md("10", 0), vec![2u8; 8192], &opts)
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    for side in ["client", "server"] {
        let fail = spans("f-fail", side, 1);
        assert_eq!(fail.len(), 1, "{side}: {fail:?}");
        assert_eq!(fail[0].get("status"), "Aborted");
        assert_eq!(fail[0].num("response_bytes"), 0);
        let denied = spans("f-sized", side, 1);
        assert_eq!(denied.len(), 1, "{side}: {denied:?}");
        assert_eq!(denied[0].get("status"), "Unauthenticated");
        assert_eq!(
            denied[0].num("request_bytes"),
            md("10", 0).encoded_len() as u64 + 8192
        );
    }
    // The server received (and copied) the request payloads.
    assert_eq!(spans("f-sized", "server", 1)[0].num("copied_bytes"), 8192);
}

#[test]
fn a_stream_has_one_span_per_side_with_its_messages_summed() {
    recorder();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let server = server("s", ServerConfig::default(), peers);
    let client = Client::connect(server.local_addr()).unwrap();

    let (mut tx, mut rx) = client
        .bidi_stream("s-chat", &CallOptions::default())
        .unwrap();
    let id = tx.id().to_string();
    let lens = [0usize, 1, 4096, 70_000];
    let body = md("m", 2);
    for (i, &len) in lens.iter().enumerate() {
        tx.send(&body, pattern(len, i as u64)).unwrap();
        let m = rx.recv().unwrap().unwrap();
        assert_eq!(m.payload.len(), 2 * len);
    }
    tx.finish().unwrap();
    assert!(rx.recv().unwrap().is_none());
    drop(rx);

    let sent: u64 = lens.iter().map(|&l| (body.encoded_len() + l) as u64).sum();
    let answered: u64 = lens
        .iter()
        .map(|&l| (body.encoded_len() + 2 * l) as u64)
        .sum();
    let payload_in: u64 = lens.iter().map(|&l| l as u64).sum();
    let c = spans("s-chat", "client", 1);
    let s = spans("s-chat", "server", 1);
    assert_eq!((c.len(), s.len()), (1, 1), "{c:?} {s:?}");
    let (c, s) = (&c[0], &s[0]);
    for span in [c, s] {
        assert_eq!(span.get("call_id"), id);
        assert_eq!(span.get("status"), "Ok");
        assert_eq!(span.num("request_bytes"), sent);
        assert_eq!(span.num("response_bytes"), answered);
    }
    assert_eq!(
        c.num("mapped_bytes") + c.num("copied_bytes"),
        2 * payload_in
    );
    assert_eq!(s.num("mapped_bytes") + s.num("copied_bytes"), payload_in);
}

#[test]
fn mapped_and_copied_bytes_add_up_to_the_payload_received_with_zero_copy() {
    recorder();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let server = server("z", ServerConfig::zerocopy(), peers);
    let client = Client::connect_with(server.local_addr(), ClientConfig::zerocopy()).unwrap();
    let len = (1 << 20) + 100;
    let calls = 12;
    let mut client_mapped = 0;
    let mut server_mapped = 0;
    for _ in 0..calls {
        let (c0, s0) = (client.counters(), server.counters());
        let r = client
            .call::<_, MetadataEntry>(
                "z-sized",
                &md(&len.to_string(), 0),
                page_payload(&pattern(len, 3)),
            )
            .unwrap();
        assert_eq!(r.payload.len(), len);
        drop(r);
        client.ping(Duration::from_secs(5)).unwrap();
        let (c1, s1) = (client.counters(), server.counters());
        client_mapped += c1.since(&c0).bytes_mapped;
        server_mapped += s1.since(&s0).bytes_mapped;
    }
    let c = spans("z-sized", "client", calls);
    let s = spans("z-sized", "server", calls);
    assert_eq!((c.len(), s.len()), (calls, calls));
    for span in c.iter().chain(&s) {
        assert_eq!(
            span.num("mapped_bytes") + span.num("copied_bytes"),
            len as u64,
            "{span:?}"
        );
    }
    // The spans' mapped bytes are exactly what the connection counted.
    assert_eq!(
        c.iter().map(|s| s.num("mapped_bytes")).sum::<u64>(),
        client_mapped
    );
    assert_eq!(
        s.iter().map(|s| s.num("mapped_bytes")).sum::<u64>(),
        server_mapped
    );
    // Zero-copy receive works on loopback here (as tests/zerocopy.rs
    // asserts): most bytes were mapped, both ways.
    assert!(client.zerocopy_receive().0);
    let total = (calls * len) as u64;
    assert!(client_mapped > total / 2, "{client_mapped} of {total}");
    assert!(server_mapped > total / 2, "{server_mapped} of {total}");
}

#[test]
fn connections_report_open_and_close_with_peer_and_reason() {
    recorder();
    let peers = Arc::new(Mutex::new(Vec::new()));
    let server = server("c", ServerConfig::default(), peers.clone());
    let addr = server.local_addr();

    // The client closes: both sides say so.
    let client = Client::connect(addr).unwrap();
    client
        .call::<_, MetadataEntry>("c-sized", &md("0", 0), Payload::Empty)
        .unwrap();
    let local = peers.lock().unwrap()[0];
    assert_eq!(events("connection_open", "client", addr).len(), 1);
    assert_eq!(events("connection_open", "server", local).len(), 1);
    client.close();
    drop(client);
    let closed = events("connection_close", "client", addr);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert!(
        closed[0]
            .get("reason")
            .contains("client closed the connection"),
        "{closed:?}"
    );
    assert_eq!(closed[0].target, "pagerpc");
    assert!(wait_until(Duration::from_secs(5), || {
        !events("connection_close", "server", local).is_empty()
    }));
    let closed = events("connection_close", "server", local);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].get("reason"), "connection closed by peer");

    // The last handle dropped: the client says so.
    let client = Client::connect(addr).unwrap();
    client
        .call::<_, MetadataEntry>("c-sized", &md("0", 0), Payload::Empty)
        .unwrap();
    let local2 = peers.lock().unwrap()[1];
    let clone = client.clone();
    drop(client);
    assert!(events("connection_close", "client", addr).len() == 1);
    drop(clone);
    let closed = events("connection_close", "client", addr);
    assert_eq!(closed.len(), 2, "{closed:?}");
    assert_eq!(
        closed[1].get("reason"),
        "the last handle to the connection was dropped"
    );
    assert!(wait_until(Duration::from_secs(5), || {
        !events("connection_close", "server", local2).is_empty()
    }));

    // The server shuts down: it says so for every connection.
    let client = Client::connect(addr).unwrap();
    client
        .call::<_, MetadataEntry>("c-sized", &md("0", 0), Payload::Empty)
        .unwrap();
    let local3 = peers.lock().unwrap()[2];
    server.shutdown();
    let closed = events("connection_close", "server", local3);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].get("reason"), "the server is shutting down");
    // The client learns it at its next call.
    let e = client
        .call::<_, MetadataEntry>("c-sized", &md("0", 0), Payload::Empty)
        .unwrap_err();
    let closed = events("connection_close", "client", addr);
    assert_eq!(closed.len(), 3, "{closed:?}");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert!(!closed[2].get("reason").is_empty());
}
