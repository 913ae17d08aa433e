//! Frame heads: the validated prefix and header of one frame, and their
//! encoding.

use crate::error::CodecError;
use crate::limits::Limits;
use crate::prefix::{Flags, Prefix, PREFIX_LEN};
use pagerpc_proto::{Header, Kind};
use prost::Message;

/// The prefix and decoded header of one frame, with its body in
/// `header.body`. The payload, if any, follows on the wire; its length is
/// `prefix.payload_len`.
///
/// On the wire (version 2) the body is not a header field: it follows the
/// header, and its length is `prefix.body_len`. The decoder moves it into
/// `header.body` so a frame's message is found in one place.
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
/// [`CodecError::MalformedHeader`] if the bytes are not a protobuf `Header`
/// or carry the `body` field (in version 2 the body follows the header),
/// [`CodecError::FieldOutOfRange`] if a 32-bit field's varint does not fit
/// its type, and the errors of [`validate_header`].
pub fn decode_header(bytes: &[u8], limits: &Limits) -> Result<Header, CodecError> {
    let header = Header::decode(bytes).map_err(|e| CodecError::MalformedHeader {
        reason: e.to_string(),
    })?;
    if !header.body.is_empty() {
        return Err(CodecError::MalformedHeader {
            reason:
                "the header carries a body field; in wire version 2 the body follows the header"
                    .into(),
        });
    }
    // Before validate_header: a truncated kind must be reported by its raw
    // value, not as the (possibly valid) value prost truncated it to.
    check_narrow_varints(bytes)?;
    validate_header(&header, limits)?;
    Ok(header)
}

/// The header's 32-bit integer fields, which prost decodes by truncating the
/// 64-bit varint: (field number, name, largest value, signed `int32`).
const NARROW_FIELDS: [(u64, &str, u64, bool); 4] = [
    (2, "kind", i32::MAX as u64, true),
    (4, "status_code", u32::MAX as u64, false),
    (8, "payload_crc32c", u32::MAX as u64, false),
    (12, "payload_send", i32::MAX as u64, true),
];

/// Walks the top-level fields of encoded header bytes and refuses a varint
/// in one of [`NARROW_FIELDS`] whose value does not fit the field's type.
///
/// An `int32` value fits when it is at most `i32::MAX` or is a negative
/// `int32` sign-extended to 64 bits (the 10-byte encoding protobuf uses for
/// negative values); a `uint32` value fits when it is at most `u32::MAX`.
/// Every occurrence of a field is checked, not only the last one prost keeps.
/// Fields inside groups and length-delimited fields (nested messages) are
/// not top-level and are skipped, as prost skips them.
///
/// # Errors
/// [`CodecError::FieldOutOfRange`] with the raw value, or
/// [`CodecError::MalformedHeader`] if the bytes are not well-formed protobuf
/// (prost has already refused those, so this is only a safety net).
fn check_narrow_varints(mut bytes: &[u8]) -> Result<(), CodecError> {
    let malformed = |what: &str| CodecError::MalformedHeader {
        reason: format!("header field walk: {what}"),
    };
    let mut group_depth = 0usize;
    while !bytes.is_empty() {
        let key = read_varint(&mut bytes).ok_or_else(|| malformed("bad field key"))?;
        let (number, wire_type) = (key >> 3, key & 7);
        let skip = match wire_type {
            0 => {
                let value = read_varint(&mut bytes).ok_or_else(|| malformed("bad varint"))?;
                if group_depth == 0 {
                    if let Some(&(_, field, limit, signed)) =
                        NARROW_FIELDS.iter().find(|f| f.0 == number)
                    {
                        let negative_int32 = signed && value >= i64::from(i32::MIN) as u64;
                        if value > limit && !negative_int32 {
                            return Err(CodecError::FieldOutOfRange {
                                field,
                                limit,
                                got: value,
                            });
                        }
                    }
                }
                0
            }
            1 => 8,
            2 => read_varint(&mut bytes).ok_or_else(|| malformed("bad length"))?,
            3 => {
                group_depth += 1;
                0
            }
            4 => {
                group_depth = group_depth
                    .checked_sub(1)
                    .ok_or_else(|| malformed("unmatched end group"))?;
                0
            }
            5 => 4,
            _ => return Err(malformed("invalid wire type")),
        };
        let skip = usize::try_from(skip)
            .ok()
            .filter(|&n| n <= bytes.len())
            .ok_or_else(|| malformed("field runs past the end"))?;
        bytes = &bytes[skip..];
    }
    if group_depth != 0 {
        return Err(malformed("unterminated group"));
    }
    Ok(())
}

/// Reads one protobuf varint (at most 10 bytes, the 10th at most 1) from
/// the front of `bytes` and advances past it. `None` if it is cut short or
/// overflows 64 bits.
fn read_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        if i == 9 && b > 1 {
            return None;
        }
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            *bytes = &bytes[i + 1..];
            return Some(value);
        }
    }
    None
}

