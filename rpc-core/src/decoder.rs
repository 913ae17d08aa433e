//! The receive state machine.
//!
//! [`FrameDecoder`] tracks where a connection is inside the current frame:
//! reading the prefix, the header, or the payload. The I/O layer asks it
//! what it [`need`](FrameDecoder::need)s, feeds it prefix and header bytes
//! with [`feed`](FrameDecoder::feed), and reports payload bytes it has placed
//! (mapped or copied) with [`payload_received`](FrameDecoder::payload_received).
//! The decoder never sees payload bytes, so the I/O layer is free to map them
//! or read them straight into their final pages.
//!
//! [`decode_stream`] runs the same machine over a byte slice; tests and the
//! fuzzers use it.

use crate::error::CodecError;
use crate::frame::{decode_header, FrameHead};
use crate::limits::Limits;
use crate::prefix::{Prefix, PREFIX_LEN};
use std::fmt;

/// The parts of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Section {
    /// The fixed 24-byte prefix.
    Prefix,
    /// The prost header.
    Header,
    /// The message body that follows the header.
    Body,
    /// The payload.
    Payload,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Section::Prefix => "prefix",
            Section::Header => "header",
            Section::Body => "body",
            Section::Payload => "payload",
        })
    }
}

/// What the decoder needs next, and how many bytes of it are still missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Prefix bytes (at most [`PREFIX_LEN`]).
    Prefix(usize),
    /// Header and body bytes; `inline_payload` more payload bytes follow
    /// them in the same part and may be read in the same call.
    Header {
        /// Header and body bytes still missing.
        remaining: usize,
        /// Length of an inline payload that follows, 0 if none.
        inline_payload: u64,
    },
    /// Payload bytes of the current frame.
    Payload {
        /// Payload bytes still missing.
        remaining: u64,
        /// The payload's total length.
        total: u64,
    },
    /// A previous error ended the stream; nothing more is accepted.
    Failed,
}

#[derive(Debug)]
enum State {
    Prefix {
        buf: [u8; PREFIX_LEN],
        have: usize,
    },
    /// Reading the header into `buf`, then the body into `body` (its own
    /// buffer, so it is handed over without a copy).
    Header {
        prefix: Prefix,
        buf: Vec<u8>,
        body: Vec<u8>,
    },
    Payload {
        remaining: u64,
        total: u64,
    },
    Failed(CodecError),
}

/// A resumable frame decoder for one direction of one connection.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    state: State,
}

impl FrameDecoder {
    /// A decoder at the start of a stream, enforcing `limits`.
    pub fn new(limits: Limits) -> FrameDecoder {
        FrameDecoder {
            limits,
            state: State::Prefix {
                buf: [0; PREFIX_LEN],
                have: 0,
            },
        }
    }

    /// The limits this decoder enforces.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Changes the limits. They apply from the next prefix on; a frame
    /// whose prefix was already checked keeps the limits it was checked
    /// against. A server tightens them until a peer authenticates.
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// What the decoder needs next.
    pub fn need(&self) -> Need {
        match &self.state {
            State::Prefix { have, .. } => Need::Prefix(PREFIX_LEN - have),
            State::Header { prefix, buf, body } => Need::Header {
                remaining: head_len(prefix) - buf.len() - body.len(),
                inline_payload: if prefix.flags.contains(crate::Flags::INLINE_PAYLOAD) {
                    prefix.payload_len
                } else {
                    0
                },
            },
            State::Payload { remaining, total } => Need::Payload {
                remaining: *remaining,
                total: *total,
            },
            State::Failed(_) => Need::Failed,
        }
    }

