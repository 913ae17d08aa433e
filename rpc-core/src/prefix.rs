//! The fixed-size frame prefix.
//!
//! ```text
//! offset size field
//!      0    4 magic        b"PGRP"
//!      4    1 version      2
//!      5    1 flags        see [`Flags`]; unknown bits are an error
//!      6    2 reserved     must be zero
//!      8    4 header_len   u32 little-endian, bytes of the prost header
//!     12    4 body_len     u32 little-endian, bytes of the message body
//!     16    8 payload_len  u64 little-endian, bytes of payload
//! ```
//!
//! A receiver that has read these 24 bytes knows exactly how many header,
//! body and payload bytes follow, before any payload byte arrives.
//!
//! Version 1 had a 20-byte prefix without `body_len` (the body travelled
//! inside the header). A version-2 decoder refuses it with
//! [`CodecError::UnsupportedVersion`]; [`encode_v1_error`] builds the one
//! version-1 frame a version-2 peer still writes: the connection-level
//! `ERROR` that tells a version-1 peer why it is being closed.

use crate::error::CodecError;
use crate::limits::Limits;
use crate::reader::Reader;

/// The four magic bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"PGRP";
/// The only wire version this crate speaks.
pub const VERSION: u8 = 2;
/// Size of the encoded prefix in bytes.
pub const PREFIX_LEN: usize = 24;
/// Size of a version-1 prefix, for [`encode_v1_error`].
pub const V1_PREFIX_LEN: usize = 20;

/// Flag bits of the prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags(u8);

impl Flags {
    /// No flag set: the payload (if any) is sent as its own part, ended by
    /// `MSG_EOR`, starting on a fresh TCP segment, so it may be mapped.
    pub const NONE: Flags = Flags(0);
    /// The payload was coalesced into the same part as the header (small
    /// payloads). A receiver reads it together with the header; it is never
    /// mappable.
    pub const INLINE_PAYLOAD: Flags = Flags(0x01);
    /// Every defined bit.
    pub const ALL: Flags = Flags(0x01);

    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }

    /// Parses raw bits.
    ///
    /// # Errors
    /// [`CodecError::UnknownFlags`] if an undefined bit is set.
    pub const fn from_bits(bits: u8) -> Result<Flags, CodecError> {
        if bits & !Flags::ALL.0 != 0 {
            Err(CodecError::UnknownFlags { got: bits })
        } else {
            Ok(Flags(bits))
        }
    }
}

/// A decoded, validated prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prefix {
    /// Flag bits.
    pub flags: Flags,
    /// Number of header bytes that follow the prefix.
    pub header_len: u32,
    /// Number of body bytes that follow the header (in the same part).
    pub body_len: u32,
    /// Number of payload bytes that follow the body.
    pub payload_len: u64,
}

