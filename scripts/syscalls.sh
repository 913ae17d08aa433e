#!/usr/bin/env bash
# Syscalls per call, each side apart: the echo server runs in its own
# process (`pagerpc-bench serve-echo`) under `strace -f -c`, and so does
# the client (`pingpong` / `concurrent --connect`). Prints, for 64 B
# ping-pong and for 64 calls in flight on one connection, every syscall's
# count per call on each side and the total.
#
#   scripts/syscalls.sh            # 20,000 calls per workload
#   CALLS=50000 scripts/syscalls.sh
#
# strace slows both processes down; the counts, not the times, are the
# result. A measurement, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v strace >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace
fi
[ -n "${PAGERPC_BENCH:-}" ] || cargo build --release -q -p pagerpc-bench
B=${PAGERPC_BENCH:-$PWD/target/release/pagerpc-bench}
CALLS=${CALLS:-20000}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# Prints "syscall count/call" lines (those at 0.01 per call or more) and
# the total, from an strace -c file.
per_call() {
    local file=$1 calls=$2
    awk -v n="$calls" '
        /^-+/ || /% time/ || NF < 4 { next }
        $NF == "total" { total = $4; next }
        $4 / n >= 0.01 { printf "    %-22s %6.2f\n", $NF, $4 / n }
        END { printf "    %-22s %6.2f\n", "TOTAL", total / n }
    ' "$file" | sort -k2 -rn
}

# measure NAME CALLS_MADE CLIENT_ARGS...
measure() {
    local name=$1 made=$2
    shift 2
    rm -f "$tmp/in" "$tmp/out"
    mkfifo "$tmp/in"
    strace -f -c -o "$tmp/server.txt" "$B" serve-echo <"$tmp/in" >"$tmp/out" &
    local srv=$!
    exec 3>"$tmp/in"
    local addr=""
    for _ in $(seq 1 100); do
        addr=$(sed -n 's/^listening on //p' "$tmp/out" 2>/dev/null || true)
        [ -n "$addr" ] && break
        sleep 0.1
    done
    [ -n "$addr" ] || { echo "serve-echo did not start" >&2; exit 1; }
    strace -f -c -o "$tmp/client.txt" "$B" "$@" --connect "$addr"
    exec 3>&-
    wait "$srv"
    echo "== $name: syscalls per call ($made calls) =="
    echo "  client:"
    per_call "$tmp/client.txt" "$made"
    echo "  server:"
    per_call "$tmp/server.txt" "$made"
}

measure "ping-pong, 64 B" "$CALLS" \
    pingpong --calls "$CALLS" --warmup 0 --size 64
# `concurrent` makes a warm-up round of a tenth of the calls first.
measure "64 in flight on one connection, 64 B" "$((CALLS + CALLS / 10))" \
    concurrent --inflight 64 --calls "$CALLS" --size 64
