#!/usr/bin/env bash
# The kernel's own tcp_mmap tool next to pagerpc-bench bulk, in one
# sitting: the yardstick for receiver CPU per MB (issue 13). Alternates,
# RUNS times,
#   tcp_mmap copy        server `tcp_mmap -s`,    client `tcp_mmap -H ::1`
#   tcp_mmap mmap        server `tcp_mmap -s -z`, client `tcp_mmap -H ::1 -z`
#   pagerpc copy         pagerpc-bench bulk --size-kib SIZE_KIB
#   pagerpc zero-copy    pagerpc-bench bulk --size-kib SIZE_KIB --zerocopy
# all on loopback with TCP_MAXSEG MSS (4108: 4096 payload bytes + 12 of
# timestamps), and prints each run's receiver line, then the medians: the
# receiving process's CPU per MB (tcp_mmap: its receiving thread), and the
# whole machine's CPU per MB read by this script from /proc/stat around
# every run (user+nice+system+irq+softirq of all CPUs, so the sender and
# softirq count too, and so does anything else the machine runs meanwhile).
#
#   scripts/tcp_mmap-peer.sh                    # 3 rounds of 2 GiB each
#   RUNS=5 TOTAL_MIB=4096 scripts/tcp_mmap-peer.sh
#
# Environment: RUNS (3), TOTAL_MIB (2048, per run and tool), SIZE_KIB (1024,
# pagerpc's payload), CHUNK_KIB (512, tcp_mmap -C: the receiver's mapping
# and SO_RCVLOWAT, the sender's send size; the tool's default), MSS (4108),
# PORT (8787, tcp_mmap's), PAGERPC_BENCH (a pagerpc-bench binary to reuse;
# default: build this tree's), TCP_MMAP_DIR (where the tool is built;
# default: target/tcp_mmap under CARGO_TARGET_DIR or ./target).
#
# tcp_mmap.c is not in this repository: it is taken at run time from
# Debian's linux-source-6.12 package (installed with apt-get if missing, as
# kernel-patch/run-uml.sh does) and built with gcc (-lpthread -lcrypto;
# libssl-dev). The tool always sends FILE_SZ = 32 GiB; the copy built here
# sends TOTAL_MIB instead (its `#define FILE_SZ` is wrapped in #ifndef and
# set with -D), so runs take seconds; TOTAL_MIB=32768 is the original.
# pagerpc's receiver CPU is its whole receiving process (RUSAGE_SELF),
# tcp_mmap's is its receiving thread (RUSAGE_THREAD); nothing is pinned.
# A measurement, not a test: CI does not run it.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${RUNS:-3}
total=${TOTAL_MIB:-2048}
size=${SIZE_KIB:-1024}
chunk=$((${CHUNK_KIB:-512} * 1024))
mss=${MSS:-4108}
port=${PORT:-8787}
pkg=linux-source-6.12
tarball=/usr/src/$pkg.tar.xz
member=$pkg/tools/testing/selftests/net/tcp_mmap.c
dir=${TCP_MMAP_DIR:-${CARGO_TARGET_DIR:-$PWD/target}/tcp_mmap}

# ---- the tool -------------------------------------------------------------
need=()
[ -f "$tarball" ] || need+=("$pkg")
command -v gcc >/dev/null 2>&1 || need+=(gcc)
[ -f /usr/include/openssl/evp.h ] || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || { echo "need root to apt-get install ${need[*]}" >&2; exit 1; }
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${need[@]}"
    fi
fi
mkdir -p "$dir"
src=$dir/tcp_mmap.c
if [ ! -s "$src" ] || [ "$tarball" -nt "$src" ]; then
    echo "extracting $member from $tarball"
    tar -xJf "$tarball" -O "$member" >"$src.tmp"
    mv "$src.tmp" "$src"
