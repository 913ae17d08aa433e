//! Codec property tests and truncation tests.

use pagerpc_core::*;
use proptest::prelude::*;

fn frame_bytes(header: &Header, payload: &[u8], flags: Flags, limits: &Limits) -> Vec<u8> {
    let mut out = Vec::new();
    encode_head(header, payload.len() as u64, flags, limits, &mut out).expect("valid frame");
    out.extend_from_slice(payload);
    out
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Request),
        Just(Kind::Response),
        Just(Kind::Error),
        Just(Kind::Cancel),
        Just(Kind::Ping),
        Just(Kind::Pong),
        Just(Kind::StreamChunk),
        Just(Kind::StreamEnd),
        Just(Kind::Settings),
        Just(Kind::Credit),
    ]
}

prop_compose! {
    fn arb_header()(
        call_id in any::<u64>(),
        kind in arb_kind(),
        method in "[a-z./]{1,40}",
        status_code in 0u32..20,
        status_message in ".{0,40}",
        deadline_us in any::<u64>(),
        metadata in prop::collection::vec(("[a-z-]{1,12}", prop::collection::vec(any::<u8>(), 0..16)), 0..6),
        crc in prop::option::of(any::<u32>()),
        body in prop::collection::vec(any::<u8>(), 0..200),
        credit in any::<u64>(),
        client_stream in any::<bool>(),
        payload_send in 0i32..3,
    ) -> Header {
        Header {
            call_id,
            kind: kind as i32,
            method,
            status_code,
            status_message,
            deadline_us,
            metadata: metadata.into_iter().map(|(key, value)| MetadataEntry { key, value }).collect(),
            payload_crc32c: crc,
            body,
            credit,
            client_stream,
            payload_send,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any sequence of valid frames decodes to itself, however the stream is
    /// split into reads.
    #[test]
    fn round_trip_any_chunking(
        frames in prop::collection::vec((arb_header(), prop::collection::vec(any::<u8>(), 0..5000), any::<bool>()), 1..6),
        chunks in prop::collection::vec(1usize..700, 0..5),
    ) {
        let limits = Limits::default();
        let mut wire = Vec::new();
        for (h, p, inline) in &frames {
            let flags = if *inline && p.len() as u64 <= limits.max_inline_payload_bytes { Flags::INLINE_PAYLOAD } else { Flags::NONE };
            wire.extend(frame_bytes(h, p, flags, &limits));
        }
        let out = decode_stream(&wire, limits, &chunks);
        prop_assert_eq!(out.error, None);
        prop_assert_eq!(out.frames.len(), frames.len());
        for (got, (h, p, _)) in out.frames.iter().zip(&frames) {
            prop_assert_eq!(&got.head.header, h);
            prop_assert_eq!(&got.payload, p);
        }
    }

    /// Arbitrary bytes never panic, and whatever decodes is well-formed.
    #[test]
    fn garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), chunks in prop::collection::vec(1usize..64, 0..3)) {
        let out = decode_stream(&bytes, Limits::default(), &chunks);
        for f in &out.frames {
            prop_assert_eq!(f.payload.len() as u64, f.head.payload_len());
        }
    }

    /// Cutting a valid stream anywhere yields only the frames before the cut
    /// and a Truncated error, never a short payload.
    #[test]
    fn truncation_never_delivers_partial(h in arb_header(), p in prop::collection::vec(any::<u8>(), 1..3000), cut_frac in 0.0f64..1.0) {
        let limits = Limits::default();
        let wire = frame_bytes(&h, &p, Flags::NONE, &limits);
        let cut = ((wire.len() as f64) * cut_frac) as usize;
        let out = decode_stream(&wire[..cut], limits, &[]);
        prop_assert!(out.frames.is_empty());
        if cut > 0 {
            let is_truncated = matches!(out.error, Some(CodecError::Truncated { .. }));
            prop_assert!(is_truncated, "{:?}", out.error);
        }
    }
}