    /// Whether the stream is between frames (so an end of stream here is a
    /// clean close).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Prefix { have: 0, .. })
    }

    /// Feeds prefix or header bytes. Consumes at most up to the end of the
    /// current frame's header, and returns how many bytes it consumed and,
    /// once the header is complete, the frame's head. After a head with a
    /// non-zero payload length the decoder expects payload bytes, reported
    /// with [`payload_received`](Self::payload_received); `feed` consumes
    /// nothing until then.
    ///
    /// # Errors
    /// Any [`CodecError`] from the prefix or header. The error is sticky:
    /// the stream cannot be resynchronised, and every later call returns it.
    pub fn feed(&mut self, input: &[u8]) -> Result<(usize, Option<FrameHead>), CodecError> {
        let mut used = 0;
        loop {
            match &mut self.state {
                State::Failed(e) => return Err(e.clone()),
                State::Payload { .. } => return Ok((used, None)),
                State::Prefix { buf, have } => {
                    let n = (PREFIX_LEN - *have).min(input.len() - used);
                    buf[*have..*have + n].copy_from_slice(&input[used..used + n]);
                    *have += n;
                    used += n;
                    if *have < PREFIX_LEN {
                        return Ok((used, None));
                    }
                    match Prefix::decode(buf, &self.limits) {
                        Ok(prefix) => {
                            // Bounded by max_header_bytes, checked just
                            // above; a body grows its buffer only as its
                            // bytes arrive.
                            let buf = Vec::with_capacity(prefix.header_len as usize);
                            self.state = State::Header {
                                prefix,
                                buf,
                                body: Vec::new(),
                            };
                        }
                        Err(e) => return Err(self.fail(e)),
                    }
                }
                State::Header { prefix, buf, body } => {
                    let hl = prefix.header_len as usize;
                    let into_header = (hl - buf.len()).min(input.len() - used);
                    buf.extend_from_slice(&input[used..used + into_header]);
                    used += into_header;
                    let want = prefix.body_len as usize - body.len();
                    let n = want.min(input.len() - used);
                    if n > 0 {
                        if body.is_empty() {
                            body.reserve(want.min(64 * 1024));
                        }
                        body.extend_from_slice(&input[used..used + n]);
                        used += n;
                    }
                    if buf.len() < hl || n < want {
                        return Ok((used, None));
                    }
                    let prefix = *prefix;
                    let body = std::mem::take(body);
                    match decode_header(buf, &self.limits) {
                        Ok(mut header) => {
                            header.body = body;
                            self.state = if prefix.payload_len == 0 {
                                Self::fresh()
                            } else {
                                State::Payload {
                                    remaining: prefix.payload_len,
                                    total: prefix.payload_len,
                                }
                            };
                            return Ok((used, Some(FrameHead { prefix, header })));
                        }
                        Err(e) => return Err(self.fail(e)),
                    }
                }
            }
        }
    }

    /// Records that `n` payload bytes of the current frame were placed.
    /// Returns `true` when that completed the payload.
    ///
    /// # Panics
    /// If the decoder is not in a payload or `n` is more than remains: both
    /// are bugs in the caller, never caused by peer data.
    pub fn payload_received(&mut self, n: u64) -> bool {
        match &mut self.state {
            State::Payload { remaining, .. } if n <= *remaining => {
                *remaining -= n;
                if *remaining == 0 {
                    self.state = Self::fresh();
                    true
                } else {
                    false
                }
            }
            other => panic!("payload_received({n}) in state {other:?}"),
        }
    }

    /// Checks that the stream may end here.
    ///
    /// # Errors
    /// [`CodecError::Truncated`] naming the section that was cut short, or
    /// the sticky error of an earlier failure.
    pub fn finish(&self) -> Result<(), CodecError> {
        match &self.state {
            State::Prefix { have: 0, .. } => Ok(()),
            State::Prefix { have, .. } => Err(CodecError::Truncated {
                section: Section::Prefix,
                expected: PREFIX_LEN as u64,
                got: *have as u64,
            }),
            State::Header { prefix, buf, .. } if buf.len() < prefix.header_len as usize => {
                Err(CodecError::Truncated {
                    section: Section::Header,
                    expected: u64::from(prefix.header_len),
                    got: buf.len() as u64,
                })
            }
            State::Header { prefix, body, .. } => Err(CodecError::Truncated {
                section: Section::Body,
                expected: u64::from(prefix.body_len),
                got: body.len() as u64,
            }),
            State::Payload { remaining, total } => Err(CodecError::Truncated {
                section: Section::Payload,
                expected: *total,
                got: total - remaining,
            }),
            State::Failed(e) => Err(e.clone()),
        }
    }

    /// The prefix of the frame whose header or body is being read, if one
    /// is: a receiver reserves memory for the body from it before the body
    /// arrives.
    pub fn pending_prefix(&self) -> Option<&Prefix> {
        match &self.state {
            State::Header { prefix, .. } => Some(prefix),
            _ => None,
        }
    }

    fn fresh() -> State {
        State::Prefix {
            buf: [0; PREFIX_LEN],
            have: 0,
        }
    }

    fn fail(&mut self, e: CodecError) -> CodecError {
        self.state = State::Failed(e.clone());
        e
    }
}

/// Header plus body bytes of a frame: what is read into one buffer.
fn head_len(prefix: &Prefix) -> usize {
    prefix.header_len as usize + prefix.body_len as usize
}

/// One whole frame decoded from a byte slice.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodedFrame {
    /// Prefix and header.
    pub head: FrameHead,
    /// The complete payload.
    pub payload: Vec<u8>,
}

/// The result of [`decode_stream`].
#[derive(Clone, Debug, PartialEq)]
pub struct StreamOutcome {
    /// Every frame that arrived whole, in order.
    pub frames: Vec<DecodedFrame>,
    /// Why decoding stopped, if the input did not end on a frame boundary or
    /// held a bad frame. A frame cut short is never in `frames`.
    pub error: Option<CodecError>,
}

/// Decodes a whole byte stream, as a receiver would see it, split into reads
/// at the given `chunks` sizes (cycled; an empty list means one read).
/// Payload buffers grow only with bytes that actually arrived, so a lying
/// length costs nothing.
pub fn decode_stream(input: &[u8], limits: Limits, chunks: &[usize]) -> StreamOutcome {
    let mut dec = FrameDecoder::new(limits);
    let mut frames = Vec::new();
    let mut current: Option<(FrameHead, Vec<u8>)> = None;
    let mut pos = 0;
    let mut chunk_idx = 0;
    while pos < input.len() {
        let step = match chunks.get(chunk_idx % chunks.len().max(1)) {
            Some(&c) => c.max(1),
            None => input.len(),
        };
        chunk_idx += 1;
        let mut read = &input[pos..(pos + step).min(input.len())];
        pos += read.len();
        while !read.is_empty() {
            if let Need::Payload { remaining, .. } = dec.need() {
                let n = (remaining.min(read.len() as u64)) as usize;
                if let Some((_, payload)) = current.as_mut() {
                    payload.extend_from_slice(&read[..n]);
                }
                read = &read[n..];
                if dec.payload_received(n as u64) {
                    if let Some((head, payload)) = current.take() {
                        frames.push(DecodedFrame { head, payload });
                    }
                }
                continue;
            }
            match dec.feed(read) {
                Ok((used, head)) => {
                    read = &read[used..];
                    if let Some(head) = head {
                        if head.payload_len() == 0 {
                            frames.push(DecodedFrame {
                                head,
                                payload: Vec::new(),
                            });
                        } else {
                            current = Some((head, Vec::new()));
                        }
                    }
                }
                Err(error) => {
                    return StreamOutcome {
                        frames,
                        error: Some(error),
                    }
                }
            }
        }
    }
    StreamOutcome {
        frames,
        error: dec.finish().err(),
    }
}
