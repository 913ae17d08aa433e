//! Zero-copy receive between two network namespaces over a veth pair with
//! MTU 4148 (4096 payload + 20 IP + 20 TCP + 12 timestamp bytes). Needs
//! root and iproute2, which CI installs.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use pagerpc::netns::NetnsPair;
use pagerpc::proto::MetadataEntry;
use pagerpc::{
    Client, ClientConfig, Origin, PageBuf, Pages, Payload, Server, ServerConfig, Status,
};

#[test]
fn megabyte_payloads_are_mapped_across_namespaces() {
    let pair = Arc::new(NetnsPair::create(&format!("pgt{}", std::process::id()), 4148).unwrap());
    let kept: Arc<Mutex<Vec<Pages>>> = Arc::default();
    let k = kept.clone();
    // The server lives in namespace a: its threads are spawned from a
    // thread that entered it.
    let p = pair.clone();
    let server = std::thread::spawn(move || {
        p.enter_a().unwrap();
        Server::builder()
            .config(ServerConfig::zerocopy())
            .register("keep", move |_ctx, req: MetadataEntry, pages: Pages| {
                k.lock().unwrap().push(pages);
                Ok::<_, Status>((req, Payload::Empty))
            })
            .bind(SocketAddr::new(NetnsPair::ADDR_A, 0))
    })
    .join()
    .unwrap()
    .unwrap();
    let addr = server.local_addr();
    let p = pair.clone();
    let client = std::thread::spawn(move || {
        p.enter_b().unwrap();
        Client::connect_with(addr, ClientConfig::zerocopy())
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(
        client.mss().unwrap(),
        4096,
        "MTU 4148 gives one page per segment"
    );
    let mut buf = PageBuf::new(1 << 20).unwrap();
    for (i, x) in buf.iter_mut().enumerate() {
        *x = (i % 249) as u8;
    }
    let data = buf.freeze();
    // A fresh connection's receive buffer is still small; let autotuning
    // settle, as in any bulk transfer, then measure.
    for _ in 0..8 {
        client
            .call::<_, MetadataEntry>("keep", &MetadataEntry::default(), data.clone())
            .unwrap();
    }
    let before = server.counters();
    for _ in 0..64 {
        client
            .call::<_, MetadataEntry>("keep", &MetadataEntry::default(), data.clone())
            .unwrap();
    }
    let c = server.counters().since(&before);
    assert_eq!(c.payload_bytes_received, 64 << 20);
    assert!(
        c.mapped_percent() > 99.0,
        "only {:.2}% mapped: {c:?}",
        c.mapped_percent()
    );
    for p in kept.lock().unwrap().iter() {
        assert_eq!(p.origin(), Origin::Socket);
        assert!(**p == *data);
    }
    drop(client);
    server.shutdown();
}