/// The checks [`encode_head`] makes for a frame with a separate payload of
/// `payload_len` bytes, without encoding anything: a caller that must know
/// before queueing whether the peer would accept a frame (a server checking
/// a reply against the client's limits) asks this.
///
/// # Errors
/// As [`encode_head`].
pub fn check_head(header: &Header, payload_len: u64, limits: &Limits) -> Result<(), CodecError> {
    validate_header(header, limits)?;
    let body = header.body.len();
    let body_field = if body == 0 {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(body as u64) + body
    };
    let hlen = header.encoded_len() - body_field;
    if body as u64 > u64::from(limits.max_body_bytes) {
        return Err(CodecError::BodyTooLarge {
            limit: limits.max_body_bytes,
            got: u32::try_from(body).unwrap_or(u32::MAX),
        });
    }
    let prefix = Prefix {
        flags: Flags::NONE,
        header_len: u32::try_from(hlen).unwrap_or(u32::MAX),
        body_len: body as u32,
        payload_len,
    };
    Prefix::decode(&prefix.encode(), limits).map(|_| ())
}

/// Appends the prefix, header and body of a frame to `out`, ready to be
/// written. The payload (of `payload_len` bytes) is not written here: the
/// sender writes it as its own part, or right after the body when `flags`
/// has [`Flags::INLINE_PAYLOAD`].
///
/// The body is `header.body`: it is written after the header, not inside
/// it, and counts against `max_body_bytes`, not `max_header_bytes`.
///
/// Returns the number of bytes appended.
///
/// # Errors
/// The errors of [`validate_header`], and [`CodecError::HeaderTooLarge`],
/// [`CodecError::BodyTooLarge`], [`CodecError::PayloadTooLarge`],
/// [`CodecError::InlinePayloadTooLarge`] when the frame is over `limits`: a
/// frame the peer would refuse fails here, before anything is sent. Nothing
/// is appended on failure.
pub fn encode_head(
    header: &Header,
    payload_len: u64,
    flags: Flags,
    limits: &Limits,
    out: &mut Vec<u8>,
) -> Result<usize, CodecError> {
    validate_header(header, limits)?;
    let body = header.body.as_slice();
    // The header's encoding without its body field (tag 9, the last one).
    let body_field = if body.is_empty() {
        0
    } else {
        1 + prost::encoding::encoded_len_varint(body.len() as u64) + body.len()
    };
    let hlen = header.encoded_len() - body_field;
    let prefix = Prefix {
        flags,
        header_len: u32::try_from(hlen).unwrap_or(u32::MAX),
        body_len: u32::try_from(body.len()).unwrap_or(u32::MAX),
        payload_len,
    };
    // Run the receiver's own checks on what we are about to send.
    if body.len() as u64 > u64::from(limits.max_body_bytes) {
        return Err(CodecError::BodyTooLarge {
            limit: limits.max_body_bytes,
            got: prefix.body_len,
        });
    }
    Prefix::decode(&prefix.encode(), limits)?;
    let start = out.len();
    out.reserve(PREFIX_LEN + hlen + body.len());
    out.extend_from_slice(&prefix.encode());
    encode_fields_but_body(header, out);
    if out.len() - start != PREFIX_LEN + hlen {
        // A field encode_fields_but_body does not know (it is checked
        // against prost in the tests): take the slow, always right way.
        out.truncate(start + PREFIX_LEN);
        let mut bare = header.clone();
        bare.body = Vec::new();
        bare.encode_raw(out);
    }
    out.extend_from_slice(body);
    Ok(out.len() - start)
}

