//! Shared helpers of the pagerpc fuzz targets: the limit sets every target
//! runs under, and the invariants a decoded frame must satisfy.

use pagerpc_core::{validate_header, DecodedFrame, Flags, Limits, PREFIX_LEN};

/// Limits small enough that fuzzed inputs reach every limit branch
/// (header, body, payload, inline payload, metadata entries, method
/// length).
pub const SMALL: Limits = Limits {
    max_header_bytes: 48,
    max_body_bytes: 32,
    max_payload_bytes: 64,
    max_inline_payload_bytes: 16,
    max_metadata_entries: 2,
    max_method_len: 8,
};

/// The smallest limits that still admit a frame: a 2-byte header (just a
/// `kind`), no payload, no metadata, a 1-byte method.
pub const TINY: Limits = Limits {
    max_header_bytes: 4,
    max_body_bytes: 0,
    max_payload_bytes: 0,
    max_inline_payload_bytes: 0,
    max_metadata_entries: 0,
    max_method_len: 1,
};

/// Limits where an inline payload may be larger than the payload limit
/// allows (an odd but legal configuration), and payloads are small.
pub const SKEWED: Limits = Limits {
    max_header_bytes: 300,
    max_body_bytes: 2000,
    max_payload_bytes: 5,
    max_inline_payload_bytes: 1000,
    max_metadata_entries: 64,
    max_method_len: 256,
};

/// Every limit set, the default first.
pub fn all_limits() -> [Limits; 4] {
    [Limits::default(), SMALL, TINY, SKEWED]
}

/// Whether every limit of `a` is at most the same limit of `b`, so anything
/// `a` accepts `b` must accept too.
pub fn tighter_or_equal(a: &Limits, b: &Limits) -> bool {
    a.max_header_bytes <= b.max_header_bytes
        && a.max_body_bytes <= b.max_body_bytes
        && a.max_payload_bytes <= b.max_payload_bytes
        && a.max_inline_payload_bytes <= b.max_inline_payload_bytes
        && a.max_metadata_entries <= b.max_metadata_entries
        && a.max_method_len <= b.max_method_len
}

/// Checks everything a delivered frame promises, and returns its size on
/// the wire (prefix + header + body + payload).
pub fn check_frame(f: &DecodedFrame, limits: &Limits) -> u64 {
    let p = &f.head.prefix;
    assert_eq!(
        f.payload.len() as u64,
        f.head.payload_len(),
        "delivered payload length differs from the declared payload_len"
    );
    assert_eq!(f.head.payload_len(), p.payload_len);
    assert!(p.header_len > 0, "empty header accepted");
    assert!(
        p.header_len <= limits.max_header_bytes,
        "header over limit accepted"
    );
    assert!(
        p.payload_len <= limits.max_payload_bytes,
        "payload over limit accepted"
    );
    assert!(p.body_len <= limits.max_body_bytes, "body over limit accepted");
    assert_eq!(
        f.head.header.body.len() as u64,
        u64::from(p.body_len),
        "delivered body length differs from the declared body_len"
    );
    if p.flags.contains(Flags::INLINE_PAYLOAD) {
        assert!(f.head.inline_payload());
        assert!(
            p.payload_len <= limits.max_inline_payload_bytes,
            "inline payload over limit accepted"
        );
    }
    assert_eq!(
        validate_header(&f.head.header, limits),
        Ok(()),
        "delivered header fails validation"
    );
    // kind() never falls back for a validated header.
    assert_eq!(f.head.kind() as i32, f.head.header.kind);
    PREFIX_LEN as u64 + u64::from(p.header_len) + u64::from(p.body_len) + p.payload_len
}
