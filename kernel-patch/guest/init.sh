#!/bin/bash
# PID 1 of the pagerpc UML test guest (started by kernel-patch/run-uml.sh).
#
# The root file system is the host's / over hostfs, so every host path,
# binary and library is visible at the same place.  run-uml.sh passes, on
# the kernel command line (unknown NAME=value parameters become init's
# environment):
#   PAGERPC_RUN   host directory for this run (shared through hostfs):
#                 guest-cmds.txt in, guest-result.txt + dmesg.txt out
#   PAGERPC_ROOT  repository root; every command runs with it as cwd
#   PAGERPC_BIN   directory holding guest_util and the compiled C tests
#
# guest-cmds.txt holds one shell command per line (run with bash -c; empty
# lines and lines starting with # are skipped).  Each must exit 0.
# Markers on the console (parsed by run-uml.sh):
#   PAGERPC-GUEST-CMD: <cmd>
#   PAGERPC-GUEST-CMD-RESULT: rc=<rc> <cmd>
#   PAGERPC-GUEST-KERNEL: debug_locks=<0|1> tainted=<n>
#   PAGERPC-GUEST-RESULT: PASS | FAIL
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb LANG=C.UTF-8
unset mem	# UML passes its mem= parameter on to init

say() { echo "$*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
# a guest-private scratch directory (the host's /tmp is shared via hostfs)
export TMPDIR=/dev/shm

bin=${PAGERPC_BIN:?}
run=${PAGERPC_RUN:?}
root=${PAGERPC_ROOT:?}

"$bin/guest_util" lo-up || say "PAGERPC-GUEST-WARN: could not bring lo up"
say "PAGERPC-GUEST: kernel $(uname -r), $(nproc) cpu, $(awk '/MemTotal/ {print $2 " kB"}' /proc/meminfo)"

ok=1
ncmd=0
while IFS= read -r cmd || [ -n "$cmd" ]; do
	case "$cmd" in ''|'#'*) continue ;; esac
	ncmd=$((ncmd + 1))
	say "PAGERPC-GUEST-CMD: $cmd"
	(cd "$root" && exec bash -c "$cmd") < /dev/null
	rc=$?
	say "PAGERPC-GUEST-CMD-RESULT: rc=$rc $cmd"
	[ "$rc" -eq 0 ] || ok=0
done < "$run/guest-cmds.txt"
[ "$ncmd" -gt 0 ] || { say "PAGERPC-GUEST-WARN: no commands"; ok=0; }

# Lockdep switches itself off (debug_locks=0) after its first report, and any
# WARN/BUG taints the kernel: both must be clean.
debug_locks=$(awk -F: '/debug_locks/ {gsub(/ /, "", $2); print $2}' /proc/lockdep_stats 2>/dev/null)
tainted=$(cat /proc/sys/kernel/tainted 2>/dev/null)
say "PAGERPC-GUEST-KERNEL: debug_locks=${debug_locks:-missing} tainted=${tainted:-missing}"
[ "${debug_locks:-}" = 1 ] || ok=0
[ "${tainted:-}" = 0 ] || ok=0
grep -E 'lock-classes|direct dependencies|dependency chains' /proc/lockdep_stats 2>/dev/null |
	sed 's/^ */PAGERPC-GUEST-LOCKDEP: /'
# Direct dependencies lockdep recorded between the socket lock and mmap_lock:
# sk_lock -> mmap_lock is the legal order (upstream's); the reverse edge is
# what the 2018 patch created and must never appear.
lockdep_edge() {
	awk -v from="$1" -v to="$2" '
		/^[0-9a-f]+ / { cur = $NF; next }
		cur == from && $1 == "->" && $NF == to { found = 1 }
		END { print found ? "yes" : "no" }' /proc/lockdep 2>/dev/null
}
for sk in sk_lock-AF_INET sk_lock-AF_INET6; do
	fwd=$(lockdep_edge "$sk" '&mm->mmap_lock')
	rev=$(lockdep_edge '&mm->mmap_lock' "$sk")
	say "PAGERPC-GUEST-LOCKDEP: $sk -> &mm->mmap_lock recorded: $fwd"
	say "PAGERPC-GUEST-LOCKDEP: &mm->mmap_lock -> $sk recorded: $rev"
	[ "$rev" = no ] || ok=0
done
dmesg > "$run/dmesg.txt" 2>&1

if [ "$ok" = 1 ]; then result=PASS; else result=FAIL; fi
say "PAGERPC-GUEST-RESULT: $result"
echo "$result" > "$run/guest-result.txt"
sync
exec "$bin/guest_util" poweroff
