//! Pinning the two processes of a transfer to CPUs (`--receiver-cpu`,
//! `--sender-cpu`), the way `tonic-peer --server-cpu/--client-cpu` pins its
//! two processes, so both tools can be compared pinned the same way.
//!
//! Affinity is per thread and inherited by the threads and processes a
//! thread creates, so each process pins its main thread before it starts
//! any other.

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Pins this (the receiving) process to `receiver`, if set, and returns the
/// CPU list the sending child process must pin itself to: `sender`, or the
/// CPUs this process had before it pinned itself (a child inherits its
/// parent's pinning), or `None` when nothing is pinned.
pub fn receiver(receiver: Option<usize>, sender: Option<usize>) -> Res<Option<String>> {
    let before = sched_getaffinity(Pid::from_raw(0))?;
    if let Some(cpu) = receiver {
        apply(&cpu.to_string())?;
    }
    Ok(match (receiver, sender) {
        (_, Some(cpu)) => Some(cpu.to_string()),
        (Some(_), None) => Some(list(&before)),
        (None, None) => None,
    })
}

/// Pins this process's calling thread (and the threads it starts later) to
/// the CPUs of `cpus`, a comma-separated list.
pub fn apply(cpus: &str) -> Res<()> {
    let mut set = CpuSet::new();
    for c in cpus.split(',').filter(|c| !c.is_empty()) {
        set.set(c.trim().parse()?)?;
    }
    sched_setaffinity(Pid::from_raw(0), &set)
        .map_err(|e| format!("pinning to CPUs {cpus}: {e}").into())
}

fn list(set: &CpuSet) -> String {
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}
