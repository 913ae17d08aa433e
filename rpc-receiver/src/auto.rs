//! How [`Backend::Auto`](crate::Backend::Auto) chooses, payload by payload,
//! between mapping and copying: a state machine without I/O. The receiver
//! tells it what each payload's header says, and afterwards how many bytes
//! were mapped and how much CPU time the receive took (measured by the
//! receiver with `CLOCK_THREAD_CPUTIME_ID`); it answers which path the next
//! payload takes, whether reads must be exact (a payload that may be mapped
//! must not be pulled into the read buffer), and what to ask the peer.
//!
//! - **Estimates.** One running estimate per path of receive CPU per byte:
//!   an exponentially weighted average of the measured samples (weight
//!   [`ALPHA`] for the newest), plus one of the CPU per byte spent
//!   *releasing* measured payloads when their consumer drops them
//!   (unmapping socket pages costs a page-table zap and a TLB flush that
//!   the receive itself does not show). A path costs the sum of the two.
//!   A path's very first measurement is left out: it pays for cold memory
//!   (no recycled buffers yet), not for the path.
//! - **Settled path, hysteresis.** The connection starts settled on the
//!   path its first separate payload's mark points to when that payload
//!   is at or above the floor (mapping if the peer wrote it with
//!   `MSG_ZEROCOPY`), else on copying (what `Backend::Copy` does). It
//!   moves to the other path only when both have at least
//!   [`MIN_SAMPLES`] samples and the other path's estimate is below
//!   [`SWITCH_BELOW`] times the settled one's (10 % cheaper) *and* lower
//!   by more than twice the standard error of the difference (from an
//!   exponentially weighted variance of each path's samples), so
//!   estimates within noise of each other never flap: on this VM single
//!   samples of one path scatter by up to 5x.
//! - **Floor.** Payloads that are inline, smaller than a page, or smaller
//!   than the floor (`RecvConfig::auto_floor`) are copied, neither
//!   measured nor sampled.
//! - **The peer.** A peer that marks its payloads (header `payload_send`)
//!   writes them by copy or with `MSG_ZEROCOPY` on request. Data written
//!   with `MSG_ZEROCOPY` and then copied costs a receiver more than data
//!   written by copy, and on loopback and veth data written by copy cannot
//!   be mapped at all, so a payload's path follows its mark (mapped if
//!   written with `MSG_ZEROCOPY`, copied otherwise), and the chooser steers
//!   the peer: it asks for the settled path's mode, and to sample the
//!   other path it *probes*: asks for the other mode until a sample of it
//!   arrived, then asks for the settled mode again. Payloads in flight
//!   across a request arrive in the old mode; they are taken by their own
//!   path and measured too. A probe starts once the settled path carried
//!   15 times the bytes the other path carried since the last probe
//!   began, so the other path gets about one byte in [`SAMPLE_SHARE`];
//!   that gap grows with the square of how much costlier the other path
//!   is estimated (a path twice as costly gets a quarter of the share), so
//!   sampling a clearly worse path costs little, while paths close in cost
//!   are compared often.
//! - **A peer that does not mark** (an older pagerpc) cannot be steered:
//!   every [`SAMPLE_SHARE`]th payload at or above the floor takes the
//!   other path (every 2nd until it has [`MIN_SAMPLES`]).
//! - **Failures.** A payload that was to be mapped but of which less than
//!   half the whole pages mapped (segments not page-aligned, a peer that
//!   wrote by copy) is no sample of mapping. [`FAIL_RUN`] such payloads in
//!   a row settle the connection on copying whatever the estimates say,
//!   until a later probe maps again; each failed probe (and each probe the
//!   peer does not answer within [`PROBE_PATIENCE`] payloads) doubles the
//!   gap to the next one, up to [`MAX_BACKOFF`] times.
//! - **Measuring.** Samples of the other path are always measured; the
//!   settled path's payloads until it has [`MIN_SAMPLES`] samples, then
//!   one in [`MEASURE_SETTLED_EVERY`] (each measurement costs clock reads).
#![forbid(unsafe_code)]

use pagerpc_core::AutoChoice;