impl Prefix {
    /// Encodes the prefix into its 20 wire bytes.
    pub fn encode(&self) -> [u8; PREFIX_LEN] {
        let mut out = [0u8; PREFIX_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.flags.bits();
        // bytes 6..8 stay zero (reserved)
        out[8..12].copy_from_slice(&self.header_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.body_len.to_le_bytes());
        out[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out
    }

    /// Decodes and validates a prefix against `limits`. Nothing is allocated,
    /// so a lying length is refused before any memory is reserved for it.
    ///
    /// # Errors
    /// - [`CodecError::Truncated`] if `bytes` is shorter than [`PREFIX_LEN`];
    /// - [`CodecError::BadMagic`], [`CodecError::UnsupportedVersion`],
    ///   [`CodecError::UnknownFlags`], [`CodecError::ReservedNonZero`] for a
    ///   malformed prefix;
    /// - [`CodecError::HeaderTooLarge`], [`CodecError::BodyTooLarge`],
    ///   [`CodecError::PayloadTooLarge`] when a declared length is over its
    ///   limit;
    /// - [`CodecError::EmptyHeader`] when `header_len` is zero.
    pub fn decode(bytes: &[u8], limits: &Limits) -> Result<Prefix, CodecError> {
        let truncated = || CodecError::Truncated {
            section: crate::decoder::Section::Prefix,
            expected: PREFIX_LEN as u64,
            got: bytes.len() as u64,
        };
        let mut r = Reader::new(bytes);
        let magic: [u8; 4] = r.take_array().ok_or_else(truncated)?;
        if magic != MAGIC {
            return Err(CodecError::BadMagic { got: magic });
        }
        let version = r.u8().ok_or_else(truncated)?;
        if version != VERSION {
            return Err(CodecError::UnsupportedVersion {
                supported: VERSION,
                got: version,
            });
        }
        let flags = Flags::from_bits(r.u8().ok_or_else(truncated)?)?;
        let reserved = r.u16_le().ok_or_else(truncated)?;
        if reserved != 0 {
            return Err(CodecError::ReservedNonZero { got: reserved });
        }
        let header_len = r.u32_le().ok_or_else(truncated)?;
        let body_len = r.u32_le().ok_or_else(truncated)?;
        let payload_len = r.u64_le().ok_or_else(truncated)?;
        if header_len == 0 {
            return Err(CodecError::EmptyHeader);
        }
        if header_len > limits.max_header_bytes {
            return Err(CodecError::HeaderTooLarge {
                limit: limits.max_header_bytes,
                got: header_len,
            });
        }
        if body_len > limits.max_body_bytes {
            return Err(CodecError::BodyTooLarge {
                limit: limits.max_body_bytes,
                got: body_len,
            });
        }
        if payload_len > limits.max_payload_bytes {
            return Err(CodecError::PayloadTooLarge {
                limit: limits.max_payload_bytes,
                got: payload_len,
            });
        }
        if flags.contains(Flags::INLINE_PAYLOAD) && payload_len > limits.max_inline_payload_bytes {
            return Err(CodecError::InlinePayloadTooLarge {
                limit: limits.max_inline_payload_bytes,
                got: payload_len,
            });
        }
        Ok(Prefix {
            flags,
            header_len,
            body_len,
            payload_len,
        })
    }
}

/// Encodes a version-1 connection-level `ERROR` frame (call id 0) with
/// `status_code` and `message`: what a version-2 peer answers a version-1
/// peer before closing, so that peer reports a clear error instead of
/// waiting. Version 1 framing: a 20-byte prefix (`PGRP`, version 1, flags
/// 0, reserved 0, `header_len` u32, `payload_len` u64 = 0) and the header.
pub fn encode_v1_error(status_code: u32, message: &str) -> Vec<u8> {
    use prost::Message;
    let header = pagerpc_proto::Header {
        call_id: 0,
        kind: pagerpc_proto::Kind::Error as i32,
        status_code,
        status_message: message.to_owned(),
        ..Default::default()
    };
    let len = header.encoded_len();
    let mut out = Vec::with_capacity(V1_PREFIX_LEN + len);
    out.extend_from_slice(&MAGIC);
    out.push(1);
    out.push(0);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    header.encode_raw(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(flags: Flags, h: u32, pl: u64) -> Prefix {
        Prefix {
            flags,
            header_len: h,
            body_len: 0,
            payload_len: pl,
        }
    }

    #[test]
    fn round_trip() {
        let l = Limits::default();
        for pre in [
            p(Flags::NONE, 1, 0),
            p(Flags::INLINE_PAYLOAD, 300, 100),
            p(Flags::NONE, l.max_header_bytes, l.max_payload_bytes),
            Prefix {
                body_len: l.max_body_bytes,
                ..p(Flags::INLINE_PAYLOAD, 9, 3)
            },
        ] {
            assert_eq!(Prefix::decode(&pre.encode(), &l), Ok(pre));
        }
    }

    #[test]
    fn every_error_variant() {
        let l = Limits::default();
        let good = p(Flags::NONE, 10, 10).encode();

        let mut b = good;
        b[0] = b'X';
        assert_eq!(
            Prefix::decode(&b, &l),
            Err(CodecError::BadMagic { got: *b"XGRP" })
        );

        let mut b = good;
        b[4] = 1;
        assert_eq!(
            Prefix::decode(&b, &l),
            Err(CodecError::UnsupportedVersion {
                supported: 2,
                got: 1
            })
        );

        let mut big_body = p(Flags::NONE, 10, 0);
        big_body.body_len = l.max_body_bytes + 1;
        assert_eq!(
            Prefix::decode(&big_body.encode(), &l),
            Err(CodecError::BodyTooLarge {
                limit: l.max_body_bytes,
                got: l.max_body_bytes + 1
            })
        );

        let mut b = good;
        b[5] = 0x82;
        assert_eq!(
            Prefix::decode(&b, &l),
            Err(CodecError::UnknownFlags { got: 0x82 })
        );

        let mut b = good;
        b[7] = 1;
        assert_eq!(
            Prefix::decode(&b, &l),
            Err(CodecError::ReservedNonZero { got: 0x0100 })
        );

        assert_eq!(
            Prefix::decode(&p(Flags::NONE, 0, 0).encode(), &l),
            Err(CodecError::EmptyHeader)
        );
        assert_eq!(
            Prefix::decode(&p(Flags::NONE, l.max_header_bytes + 1, 0).encode(), &l),
            Err(CodecError::HeaderTooLarge {
                limit: l.max_header_bytes,
                got: l.max_header_bytes + 1
            })
        );
        assert_eq!(
            Prefix::decode(&p(Flags::NONE, 1, u64::MAX).encode(), &l),
            Err(CodecError::PayloadTooLarge {
                limit: l.max_payload_bytes,
                got: u64::MAX
            })
        );
        assert_eq!(
            Prefix::decode(
                &p(Flags::INLINE_PAYLOAD, 1, l.max_inline_payload_bytes + 1).encode(),
                &l
            ),
            Err(CodecError::InlinePayloadTooLarge {
                limit: l.max_inline_payload_bytes,
                got: l.max_inline_payload_bytes + 1
            })
        );
    }

    #[test]
    fn v1_error_frame_layout() {
        use prost::Message;
        let b = encode_v1_error(9, "speak version 2");
        assert_eq!(&b[..4], &MAGIC);
        assert_eq!(b[4], 1);
        let hlen = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
        assert_eq!(u64::from_le_bytes(b[12..20].try_into().unwrap()), 0);
        assert_eq!(b.len(), V1_PREFIX_LEN + hlen);
        let h = pagerpc_proto::Header::decode(&b[V1_PREFIX_LEN..]).unwrap();
        assert_eq!(h.status_code, 9);
        assert_eq!(h.status_message, "speak version 2");
        // A version-2 decoder names the version.
        assert_eq!(
            Prefix::decode(&b[..PREFIX_LEN.min(b.len())], &Limits::default()),
            Err(CodecError::UnsupportedVersion {
                supported: 2,
                got: 1
            })
        );
    }

    #[test]
    fn truncated_at_every_offset() {
        let l = Limits::default();
        let good = p(Flags::NONE, 10, 10).encode();
        for cut in 0..PREFIX_LEN {
            match Prefix::decode(&good[..cut], &l) {
                Err(CodecError::Truncated { expected, got, .. }) => {
                    assert_eq!(expected, PREFIX_LEN as u64);
                    assert_eq!(got, cut as u64);
                }
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }
}
