//! Codec errors: one variant per malformation and one per limit, each
//! carrying the limit and the value seen.

use crate::decoder::Section;
use std::fmt;

/// Why a frame could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CodecError {
    /// The frame does not start with `b"PGRP"`.
    BadMagic {
        /// The four bytes found instead.
        got: [u8; 4],
    },
    /// The prefix names a wire version this build does not speak.
    UnsupportedVersion {
        /// The version this build speaks.
        supported: u8,
        /// The version found.
        got: u8,
    },
    /// An undefined flag bit is set.
    UnknownFlags {
        /// The raw flag byte.
        got: u8,
    },
    /// The reserved prefix bytes are not zero.
    ReservedNonZero {
        /// The reserved field as found.
        got: u16,
    },
    /// `header_len` is zero; every frame has a header.
    EmptyHeader,
    /// `header_len` is over [`Limits::max_header_bytes`](crate::Limits).
    HeaderTooLarge {
        /// The configured limit.
        limit: u32,
        /// The declared header length.
        got: u32,
    },
    /// `body_len` is over [`Limits::max_body_bytes`](crate::Limits).
    BodyTooLarge {
        /// The configured limit.
        limit: u32,
        /// The declared body length.
        got: u32,
    },
    /// `payload_len` is over [`Limits::max_payload_bytes`](crate::Limits).
    PayloadTooLarge {
        /// The configured limit.
        limit: u64,
        /// The declared payload length.
        got: u64,
    },
    /// An inline payload is over
    /// [`Limits::max_inline_payload_bytes`](crate::Limits).
    InlinePayloadTooLarge {
        /// The configured limit.
        limit: u64,
        /// The declared payload length.
        got: u64,
    },
    /// The header has more metadata entries than
    /// [`Limits::max_metadata_entries`](crate::Limits).
    TooManyMetadataEntries {
        /// The configured limit.
        limit: u32,
        /// The number of entries found.
        got: u64,
    },
    /// The method name is longer than
    /// [`Limits::max_method_len`](crate::Limits).
    MethodNameTooLong {
        /// The configured limit.
        limit: u32,
        /// The method name's length in bytes.
        got: u64,
    },
    /// The header bytes are not a valid protobuf `Header`.
    MalformedHeader {
        /// prost's description of the problem.
        reason: String,
    },
    /// The header's `kind` is not one this build knows, or is
    /// `KIND_UNSPECIFIED`.
    UnknownKind {
        /// The raw enum value.
        got: i32,
    },
    /// A 32-bit integer field of the header (`kind`, `status_code`,
    /// `payload_crc32c`) arrived as a varint whose value does not fit the
    /// field's type. prost would silently truncate it (a `kind` of
    /// 2^32 + 1 would read as `REQUEST`), so it is refused instead.
    FieldOutOfRange {
        /// The header field's name as in `pagerpc.proto`.
        field: &'static str,
        /// The largest value the field takes: `i32::MAX` for an `int32`
        /// field (whose negative values, sign-extended to 64 bits, are
        /// in range too), `u32::MAX` for a `uint32` field.
        limit: u64,
        /// The raw 64-bit varint value seen.
        got: u64,
    },
    /// A request frame has an empty method name.
    MissingMethod,
    /// The input ended inside a frame.
    Truncated {
        /// Which part of the frame was cut short.
        section: Section,
        /// How many bytes that part needed.
        expected: u64,
        /// How many of them arrived.
        got: u64,
    },
}

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use CodecError::*;
        match self {
            BadMagic { got } => write!(f, "bad frame magic {got:02x?} (expected \"PGRP\")"),
            UnsupportedVersion { supported, got } if *got == 1 => write!(
                f,
                "the peer speaks pagerpc wire version 1 (this build speaks {supported}); upgrade the peer"
            ),
            UnsupportedVersion { supported, got } => {
                write!(f, "unsupported wire version {got} (this build speaks {supported})")
            }
            UnknownFlags { got } => write!(f, "unknown prefix flag bits {got:#04x}"),
            ReservedNonZero { got } => write!(f, "reserved prefix bytes are {got:#06x}, not zero"),
            EmptyHeader => write!(f, "frame has an empty header"),
            HeaderTooLarge { limit, got } => {
                write!(f, "header of {got} bytes exceeds the max_header_bytes limit of {limit}")
            }
            BodyTooLarge { limit, got } => {
                write!(f, "body of {got} bytes exceeds the max_body_bytes limit of {limit}")
            }
            PayloadTooLarge { limit, got } => {
                write!(f, "payload of {got} bytes exceeds the max_payload_bytes limit of {limit}")
            }
            InlinePayloadTooLarge { limit, got } => write!(
                f,
                "inline payload of {got} bytes exceeds the max_inline_payload_bytes limit of {limit}"
            ),
            TooManyMetadataEntries { limit, got } => write!(
                f,
                "{got} metadata entries exceed the max_metadata_entries limit of {limit}"
            ),
            MethodNameTooLong { limit, got } => write!(
                f,
                "method name of {got} bytes exceeds the max_method_len limit of {limit}"
            ),
            MalformedHeader { reason } => write!(f, "malformed header: {reason}"),
            UnknownKind { got } => write!(f, "unknown frame kind {got}"),
            FieldOutOfRange { field, limit, got } => write!(
                f,
                "header field {field} carries the varint value {got}, which does not fit its 32-bit type (limit {limit})"
            ),
            MissingMethod => write!(f, "request frame without a method name"),
            Truncated {
                section,
                expected,
                got,
            } => write!(
                f,
                "input ended inside the frame {section}: got {got} of {expected} bytes"
            ),
        }
    }
}

impl std::error::Error for CodecError {}
