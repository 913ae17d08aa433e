//! `frame::decode_header` on arbitrary bytes, under several limit sets.
//!
//! Invariants: never panics; an accepted header passes `validate_header`;
//! `encode_head` of it succeeds whenever its canonical encoding fits the
//! header limit, and the encoded prefix + header decode back to the same
//! header (directly and through `decode_stream`); whatever tighter limits
//! accept, looser limits accept too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagerpc_core::frame::decode_header;
use pagerpc_core::{
    decode_stream, encode_head, validate_header, CodecError, Flags, Header, Limits, Prefix,
    PREFIX_LEN,
};
use pagerpc_fuzz::{all_limits, tighter_or_equal};

fuzz_target!(|data: &[u8]| {
    let limits = all_limits();
    let results = limits.map(|l| decode_header(data, &l));
    for (l, r) in limits.iter().zip(&results) {
        match r {
            Ok(h) => round_trip(h, l),
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    for (i, a) in limits.iter().enumerate() {
        for (j, b) in limits.iter().enumerate() {
            if tighter_or_equal(a, b) {
                if let Ok(h) = &results[i] {
                    assert_eq!(results[j].as_ref(), Ok(h), "looser limits refused a header");
                }
            }
        }
    }
});

fn round_trip(h: &Header, l: &Limits) {
    assert_eq!(validate_header(h, l), Ok(()));
    let inline_len = l.max_inline_payload_bytes.min(l.max_payload_bytes).min(3);
    for (flags, payload_len) in [(Flags::NONE, 0), (Flags::INLINE_PAYLOAD, inline_len)] {
        let mut out = Vec::new();
        let n = match encode_head(h, payload_len, flags, l, &mut out) {
            Ok(n) => n,
            Err(CodecError::HeaderTooLarge { limit, got }) => {
                // The canonical encoding may differ in size from the input.
                assert_eq!(limit, l.max_header_bytes);
                assert!(got > limit);
                assert!(out.is_empty(), "encode_head wrote on failure");
                continue;
            }
            Err(e) => panic!("encode_head refused an accepted header: {e:?}"),
        };
        assert_eq!(n, out.len());
        let p = Prefix::decode(&out, l).expect("own prefix refused");
        assert_eq!(p.flags, flags);
        assert_eq!(p.payload_len, payload_len);
        assert_eq!(p.header_len as usize, n - PREFIX_LEN);
        assert_eq!(decode_header(&out[PREFIX_LEN..], l).as_ref(), Ok(h));
        out.resize(out.len() + payload_len as usize, 0xA5);
        let s = decode_stream(&out, *l, &[]);
        assert_eq!(s.error, None);
        assert_eq!(s.frames.len(), 1);
        assert_eq!(&s.frames[0].head.header, h);
        assert_eq!(s.frames[0].head.prefix, p);
        assert_eq!(s.frames[0].payload.len() as u64, payload_len);
    }
}
