#!/usr/bin/env bash
# Streams, pagerpc vs tonic, in one sitting: alternates
#   tonic-peer bulk --mode stream                 (tonic client streaming)
#   pagerpc-bench stream                          (copy mode)
#   pagerpc-bench stream --zerocopy               (zero-copy mode)
# RUNS times, every process pinned the same way (receiver on RECEIVER_CPU,
# sender on SENDER_CPU; PIN=off leaves them unpinned), and prints every
# line, then the medians.
#
#   scripts/stream-bench.sh [RUNS]        # default 5
#
# Environment: SIZE_KIB (1024), TOTAL_MIB (2048), RECEIVER_CPU (0),
# SENDER_CPU (1), PIN (on), BENCH (a pagerpc-bench binary; default: build
# this tree's), TONIC_PEER (a tonic-peer binary; default: build
# ../shared/peers/tonic-bulk into TONIC_TARGET_DIR, /tmp/tonic-peer-target).
# A pagerpc run that does not finish within 120 s counts as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${1:-5}
size=${SIZE_KIB:-1024}
total=${TOTAL_MIB:-2048}
rcpu=${RECEIVER_CPU:-0}
scpu=${SENDER_CPU:-1}

bench=${BENCH:-}
if [ -z "$bench" ]; then
    cargo build --release -q -p pagerpc-bench
    bench=target/release/pagerpc-bench
fi
peer=${TONIC_PEER:-}
if [ -z "$peer" ]; then
    tdir=${TONIC_TARGET_DIR:-/tmp/tonic-peer-target}
    CARGO_TARGET_DIR=$tdir cargo build --release -q \
        --manifest-path ../shared/peers/tonic-bulk/Cargo.toml
    peer=$tdir/release/tonic-peer
fi

pin_pagerpc=()
pin_tonic=()
if [ "${PIN:-on}" != off ]; then
    pin_pagerpc=(--receiver-cpu "$rcpu" --sender-cpu "$scpu")
    pin_tonic=(--server-cpu "$rcpu" --client-cpu "$scpu")
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for i in $(seq 1 "$runs"); do
    echo "== round $i"
    "$peer" bulk --size-kib "$size" --total-mib "$total" --mode stream "${pin_tonic[@]}" | tee -a "$log"
    for mode in copy zerocopy; do
        zc=()
        [ "$mode" = zerocopy ] && zc=(--zerocopy)
        if ! timeout 120 "$bench" stream --size-kib "$size" --total-mib "$total" \
            "${zc[@]}" "${pin_pagerpc[@]}" >"$log.run" 2>&1; then
            echo "pagerpc-$mode FAILED: $(tail -n 1 "$log.run")" | tee -a "$log"
        fi
        grep -E '^(client|server)-stream: ' "$log.run" | sed "s/^/pagerpc-$mode /" | tee -a "$log"
    done
done
rm -f "$log.run"

# Medians: Gbit/s, receiver CPU usec per MB, % mapped.
echo "== medians over $runs rounds (${size} KiB messages, ${total} MiB)"
awk '
function median(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function add(key, v) { vals[key] = vals[key] (vals[key] == "" ? "" : " ") v; seen[key] = 1 }
$1 == "tonic" {
    for (i = 1; i <= NF; i++) {
        if ($i == "Gbit/s,") add("tonic client-stream gbit", $(i - 1))
        if ($i == "cpu" && $(i - 1) == "server") add("tonic client-stream usec", $(i + 1))
    }
    names["tonic client-stream"] = 1
}
$1 ~ /^pagerpc-/ && $2 ~ /-stream:$/ {
    name = $1 " " substr($2, 1, length($2) - 1)
    for (i = 1; i <= NF; i++) {
        if ($i == "Gbit,") add(name " gbit", $(i - 1))
        if ($i == "usec") add(name " usec", $(i - 1))
        if ($i == "%" && $(i + 1) == "mmap'"'"'ed)") add(name " pct", substr($(i - 1), 2))
    }
    names[name] = 1
}
$2 == "FAILED:" { failed[$1]++ }
END {
    for (n in names) {
        line = sprintf("%-30s %6.2f Gbit/s, receiver cpu %6.1f usec per MB", n, median(n " gbit"), median(n " usec"))
        if (seen[n " pct"]) line = line sprintf(", %.4f %% mapped", median(n " pct"))
        print line
    }
    for (f in failed) printf "%s: %d failed runs\n", f, failed[f]
}' "$log" | sort