const PAGE: u64 = pagerpc_core::PAGE_SIZE as u64;

/// The other path gets about one payload byte in this many.
pub const SAMPLE_SHARE: u64 = 16;
/// Samples each path needs before the connection may switch paths.
pub const MIN_SAMPLES: u32 = 3;
/// Weight of the newest sample in a path's running estimate.
pub const ALPHA: f64 = 0.25;
/// The other path must cost less than this fraction of the settled one.
pub const SWITCH_BELOW: f64 = 0.9;
/// Failed mappings in a row that settle a connection on copying.
pub const FAIL_RUN: u32 = 2;
/// Payloads a probe waits for the peer to switch before it gives up.
pub const PROBE_PATIENCE: u32 = 32;
/// Largest multiple of the normal gap between probes after failures.
pub const MAX_BACKOFF: u64 = 64;
/// Of the settled path's payloads, one in this many is measured (once it
/// has its first samples).
pub const MEASURE_SETTLED_EVERY: u64 = 4;

/// A receive path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// Mapped from the socket (`TCP_ZEROCOPY_RECEIVE`), copying only what
    /// the kernel cannot map and the tail.
    Map,
    /// Copied whole.
    Copy,
}

impl Path {
    fn other(self) -> Path {
        match self {
            Path::Map => Path::Copy,
            Path::Copy => Path::Map,
        }
    }

    fn idx(self) -> usize {
        match self {
            Path::Map => 0,
            Path::Copy => 1,
        }
    }
}

/// Why a payload takes its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Why {
    /// The connection is settled on it.
    Chosen,
    /// The other path: a sample, or a payload in flight across a request.
    Sample,
    /// Too small to choose.
    BelowFloor,
}

/// What a payload's header says about how the peer wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SentAs {
    /// With `MSG_ZEROCOPY`.
    ZeroCopy,
    /// By copy.
    Copy,
    /// Nothing (a peer that does not mark its payloads).
    Unknown,
}

/// The path one payload takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub(crate) path: Path,
    pub(crate) why: Why,
    /// Measure its receive CPU time and report it to [`Chooser::finish`].
    pub(crate) measure: bool,
}

impl Plan {
    /// The counter it goes under.
    pub(crate) fn choice(&self) -> AutoChoice {
        match (self.why, self.path) {
            (Why::BelowFloor, _) => AutoChoice::CopyBelowFloor,
            (Why::Chosen, Path::Map) => AutoChoice::MapChosen,
            (Why::Sample, Path::Map) => AutoChoice::MapSample,
            (Why::Chosen, Path::Copy) => AutoChoice::CopyChosen,
            (Why::Sample, Path::Copy) => AutoChoice::CopySample,
        }
    }
}

/// A running estimate of one path's receive CPU per byte.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Estimate {
    per_byte: f64,
    /// Exponentially weighted variance of the samples.
    var: f64,
    samples: u32,
    /// The first measurement was seen (and left out).
    primed: bool,
}

impl Estimate {
    /// Adds a measurement, except the very first: it pays for cold
    /// memory (no recycled buffers yet, first faults), not what the path
    /// costs once running.
    fn add(&mut self, per_byte: f64) {
        if !self.primed {
            self.primed = true;
            return;
        }
        self.add_sample(per_byte);
    }

    fn add_sample(&mut self, per_byte: f64) {
        if self.samples == 0 {
            self.per_byte = per_byte;
        } else {
            let d = per_byte - self.per_byte;
            self.per_byte += ALPHA * d;
            self.var = (1.0 - ALPHA) * (self.var + ALPHA * d * d);
        }
        self.samples = self.samples.saturating_add(1);
    }

    /// The squared standard error of the average: how far it may be off,
    /// given how much the samples scatter.
    fn se2(&self) -> f64 {
        self.var * ALPHA / (2.0 - ALPHA)
    }

    fn ready(&self) -> bool {
        self.samples >= MIN_SAMPLES
    }
}

/// Asking the peer for the other path until samples of it arrive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Probe {
    path: Path,
    /// Samples wanted.
    need: u32,
    /// Samples taken.
    got: u32,
    /// Payloads seen on the settled path meanwhile.
    waited: u32,
}

