//! Measuring one transfer in the process that receives it, and printing it
//! as a line in the format of the kernel's `tcp_mmap` tool.

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

/// Started in the receiving process when a measured transfer starts.
pub struct Meter {
    before: CountersSnapshot,
    cpu0: f64,
    cs0: i64,
    t0: Instant,
}

impl Meter {
    /// Starts measuring: wall clock, this process's CPU time and context
    /// switches, and the process-wide transfer counters (every connection's
    /// counters add to them).
    pub fn start() -> Result<Meter, nix::Error> {
        let before = Counters::global().snapshot();
        let (cpu0, cs0) = usage()?;
        Ok(Meter {
            before,
            cpu0,
            cs0,
            t0: Instant::now(),
        })
    }

    /// Stops measuring a transfer that delivered `bytes` payload bytes.
    pub fn stop(self, bytes: u64) -> Result<Sample, nix::Error> {
        let secs = self.t0.elapsed().as_secs_f64();
        let (cpu1, cs1) = usage()?;
        Ok(Sample {
            bytes,
            secs,
            cpu: cpu1 - self.cpu0,
            cswitches: cs1 - self.cs0,
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
    /// Transfer counters over the transfer (mapped vs copied bytes).
    pub counters: CountersSnapshot,
}

impl Sample {
    /// The `tcp_mmap`-style line, after `label: ` when `label` is not empty:
    /// `received <MB> MB (<pct> % mmap'ed) in <secs> s, <gbit> Gbit, cpu
    /// <cpu_s> s, <usec> usec per MB, <n> c-switches`.
    pub fn line(&self, label: &str) -> String {
        let mb = self.bytes as f64 / (1024.0 * 1024.0);
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
            self.cpu * 1e6 / mb,
            self.cswitches
        )
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
