#!/usr/bin/env bash
# Builds every cargo-fuzz target of pagerpc and runs each one for a while
# over a temporary copy of its committed seed corpus (so the committed corpus
# never grows). Exits non-zero if any target crashes, hangs or runs out of
# memory; the reproducer is left in fuzz/artifacts/<target>/.
#
#   fuzz/run.sh [seconds-per-target]        (default 20)
#
# Works from any directory and on a fresh machine: it installs cargo-fuzz
# (and a C++ compiler for libFuzzer, with apt-get, if there is none).
#
# Environment:
#   FUZZ_SANITIZER  address (default) | none   -- `none` runs ~5x faster
#   FUZZ_TARGETS    space-separated subset of targets (default: all)
#
# Only a stable toolchain is needed: cargo-fuzz passes `-Zsanitizer=...` and
# checks for a nightly compiler, and RUSTC_BOOTSTRAP=1 lets stable accept both.
set -euo pipefail

SECS="${1:-20}"
case "$SECS" in
    '' | *[!0-9]*) echo "usage: $0 [seconds-per-target]" >&2; exit 2 ;;
esac
FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SANITIZER="${FUZZ_SANITIZER:-address}"
TARGETS="${FUZZ_TARGETS:-prefix header stream conn}"
CARGO_FUZZ_VERSION="0.13.2"

export RUSTC_BOOTSTRAP=1
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# libfuzzer-sys compiles libFuzzer's C++ sources.
if ! command -v c++ >/dev/null 2>&1; then
    echo "run.sh: no C++ compiler; installing g++" >&2
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++
    else
        echo "run.sh: install a C++ compiler (g++ or clang++) and retry" >&2
        exit 1
    fi
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

cd "$FUZZ_DIR"
# Cargo caches `rustc --print` probes in target/.rustc_info.json without
# keying them on RUSTC_BOOTSTRAP: a probe that failed once (a `cargo fuzz`
# run without RUSTC_BOOTSTRAP) would keep failing. It is only a cache.
rm -f "$FUZZ_DIR/target/.rustc_info.json"

start=$(date +%s)
echo "== building fuzz targets (sanitizer: $SANITIZER)"
cargo fuzz build --fuzz-dir "$FUZZ_DIR" -s "$SANITIZER"
echo "== built in $(( $(date +%s) - start ))s"

LOG_DIR="$FUZZ_DIR/target/fuzz-logs"
mkdir -p "$LOG_DIR"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/pagerpc-fuzz.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

passed=0
failed=0
failed_names=""
for t in $TARGETS; do
    if [ ! -d "$FUZZ_DIR/corpus/$t" ]; then
        echo "run.sh: no corpus for target '$t'" >&2
        exit 2
    fi
    corpus="$WORK/$t"
    mkdir -p "$corpus"
    cp -R "$FUZZ_DIR/corpus/$t/." "$corpus/"
    log="$LOG_DIR/$t.log"
    echo "== $t: ${SECS}s over $(ls "$corpus" | wc -l) seeds (log: $log)"
    rc=0
    cargo fuzz run --fuzz-dir "$FUZZ_DIR" -s "$SANITIZER" "$t" "$corpus" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1 || rc=$?
    grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|Done [0-9]+ runs|stat::number_of_executed_units)' "$log" || true
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        echo "== $t: ok"
    else
        failed=$((failed + 1))
        failed_names="$failed_names $t"
        echo "== $t: FAILED (exit $rc); last lines of $log:"
        tail -n 80 "$log"
        ls -l "$FUZZ_DIR/artifacts/$t" 2>/dev/null || true
    fi
done

echo "== total time $(( $(date +%s) - start ))s"
if [ "$failed" -ne 0 ]; then
    echo "failing targets:$failed_names (reproduce: cargo fuzz run -s $SANITIZER <target> fuzz/artifacts/<target>/<file>)"
fi
echo "fuzz: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