/// The choice of one connection. See the [module documentation](self).
#[derive(Clone, Debug)]
pub(crate) struct Chooser {
    floor: u64,
    settled: Path,
    est: [Estimate; 2],
    /// Release cost per byte, per path.
    rel: [Estimate; 2],
    /// The peer marks its payloads (and so honours requests).
    peer_marks: bool,
    /// The last separate payload was written with `MSG_ZEROCOPY`.
    last_zc: bool,
    /// What the peer was last asked for.
    asked: Option<Path>,
    /// A request not yet taken by the receiver.
    pending: Option<Path>,
    probe: Option<Probe>,
    /// Bytes of payloads at or above the floor on the settled path, and on
    /// the other one, since the last probe began (or the last switch).
    settled_bytes: u64,
    other_bytes: u64,
    /// The last such payload's length.
    last_len: u64,
    backoff: u64,
    map_fail_run: u32,
    /// Mapping failed; the connection stays on copying until a mapping
    /// succeeds again.
    map_failing: bool,
    /// This connection cannot map at all (the kernel refused).
    map_off: bool,
    /// Payloads at or above the floor from a peer that does not mark.
    unmarked: u64,
    /// Payloads on the settled path (to measure one in a few).
    settled_seen: u64,
    /// A separate payload was seen (the starting path is set).
    started: bool,
}

impl Chooser {
    /// A connection's chooser; payloads below `floor` bytes are copied
    /// without measuring.
    pub(crate) fn new(floor: usize) -> Chooser {
        Chooser {
            floor: floor as u64,
            settled: Path::Copy,
            est: [Estimate::default(); 2],
            rel: [Estimate::default(); 2],
            peer_marks: false,
            last_zc: false,
            asked: None,
            pending: None,
            probe: None,
            settled_bytes: 0,
            other_bytes: 0,
            last_len: 0,
            backoff: 1,
            map_fail_run: 0,
            map_failing: false,
            map_off: false,
            unmarked: 0,
            settled_seen: 0,
            started: false,
        }
    }

    /// The path the connection is settled on.
    pub(crate) fn settled(&self) -> Path {
        self.settled
    }

    /// The path a payload of `len` bytes takes. `separate`: it was sent as
    /// its own part (not inline); `sent`: what its header says;
    /// `can_map`: the receiver could map it now (nothing of it was read
    /// into the buffer already). Call [`finish`](Self::finish) with the
    /// plan once the payload is received.
    pub(crate) fn plan(&mut self, len: u64, separate: bool, sent: SentAs, can_map: bool) -> Plan {
        if separate {
            match sent {
                SentAs::ZeroCopy => (self.peer_marks, self.last_zc) = (true, true),
                SentAs::Copy => (self.peer_marks, self.last_zc) = (true, false),
                SentAs::Unknown => {}
            }
            if !self.started {
                // Start where the peer is, if it already writes for
                // mapping what is worth choosing for.
                self.started = true;
                if sent == SentAs::ZeroCopy && len >= PAGE && len >= self.floor {
                    self.settled = Path::Map;
                }
            }
            // A peer just seen to mark gets the request that stands.
            self.update_request();
        }
        if !separate || len < PAGE || len < self.floor {
            return Plan {
                path: Path::Copy,
                why: Why::BelowFloor,
                measure: false,
            };
        }
        let mut path = match sent {
            SentAs::ZeroCopy => Path::Map,
            SentAs::Copy => Path::Copy,
            SentAs::Unknown => {
                self.unmarked += 1;
                if self.unmarked_sample(self.unmarked) {
                    self.settled.other()
                } else {
                    self.settled
                }
            }
        };
        let mut measurable = true;
        if path == Path::Map && (!can_map || self.map_off) {
            // Copied this once, and not measured: copying data written for
            // mapping is not what the copy path costs.
            path = Path::Copy;
            measurable = false;
        }
        let why = if path == self.settled {
            Why::Chosen
        } else {
            Why::Sample
        };
        let measure = measurable
            && match why {
                Why::Chosen => {
                    self.settled_seen += 1;
                    !self.est[path.idx()].ready()
                        || self.settled_seen.is_multiple_of(MEASURE_SETTLED_EVERY)
                }
                _ => true,
            };
        Plan { path, why, measure }
    }