#[test]
fn truncated_at_every_offset_names_the_section() {
    let limits = Limits::default();
    let h = Header {
        call_id: 1,
        kind: Kind::Request as i32,
        method: "put".into(),
        body: vec![9; 33],
        ..Default::default()
    };
    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let mut head = Vec::new();
    let head_len = encode_head(&h, payload.len() as u64, Flags::NONE, &limits, &mut head).unwrap();
    let mut wire = head.clone();
    wire.extend_from_slice(&payload);
    // Also a second, complete frame before it: it must still be delivered.
    let mut two = frame_bytes(&h, b"first", Flags::INLINE_PAYLOAD, &limits);
    let first_len = two.len();
    two.extend_from_slice(&wire);
    for cut in 0..wire.len() {
        let out = decode_stream(&two[..first_len + cut], limits, &[]);
        assert_eq!(out.frames.len(), 1, "cut {cut}");
        assert_eq!(out.frames[0].payload, b"first");
        let (section, expected, got) = match out.error {
            None if cut == 0 => continue,
            Some(CodecError::Truncated {
                section,
                expected,
                got,
            }) => (section, expected, got),
            other => panic!("cut {cut}: {other:?}"),
        };
        if cut < PREFIX_LEN {
            assert_eq!(
                (section, expected, got),
                (Section::Prefix, PREFIX_LEN as u64, cut as u64)
            );
        } else if cut < head_len - h.body.len() {
            assert_eq!(section, Section::Header);
            assert_eq!(expected, (head_len - h.body.len() - PREFIX_LEN) as u64);
            assert_eq!(got, (cut - PREFIX_LEN) as u64);
        } else if cut < head_len {
            assert_eq!(section, Section::Body);
            assert_eq!(expected, h.body.len() as u64);
            assert_eq!(got, (cut - (head_len - h.body.len())) as u64);
        } else {
            assert_eq!(section, Section::Payload);
            assert_eq!(expected, payload.len() as u64);
            assert_eq!(got, (cut - head_len) as u64);
        }
    }
    let whole = decode_stream(&two, limits, &[7]);
    assert_eq!(whole.error, None);
    assert_eq!(whole.frames[1].payload, payload);
}

#[test]
fn errors_are_sticky_and_stop_delivery() {
    let limits = Limits::default();
    let h = Header {
        call_id: 1,
        kind: Kind::Ping as i32,
        ..Default::default()
    };
    let mut wire = frame_bytes(&h, b"", Flags::NONE, &limits);
    wire.extend_from_slice(b"GARBAGE-GARBAGE-GARBAGE-GARBAGE");
    wire.extend(frame_bytes(&h, b"", Flags::NONE, &limits));
    let out = decode_stream(&wire, limits, &[]);
    assert_eq!(out.frames.len(), 1);
    assert_eq!(out.error, Some(CodecError::BadMagic { got: *b"GARB" }));

    let mut dec = FrameDecoder::new(limits);
    assert!(dec.feed(b"GARBAGE-GARBAGE-GARBAGE-GARBAGE").is_err());
    assert_eq!(dec.need(), Need::Failed);
    assert_eq!(
        dec.feed(&frame_bytes(&h, b"", Flags::NONE, &limits)),
        Err(CodecError::BadMagic { got: *b"GARB" })
    );
}