/// Encodes every field of `header` except `body`, in field order, exactly
/// as prost would: prost's encoding of the header with an empty body,
/// without cloning the body. Fields after `body` (tag 9) are written after
/// the ones before it, as prost does.
fn encode_fields_but_body(header: &Header, out: &mut Vec<u8>) {
    use prost::encoding as enc;
    if header.call_id != 0 {
        enc::uint64::encode(1, &header.call_id, out);
    }
    if header.kind != 0 {
        enc::int32::encode(2, &header.kind, out);
    }
    if !header.method.is_empty() {
        enc::string::encode(3, &header.method, out);
    }
    if header.status_code != 0 {
        enc::uint32::encode(4, &header.status_code, out);
    }
    if !header.status_message.is_empty() {
        enc::string::encode(5, &header.status_message, out);
    }
    if header.deadline_us != 0 {
        enc::uint64::encode(6, &header.deadline_us, out);
    }
    for m in &header.metadata {
        enc::message::encode(7, m, out);
    }
    if let Some(crc) = header.payload_crc32c {
        enc::uint32::encode(8, &crc, out);
    }
    // (tag 9, body, travels after the header)
    if header.credit != 0 {
        enc::uint64::encode(10, &header.credit, out);
    }
    if header.client_stream {
        enc::bool::encode(11, &header.client_stream, out);
    }
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
    fn varint_reader() {
        let mut b: &[u8] = &[0x81, 0x80, 0x80, 0x80, 0x10, 0xAA];
        assert_eq!(read_varint(&mut b), Some((1 << 32) + 1));
        assert_eq!(b, &[0xAA]);
        let mut b: &[u8] = &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert_eq!(read_varint(&mut b), Some(u64::MAX));
        assert!(b.is_empty());
        // An 11th byte, a 10th byte over 1, and a cut-short varint.
        assert_eq!(read_varint(&mut &[0xff; 11][..]), None);
        assert_eq!(
            read_varint(&mut &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02][..]),
            None
        );
        assert_eq!(read_varint(&mut &[0x80][..]), None);
    }

    #[test]
    fn narrow_field_walk_skips_other_wire_types() {
        // call_id (varint), a fixed64 field 10, a fixed32 field 11, method
        // (len-delimited), then kind = 2^31 (out of range for int32).
        let mut b = vec![0x08, 0x05, 10 << 3 | 1];
        b.extend_from_slice(&[0x10; 8]); // fixed64 bytes that look like kind keys
        b.push(11 << 3 | 5);
        b.extend_from_slice(&[0x10; 4]);
        b.extend_from_slice(&[0x1a, 0x02, 0x10, 0xff]);
        assert_eq!(check_narrow_varints(&b), Ok(()));
        b.extend_from_slice(&[0x10, 0x80, 0x80, 0x80, 0x80, 0x08]);
        assert_eq!(
            check_narrow_varints(&b),
            Err(CodecError::FieldOutOfRange {
                field: "kind",
                limit: i32::MAX as u64,
                got: 1 << 31
            })
        );
        // Unbalanced groups are malformed.
        assert!(matches!(
            check_narrow_varints(&[20 << 3 | 3]),
            Err(CodecError::MalformedHeader { .. })
        ));
        assert!(matches!(
            check_narrow_varints(&[20 << 3 | 4]),
            Err(CodecError::MalformedHeader { .. })
        ));
    }

    #[test]
    fn encoder_refuses_what_the_peer_would_refuse() {
        let l = Limits {
            max_header_bytes: 16,
            ..Limits::default()
        };
        let mut out = Vec::new();
        assert!(matches!(
            encode_head(&req(&"x".repeat(100)), 0, Flags::NONE, &l, &mut out),
            Err(CodecError::HeaderTooLarge { limit: 16, .. })
        ));
        assert!(out.is_empty(), "nothing is written on failure");
        // The body does not count against the header limit, but against
        // its own.
        let mut h = req("x");
        h.body = vec![0; 100];
        assert!(encode_head(&h, 0, Flags::NONE, &l, &mut out).is_ok());
        out.clear();
        let small_body = Limits {
            max_body_bytes: 99,
            ..Limits::default()
        };
        assert_eq!(
            encode_head(&h, 0, Flags::NONE, &small_body, &mut out),
            Err(CodecError::BodyTooLarge {
                limit: 99,
                got: 100
            })
        );
        assert!(out.is_empty(), "nothing is written on failure");
    }

    #[test]
    fn body_follows_the_header_and_comes_back_in_it() {
        let l = Limits::default();
        let h = Header {
            call_id: u64::MAX,
            kind: Kind::Error as i32,
            method: "m".into(),
            status_code: 7,
            status_message: "no".into(),
            deadline_us: 12,
            metadata: vec![MetadataEntry {
                key: "k".into(),
                value: vec![1, 2],
            }],
            payload_crc32c: Some(0),
            body: vec![0xb0; 300],
            credit: 1 << 40,
            client_stream: true,
            payload_send: pagerpc_proto::PayloadSend::Zerocopy as i32,
        };
        let mut out = Vec::new();
        let n = encode_head(&h, 5, Flags::INLINE_PAYLOAD, &l, &mut out).unwrap();
        assert_eq!(n, out.len());
        let prefix = Prefix::decode(&out[..PREFIX_LEN], &l).unwrap();
        assert_eq!(prefix.body_len, 300);
        let hl = prefix.header_len as usize;
        // The header bytes are prost's encoding of the header without body.
        let mut bare = h.clone();
        bare.body.clear();
        assert_eq!(&out[PREFIX_LEN..PREFIX_LEN + hl], bare.encode_to_vec());
        assert_eq!(&out[PREFIX_LEN + hl..], &h.body[..]);
        // A header that carries the body field itself is refused.
        let err = decode_header(&h.encode_to_vec(), &l).unwrap_err();
        assert!(matches!(err, CodecError::MalformedHeader { .. }), "{err:?}");
    }
}