    /// Whether the `k`th payload at or above the floor from a peer that
    /// does not mark takes the other path.
    fn unmarked_sample(&self, k: u64) -> bool {
        let other = self.settled.other();
        if other == Path::Map && self.map_off {
            return false;
        }
        let every = if !self.est[other.idx()].ready() && self.backoff == 1 {
            2
        } else {
            SAMPLE_SHARE * self.backoff
        };
        k.is_multiple_of(every)
    }

    /// A payload planned as `plan` was received: `len` bytes, `mapped` of
    /// them mapped, and its receive took `cpu_ns` of CPU time if it was
    /// measured.
    pub(crate) fn finish(&mut self, plan: Plan, len: u64, mapped: u64, cpu_ns: Option<u64>) {
        if plan.why == Why::BelowFloor || len == 0 {
            return;
        }
        self.last_len = len;
        if plan.path == self.settled {
            self.settled_bytes += len;
        } else {
            self.other_bytes += len;
        }
        let mut sample = plan.measure;
        if plan.path == Path::Map {
            if mapped.saturating_mul(2) < len / PAGE * PAGE {
                // Not a sample of mapping: this connection could not map.
                sample = false;
                self.map_fail_run += 1;
            } else {
                self.map_fail_run = 0;
                self.map_failing = false;
            }
        }
        if let (true, Some(ns)) = (sample, cpu_ns) {
            self.est[plan.path.idx()].add(ns as f64 / len as f64);
        }
        if let Some(p) = self.probe.as_mut() {
            if plan.path == p.path {
                p.got += u32::from(sample);
            } else {
                p.waited += 1;
            }
        }
        self.decide();
    }

    /// Payloads taken by `path` were released by their consumer: `bytes`
    /// of them, in `ns` of CPU time.
    pub(crate) fn released(&mut self, path: Path, ns: u64, bytes: u64) {
        if bytes > 0 {
            self.rel[path.idx()].add_sample(ns as f64 / bytes as f64);
        }
    }

    /// What `path` costs per byte: receive plus release.
    fn cost(&self, path: Path) -> f64 {
        self.est[path.idx()].per_byte + self.rel[path.idx()].per_byte
    }

    /// The squared standard error of [`cost`](Self::cost).
    fn cost_se2(&self, path: Path) -> f64 {
        self.est[path.idx()].se2() + self.rel[path.idx()].se2()
    }

    /// Whether `other` is cheaper than `current` beyond doubt: by more
    /// than [`SWITCH_BELOW`] says, and by more than twice the standard
    /// error of the difference.
    fn clearly_cheaper(&self, other: Path, current: Path) -> bool {
        let gain = self.cost(current) - self.cost(other);
        let noise = 2.0 * (self.cost_se2(current) + self.cost_se2(other)).sqrt();
        gain > (1.0 - SWITCH_BELOW) * self.cost(current) && gain > noise
    }

    /// Moves to the cheaper path, ends and starts probes, and updates the
    /// request for the peer.
    fn decide(&mut self) {
        if self.map_fail_run >= FAIL_RUN {
            self.map_fail_run = 0;
            self.map_failing = true;
            self.settle(Path::Copy);
            self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            if self.probe.is_some_and(|p| p.path == Path::Map) {
                self.probe = None;
            }
        }
        let (m, c) = (self.est[0], self.est[1]);
        if m.ready() && c.ready() {
            let other = self.settled.other();
            let blocked = other == Path::Map && (self.map_failing || self.map_off);
            if !blocked && self.clearly_cheaper(other, self.settled) {
                self.settle(other);
            }
        }
        if let Some(p) = self.probe {
            if p.path == self.settled || p.got >= p.need {
                self.probe = None;
            } else if p.waited >= PROBE_PATIENCE {
                // The peer did not switch (it cannot write with
                // MSG_ZEROCOPY, say): try again later.
                self.probe = None;
                self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
            }
        }
        if self.probe.is_none() && self.peer_marks {
            let other = self.settled.other();
            if !(other == Path::Map && self.map_off) {
                let warm = !self.est[other.idx()].ready();
                let gap = if warm && self.backoff == 1 {
                    u64::from(MIN_SAMPLES) * self.last_len
                } else {
                    let base = (SAMPLE_SHARE - 1) * self.other_bytes.max(self.last_len);
                    (base as f64 * self.gap_factor()) as u64
                };
                if self.settled_bytes >= gap {
                    let e = self.est[other.idx()];
                    // (A path's first measurement is left out.)
                    let need = MIN_SAMPLES.saturating_sub(e.samples) + u32::from(!e.primed);
                    self.probe = Some(Probe {
                        path: other,
                        need: if warm { need } else { 1 },
                        got: 0,
                        waited: 0,
                    });
                    self.settled_bytes = 0;
                    self.other_bytes = 0;
                }
            }
        }
        self.update_request();
    }

