//! Measuring one transfer in the process that receives it, and printing it
//! as a line in the format of the kernel's `tcp_mmap` tool; beside it, what
//! the whole machine spent over the same interval (`/proc/stat`), so that a
//! saving in the receiver that moves work elsewhere (to the sender, to
//! softirq) shows.

use std::time::Instant;

use nix::sys::resource::{getrusage, UsageWho};
use pagerpc::{Counters, CountersSnapshot};

/// CPU seconds (user+sys) and context switches (voluntary+involuntary) of
/// this process so far.
fn usage() -> Result<(f64, i64), nix::Error> {
    let u = getrusage(UsageWho::RUSAGE_SELF)?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Ok((
        secs(u.user_time()) + secs(u.system_time()),
        u.voluntary_context_switches() + u.involuntary_context_switches(),
    ))
}

/// Busy time of all CPUs together, in `USER_HZ` ticks, from the text of
/// `/proc/stat`: user + nice + system + irq + softirq of the aggregate `cpu`
/// line. Idle, iowait and steal are not work done by this machine; guest
/// time is already part of user (guest_nice of nice).
pub fn busy_ticks(stat: &str) -> Result<u64, String> {
    let line = stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or("no aggregate `cpu` line")?;
    let fields = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("`{line}`: {e}"))?;
    match fields[..] {
        [user, nice, system, _idle, _iowait, irq, softirq, ..] => {
            Ok(user + nice + system + irq + softirq)
        }
        _ => Err(format!("`{line}`: fewer than 7 fields")),
    }
}

/// The whole machine's busy CPU time so far, in ticks, and ticks per
/// second (`sysconf(_SC_CLK_TCK)`, usually 100).
fn machine_ticks() -> Result<(u64, f64), String> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
    let hz = match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(hz)) if hz > 0 => hz as f64,
        other => return Err(format!("sysconf(_SC_CLK_TCK): {other:?}")),
    };
    Ok((busy_ticks(&stat)?, hz))
}

/// Started in the receiving process when a measured transfer starts.
pub struct Meter {
    before: CountersSnapshot,
    cpu0: f64,
    cs0: i64,
    machine0: Result<(u64, f64), String>,
    t0: Instant,
}

impl Meter {
    /// Starts measuring: wall clock, this process's CPU time and context
    /// switches, and the process-wide transfer counters (every connection's
    /// counters add to them).
    pub fn start() -> Result<Meter, nix::Error> {
        let before = Counters::global().snapshot();
        let (cpu0, cs0) = usage()?;
        let machine0 = machine_ticks();
        Ok(Meter {
            before,
            cpu0,
            cs0,
            machine0,
            t0: Instant::now(),
        })
    }

    /// Stops measuring a transfer that delivered `bytes` payload bytes.
    pub fn stop(self, bytes: u64) -> Result<Sample, nix::Error> {
        let secs = self.t0.elapsed().as_secs_f64();
        let (cpu1, cs1) = usage()?;
        let machine_cpu = self.machine0.and_then(|(t0, hz)| {
            let (t1, _) = machine_ticks()?;
            Ok(t1.saturating_sub(t0) as f64 / hz)
        });
        Ok(Sample {
            bytes,
            secs,
            cpu: cpu1 - self.cpu0,
            cswitches: cs1 - self.cs0,
            machine_cpu,
            counters: Counters::global().snapshot().since(&self.before),
        })
    }
}

/// What one transfer cost its receiving process.
pub struct Sample {
    /// Payload bytes received.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub secs: f64,
    /// CPU seconds (user+sys) of the receiving process.
    pub cpu: f64,
    /// Context switches of the receiving process.
    pub cswitches: i64,
    /// CPU seconds of the whole machine (every CPU, every process, and
    /// interrupts) over the transfer, from `/proc/stat`; the error says why
    /// it could not be read.
    pub machine_cpu: Result<f64, String>,
    /// Transfer counters over the transfer (mapped vs copied bytes).
    pub counters: CountersSnapshot,
}

