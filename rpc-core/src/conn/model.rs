//! A reference model of [`ServerConn`], for property tests and fuzzing
//! (feature `model`): a sequence of [`Op`]s is applied to a state machine
//! and to a simple model of what it must do, on a virtual clock, and every
//! answer is checked against the model.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::{ConnConfig, IoSnapshot, Refusal, ServerConn, Timeout};

/// One event fed to the state machine.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// A request with this call id arrives.
    Admit(u64),
    /// The call with this id finishes.
    Finish(u64),
    /// A CANCEL for this id arrives.
    Cancel(u64),
    /// The peer authenticates.
    Authenticate,
    /// The virtual clock moves on.
    Advance(Duration),
    /// Bytes arrive, completing this many frames.
    Received(usize),
    /// The socket takes bytes of ours.
    Sent,
    /// The I/O state changes.
    Io(IoSnapshot),
    /// The driver checks the timeouts.
    CheckTimeout,
}

impl Op {
    /// Decodes ops from fuzzer bytes (three bytes each; ids and times kept
    /// small so that collisions and timeouts happen).
    pub fn from_bytes(data: &[u8]) -> Vec<Op> {
        data.chunks_exact(3)
            .map(|c| {
                let (a, b) = (u64::from(c[1]), c[2]);
                match c[0] % 9 {
                    0 => Op::Admit(a % 8),
                    1 => Op::Finish(a % 8),
                    2 => Op::Cancel(a % 8),
                    3 => Op::Authenticate,
                    4 => Op::Advance(Duration::from_millis(a * 40 + u64::from(b))),
                    5 => Op::Received(usize::from(b % 3)),
                    6 => Op::Sent,
                    7 => Op::Io(IoSnapshot {
                        in_head: b & 1 != 0,
                        in_frame: b & 3 != 0,
                        read_paused: b & 4 != 0,
                        queued_out: if b & 8 != 0 {
                            usize::from(c[1]) * 1000
                        } else {
                            0
                        },
                    }),
                    _ => Op::CheckTimeout,
                }
            })
            .collect()
    }
}

/// Settings small enough for short op sequences to reach every limit.
pub fn small_config(auth_required: bool) -> ConnConfig {
    ConnConfig {
        max_inflight: 3,
        outbound_max_bytes: 100_000,
        header_timeout: Some(Duration::from_secs(10)),
        progress_timeout: Some(Duration::from_secs(5)),
        idle_timeout: Some(Duration::from_secs(60)),
        handshake_timeout: Some(Duration::from_secs(3)),
        auth_required,
    }
}

/// Applies `ops` to a fresh [`ServerConn`] and checks it against the
/// model. Returns the first disagreement.
///
/// # Errors
/// A description of the op where the state machine and the model
/// disagree.
pub fn check(cfg: ConnConfig, ops: &[Op]) -> Result<(), String> {
    let t0 = Instant::now();
    let mut now = t0;
    let mut sm: ServerConn<u64> = ServerConn::new(cfg, now);
    let mut calls: HashSet<u64> = HashSet::new();
    let mut authed = !cfg.auth_required;
    let mut io = IoSnapshot::default();
    let mut last_recv = now;
    let mut closed = false;
    for (i, op) in ops.iter().enumerate() {
        if closed {
            break;
        }
        let fail = |what: String| Err(format!("op {i} {op:?}: {what}"));
        match *op {
            Op::Admit(id) => {
                let want = if !authed {
                    Err(Refusal::NotAuthenticated)
                } else if id == 0 {
                    Err(Refusal::ZeroCallId)
                } else if calls.contains(&id) {
                    Err(Refusal::DuplicateCallId { id })
                } else if calls.len() >= cfg.max_inflight {
                    Err(Refusal::TooManyInflight {
                        limit: cfg.max_inflight,
                        got: calls.len(),
                    })
                } else {
                    Ok(())
                };
                let got = sm.admit(id, id);
                if got != want {
                    return fail(format!("admit gave {got:?}, want {want:?}"));
                }
                if got.is_ok() {
                    calls.insert(id);
                }
            }
            Op::Finish(id) => {
                let got = sm.finish(id);
                if got.is_some() != calls.remove(&id) || got.is_some_and(|t| t != id) {
                    return fail(format!("finish gave {got:?}"));
                }
            }
            Op::Cancel(id) => {
                if sm.cancel(id).copied() != calls.get(&id).copied() {
                    return fail("cancel found the wrong call".into());
                }
            }
            Op::Authenticate => {
                sm.authenticated();
                authed = true;
            }
            Op::Advance(d) => now += d,
            Op::Received(frames) => {
                sm.on_received(now, frames);
                sm.on_head(now, io.in_head);
                last_recv = now;
            }
            Op::Sent => sm.on_sent(now),
            Op::Io(s) => {
                io = s;
                sm.on_head(now, io.in_head);
            }
            Op::CheckTimeout => {
                let next = sm.poll_timeout(&io);
                let fired = sm.handle_timeout(now, &io);
                if fired.is_some() != next.is_some_and(|t| t <= now) {
                    return fail(format!("fired {fired:?} but next deadline is {next:?}"));
                }
                if sm.inflight() != calls.len() {
                    return fail("in-flight count drifted".into());
                }
                let Some(t) = fired else { continue };
                let ok = match t {
                    Timeout::Handshake { .. } => !authed,
                    Timeout::Header { .. } => io.in_head && !io.read_paused,
                    Timeout::RecvStalled { limit } => {
                        io.in_frame && !io.read_paused && now >= last_recv + limit
                    }
                    Timeout::SendStalled { .. } => io.queued_out > 0,
                    Timeout::Idle { .. } => !io.in_frame && io.queued_out == 0 && calls.is_empty(),
                };
                if !ok {
                    return fail(format!("{t:?} fired with io {io:?}, {} calls", calls.len()));
                }
                closed = true;
            }
        }
    }
    Ok(())
}
