//! The receive state machine (`FrameDecoder` through `decode_stream`, and
//! driven directly the way a receiver does) on arbitrary byte streams.
//!
//! Input layout: byte 0 picks the limit set (bits 0-1) and the number of
//! chunk sizes (bits 2-4); that many bytes give the chunk sizes; the rest is
//! the stream.
//!
//! Invariants: never panics; every delivered frame's payload has its
//! declared `payload_len` and is the exact bytes of the stream at its
//! offset; frames obey the limits; decoding does not depend on how the
//! stream is split into reads (one read, the fuzzed chunking, one byte at a
//! time, and reads sized by `need()` all give the same frames and the same
//! error); errors are sticky; a clean end consumed the whole stream; frames
//! re-encoded with `encode_head` decode to themselves; looser limits accept
//! at least the frames tighter ones accept.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pagerpc_core::{
    decode_stream, encode_head, CodecError, DecodedFrame, FrameDecoder, Limits, Need, Section,
    StreamOutcome, PREFIX_LEN,
};
use pagerpc_fuzz::{all_limits, check_frame, tighter_or_equal};

fn chunk_size(b: u8) -> usize {
    if b < 0xC0 {
        usize::from(b % 64) + 1
    } else {
        usize::from(b - 0xBF) * 97
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let all = all_limits();
    let limits = all[usize::from(ctl & 3)];
    let n_chunks = usize::from((ctl >> 2) & 7).min(rest.len());
    let (chunk_bytes, stream) = rest.split_at(n_chunks);
    let chunks: Vec<usize> = chunk_bytes.iter().map(|&b| chunk_size(b)).collect();

    let whole = decode_stream(stream, limits, &[]);
    check_outcome(stream, &limits, &whole);

    let chunked = decode_stream(stream, limits, &chunks);
    assert_eq!(chunked, whole, "result depends on the chunking {chunks:?}");
    let bytewise = decode_stream(stream, limits, &[1]);
    assert_eq!(
        bytewise, whole,
        "result differs when fed one byte at a time"
    );
    let driven = drive_by_need(stream, limits, &chunks);
    assert_eq!(
        driven, whole,
        "result differs when reads are sized by need()"
    );

    reencode(&whole.frames, &limits);

    // Looser limits accept at least what tighter ones accepted.
    for loose in &all {
        if tighter_or_equal(&limits, loose) {
            let other = decode_stream(stream, *loose, &chunks);
            assert!(other.frames.len() >= whole.frames.len());
            for (a, b) in whole.frames.iter().zip(&other.frames) {
                assert_eq!(a.head.header, b.head.header);
                assert_eq!(a.head.prefix, b.head.prefix);
                assert_eq!(a.payload, b.payload);
            }
        }
    }
});

/// Frame invariants, payload bytes at the right offsets, and the error's
/// consistency with how much of the stream the frames used.
fn check_outcome(stream: &[u8], limits: &Limits, out: &StreamOutcome) {
    let mut off = 0u64;
    for f in &out.frames {
        let size = check_frame(f, limits);
        let body_at = (off + PREFIX_LEN as u64 + u64::from(f.head.prefix.header_len)) as usize;
        assert_eq!(
            &f.head.header.body[..],
            &stream[body_at..body_at + f.head.header.body.len()],
            "body bytes are not the stream's bytes"
        );
        let pay_at = body_at + f.head.header.body.len();
        assert_eq!(
            &f.payload[..],
            &stream[pay_at..pay_at + f.payload.len()],
            "payload bytes are not the stream's bytes"
        );
        off += size;
    }
    let len = stream.len() as u64;
    assert!(off <= len);
    match &out.error {
        None => assert_eq!(off, len, "clean end but bytes left over"),
        Some(CodecError::Truncated {
            section,
            expected,
            got,
        }) => {
            assert!(got < expected, "truncated with nothing missing");
            match section {
                Section::Prefix => {
                    assert_eq!(*expected, PREFIX_LEN as u64);
                    assert_eq!(off + got, len);
                }
                Section::Header => assert_eq!(off + PREFIX_LEN as u64 + got, len),
                // A body or payload follows a header of at least one byte.
                Section::Body | Section::Payload => {
                    assert!(off + PREFIX_LEN as u64 + got < len)
                }
            }
        }
        Some(e) => {
            assert!(off < len, "error {e:?} with no bytes after the last frame");
            let _ = e.to_string();
        }
    }
}