#[test]
fn header_errors_surface_through_the_decoder() {
    let limits = Limits::default();
    let bad = Header {
        call_id: 1,
        kind: Kind::Request as i32,
        method: String::new(),
        ..Default::default()
    };
    // Encode by hand, bypassing the encoder's own validation.
    let body = prost::Message::encode_to_vec(&bad);
    let prefix = Prefix {
        flags: Flags::NONE,
        header_len: body.len() as u32,
        body_len: 0,
        payload_len: 0,
    };
    let mut wire = prefix.encode().to_vec();
    wire.extend(body);
    assert_eq!(
        decode_stream(&wire, limits, &[]).error,
        Some(CodecError::MissingMethod)
    );

    let many = Header {
        call_id: 1,
        kind: Kind::Ping as i32,
        metadata: (0..65)
            .map(|i| MetadataEntry {
                key: format!("k{i}"),
                value: vec![],
            })
            .collect(),
        ..Default::default()
    };
    let body = prost::Message::encode_to_vec(&many);
    let prefix = Prefix {
        flags: Flags::NONE,
        header_len: body.len() as u32,
        body_len: 0,
        payload_len: 0,
    };
    let mut wire = prefix.encode().to_vec();
    wire.extend(body);
    assert_eq!(
        decode_stream(&wire, limits, &[]).error,
        Some(CodecError::TooManyMetadataEntries { limit: 64, got: 65 })
    );
}

#[test]
fn lying_payload_length_costs_nothing() {
    let limits = Limits {
        max_payload_bytes: u64::MAX,
        ..Limits::default()
    };
    let h = Header {
        call_id: 1,
        kind: Kind::Request as i32,
        method: "m".into(),
        ..Default::default()
    };
    let mut wire = Vec::new();
    encode_head(&h, u64::MAX / 2, Flags::NONE, &limits, &mut wire).unwrap();
    wire.extend_from_slice(&[1, 2, 3]);
    let out = decode_stream(&wire, limits, &[]);
    assert!(out.frames.is_empty());
    assert_eq!(
        out.error,
        Some(CodecError::Truncated {
            section: Section::Payload,
            expected: u64::MAX / 2,
            got: 3
        })
    );
}

/// Appends `v` as a protobuf varint (minimal encoding).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Header bytes with `call_id` 1, the given raw varint `fields` (tag, value)
/// in order, and method `"m"`, built by hand so that values prost's encoder
/// could never produce reach the decoder.
fn raw_header(fields: &[(u32, u64)]) -> Vec<u8> {
    let mut h = vec![0x08, 0x01];
    for &(tag, v) in fields {
        put_varint(&mut h, u64::from(tag << 3));
        put_varint(&mut h, v);
    }
    h.extend_from_slice(&[0x1a, 0x01, b'm']);
    h
}

fn wire_of(header: &[u8]) -> Vec<u8> {
    let prefix = Prefix {
        flags: Flags::NONE,
        header_len: header.len() as u32,
        body_len: 0,
        payload_len: 0,
    };
    let mut wire = prefix.encode().to_vec();
    wire.extend_from_slice(header);
    wire
}

/// Regression: prost truncates an `int32` varint to its low 32 bits, so a
/// `kind` of 2^32 + 1 used to be accepted as `REQUEST`.
#[test]
fn out_of_range_kind_varint_is_refused() {
    let limits = Limits::default();
    let int32_limit = i32::MAX as u64;

    // kind = 1 (REQUEST) is fine.
    let ok = decode_stream(&wire_of(&raw_header(&[(2, 1)])), limits, &[]);
    assert_eq!(ok.error, None);
    assert_eq!(ok.frames.len(), 1);
    assert_eq!(ok.frames[0].head.kind(), Kind::Request);

    for got in [(1u64 << 32) + 1, 1 << 31, u64::from(u32::MAX), 1 << 40] {
        let out = decode_stream(&wire_of(&raw_header(&[(2, got)])), limits, &[]);
        assert!(out.frames.is_empty(), "kind {got} was accepted");
        assert_eq!(
            out.error,
            Some(CodecError::FieldOutOfRange {
                field: "kind",
                limit: int32_limit,
                got
            }),
            "kind {got}"
        );
    }

    // An out-of-range kind followed by a valid one: prost keeps the last,
    // the out-of-range one is still refused.
    let out = decode_stream(
        &wire_of(&raw_header(&[(2, (1 << 32) + 1), (2, 1)])),
        limits,
        &[],
    );
    assert_eq!(
        out.error,
        Some(CodecError::FieldOutOfRange {
            field: "kind",
            limit: int32_limit,
            got: (1 << 32) + 1
        })
    );

    // A negative int32, sign-extended to ten bytes, is in range: it is an
    // unknown kind, as before.
    let out = decode_stream(&wire_of(&raw_header(&[(2, -1i64 as u64)])), limits, &[]);
    assert_eq!(out.error, Some(CodecError::UnknownKind { got: -1 }));
}

