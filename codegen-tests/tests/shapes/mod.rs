//! Checks of every rpc shape through the generated blocking client,
//! shared by the tests against the blocking and the async server.
#![allow(dead_code)]

use pagerpc_codegen_tests::lab::{Blob, LabClient, Note};
use pagerpc_codegen_tests::{pattern_bytes, sha256_hex};

const MIB: usize = 1 << 20;

const SIZES: [usize; 7] = [0, 1, 4095, 4096, 4097, MIB + 13, 8 * MIB];

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

/// unary shapes: byte-exact through the generated client.
pub fn unary_shapes(lab: &LabClient) {
    let r = lab.say(&note("hello", 7)).unwrap();
    assert_eq!(r.message, note("HELLO", 7));
    assert!(r.payload.is_empty());
    let r = lab.r#type(&note("as is", 1)).unwrap();
    assert_eq!(r.message, note("as is", 1));

    for (k, &len) in SIZES.iter().enumerate() {
        let data = pattern_bytes(len, k as u64);
        // REQUEST: the payload reaches the handler whole.
        let r = lab.store(&blob("s", len, 0), data.clone()).unwrap();
        assert_eq!(r.message.bytes, len as u64);
        assert_eq!(r.message.sha256, sha256_hex(&[&data]), "store of {len}");
        // RESPONSE: the payload comes back whole.
        let r = lab.fetch(&blob("f", len, k as u64)).unwrap();
        assert_eq!(r.message, blob("f", len, k as u64));
        assert!(r.payload[..] == data[..], "fetch of {len} differs");
        // BOTH.
        let r = lab.mirror(&blob("m", len, 0), data.clone()).unwrap();
        let mut rev = data.clone();
        rev.reverse();
        assert!(r.payload[..] == rev[..], "mirror of {len} differs");
    }
}

/// client streams: byte-exact through the generated client.
pub fn client_streams(lab: &LabClient) {
    let (mut tx, resp) = lab.upload().unwrap();
    let chunks: Vec<Vec<u8>> = (0..24u64)
        .map(|i| pattern_bytes(256 * 1024 + i as usize * 4099, i))
        .collect();
    for (i, c) in chunks.iter().enumerate() {
        tx.send(&blob("u", c.len(), i as u64), c.clone()).unwrap();
    }
    tx.finish().unwrap();
    let ack = resp.wait().unwrap().message;
    let parts: Vec<&[u8]> = chunks.iter().map(|c| &c[..]).collect();
    assert_eq!(ack.count, 24);
    assert_eq!(
        ack.bytes,
        chunks.iter().map(|c| c.len() as u64).sum::<u64>()
    );
    assert_eq!(ack.sha256, sha256_hex(&parts));

    let (mut tx, resp) = lab.count().unwrap();
    for seq in 0..1000 {
        tx.send(&note("n", seq)).unwrap();
    }
    tx.finish().unwrap();
    assert_eq!(resp.wait().unwrap().message.count, 1000);
}

/// server streams: byte-exact through the generated client.
pub fn server_streams(lab: &LabClient) {
    // RESPONSE: 12 chunks of 1 MiB, in order, byte-exact.
    let mut rx = lab.download(&blob("d", MIB, 12)).unwrap();
    let mut n = 0u64;
    while let Some((msg, pages)) = rx.recv().unwrap() {
        assert_eq!(msg.seq, n);
        assert!(pages[..] == pattern_bytes(MIB, n)[..], "chunk {n} differs");
        n += 1;
    }
    assert_eq!(n, 12);

    // BOTH: the request's payload comes back in chunks.
    let data = pattern_bytes(3 * MIB + 5, 99);
    let rx = lab.split(&blob("s", MIB, 0), data.clone()).unwrap();
    let mut back = Vec::new();
    for (i, m) in rx.enumerate() {
        let (msg, pages) = m.unwrap();
        assert_eq!(msg.seq, i as u64);
        assert_eq!(msg.len, pages.len() as u64);
        back.extend_from_slice(&pages);
    }
    assert!(back == data, "split payload differs");

    // No payloads, read as an iterator.
    let got: Vec<u64> = lab
        .countdown(&note("t", 100))
        .unwrap()
        .map(|m| m.unwrap().0.seq)
        .collect();
    assert_eq!(got, (1..=100).rev().collect::<Vec<_>>());
}

/// bidi streams: byte-exact through the generated client.
pub fn bidi_streams(lab: &LabClient) {
    let (mut tx, mut rx) = lab.exchange().unwrap();
    for i in 0..16u64 {
        let data = pattern_bytes(64 * 1024 + i as usize, i);
        tx.send(&blob("x", data.len(), i), data.clone()).unwrap();
        let (msg, pages) = rx.recv().unwrap().expect("an answer per message");
        assert_eq!(msg.seq, i);
        let mut rev = data;
        rev.reverse();
        assert!(pages[..] == rev[..], "exchange {i} differs");
    }
    tx.finish().unwrap();
    assert!(rx.recv().unwrap().is_none());

    let (mut tx, mut rx) = lab.chat().unwrap();
    for i in 0..50 {
        tx.send(&note("abc", i)).unwrap();
    }
    tx.finish().unwrap();
    for i in 0..50 {
        assert_eq!(rx.recv().unwrap(), Some(note("ABC", i)));
    }
    assert_eq!(rx.recv().unwrap(), None);
    assert_eq!(rx.trailers().len(), 1);
    assert_eq!(rx.trailers()[0].value, b"50");
}
