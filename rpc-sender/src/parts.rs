//! The queue of encoded parts waiting to be written.
//!
//! A frame becomes up to two parts, each written with `MSG_EOR`: its
//! prefix and header (plus its payload when that is small enough to be
//! inlined), then its payload on its own. Consecutive head parts merge, so
//! many small frames go out in one `sendmsg`.

use std::collections::VecDeque;

use pagerpc_pages::Payload;

/// One part.
#[derive(Debug)]
pub(crate) enum Part {
    /// Encoded heads, with any inline payload bytes copied in after their
    /// head. The inline payloads themselves are kept only to be handed
    /// back if nothing of the part is written.
    Head {
        buf: Vec<u8>,
        inline: Vec<Payload>,
        /// Whether a later frame may still be appended to this part.
        open: bool,
    },
    /// A payload written as its own part.
    Payload {
        payload: Payload,
        /// Whether bytes of it have gone out with `MSG_ZEROCOPY`, and how
        /// many notification ids those calls took.
        zc: Option<ZcPart>,
        /// Whether it is to be written with `MSG_ZEROCOPY` (decided when
        /// it was queued, and said in its header when the sender marks
        /// payloads).
        zc_ok: bool,
    },
}

/// Zero-copy state of a payload part being written.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ZcPart {
    pub(crate) first: u32,
    pub(crate) count: u32,
    /// The kernel refused to pin more memory and nothing of ours was
    /// outstanding: the rest of the payload goes by copy.
    pub(crate) copy_rest: bool,
}

impl Part {
    pub(crate) fn len(&self) -> usize {
        match self {
            Part::Head { buf, .. } => buf.len(),
            Part::Payload { payload, .. } => payload.len(),
        }
    }
}

/// Parts in order, with how much of the first one was written.
#[derive(Debug, Default)]
pub(crate) struct PartQueue {
    pub(crate) parts: VecDeque<Part>,
    /// Bytes of `parts[0]` already written.
    pub(crate) written: usize,
    /// Bytes not yet written, over every part.
    pub(crate) bytes: usize,
    /// Parts completed so far (to find a part again after others left).
    pub(crate) popped: u64,
}

impl PartQueue {
    /// Appends a head (and inline payload bytes) to the open head part at
    /// the back, or starts a new head part.
    pub(crate) fn push_head(&mut self, head: &[u8], inline: Option<Payload>) {
        let extra = inline.as_ref().map_or(0, Payload::len);
        self.bytes += head.len() + extra;
        match self.parts.back_mut() {
            Some(Part::Head {
                buf,
                inline: kept,
                open: true,
            }) => {
                buf.extend_from_slice(head);
                if let Some(p) = inline {
                    buf.extend_from_slice(p.as_slice());
                    kept.push(p);
                }
            }
            _ => {
                let mut buf = Vec::with_capacity(head.len() + extra);
                buf.extend_from_slice(head);
                let mut kept = Vec::new();
                if let Some(p) = inline {
                    buf.extend_from_slice(p.as_slice());
                    kept.push(p);
                }
                self.parts.push_back(Part::Head {
                    buf,
                    inline: kept,
                    open: true,
                });
            }
        }
    }

    /// Appends a payload part.
    pub(crate) fn push_payload(&mut self, payload: Payload, zc_ok: bool) {
        self.bytes += payload.len();
        self.parts.push_back(Part::Payload {
            payload,
            zc: None,
            zc_ok,
        });
    }

    /// Stops later frames from merging into the part at the back.
    pub(crate) fn seal(&mut self) {
        if let Some(Part::Head { open, .. }) = self.parts.back_mut() {
            *open = false;
        }
    }

    /// Whether the part at `index` has not been started.
    pub(crate) fn untouched(&self, index: usize) -> bool {
        index > 0 || self.written == 0
    }

    /// Records `n` bytes written of the front part; returns the part if it
    /// is now complete.
    pub(crate) fn advance(&mut self, n: usize) -> Option<Part> {
        self.written += n;
        self.bytes -= n;
        let len = self.parts.front().map_or(0, Part::len);
        if self.written >= len {
            self.written = 0;
            self.popped += 1;
            self.parts.pop_front()
        } else {
            None
        }
    }

    /// Removes every part from `index` on, returning their payloads.
    pub(crate) fn truncate(&mut self, index: usize, out: &mut Vec<Payload>) {
        let mut removed = Vec::new();
        while self.parts.len() > index {
            let Some(part) = self.parts.pop_back() else {
                break;
            };
            let started = self.parts.is_empty() && self.written > 0;
            let left = part.len() - if started { self.written } else { 0 };
            self.bytes -= left;
            if started {
                self.written = 0;
            }
            removed.push(part);
        }
        for part in removed.into_iter().rev() {
            match part {
                Part::Head { inline, .. } => out.extend(inline),
                Part::Payload { payload, .. } => out.push(payload),
            }
        }
    }
}