    /// How many times the normal gap the next probe waits: the back-off
    /// after failures, times the square of how much costlier the other
    /// path is estimated; at most [`MAX_BACKOFF`].
    fn gap_factor(&self) -> f64 {
        let other = self.settled.other();
        let ratio = if self.est[other.idx()].ready() && self.est[self.settled.idx()].ready() {
            (self.cost(other) / self.cost(self.settled)).max(1.0)
        } else {
            1.0
        };
        (self.backoff as f64 * ratio * ratio).min(MAX_BACKOFF as f64)
    }

    fn settle(&mut self, path: Path) {
        if self.settled != path {
            self.settled = path;
            self.settled_bytes = 0;
            self.other_bytes = 0;
        }
        if path == Path::Map {
            self.backoff = 1;
        }
    }

    /// The mode the peer should write in now.
    fn want(&self) -> Path {
        self.probe.map_or(self.settled, |p| p.path)
    }

    fn update_request(&mut self) {
        if !self.peer_marks {
            return;
        }
        let want = self.want();
        if self.asked != Some(want) {
            self.asked = Some(want);
            self.pending = Some(want);
        }
    }

    /// What to ask the peer now, if anything: write separate payloads for
    /// mapping (`Path::Map`, `MSG_ZEROCOPY`) or by copy.
    pub(crate) fn take_request(&mut self) -> Option<Path> {
        self.pending.take()
    }

    /// Whether the next payload may be mapped, so reads must not pull any
    /// of it into the read buffer.
    pub(crate) fn exact_reads(&self) -> bool {
        if self.map_off {
            false
        } else if self.peer_marks {
            self.last_zc || self.want() == Path::Map
        } else {
            self.settled == Path::Map || self.unmarked_sample(self.unmarked + 1)
        }
    }

    /// The connection cannot map at all (the kernel refused): copy from
    /// now on.
    pub(crate) fn map_unavailable(&mut self) {
        self.map_off = true;
        self.settle(Path::Copy);
        self.probe = None;
        self.update_request();
    }