/// Drives a `FrameDecoder` the way the receiver does: it asks `need()` and
/// never hands over more than is needed (nor more than the current read).
fn drive_by_need(stream: &[u8], limits: Limits, chunks: &[usize]) -> StreamOutcome {
    let mut dec = FrameDecoder::new(limits);
    assert!(dec.at_boundary());
    assert_eq!(dec.need(), Need::Prefix(PREFIX_LEN));
    let mut frames = Vec::new();
    let mut current = None;
    let mut pos = 0;
    let mut ci = 0;
    while pos < stream.len() {
        let mut read_len = chunks
            .get(ci % chunks.len().max(1))
            .copied()
            .unwrap_or(usize::MAX);
        ci += 1;
        read_len = read_len.min(stream.len() - pos);
        let mut read = &stream[pos..pos + read_len];
        pos += read_len;
        while !read.is_empty() {
            match dec.need() {
                Need::Failed => unreachable!("failed decoder not left"),
                Need::Payload { remaining, total } => {
                    assert!(remaining > 0 && remaining <= total);
                    let n = remaining.min(read.len() as u64) as usize;
                    let frame: &mut DecodedFrame =
                        current.as_mut().expect("payload without a head");
                    assert_eq!(
                        frame.head.payload_len() - frame.payload.len() as u64,
                        remaining
                    );
                    frame.payload.extend_from_slice(&read[..n]);
                    read = &read[n..];
                    if dec.payload_received(n as u64) {
                        frames.push(current.take().unwrap());
                        assert!(dec.at_boundary());
                    } else {
                        assert!(!dec.at_boundary());
                    }
                }
                need => {
                    let want = match need {
                        Need::Prefix(n) => {
                            assert!(n > 0 && n <= PREFIX_LEN);
                            n
                        }
                        Need::Header { remaining, .. } => {
                            assert!(remaining > 0);
                            remaining
                        }
                        _ => unreachable!(),
                    };
                    let give = want.min(read.len());
                    match dec.feed(&read[..give]) {
                        Ok((used, head)) => {
                            assert_eq!(used, give, "feed left needed bytes unused");
                            read = &read[used..];
                            // Feeding nothing changes nothing.
                            assert_eq!(dec.feed(&[]), Ok((0, None)));
                            if let Some(head) = head {
                                if head.payload_len() == 0 {
                                    frames.push(DecodedFrame {
                                        head,
                                        payload: Vec::new(),
                                    });
                                    assert!(dec.at_boundary());
                                } else {
                                    assert!(matches!(
                                        dec.need(),
                                        Need::Payload { remaining, total }
                                            if remaining == total && total == head.payload_len()
                                    ));
                                    // No prefix or header bytes are taken during a payload.
                                    assert_eq!(dec.feed(read), Ok((0, None)));
                                    current = Some(DecodedFrame {
                                        head,
                                        payload: Vec::new(),
                                    });
                                }
                            }
                        }
                        Err(error) => {
                            // Sticky.
                            assert_eq!(dec.need(), Need::Failed);
                            assert_eq!(dec.feed(b"PGRP").as_ref(), Err(&error));
                            assert_eq!(dec.finish().as_ref(), Err(&error));
                            return StreamOutcome {
                                frames,
                                error: Some(error),
                            };
                        }
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

/// Re-encodes the delivered frames and checks they decode to themselves.
fn reencode(frames: &[DecodedFrame], limits: &Limits) {
    let mut wire = Vec::new();
    for f in frames {
        let p = &f.head.prefix;
        match encode_head(&f.head.header, p.payload_len, p.flags, limits, &mut wire) {
            Ok(_) => wire.extend_from_slice(&f.payload),
            // The canonical header encoding can differ in size from the one
            // received; only a larger one may be refused, and only for size.
            Err(CodecError::HeaderTooLarge { limit, got }) if got > limit => return,
            Err(e) => panic!("encode_head refused a decoded frame: {e:?}"),
        }
    }
    let again = decode_stream(&wire, *limits, &[]);
    assert_eq!(again.error, None);
    assert_eq!(again.frames.len(), frames.len());
    for (a, b) in again.frames.iter().zip(frames) {
        assert_eq!(a.head.header, b.head.header);
        assert_eq!(a.head.prefix.flags, b.head.prefix.flags);
        assert_eq!(a.head.prefix.payload_len, b.head.prefix.payload_len);
        assert_eq!(a.payload, b.payload);
    }
}