/// Regression: `status_code` and `payload_crc32c` are `uint32`; prost
/// truncated them silently.
#[test]
fn out_of_range_uint32_varints_are_refused() {
    let limits = Limits::default();
    let u32_limit = u64::from(u32::MAX);
    let ok = decode_stream(
        &wire_of(&raw_header(&[(2, 1), (4, u32_limit), (8, u32_limit)])),
        limits,
        &[],
    );
    assert_eq!(ok.error, None);
    assert_eq!(ok.frames[0].head.header.status_code, u32::MAX);
    assert_eq!(ok.frames[0].head.header.payload_crc32c, Some(u32::MAX));

    for (tag, field) in [(4, "status_code"), (8, "payload_crc32c")] {
        let got = (1u64 << 32) + 7;
        let out = decode_stream(&wire_of(&raw_header(&[(2, 1), (tag, got)])), limits, &[]);
        assert!(out.frames.is_empty(), "{field} {got} was accepted");
        assert_eq!(
            out.error,
            Some(CodecError::FieldOutOfRange {
                field,
                limit: u32_limit,
                got
            })
        );
    }
}

/// `payload_send` (field 12, an enum) is range-checked like `kind`; a value
/// in range that this version does not know is kept, not refused (a later
/// version may add modes; receivers treat it as "nothing said").
#[test]
fn payload_send_varint_is_range_checked_and_unknown_values_pass() {
    let limits = Limits::default();
    let ok = decode_stream(&wire_of(&raw_header(&[(2, 11), (12, 1)])), limits, &[]);
    assert_eq!(ok.error, None);
    assert_eq!(ok.frames[0].head.header.payload_send, 1);
    let ok = decode_stream(&wire_of(&raw_header(&[(2, 11), (12, 9)])), limits, &[]);
    assert_eq!(ok.error, None);
    assert_eq!(ok.frames[0].head.header.payload_send, 9);
    let got = (1u64 << 32) + 1;
    let out = decode_stream(&wire_of(&raw_header(&[(2, 11), (12, got)])), limits, &[]);
    assert_eq!(
        out.error,
        Some(CodecError::FieldOutOfRange {
            field: "payload_send",
            limit: i32::MAX as u64,
            got
        })
    );
}

/// The range check walks only top-level fields: a field numbered 2 inside an
/// unknown group (which prost skips) is not the header's `kind`, while a
/// top-level `kind` after the group is still checked.
#[test]
fn range_check_skips_unknown_groups() {
    let limits = Limits::default();
    // Field 20: start group (wire type 3), inner field 2 = 2^32 + 1,
    // end group (wire type 4).
    let mut group = Vec::new();
    put_varint(&mut group, (20 << 3) | 3);
    group.extend_from_slice(&[0x10]);
    put_varint(&mut group, (1 << 32) + 1);
    put_varint(&mut group, (20 << 3) | 4);

    let mut h = raw_header(&[(2, 1)]);
    h.extend_from_slice(&group);
    let out = decode_stream(&wire_of(&h), limits, &[]);
    assert_eq!(out.error, None);
    assert_eq!(out.frames[0].head.kind(), Kind::Request);

    let mut h = group.clone();
    h.extend_from_slice(&raw_header(&[(2, (1 << 32) + 3)]));
    let out = decode_stream(&wire_of(&h), limits, &[]);
    assert_eq!(
        out.error,
        Some(CodecError::FieldOutOfRange {
            field: "kind",
            limit: i32::MAX as u64,
            got: (1 << 32) + 3
        })
    );
}
