//! Deterministic tests with a virtual clock: `t0 + n` seconds, never read.

use std::time::{Duration, Instant};

use super::*;

fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn cfg() -> ConnConfig {
    ConnConfig {
        max_inflight: 2,
        outbound_max_bytes: 1000,
        header_timeout: Some(s(10)),
        progress_timeout: Some(s(5)),
        idle_timeout: Some(s(60)),
        handshake_timeout: Some(s(3)),
        auth_required: false,
    }
}

#[test]
fn duplicate_and_zero_ids_are_refused_and_the_first_call_keeps_its_entry() {
    let t0 = Instant::now();
    let mut c = ServerConn::new(cfg(), t0);
    assert_eq!(c.admit(0, 'a'), Err(Refusal::ZeroCallId));
    c.admit(7, 'a').unwrap();
    assert_eq!(c.admit(7, 'b'), Err(Refusal::DuplicateCallId { id: 7 }));
    assert_eq!(
        c.cancel(7),
        Some(&'a'),
        "a duplicate must not orphan the call"
    );
    assert_eq!(c.inflight(), 1);
    c.admit(8, 'c').unwrap();
    assert_eq!(
        c.admit(9, 'd'),
        Err(Refusal::TooManyInflight { limit: 2, got: 2 })
    );
    assert_eq!(c.finish(7), Some('a'));
    c.admit(7, 'e').unwrap();
    assert_eq!(c.inflight(), 2);
}

#[test]
fn nothing_is_admitted_before_authentication_and_the_handshake_times_out() {
    let t0 = Instant::now();
    let mut k = cfg();
    k.auth_required = true;
    let mut c = ServerConn::new(k, t0);
    assert_eq!(c.admit(1, ()), Err(Refusal::NotAuthenticated));
    let io = IoSnapshot::default();
    assert_eq!(c.poll_timeout(&io), Some(t0 + s(3)));
    assert_eq!(c.handle_timeout(t0 + s(2), &io), None);
    assert_eq!(
        c.handle_timeout(t0 + s(3), &io),
        Some(Timeout::Handshake { limit: s(3) })
    );
    // Authenticated in time: no handshake deadline any more.
    let mut c = ServerConn::new(k, t0);
    c.authenticated();
    c.admit(1, ()).unwrap();
    assert_eq!(c.handle_timeout(t0 + s(100), &io), None);
}

#[test]
fn a_slow_but_moving_sender_is_never_cut_off_a_stalled_one_is() {
    let t0 = Instant::now();
    let mut c: ServerConn<()> = ServerConn::new(cfg(), t0);
    let io = IoSnapshot {
        in_frame: true,
        ..IoSnapshot::default()
    };
    // A byte every 4 s for 100 s: progress every time, never closed.
    for i in 1..=25 {
        let now = t0 + s(4 * i);
        assert_eq!(c.handle_timeout(now, &io), None, "at {i}");
        c.on_received(now, 0);
    }
    let last = t0 + s(100);
    assert_eq!(c.poll_timeout(&io), Some(last + s(5)));
    assert_eq!(
        c.handle_timeout(last + s(5), &io),
        Some(Timeout::RecvStalled { limit: s(5) })
    );
    // Paused by our own backpressure: not the peer's fault.
    let paused = IoSnapshot {
        read_paused: true,
        ..io
    };
    assert_eq!(c.handle_timeout(last + s(50), &paused), None);
}

#[test]
fn a_peer_that_stops_reading_is_closed_after_the_progress_timeout_only() {
    let t0 = Instant::now();
    let mut c: ServerConn<()> = ServerConn::new(cfg(), t0);
    let io = IoSnapshot {
        queued_out: 4 << 20,
        ..IoSnapshot::default()
    };
    c.on_sent(t0 + s(1));
    // Reading 1 byte every 4 s keeps it alive however long it takes.
    for i in 1..=30 {
        let now = t0 + s(1 + 4 * i);
        assert_eq!(c.handle_timeout(now, &io), None);
        c.on_sent(now);
    }
    let last = t0 + s(121);
    assert_eq!(
        c.handle_timeout(last + s(5), &io),
        Some(Timeout::SendStalled {
            limit: s(5),
            queued: 4 << 20
        })
    );
    assert!(c.outbound_full(1000));
    assert!(!c.outbound_full(999));
}

#[test]
fn a_dribbled_header_hits_the_header_timeout_despite_progress() {
    let t0 = Instant::now();
    let mut c: ServerConn<()> = ServerConn::new(cfg(), t0);
    let io = IoSnapshot {
        in_head: true,
        in_frame: true,
        ..IoSnapshot::default()
    };
    c.on_received(t0, 0);
    c.on_head(t0, true);
    for i in 1..10 {
        c.on_received(t0 + s(i), 0);
        c.on_head(t0 + s(i), true);
        assert_eq!(c.handle_timeout(t0 + s(i), &io), None);
    }
    assert_eq!(
        c.handle_timeout(t0 + s(10), &io),
        Some(Timeout::Header { limit: s(10) })
    );
    // A completed frame resets it.
    c.on_received(t0 + s(10), 1);
    c.on_head(t0 + s(10), false);
    assert_eq!(c.handle_timeout(t0 + s(12), &IoSnapshot::default()), None);
}

#[test]
fn idle_counts_only_when_nothing_is_going_on() {
    let t0 = Instant::now();
    let mut c = ServerConn::new(cfg(), t0);
    let idle = IoSnapshot::default();
    assert_eq!(c.poll_timeout(&idle), Some(t0 + s(60)));
    c.admit(1, ()).unwrap();
    // A call in flight (a long handler) is not idleness.
    assert_eq!(c.handle_timeout(t0 + s(500), &idle), None);
    assert_eq!(c.poll_timeout(&idle), None);
    c.finish(1);
    c.on_sent(t0 + s(500));
    assert_eq!(c.handle_timeout(t0 + s(559), &idle), None);
    assert_eq!(
        c.handle_timeout(t0 + s(560), &idle),
        Some(Timeout::Idle { limit: s(60) })
    );
}

#[test]
fn refusals_and_timeouts_name_their_limit() {
    let r = Refusal::TooManyInflight { limit: 2, got: 2 }.to_string();
    assert!(
        r.contains("max_inflight_per_conn") && r.contains('2'),
        "{r}"
    );
    let t = Timeout::SendStalled {
        limit: s(5),
        queued: 77,
    }
    .to_string();
    assert!(t.contains("progress_timeout") && t.contains("77"), "{t}");
}
