//! Frame heads: the validated prefix and header of one frame, and their
//! encoding.

use crate::error::CodecError;
use crate::limits::Limits;
use crate::prefix::{Flags, Prefix, PREFIX_LEN};
use pagerpc_proto::{Header, Kind};
use prost::Message;

/// The prefix and decoded header of one frame. The payload, if any, follows
/// on the wire; its length is `prefix.payload_len`.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameHead {
    /// The fixed prefix.
    pub prefix: Prefix,
    /// The decoded header.
    pub header: Header,
}

impl FrameHead {
    /// The frame's kind. Validation guarantees it is a known, specified kind.
    pub fn kind(&self) -> Kind {
        // validate_header() rejected unknown values, so this never falls back.
        Kind::try_from(self.header.kind).unwrap_or(Kind::Unspecified)
    }

    /// The call this frame belongs to.
    pub fn call_id(&self) -> u64 {
        self.header.call_id
    }

    /// Payload bytes that follow the header.
    pub fn payload_len(&self) -> u64 {
        self.prefix.payload_len
    }

    /// Whether the payload was coalesced into the header's part.
    pub fn inline_payload(&self) -> bool {
        self.prefix.flags.contains(Flags::INLINE_PAYLOAD)
    }
}

/// Checks a header against `limits` and the rules every frame obeys.
///
/// # Errors
/// - [`CodecError::UnknownKind`] for an unknown or unspecified kind;
/// - [`CodecError::MissingMethod`] for a request without a method;
/// - [`CodecError::MethodNameTooLong`], [`CodecError::TooManyMetadataEntries`]
///   when over those limits.
pub fn validate_header(header: &Header, limits: &Limits) -> Result<(), CodecError> {
    let kind = match Kind::try_from(header.kind) {
        Ok(Kind::Unspecified) | Err(_) => return Err(CodecError::UnknownKind { got: header.kind }),
        Ok(k) => k,
    };
    if header.method.len() as u64 > u64::from(limits.max_method_len) {
        return Err(CodecError::MethodNameTooLong {
            limit: limits.max_method_len,
            got: header.method.len() as u64,
        });
    }
    if kind == Kind::Request && header.method.is_empty() {
        return Err(CodecError::MissingMethod);
    }
    if header.metadata.len() as u64 > u64::from(limits.max_metadata_entries) {
        return Err(CodecError::TooManyMetadataEntries {
            limit: limits.max_metadata_entries,
            got: header.metadata.len() as u64,
        });
    }
    Ok(())
}

/// Decodes header bytes (exactly `header_len` of them) and validates them.
///
/// # Errors
/// [`CodecError::MalformedHeader`] if the bytes are not a protobuf `Header`,
/// and the errors of [`validate_header`].
pub fn decode_header(bytes: &[u8], limits: &Limits) -> Result<Header, CodecError> {
    let header = Header::decode(bytes).map_err(|e| CodecError::MalformedHeader {
        reason: e.to_string(),
    })?;
    validate_header(&header, limits)?;
    Ok(header)
}

/// Appends the prefix and header of a frame to `out`, ready to be written.
/// The payload (of `payload_len` bytes) is not written here: the sender
/// writes it as its own part, or right after the header when `flags` has
/// [`Flags::INLINE_PAYLOAD`].
///
/// Returns the number of bytes appended.
///
/// # Errors
/// The errors of [`validate_header`], and [`CodecError::HeaderTooLarge`],
/// [`CodecError::PayloadTooLarge`], [`CodecError::InlinePayloadTooLarge`]
/// when the frame is over `limits`: a frame the peer would refuse fails here,
/// before anything is sent.
pub fn encode_head(
    header: &Header,
    payload_len: u64,
    flags: Flags,
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<usize, CodecError> {
    validate_header(header, limits)?;
    let hlen = header.encoded_len();
    let header_len = u32::try_from(hlen).unwrap_or(u32::MAX);
    let prefix = Prefix {
        flags,
        header_len,
        payload_len,
    };
    // Run the receiver's own checks on what we are about to send.
    Prefix::decode(&prefix.encode(), limits)?;
    out.reserve(PREFIX_LEN + hlen);
    out.extend_from_slice(&prefix.encode());
    header
        .encode(out)
        .map_err(|e| CodecError::MalformedHeader {
            reason: e.to_string(),
        })?;
    Ok(PREFIX_LEN + hlen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pagerpc_proto::MetadataEntry;

    fn req(method: &str) -> Header {
        Header {
            call_id: 7,
            kind: Kind::Request as i32,
            method: method.into(),
            ..Default::default()
        }
    }

    #[test]
    fn header_rules() {
        let l = Limits::default();
        assert_eq!(validate_header(&req("echo"), &l), Ok(()));
        assert_eq!(
            validate_header(&req(""), &l),
            Err(CodecError::MissingMethod)
        );
        let mut h = req("x");
        h.kind = 0;
        assert_eq!(
            validate_header(&h, &l),
            Err(CodecError::UnknownKind { got: 0 })
        );
        h.kind = 99;
        assert_eq!(
            validate_header(&h, &l),
            Err(CodecError::UnknownKind { got: 99 })
        );
        let long = "m".repeat(l.max_method_len as usize + 1);
        assert_eq!(
            validate_header(&req(&long), &l),
            Err(CodecError::MethodNameTooLong {
                limit: l.max_method_len,
                got: long.len() as u64
            })
        );
        let mut h = req("x");
        h.metadata = (0..=l.max_metadata_entries)
            .map(|i| MetadataEntry {
                key: format!("k{i}"),
                value: vec![],
            })
            .collect();
        assert_eq!(
            validate_header(&h, &l),
            Err(CodecError::TooManyMetadataEntries {
                limit: l.max_metadata_entries,
                got: u64::from(l.max_metadata_entries) + 1
            })
        );
    }

    #[test]
    fn malformed_header_bytes() {
        let l = Limits::default();
        // A field header announcing a length-delimited field longer than the input.
        let err = decode_header(&[0x1a, 0x7f, b'a'], &l).unwrap_err();
        assert!(matches!(err, CodecError::MalformedHeader { .. }), "{err:?}");
    }

    #[test]
    fn encoder_refuses_what_the_peer_would_refuse() {
        let l = Limits {
            max_header_bytes: 16,
            ..Limits::default()
        };
        let mut h = req("x");
        h.body = vec![0; 100];
        let mut out = Vec::new();
        assert!(matches!(
            encode_head(&h, 0, Flags::NONE, &l, &mut out),
            Err(CodecError::HeaderTooLarge { limit: 16, .. })
        ));
        assert!(out.is_empty(), "nothing is written on failure");
    }
}
