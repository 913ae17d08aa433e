//! Decoder limits. Every limit has its own error variant in
//! [`CodecError`](crate::CodecError) carrying the limit and the value seen.

/// Limits a decoder enforces on every frame, and an encoder checks before
/// sending so that a frame the peer would refuse fails early and locally.
///
/// # Memory cost
/// - `max_header_bytes`: a connection that is reading a header holds a buffer
///   of up to this many bytes (default 64 KiB per connection).
/// - `max_payload_bytes`: a receiver reserves the declared payload length,
///   rounded up to 4 KiB pages, as soon as the header is decoded; pages
///   become resident as bytes arrive. One connection can therefore pin up to
///   this much memory per message it is receiving (default 256 MiB), and a
///   consumer that keeps payloads keeps that memory until it drops them.
/// - `max_body_bytes`: a message body is read with its header into one
///   buffer as its bytes arrive (default 4 MiB per connection receiving
///   one; at most [`Limits::MAX_BODY_BYTES_CEILING`], 1 GiB).
/// - `max_inline_payload_bytes`: inline payloads are read together with the
///   header into the connection's read buffer (default 16 KiB).
/// - `max_metadata_entries` and `max_method_len` bound work per header; the
///   memory they take is already bounded by `max_header_bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest header, in bytes (the body is not part of it). Default
    /// 64 KiB.
    pub max_header_bytes: u32,
    /// Largest message body, in bytes. Default 4 MiB (tonic's default
    /// message size); at most [`Limits::MAX_BODY_BYTES_CEILING`].
    pub max_body_bytes: u32,
    /// Largest payload, in bytes. Default 256 MiB.
    pub max_payload_bytes: u64,
    /// Largest payload that may be coalesced with its header. Default 16 KiB.
    pub max_inline_payload_bytes: u64,
    /// Most metadata entries in one header. Default 64.
    pub max_metadata_entries: u32,
    /// Longest method name, in bytes. Default 256.
    pub max_method_len: u32,
}

impl Limits {
    /// The default header limit: 64 KiB.
    pub const DEFAULT_MAX_HEADER_BYTES: u32 = 64 * 1024;
    /// The default body limit: 4 MiB.
    pub const DEFAULT_MAX_BODY_BYTES: u32 = 4 * 1024 * 1024;
    /// The largest body limit that may be configured: 1 GiB.
    pub const MAX_BODY_BYTES_CEILING: u32 = 1024 * 1024 * 1024;
    /// The default payload limit: 256 MiB.
    pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 256 * 1024 * 1024;
    /// The default inline payload limit: 16 KiB.
    pub const DEFAULT_MAX_INLINE_PAYLOAD_BYTES: u64 = 16 * 1024;
    /// The default metadata entry limit: 64.
    pub const DEFAULT_MAX_METADATA_ENTRIES: u32 = 64;
    /// The default method name limit: 256 bytes.
    pub const DEFAULT_MAX_METHOD_LEN: u32 = 256;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: Self::DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes: Self::DEFAULT_MAX_BODY_BYTES,
            max_payload_bytes: Self::DEFAULT_MAX_PAYLOAD_BYTES,
            max_inline_payload_bytes: Self::DEFAULT_MAX_INLINE_PAYLOAD_BYTES,
            max_metadata_entries: Self::DEFAULT_MAX_METADATA_ENTRIES,
            max_method_len: Self::DEFAULT_MAX_METHOD_LEN,
        }
    }
}