fi
tool=$dir/tcp_mmap-${total}m
if [ ! -x "$tool" ] || [ "$src" -nt "$tool" ]; then
    grep -qx '#define FILE_SZ (1ULL << 35)' "$src" ||
        { echo "$src: no '#define FILE_SZ (1ULL << 35)' line to make the size settable" >&2; exit 1; }
    sed 's/^#define FILE_SZ (1ULL << 35)$/#ifndef FILE_SZ\n&\n#endif/' "$src" >"$dir/tcp_mmap-sized.c"
    gcc -O2 -Wall -DFILE_SZ="(${total}ULL << 20)" -o "$tool" "$dir/tcp_mmap-sized.c" -lpthread -lcrypto
fi

# ---- pagerpc-bench --------------------------------------------------------
bench=${PAGERPC_BENCH:-}
if [ -z "$bench" ]; then
    cargo build --release -q -p pagerpc-bench
    bench=${CARGO_TARGET_DIR:-$PWD/target}/release/pagerpc-bench
fi

tmp=$(mktemp -d)
srv=
cleanup() {
    if [ -n "$srv" ]; then kill "$srv" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

hz=$(getconf CLK_TCK)
busy() { awk '$1 == "cpu" { print $2 + $3 + $4 + $7 + $8; exit }' /proc/stat; }
# machine T0 T1 MB: the whole machine's CPU usec per MB between two busy().
machine() { awk -v a="$1" -v b="$2" -v hz="$hz" -v mb="$3" 'BEGIN { printf "%.1f", (b - a) / hz * 1e6 / mb }'; }

# tcp_mmap_run copy|mmap: one transfer; prints one line.
tcp_mmap_run() {
    local mode=$1 z=()
    [ "$mode" = mmap ] && z=(-z)
    # Line-buffered, so the server's report reaches the file before it is killed.
    stdbuf -oL "$tool" -s "${z[@]}" -M "$mss" -C "$chunk" -p "$port" >"$tmp/srv.out" 2>"$tmp/srv.err" &
    srv=$!
    local i
    for i in $(seq 1 100); do
        ss -Hltn "sport = :$port" | grep -q . && break
        kill -0 "$srv" 2>/dev/null || break
        sleep 0.05
    done
    local t0 t1 ok=1
    t0=$(busy)
    timeout 120 "$tool" -H ::1 "${z[@]}" -M "$mss" -C "$chunk" -p "$port" >/dev/null 2>"$tmp/cli.err" || ok=0
    for i in $(seq 1 200); do
        grep -q 'usec per MB' "$tmp/srv.out" && break
        kill -0 "$srv" 2>/dev/null || break
        sleep 0.05
    done
    t1=$(busy)
    kill "$srv" 2>/dev/null || true
    wait "$srv" 2>/dev/null || true
    srv=
    if [ "$ok" = 0 ] || ! grep -q 'usec per MB' "$tmp/srv.out"; then
        echo "tcp_mmap-$mode: FAILED: $(cat "$tmp/srv.err" "$tmp/cli.err" | grep -v MAP_HUGETLB | tail -n 2 | tr '\n' ' ')"
        return
    fi
    # "received M MB (P % mmap'ed) in S s, G Gbit" + "  cpu usage user:U sys:S, X usec per MB, N c-switches, rcv_mss R"
    local line mb
    line=$(grep -A1 '^received' "$tmp/srv.out" | sed 's/^ *//' | paste -sd ';' - | sed 's/;/; /')
    mb=$(awk '{ print $2 }' <<<"$line")
    echo "tcp_mmap-$mode: $line; machine $(machine "$t0" "$t1" "$mb") usec per MB"
}

# pagerpc_run copy|zerocopy: one transfer; prints one line.
pagerpc_run() {
    local mode=$1 z=()
    [ "$mode" = zerocopy ] && z=(--zerocopy)
    local t0 t1
    t0=$(busy)
    if ! timeout 120 "$bench" bulk --size-kib "$size" --total-mib "$total" --mss "$mss" "${z[@]}" \
        >"$tmp/pg.out" 2>&1; then
        echo "pagerpc-$mode: FAILED: $(tail -n 1 "$tmp/pg.out")"
        return
    fi
    t1=$(busy)
    local line mb
    line=$(grep '^received' "$tmp/pg.out")
    mb=$(awk '{ print $2 }' <<<"$line")
    # The bench's own machine line covers the transfer only; the script's
    # window (as for tcp_mmap) also covers process start and connection setup.
    echo "pagerpc-$mode: $line; machine $(machine "$t0" "$t1" "$mb") usec per MB" \
        "(bench: $(sed -n 's/^machine cpu .*, \([0-9.]*\) usec per MB.*/\1/p' "$tmp/pg.out"))"
}

if ss -Hltn "sport = :$port" | grep -q .; then
    echo "port $port is already in use; set PORT" >&2
    exit 1
fi
log=$tmp/log
echo "tcp_mmap ($tool, -C $chunk, -M $mss, ::1) vs $bench bulk (--size-kib $size, --mss $mss, 127.0.0.1); $total MiB per run"
for r in $(seq 1 "$runs"); do
    echo "== round $r"
    tcp_mmap_run copy | tee -a "$log"
    pagerpc_run copy | tee -a "$log"
    tcp_mmap_run mmap | tee -a "$log"
    pagerpc_run zerocopy | tee -a "$log"
done

echo "== medians over $runs round(s), $total MiB each (receiver = the receiving process; tcp_mmap: its receiving thread)"
awk '
function median(key,   n, i, j, t, a) {
    n = split(vals[key], a, " ")
    for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j-1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j-1]; a[j-1] = t }
    return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
}
function add(key, v) { vals[key] = vals[key] (vals[key] == "" ? "" : " ") v }
$2 == "FAILED:" { failed[substr($1, 1, length($1) - 1)]++; next }
{
    name = substr($1, 1, length($1) - 1)
    runs[name]++
    for (i = 2; i <= NF; i++) {
        if ($i ~ /^Gbit[,;]?$/) add(name " gbit", $(i - 1))
        if ($i == "usec" && $(i - 2) != "machine") add(name " usec", $(i - 1))
        if ($i == "usec" && $(i - 2) == "machine") add(name " machine", $(i - 1))
        if ($i == "%" && $(i + 1) == "mmap'"'"'ed)") add(name " pct", substr($(i - 1), 2))
    }
}
END {
    printf "%-18s %5s %8s %10s %18s %17s\n", "", "runs", "Gbit", "mmaped %", "receiver usec/MB", "machine usec/MB"
    split("tcp_mmap-copy pagerpc-copy tcp_mmap-mmap pagerpc-zerocopy", order, " ")
    for (k = 1; k <= 4; k++) {
        n = order[k]
        if (!runs[n]) continue
        printf "%-18s %5d %8.2f %10.2f %18.1f %17.1f\n", n, runs[n], median(n " gbit"), median(n " pct"), median(n " usec"), median(n " machine")
        med[n] = median(n " usec"); mach[n] = median(n " machine")
    }
    if (med["tcp_mmap-copy"] && med["pagerpc-copy"])
        printf "pagerpc copy / tcp_mmap copy:          receiver %.2fx, machine %.2fx\n", med["pagerpc-copy"] / med["tcp_mmap-copy"], mach["pagerpc-copy"] / mach["tcp_mmap-copy"]
    if (med["tcp_mmap-mmap"] && med["pagerpc-zerocopy"])
        printf "pagerpc zero-copy / tcp_mmap -z:       receiver %.2fx, machine %.2fx (issue 13 goal: receiver <= 1.10x)\n", med["pagerpc-zerocopy"] / med["tcp_mmap-mmap"], mach["pagerpc-zerocopy"] / mach["tcp_mmap-mmap"]
    for (f in failed) printf "%s: %d failed run(s)\n", f, failed[f]
}' "$log"