    /// The running estimates of receive CPU per byte (ns), mapping and
    /// copying, with their sample counts.
    #[cfg(test)]
    fn estimates(&self) -> [(f64, u32); 2] {
        self.est.map(|e| (e.per_byte, e.samples))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A simulated peer that writes in the mode it was last asked for,
    /// with `lag` payloads already in flight when a request arrives.
    struct Peer {
        zc: bool,
        in_flight: std::collections::VecDeque<bool>,
        honours: bool,
    }

    impl Peer {
        fn new(zc: bool, lag: usize) -> Peer {
            Peer {
                zc,
                in_flight: std::iter::repeat_n(zc, lag).collect(),
                honours: true,
            }
        }

        /// The next payload's mode (`true`: MSG_ZEROCOPY).
        fn next(&mut self) -> bool {
            self.in_flight.push_back(self.zc);
            self.in_flight.pop_front().unwrap_or(self.zc)
        }

        fn ask(&mut self, path: Path) {
            if self.honours {
                self.zc = path == Path::Map;
            }
        }
    }

    /// Runs `n` payloads of `len` bytes through `c`, the peer answering its
    /// requests, with the costs `cost(path)` in ns per byte; mapping maps
    /// everything unless `maps` is false. Returns the plans.
    fn run(
        c: &mut Chooser,
        peer: &mut Peer,
        n: usize,
        len: u64,
        maps: bool,
        mut cost: impl FnMut(Path) -> f64,
    ) -> Vec<Plan> {
        let mut plans = Vec::new();
        for _ in 0..n {
            if let Some(r) = c.take_request() {
                peer.ask(r);
            }
            let sent = if peer.next() {
                SentAs::ZeroCopy
            } else {
                SentAs::Copy
            };
            let plan = c.plan(len, true, sent, true);
            let mapped = if plan.path == Path::Map && maps {
                len / PAGE * PAGE
            } else {
                0
            };
            let ns = (cost(plan.path) * len as f64) as u64;
            c.finish(plan, len, mapped, plan.measure.then_some(ns));
            plans.push(plan);
        }
        plans
    }

    fn share(plans: &[Plan], path: Path) -> f64 {
        plans.iter().filter(|p| p.path == path).count() as f64 / plans.len() as f64
    }

    #[test]
    fn small_payloads_are_copied_unmeasured_and_the_peer_is_asked_to_copy() {
        let mut c = Chooser::new(256 << 10);
        for (len, separate) in [
            (100, false),
            (3000, true),
            (64 << 10, true),
            (255 << 10, true),
        ] {
            let p = c.plan(len, separate, SentAs::ZeroCopy, true);
            assert_eq!(
                p,
                Plan {
                    path: Path::Copy,
                    why: Why::BelowFloor,
                    measure: false
                }
            );
            assert_eq!(p.choice(), AutoChoice::CopyBelowFloor);
            c.finish(p, len, 0, None);
        }
        // A peer that marks is asked to write by copy at once: copying is
        // where a connection starts.
        assert_eq!(c.take_request(), Some(Path::Copy));
        assert_eq!(c.take_request(), None);
        assert_eq!(c.estimates(), [(0.0, 0), (0.0, 0)]);
    }

    #[test]
    fn settles_on_mapping_when_it_is_clearly_cheaper_and_samples_copying() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 2);
        let plans = run(&mut c, &mut peer, 400, MIB, true, |p| match p {
            Path::Map => 100.0,
            Path::Copy => 200.0,
        });
        assert_eq!(c.settled(), Path::Map);
        let late = &plans[100..];
        let copies = share(late, Path::Copy);
        // The other path gets about one in SAMPLE_SHARE (plus what is in
        // flight across each probe).
        assert!(copies > 0.0 && copies < 0.15, "copy share {copies}");
        assert!(late
            .iter()
            .filter(|p| p.path == Path::Copy)
            .all(|p| p.why == Why::Sample));
        let (m, cp) = (c.estimates()[0], c.estimates()[1]);
        assert!((m.0 - 100.0).abs() < 1e-6 && (cp.0 - 200.0).abs() < 1e-6);
        assert!(peer.zc, "the peer was left writing for mapping");
    }

    #[test]
    fn settles_on_copying_when_it_is_clearly_cheaper_and_samples_mapping() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 2);
        let plans = run(&mut c, &mut peer, 400, MIB, true, |p| match p {
            Path::Map => 300.0,
            Path::Copy => 100.0,
        });
        assert_eq!(c.settled(), Path::Copy);
        let maps = share(&plans[100..], Path::Map);
        assert!(maps > 0.0 && maps < 0.15, "map share {maps}");
        assert!(!peer.zc, "the peer was left writing by copy");
        assert!(c.estimates()[0].1 >= MIN_SAMPLES);
    }

    #[test]
    fn switches_when_costs_change_and_back() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 2);
        run(&mut c, &mut peer, 200, MIB, true, |p| match p {
            Path::Map => 100.0,
            Path::Copy => 150.0,
        });
        assert_eq!(c.settled(), Path::Map);
        // Mapping becomes expensive: the next probe of copying finds it
        // cheaper and the connection moves.
        run(&mut c, &mut peer, 300, MIB, true, |p| match p {
            Path::Map => 400.0,
            Path::Copy => 150.0,
        });
        assert_eq!(c.settled(), Path::Copy);
        assert!(!peer.zc);
        run(&mut c, &mut peer, 300, MIB, true, |p| match p {
            Path::Map => 50.0,
            Path::Copy => 150.0,
        });
        assert_eq!(c.settled(), Path::Map);
        assert!(peer.zc);
    }

    #[test]
    fn a_difference_within_the_noise_does_not_switch() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 2);
        let mut k = 0u64;
        // Both paths cost 100 on average, but mapping's samples scatter
        // from 0.3x to 1.7x: its running average strays more than 10 %
        // from copying's, yet never by more than the noise allows.
        let scatter = [30.0, 170.0, 60.0, 140.0, 130.0, 40.0, 130.0];
        let mut max_seen = 0.0f64;
        for _ in 0..100 {
            run(&mut c, &mut peer, 4, MIB, true, |p| {
                k += 1;
                match p {
                    Path::Map => scatter[k as usize % scatter.len()],
                    Path::Copy => 100.0,
                }
            });
            max_seen = max_seen.max(c.est[0].per_byte);
            assert_eq!(c.settled(), Path::Map, "moved on noise: {:?}", c.est);
        }
        assert!(max_seen > 111.0, "the test does not stray: {max_seen}");
        // A real 20 % difference, without the scatter: copying.
        run(&mut c, &mut peer, 400, MIB, true, |p| match p {
            Path::Map => 120.0,
            Path::Copy => 100.0,
        });
        assert_eq!(c.settled(), Path::Copy);
    }

    #[test]
    fn release_costs_count_too() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 2);
        // Receiving maps cheaper, but unmapping costs more than it saves.
        for _ in 0..40 {
            run(&mut c, &mut peer, 10, MIB, true, |p| match p {
                Path::Map => 50.0,
                Path::Copy => 100.0,
            });
            c.released(Path::Map, 80 * MIB, MIB);
            c.released(Path::Copy, 2 * MIB, MIB);
        }
        assert_eq!(c.settled(), Path::Copy);
        assert_eq!(c.rel[0].per_byte, 80.0);
        c.released(Path::Copy, 0, 0);
        assert_eq!(c.rel[1].samples, 40);
    }

    #[test]
    fn close_costs_do_not_flap() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 1);
        let mut k = 0u64;
        run(&mut c, &mut peer, 50, MIB, true, |p| match p {
            Path::Map => 95.0,
            Path::Copy => 100.0,
        });
        let before = c.settled();
        let mut switches = 0;
        let mut last = before;
        for _ in 0..500 {
            // Costs within 5 % of each other, noisy.
            k += 1;
            let wobble = if k.is_multiple_of(3) { 1.04 } else { 0.97 };
            run(&mut c, &mut peer, 1, MIB, true, |p| match p {
                Path::Map => 98.0 * wobble,
                Path::Copy => 100.0,
            });
            if c.settled() != last {
                switches += 1;
                last = c.settled();
            }
        }
        assert_eq!(switches, 0, "flapped between paths on noise");
    }

    #[test]
    fn failing_mappings_settle_on_copying_whatever_the_costs_and_probes_back_off() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(true, 2);
        // Mapping would be cheap, but nothing maps (misaligned segments).
        let plans = run(&mut c, &mut peer, 20000, MIB, false, |p| match p {
            Path::Map => 10.0,
            Path::Copy => 100.0,
        });
        assert_eq!(c.settled(), Path::Copy);
        assert!(!peer.zc, "the peer was asked to write by copy");
        assert_eq!(c.estimates()[0].1, 0, "failed mappings are no samples");
        // Probes keep being made, further and further apart.
        let early = share(&plans[..1000], Path::Map);
        let late = share(&plans[2000..], Path::Map);
        assert!(late > 0.0 && late < 0.005, "map attempts late: {late}");
        assert!(early > late, "no back-off: {early} then {late}");
        assert_eq!(c.backoff, MAX_BACKOFF);
        // Once mapping works again, a probe finds it and the connection
        // moves (after at most one gap of MAX_BACKOFF).
        run(&mut c, &mut peer, 10000, MIB, true, |p| match p {
            Path::Map => 10.0,
            Path::Copy => 100.0,
        });
        assert_eq!(c.settled(), Path::Map);
        assert_eq!(c.backoff, 1);
    }

    #[test]
    fn a_peer_that_does_not_switch_is_probed_less_and_less() {
        let mut c = Chooser::new(256 << 10);
        let mut peer = Peer::new(false, 0);
        peer.honours = false;
        let plans = run(&mut c, &mut peer, 3000, MIB, true, |_| 100.0);
        assert!(plans.iter().all(|p| p.path == Path::Copy));
        assert_eq!(c.backoff, MAX_BACKOFF);
        assert_eq!(c.settled(), Path::Copy);
    }

    #[test]
    fn a_peer_that_does_not_mark_is_sampled_by_count() {
        let mut c = Chooser::new(256 << 10);
        let mut plans = Vec::new();
        for _ in 0..400 {
            let p = c.plan(MIB, true, SentAs::Unknown, true);
            // Mapping is cheaper: the receiver moves there.
            let ns = match p.path {
                Path::Map => 50 * MIB,
                Path::Copy => 100 * MIB,
            };
            c.finish(p, MIB, if p.path == Path::Map { MIB } else { 0 }, Some(ns));
            plans.push(p);
        }
        assert_eq!(
            c.take_request(),
            None,
            "a peer that does not mark is never asked"
        );
        assert_eq!(c.settled(), Path::Map);
        let copies = plans[100..].iter().filter(|p| p.path == Path::Copy).count();
        // k = 101..=400: the multiples of SAMPLE_SHARE.
        assert_eq!(copies, 19, "one in {SAMPLE_SHARE}");
        assert!(c.exact_reads());
    }

    #[test]
    fn a_payload_that_cannot_be_mapped_now_is_copied_unmeasured() {
        let mut c = Chooser::new(256 << 10);
        let p = c.plan(MIB, true, SentAs::ZeroCopy, false);
        assert_eq!(p.path, Path::Copy);
        assert!(!p.measure);
        c.finish(p, MIB, 0, None);
        assert_eq!(c.estimates()[1].1, 0);
        c.map_unavailable();
        let p = c.plan(MIB, true, SentAs::ZeroCopy, true);
        assert_eq!(p.path, Path::Copy);
        assert!(!c.exact_reads());
    }

    #[test]
    fn reads_are_exact_only_while_a_payload_may_be_mapped() {
        let mut c = Chooser::new(256 << 10);
        // Nothing known yet: copying, reads as the copy backend's.
        assert!(!c.exact_reads());
        // A small payload written with MSG_ZEROCOPY: the connection starts
        // on copying and asks the peer to copy, but the next payload may
        // still be written for mapping.
        let p = c.plan(64 << 10, true, SentAs::ZeroCopy, false);
        c.finish(p, 64 << 10, 0, None);
        assert_eq!(c.settled(), Path::Copy);
        assert!(c.exact_reads());
        assert_eq!(c.take_request(), Some(Path::Copy));
        // Once the peer writes by copy (and no probe wants mapping), reads
        // may take several frames at once again.
        let p = c.plan(MIB, true, SentAs::Copy, true);
        c.finish(p, MIB, 0, Some(MIB));
        assert!(!c.exact_reads());
    }

    #[test]
    fn a_connection_starts_where_the_peer_is() {
        let mut c = Chooser::new(256 << 10);
        // Its first payload is large and written with MSG_ZEROCOPY: start
        // on mapping (this one is copied: part of it was read already).
        let p = c.plan(MIB, true, SentAs::ZeroCopy, false);
        assert_eq!((p.path, p.why, p.measure), (Path::Copy, Why::Sample, false));
        c.finish(p, MIB, 0, None);
        assert_eq!(c.settled(), Path::Map);
        assert!(c.exact_reads());
        assert_eq!(c.take_request(), Some(Path::Map));
        let p = c.plan(MIB, true, SentAs::ZeroCopy, true);
        assert_eq!((p.path, p.why, p.measure), (Path::Map, Why::Chosen, true));
    }
}
