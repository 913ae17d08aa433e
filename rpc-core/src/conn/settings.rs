//! The SETTINGS frame: the limits one side enforces on what it receives,
//! announced to its peer right after connecting (after AUTH where a key is
//! set), so the peer can refuse an oversized call locally instead of being
//! refused.

use crate::Limits;
use pagerpc_proto::Settings;

/// What a peer announced, with the documented defaults for what it left
/// out (a field of 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerSettings {
    /// The peer's receive limits.
    pub limits: Limits,
    /// Calls (streams included) it accepts in flight; `None` if it did
    /// not say.
    pub max_inflight: Option<u32>,
    /// Bytes of stream messages it accepts on one stream before it gives
    /// credit back.
    pub stream_window: u64,
    /// Bytes of separate payloads it accepts in flight on the connection
    /// (sent, not yet read out of its socket) before it gives credit back;
    /// 0 if it announced none (then nothing limits them).
    pub conn_window: u64,
}

/// The stream window assumed when a peer announces none: 8 MiB.
pub const DEFAULT_STREAM_WINDOW: u64 = 8 << 20;

/// The connection payload window a pagerpc endpoint announces by default:
/// 2 MiB (see `docs/wire-format.md`, "Connection credit").
pub const DEFAULT_CONN_WINDOW: u64 = 2 << 20;

impl Default for PeerSettings {
    fn default() -> Self {
        PeerSettings {
            limits: Limits::default(),
            max_inflight: None,
            stream_window: DEFAULT_STREAM_WINDOW,
            conn_window: 0,
        }
    }
}

impl PeerSettings {
    /// Settings announcing `limits`, `max_inflight` and `stream_window`.
    pub fn new(limits: Limits, max_inflight: Option<u32>, stream_window: u64) -> PeerSettings {
        PeerSettings {
            limits,
            max_inflight,
            stream_window,
            conn_window: 0,
        }
    }

    /// The same, announcing a connection payload window of `bytes`.
    pub fn with_conn_window(mut self, bytes: u64) -> PeerSettings {
        self.conn_window = bytes;
        self
    }

    /// The message sent in a SETTINGS frame's body.
    pub fn to_proto(&self) -> Settings {
        let l = &self.limits;
        Settings {
            max_header_bytes: l.max_header_bytes,
            max_body_bytes: l.max_body_bytes,
            max_payload_bytes: l.max_payload_bytes,
            max_inline_payload_bytes: l.max_inline_payload_bytes,
            max_metadata_entries: l.max_metadata_entries,
            max_method_len: l.max_method_len,
            max_inflight: self.max_inflight.unwrap_or(0),
            stream_window: self.stream_window,
            conn_window: self.conn_window,
        }
    }

    /// What a received SETTINGS message announces; a field of 0 keeps the
    /// default.
    pub fn from_proto(s: &Settings) -> PeerSettings {
        let d = Limits::default();
        let pick32 = |v: u32, def: u32| if v == 0 { def } else { v };
        let pick64 = |v: u64, def: u64| if v == 0 { def } else { v };
        PeerSettings {
            limits: Limits {
                max_header_bytes: pick32(s.max_header_bytes, d.max_header_bytes),
                max_body_bytes: pick32(s.max_body_bytes, d.max_body_bytes),
                max_payload_bytes: pick64(s.max_payload_bytes, d.max_payload_bytes),
                // 0 is a meaningful inline limit (none inline), but a peer
                // that says nothing gets the default.
                max_inline_payload_bytes: pick64(
                    s.max_inline_payload_bytes,
                    d.max_inline_payload_bytes,
                ),
                max_metadata_entries: pick32(s.max_metadata_entries, d.max_metadata_entries),
                max_method_len: pick32(s.max_method_len, d.max_method_len),
            },
            max_inflight: (s.max_inflight != 0).then_some(s.max_inflight),
            stream_window: pick64(s.stream_window, DEFAULT_STREAM_WINDOW),
            conn_window: s.conn_window,
        }
    }

    /// Decodes a SETTINGS frame's body.
    ///
    /// # Errors
    /// prost's error for bytes that are not a `Settings` message.
    pub fn decode(body: &[u8]) -> Result<PeerSettings, prost::DecodeError> {
        use prost::Message;
        Settings::decode(body).map(|s| PeerSettings::from_proto(&s))
    }

    /// Encodes the body of a SETTINGS frame.
    pub fn encode(&self) -> Vec<u8> {
        use prost::Message;
        self.to_proto().encode_to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() {
        let s = PeerSettings::new(
            Limits {
                max_body_bytes: 16 << 20,
                ..Limits::default()
            },
            Some(7),
            1 << 20,
        )
        .with_conn_window(3 << 20);
        assert_eq!(PeerSettings::decode(&s.encode()).unwrap(), s);
        assert_eq!(PeerSettings::decode(&[]).unwrap(), PeerSettings::default());
    }
}
