//! `pagerpc doctor --cost` with tiny transfers: it measures every size by
//! both receive paths and says where zero-copy pays, in words. Behaviour
//! only: which path wins depends on the host, so no number is checked.

use std::process::Command;

#[test]
fn cost_report_names_every_size_and_gives_a_break_even_sentence() {
    let out = Command::new(env!("CARGO_BIN_EXE_pagerpc"))
        .args(["doctor", "--count", "2", "--cost", "--cost-mib", "1"])
        .args(["--cost-rounds", "1"])
        .output()
        .expect("run pagerpc doctor --cost");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");

    // One table row per size: the size, then copy and zero-copy µs/MB.
    for size in ["16 KiB", "64 KiB", "1 MiB", "16 MiB"] {
        let row = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(size))
            .unwrap_or_else(|| panic!("no row for {size}:\n{stdout}"));
        let nums: Vec<f64> = row
            .split_whitespace()
            .skip(2)
            .take(2)
            .map(|v| v.parse().unwrap_or(f64::NAN))
            .collect();
        assert!(
            nums.len() == 2 && nums.iter().all(|v| v.is_finite() && *v > 0.0),
            "row for {size} has no positive copy and zero-copy costs: {row}"
        );
    }
    let verdict = stdout
        .lines()
        .find_map(|l| l.strip_prefix("break-even: "))
        .unwrap_or_else(|| panic!("no break-even line:\n{stdout}"));
    assert!(verdict.starts_with("On this host "), "{verdict}");
    assert!(
        [
            "keep Backend::Copy",
            "pays from",
            "no single break-even size"
        ]
        .iter()
        .any(|s| verdict.contains(s)),
        "{verdict}"
    );
}

#[test]
fn cost_flags_need_cost() {
    let out = Command::new(env!("CARGO_BIN_EXE_pagerpc"))
        .args(["doctor", "--cost-mib", "1"])
        .output()
        .expect("run pagerpc doctor");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cost"));
}