impl Sample {
    /// The `tcp_mmap`-style line, after `label: ` when `label` is not empty:
    /// `received <MB> MB (<pct> % mmap'ed) in <secs> s, <gbit> Gbit, cpu
    /// <cpu_s> s, <usec> usec per MB, <n> c-switches`.
    pub fn line(&self, label: &str) -> String {
        let prefix = if label.is_empty() {
            String::new()
        } else {
            format!("{label}: ")
        };
        format!(
            "{prefix}received {} MB ({:.4} % mmap'ed) in {:.3} s, {:.2} Gbit, cpu {:.3} s, {:.1} usec per MB, {} c-switches",
            self.bytes >> 20,
            self.counters.mapped_percent(),
            self.secs,
            self.bytes as f64 * 8.0 / self.secs / 1e9,
            self.cpu,
            self.usec_per_mb(),
            self.cswitches
        )
    }

    /// The whole machine's CPU over the same interval, on a line of its own
    /// (after `label: ` when `label` is not empty): `machine cpu <cpu_s> s,
    /// <usec> usec per MB (all CPUs: user+nice+system+irq+softirq)`. Read
    /// in `USER_HZ` ticks (10 ms at 100 Hz), so short runs are coarse, and it
    /// counts whatever else the machine ran meanwhile.
    pub fn machine_line(&self, label: &str) -> String {
        let prefix = if label.is_empty() {
            String::new()
        } else {
            format!("{label}: ")
        };
        match &self.machine_cpu {
            Ok(cpu) => format!(
                "{prefix}machine cpu {cpu:.3} s, {:.1} usec per MB (all CPUs: user+nice+system+irq+softirq)",
                cpu * 1e6 / self.mb()
            ),
            Err(e) => format!("{prefix}machine cpu unavailable: {e}"),
        }
    }

    /// The receiving process's CPU microseconds per MB (2^20 bytes).
    pub fn usec_per_mb(&self) -> f64 {
        self.cpu * 1e6 / self.mb()
    }

    /// The whole machine's CPU microseconds per MB, when `/proc/stat` was
    /// read.
    pub fn machine_usec_per_mb(&self) -> Option<f64> {
        self.machine_cpu.as_ref().ok().map(|c| c * 1e6 / self.mb())
    }

    fn mb(&self) -> f64 {
        self.bytes as f64 / (1024.0 * 1024.0)
    }

    /// An error when less than `min` percent of the payload bytes were
    /// mapped (`--min-mapped`).
    pub fn check_mapped(&self, min: Option<f64>) -> Result<(), String> {
        match min {
            Some(min) if self.counters.mapped_percent() < min => Err(format!(
                "{:.4} % mapped is below --min-mapped {min}",
                self.counters.mapped_percent()
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::busy_ticks;

    /// The head of a real `/proc/stat` of a 2-CPU machine (Linux 6.x).
    const SAMPLE: &str = "\
cpu  2872066 66654 639138 2109523 46267 0 125166 9850 0 0
cpu0 1435527 34715 334274 1035234 27212 0 62704 4842 0 0
cpu1 1436539 31939 304864 1074289 19054 0 62462 5007 0 0
intr 1234567 0 9 0 0
ctxt 98765432
btime 1700000000
";

    #[test]
    fn busy_is_user_nice_system_irq_softirq_of_the_cpu_line() {
        // Not cpu0/cpu1, not idle (2109523), iowait (46267) or steal (9850).
        assert_eq!(busy_ticks(SAMPLE), Ok(2872066 + 66654 + 639138 + 125166));
    }

    #[test]
    fn an_old_kernel_line_without_steal_still_parses() {
        assert_eq!(
            busy_ticks("cpu  10 1 5 100 2 3 4\n"),
            Ok(10 + 1 + 5 + 3 + 4)
        );
    }

    #[test]
    fn missing_or_short_or_garbled_lines_are_errors() {
        assert!(busy_ticks("cpu0 1 2 3 4 5 6 7\n").is_err());
        assert!(busy_ticks("cpu  1 2 3\n").is_err());
        assert!(busy_ticks("cpu  1 2 x 4 5 6 7\n").is_err());
        assert!(busy_ticks("").is_err());
    }
}
