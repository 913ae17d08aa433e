//! Writes the seed corpus of the fuzz targets into `fuzz/corpus/`.
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`
//!
//! Deterministic: running it again rewrites the same files.

use pagerpc_core::{encode_head, Flags, Header, Kind, Limits, MetadataEntry, PREFIX_LEN};
use std::fs;
use std::path::{Path, PathBuf};

fn header(kind: Kind, call_id: u64, method: &str) -> Header {
    Header {
        call_id,
        kind: kind as i32,
        method: method.into(),
        ..Default::default()
    }
}

/// Prefix + header + payload of one valid frame.
fn frame(h: &Header, payload: &[u8], flags: Flags) -> Vec<u8> {
    let mut out = Vec::new();
    encode_head(h, payload.len() as u64, flags, &Limits::default(), &mut out).expect("valid frame");
    out.extend_from_slice(payload);
    out
}

/// A raw version-`version` prefix with no body, for frames the encoder
/// would refuse to produce. Version 1 prefixes are 20 bytes (no
/// `body_len`), as version-1 peers send them.
fn raw_prefix(version: u8, flags: u8, reserved: u16, header_len: u32, payload_len: u64) -> Vec<u8> {
    raw_prefix_body(version, flags, reserved, header_len, 0, payload_len)
}

fn raw_prefix_body(
    version: u8,
    flags: u8,
    reserved: u16,
    header_len: u32,
    body_len: u32,
    payload_len: u64,
) -> Vec<u8> {
    let mut p = b"PGRP".to_vec();
    p.push(version);
    p.push(flags);
    p.extend_from_slice(&reserved.to_le_bytes());
    p.extend_from_slice(&header_len.to_le_bytes());
    if version != 1 {
        p.extend_from_slice(&body_len.to_le_bytes());
    }
    p.extend_from_slice(&payload_len.to_le_bytes());
    assert_eq!(p.len(), if version == 1 { 20 } else { PREFIX_LEN });
    p
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    fs::write(dir.join(name), bytes).expect("write corpus file");
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let dirs = ["prefix", "header", "stream"].map(|t| {
        let d = root.join(t);
        fs::create_dir_all(&d).expect("create corpus dir");
        d
    });
    let [prefix_dir, header_dir, stream_dir] = &dirs;

    // A handful of valid frames.
    let ping = header(Kind::Ping, 1, "");
    let mut req = header(Kind::Request, 7, "echo.Echo/Say");
    req.deadline_us = 1_500_000;
    req.body = b"hello".to_vec();
    req.metadata = vec![
        MetadataEntry {
            key: "trace-id".into(),
            value: b"abc123".to_vec(),
        },
        MetadataEntry {
            key: "user".into(),
            value: vec![0, 1, 2, 255],
        },
    ];
    let mut resp = header(Kind::Response, 7, "");
    resp.payload_crc32c = Some(0xdead_beef);
    let mut err = header(Kind::Error, 9, "");
    err.status_code = 5;
    err.status_message = "not found".into();
    let cancel = header(Kind::Cancel, 9, "");
    let mut chunk = header(Kind::StreamChunk, 11, "");
    chunk.body = b"chunk body".to_vec();
    let end = header(Kind::StreamEnd, 11, "");
    let pong = header(Kind::Pong, 1, "");
    let mut settings = header(Kind::Settings, 0, "");
    settings.body = pagerpc_core::conn::PeerSettings::default()
        .with_conn_window(4 << 20)
        .encode();
    let mut credit = header(Kind::Credit, 11, "");
    credit.credit = 1 << 20;
    let mut open = header(Kind::Request, 11, "store.Blobs/Put");
    open.client_stream = true;

    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("ping", frame(&ping, b"", Flags::NONE)),
        ("pong", frame(&pong, b"", Flags::NONE)),
        (
            "request_inline",
            frame(&req, b"inline payload", Flags::INLINE_PAYLOAD),
        ),
        ("response_payload", frame(&resp, &[0x5a; 300], Flags::NONE)),
        ("error", frame(&err, b"", Flags::NONE)),
        ("cancel", frame(&cancel, b"", Flags::NONE)),
        ("stream_chunk", frame(&chunk, &[1, 2, 3, 4], Flags::NONE)),
        ("stream_end", frame(&end, b"", Flags::INLINE_PAYLOAD)),
        ("settings", frame(&settings, b"", Flags::NONE)),
        ("credit", frame(&credit, b"", Flags::NONE)),
        ("stream_open", frame(&open, b"", Flags::NONE)),
    ];

    // One seed per distinct shape; the stream seeds below hold every frame.
    for (name, f) in &frames {
        let hlen = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
        if ["ping", "request_inline", "response_payload", "stream_end"].contains(name) {
            write(prefix_dir, name, &f[..PREFIX_LEN]);
        }
        if ["ping", "request_inline", "response_payload", "error"].contains(name) {
            write(header_dir, name, &f[PREFIX_LEN..PREFIX_LEN + hlen]);
        }
    }
    // Stream seeds: control byte 0 (default limits, one read) + frame(s).
    write(stream_dir, "ping", &[&[0u8][..], &frames[0].1].concat());

    // Streams of several frames, with chunkings and other limit sets.
    let mut conv = Vec::new();
    for (_, f) in &frames {
        conv.extend_from_slice(f);
    }
    let with_ctl = |ctl: u8, chunks: &[u8], body: &[u8]| {
        let mut s = vec![ctl];
        s.extend_from_slice(chunks);
        s.extend_from_slice(body);
        s
    };
    write(stream_dir, "conversation", &with_ctl(0, &[], &conv));
    write(
        stream_dir,
        "conversation_chunked",
        &with_ctl(3 << 2, &[6, 0, 40], &conv),
    );
    write(
        stream_dir,
        "conversation_small_limits",
        &with_ctl(1 | (2 << 2), &[2, 19], &conv),
    );
    write(
        stream_dir,
        "conversation_tiny_limits",
        &with_ctl(2, &[], &conv),
    );
    write(
        stream_dir,
        "conversation_skewed_limits",
        &with_ctl(3 | (1 << 2), &[0xC3], &conv),
    );

    // Truncated frames: cut inside the prefix, the header and the payload.
    let resp_frame = &frames[3].1;
    let req_frame = &frames[2].1;
    write(
        stream_dir,
        "cut_prefix",
        &with_ctl(0, &[], &resp_frame[..11]),
    );
    write(
        stream_dir,
        "cut_header",
        &with_ctl(0, &[], &req_frame[..PREFIX_LEN + 9]),
    );
    write(
        stream_dir,
        "cut_payload",
        &with_ctl(1 << 2, &[7], &resp_frame[..resp_frame.len() - 100]),
    );
    write(prefix_dir, "cut_prefix", &resp_frame[..13]);
    write(
        header_dir,
        "cut_header",
        &req_frame[PREFIX_LEN..PREFIX_LEN + 9],
    );

    // Bad prefixes.
    let bad_prefixes: Vec<(&str, Vec<u8>)> = vec![
        ("bad_magic", {
            let mut p = raw_prefix(2, 0, 0, 2, 0);
            p[..4].copy_from_slice(b"GET ");
            p
        }),
        ("bad_version", raw_prefix(3, 0, 0, 2, 0)),
        ("version_1", raw_prefix(1, 0, 0, 2, 0)),
        ("bad_flags", raw_prefix(2, 0x82, 0, 2, 0)),
        ("bad_reserved", raw_prefix(2, 0, 0x0100, 2, 0)),
        ("empty_header", raw_prefix(2, 0, 0, 0, 0)),
        ("header_too_large", raw_prefix(2, 0, 0, 64 * 1024 + 1, 0)),
        ("body_too_large", raw_prefix_body(2, 0, 0, 2, 4 * 1024 * 1024 + 1, 0)),
        ("payload_too_large", raw_prefix(2, 0, 0, 2, u64::MAX)),
        ("inline_too_large", raw_prefix(2, 1, 0, 2, 16 * 1024 + 1)),
    ];
    for (name, p) in &bad_prefixes {
        write(prefix_dir, name, p);
        if ["bad_magic", "empty_header", "payload_too_large"].contains(name) {
            write(stream_dir, name, &with_ctl(0, &[], p));
        }
    }

    // Bad headers (as header bytes, and inside a frame).
    let bad_headers: Vec<(&str, Vec<u8>)> = vec![
        ("malformed", vec![0x1a, 0x7f, b'a']),
        ("unknown_kind", vec![0x10, 0x63]),
        ("unspecified_kind", vec![0x08, 0x01]),
        ("missing_method", vec![0x08, 0x07, 0x10, 0x01]),
        ("bad_utf8_method", vec![0x10, 0x01, 0x1a, 0x02, 0xff, 0xfe]),
        ("long_method", {
            let mut h = vec![0x10, 0x01, 0x1a, 0x09];
            h.extend_from_slice(b"123456789");
            h
        }),
        ("many_metadata", {
            let mut h = vec![0x10, 0x05];
            for _ in 0..3 {
                h.extend_from_slice(&[0x3a, 0x03, 0x0a, 0x01, b'k']);
            }
            h
        }),
    ];
    for (name, h) in &bad_headers {
        write(header_dir, name, h);
        let mut s = vec![1u8]; // small limits
        s.extend_from_slice(&raw_prefix(2, 0, 0, h.len() as u32, 0));
        s.extend_from_slice(h);
        write(stream_dir, &format!("frame_{name}"), &s);
    }

    // A valid frame followed by garbage: one frame, then an error.
    let mut s = with_ctl(0, &[], &frames[0].1);
    s.extend_from_slice(b"HTTP/1.1 200 OK\r\n\r\n");
    write(stream_dir, "frame_then_garbage", &s);

    for d in &dirs {
        println!(
            "{}: {} files",
            d.display(),
            fs::read_dir(d).unwrap().count()
        );
    }
}
