#!/bin/bash
# Build a trimmed User-mode Linux kernel (Debian's linux-source-6.12 plus the
# TCP_MMAP_CONSUME series in this directory, CONFIG_PROVE_LOCKING on, and the
# harness fix uml-host/0*.patch so that UML runs on hosts with large XSAVE
# areas), boot it with the host's / as a hostfs root, run tests inside it and
# turn the guest's verdict into this script's exit status.
#
# usage: kernel-patch/run-uml.sh [options] [--] [guest-cmd ...]
#
# Each guest-cmd is one shell command line (run with `bash -c`, cwd = the
# repository root, as root, on a guest with only loopback networking); each
# must exit 0.  They run after the built-in C tests, in order.  More commands
# can come from a file: PAGERPC_UML_CMDS=file (one command per line, # for
# comments).  Paths are the host's (the guest sees the host's / unchanged).
#
# options:
#   --no-builtin-tests   do not run kernel-patch/tests/uml_fpu_test (the guest
#                        keeps vector registers) and mmap_consume_test
#   --bulk-mib N         size of the built-in bulk transfer test (default 64)
#   --mem SIZE           guest memory (default 1024M)
#   --timeout SECONDS    limit for the boot + all guest commands (default 900)
#   --jobs N             make -j (default: number of CPUs + 1)
#   --rebuild            ignore the build cache stamp and run make again
#   --negative-control   also apply negative-control/*.patch (the 2018 lock
#                        order) in target/uml/negative-control and expect
#                        lockdep to catch it: exits 0 only if it does
#   --verbose            show every kernel console line, not just warnings
#
# exit status: 0 guest PASS and lockdep clean; 1 test or lockdep failure or
# guest timeout; 2 setup/build problem, including a host that cannot run UML
# at all (tests/uml_host_probe.c: no ptrace, or the host refuses its own FPU
# state back).  There is no "skipped" status.
#
# Output (relative to the repository root):
#   target/uml/src/linux-source-6.12   patched source      target/uml/build  O= dir
#   target/uml/bin                     guest helpers/tests  target/uml/run    console.log,
#   target/uml/logs                    apt/patch/config/build logs            dmesg.txt, ...
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)

KVER_PKG=linux-source-6.12
TARBALL=/usr/src/linux-source-6.12.tar.xz
SRCNAME=linux-source-6.12

builtin_tests=1
bulk_mib=64
mem=1024M
boot_timeout=900
jobs=$(( $(nproc 2>/dev/null || echo 2) + 1 ))
rebuild=0
negative=0
verbose=0
guest_cmds=()

while [ $# -gt 0 ]; do
	case "$1" in
	--no-builtin-tests) builtin_tests=0 ;;
	--bulk-mib) bulk_mib=$2; shift ;;
	--mem) mem=$2; shift ;;
	--timeout) boot_timeout=$2; shift ;;
	--jobs) jobs=$2; shift ;;
	--rebuild) rebuild=1 ;;
	--negative-control) negative=1 ;;
	--verbose) verbose=1 ;;
	-h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	--) shift; guest_cmds+=("$@"); break ;;
	-*) echo "run-uml: unknown option $1" >&2; exit 2 ;;
	*) guest_cmds+=("$1") ;;
	esac
	shift
done

base=$root/target/uml
[ "$negative" = 1 ] && base=$root/target/uml/negative-control
src_parent=$base/src
src=$src_parent/$SRCNAME
build=$base/build
bin=$base/bin
run=$base/run
logs=$base/logs

t_start=$(date +%s)
log() { printf 'run-uml [%3ds]: %s\n' "$(( $(date +%s) - t_start ))" "$*"; }
die() { log "ERROR: $*" >&2; exit 2; }

case "$root$here" in *[[:space:]]*) die "the repository path must not contain spaces (it is passed on the UML kernel command line)" ;; esac
mkdir -p "$src_parent" "$build" "$bin" "$run" "$logs"

# ---- 1. host packages ---------------------------------------------------------
need_pkgs=(build-essential bc flex bison xz-utils patch perl "$KVER_PKG")
missing=()
for p in "${need_pkgs[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	log "installing ${missing[*]}"
	[ "$(id -u)" = 0 ] || die "need root to apt-get install ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${missing[@]}" > "$logs/apt.log" 2>&1; then
		log "apt-get install failed, running apt-get update first"
		apt-get update >> "$logs/apt.log" 2>&1 || die "apt-get update failed, see $logs/apt.log"
		apt-get install -y --no-install-recommends "${missing[@]}" >> "$logs/apt.log" 2>&1 ||
			die "apt-get install failed, see $logs/apt.log"
	fi
fi
[ -f "$TARBALL" ] || die "$TARBALL missing although $KVER_PKG is installed"
pkg_version=$(dpkg-query -W -f='${Version}' "$KVER_PKG")

# ---- 1b. can this host run the UML guest's userspace at all? -------------------
# UML moves each guest process's FPU state through ptrace with the host's
# XSAVE size (uml-host/0001-*.patch; stock 6.12 used a fixed 2696 bytes, which
# hosts with AMX refuse).  tests/uml_host_probe.c does the same round trip;
# if it fails the guest could not start, so stop before spending minutes on a
# build.  This is a failure, not a skip.
gcc -O2 -o "$bin/uml_host_probe" "$here/tests/uml_host_probe.c" 2> "$logs/probe.log" ||
	die "compiling tests/uml_host_probe.c failed, see $logs/probe.log"
set +e
probe=$("$bin/uml_host_probe")
probe_rc=$?
set -e
[ "$probe_rc" = 0 ] ||
	die "this host cannot run the UML guest (host kernel $(uname -r)): ${probe:-probe exited $probe_rc}"
log "host: $probe"

# ---- 2. source tree + patch series --------------------------------------------
# the harness fix for UML itself first, then the TCP_MMAP_CONSUME series
series=("$here"/uml-host/0*.patch "$here"/0*.patch)
[ "$negative" = 1 ] && series+=("$here"/negative-control/0*.patch)
for p in "${series[@]}"; do [ -f "$p" ] || die "no patches matching $p"; done
series_hash=$( { echo "$pkg_version"; for p in "${series[@]}"; do basename "$p"; cat "$p"; done; } | sha256sum | cut -c1-16)

extract() {
	log "unpacking $TARBALL ($pkg_version)"
	rm -rf "$src" "$src_parent/.applied"
	tar -C "$src_parent" -xf "$TARBALL"
	echo "$pkg_version" > "$src_parent/.extracted"
	# the tarball's old mtimes would hide source changes from make: the
	# objects of an earlier tree must go
	rm -rf "$build"
	mkdir -p "$build"
	keep_sum=() keep_mtime=()
}
declare -A keep_sum=() keep_mtime=()
if [ ! -d "$src" ] || [ "$(cat "$src_parent/.extracted" 2>/dev/null)" != "$pkg_version" ]; then
	extract
fi

touched_files() {	# files a set of patches modify
	sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$@" | sort -u
}
if [ "$(cat "$src_parent/.applied/hash" 2>/dev/null)" != "$series_hash" ]; then
	# Remember the files both series touch, so that those whose content
	# ends up unchanged get their old mtime back: reverting and reapplying
	# include/linux/fs.h would otherwise rebuild the whole kernel.
	while IFS= read -r f; do
		[ -f "$src/$f" ] || continue
		keep_sum[$f]=$(sha256sum < "$src/$f")
		keep_mtime[$f]=$(stat -c %Y "$src/$f")
	done < <(touched_files "${series[@]}" "$src_parent/.applied/"*.patch 2>/dev/null)
	# undo a previously applied, different series (keeps the build incremental)
	if [ -d "$src_parent/.applied" ]; then
		log "series changed: reverting the previously applied patches"
		mapfile -t old < <(ls "$src_parent/.applied/"[0-9][0-9][0-9]-*.patch 2>/dev/null | sort -r)
		for p in "${old[@]}"; do
			if ! patch -d "$src" -p1 -R -s -f < "$p" >> "$logs/patch.log" 2>&1; then
				log "could not revert $(basename "$p"); unpacking afresh"
				extract
				break
			fi
		done
		rm -rf "$src_parent/.applied"
	fi
	for p in "${series[@]}"; do
		if patch -d "$src" -p1 -R --dry-run -s -f < "$p" > /dev/null 2>&1; then
			log "already applied: $(basename "$p")"
			continue
		fi
		log "applying $(basename "$p")"
		patch -d "$src" --forward -p1 < "$p" >> "$logs/patch.log" 2>&1 ||
			die "patch $(basename "$p") does not apply to $KVER_PKG $pkg_version, see $logs/patch.log"
	done
	mkdir -p "$src_parent/.applied"
	i=0
	for p in "${series[@]}"; do	# keep the order for a later revert
		i=$((i + 1))
		cp "$p" "$src_parent/.applied/$(printf %03d $i)-$(basename "$p")"
	done
	echo "$series_hash" > "$src_parent/.applied/hash"
	for f in "${!keep_sum[@]}"; do
		if [ -f "$src/$f" ] && [ "$(sha256sum < "$src/$f")" = "${keep_sum[$f]}" ]; then
			touch -d "@${keep_mtime[$f]}" "$src/$f"
		fi
	done
fi
kernelversion=$(make -s -C "$src" kernelversion 2>/dev/null)
log "kernel $kernelversion (Debian $KVER_PKG $pkg_version), series $series_hash: ${series[*]#"$here"/}"

# ---- 3./4. configure + build (cached) -------------------------------------------
frag=$here/uml.config
build_hash=$( { echo "$series_hash"; cat "$frag"; } | sha256sum | cut -c1-16)
stamp=$build/.pagerpc-build-stamp
kmake=(make -C "$src" ARCH=um O="$build")

if [ "$rebuild" = 0 ] && [ -x "$build/linux" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$build_hash" ]; then
	log "UML kernel up to date ($build/linux, stamp $build_hash)"
else
	rm -f "$stamp"
	log "configuring: allnoconfig + $(basename "$frag")"
	{
		"${kmake[@]}" allnoconfig
		"$src/scripts/kconfig/merge_config.sh" -m -O "$build" "$build/.config" "$frag"
		"${kmake[@]}" olddefconfig
	} > "$logs/config.log" 2>&1 || die "configuration failed, see $logs/config.log"
	bad=0
	while IFS= read -r line; do
		case "$line" in CONFIG_*=*) ;; *) continue ;; esac
		if ! grep -qxF -- "$line" "$build/.config"; then
			log "config: wanted '$line', got '$(grep -E "^(# )?${line%%=*}[= ]" "$build/.config" || echo unset)'" >&2
			bad=1
		fi
	done < "$frag"
	[ "$bad" = 0 ] || die "the config fragment did not stick (dependencies?), see $build/.config"
	log "building with make -j$jobs (log: $logs/build.log)"
	t_build=$(date +%s)
	"${kmake[@]}" -j"$jobs" linux > "$logs/build.log" 2>&1 || {
		grep -E 'error|Error' "$logs/build.log" | head -20 >&2
		die "kernel build failed, see $logs/build.log"
	}
	echo "$build_hash" > "$stamp"
	log "built $build/linux in $(( $(date +%s) - t_build ))s"
fi

# ---- guest helpers, tests, command list ------------------------------------------
cc=(gcc -O2 -Wall -Wextra -Wno-sign-compare)
"${cc[@]}" -o "$bin/guest_util" "$here/guest/guest_util.c" || die "compiling guest_util failed"
"${cc[@]}" -pthread -o "$bin/mmap_consume_test" "$here/tests/mmap_consume_test.c" ||
	die "compiling mmap_consume_test failed"
"${cc[@]}" -o "$bin/uml_fpu_test" "$here/tests/uml_fpu_test.c" || die "compiling uml_fpu_test failed"
install -m 0755 "$here/guest/init.sh" "$bin/init.sh"

rm -f "$run/guest-result.txt" "$run/dmesg.txt" "$run/console.log"
{
	echo "# generated by run-uml.sh"
	if [ "$builtin_tests" = 1 ]; then
		echo "$bin/uml_fpu_test"
		echo "$bin/mmap_consume_test -t $bulk_mib"
	fi
	if [ -n "${PAGERPC_UML_CMDS:-}" ]; then
		[ -f "$PAGERPC_UML_CMDS" ] || die "PAGERPC_UML_CMDS=$PAGERPC_UML_CMDS is not a file"
		cat "$PAGERPC_UML_CMDS"
		echo
	fi
	for c in "${guest_cmds[@]+"${guest_cmds[@]}"}"; do
		printf '%s\n' "$c"
	done
} > "$run/guest-cmds.txt"
grep -qv '^#' "$run/guest-cmds.txt" || die "nothing to run in the guest"

# ---- 5. boot ----------------------------------------------------------------------
# UML keeps guest RAM in a file under $TMPDIR: prefer /dev/shm (tmpfs) when it
# has room, else a directory under target/uml.
mem_mb=${mem%M}
case "$mem" in *G) mem_mb=$(( ${mem%G} * 1024 )) ;; esac
umltmp=
if [ -d /dev/shm ] && [ -w /dev/shm ] &&
   [ "$(df -Pm /dev/shm | awk 'NR==2 {print $4}')" -gt $(( mem_mb + 256 )) ] 2>/dev/null; then
	umltmp=$(mktemp -d /dev/shm/pagerpc-uml.XXXXXX)
else
	mkdir -p "$base/tmp"
	umltmp=$(mktemp -d "$base/tmp/uml.XXXXXX")
fi
trap 'rm -rf "$umltmp"' EXIT

cmdline=(mem="$mem" rootfstype=hostfs rootflags=/ rw init="$bin/init.sh"
	con0=null,fd:1 con=null ssl=null
	PAGERPC_RUN="$run" PAGERPC_ROOT="$root" PAGERPC_BIN="$bin")
log "booting UML (mem=$mem, timeout ${boot_timeout}s), $(grep -vc '^#' "$run/guest-cmds.txt") guest command(s)"
splat_re='possible circular locking|possible recursive locking|inconsistent lock state|possible irq lock inversion|suspicious RCU usage|lock held when returning to user|WARNING:|BUG:|Kernel panic|Oops|general protection|DEBUG_LOCKS_WARN_ON|INFO: task .* blocked|turning off the locking correctness validator|Call Trace'
show() {
	if [ "$verbose" = 1 ]; then
		cat
	else
		# kernel lines carry a [timestamp] and UML's host-side start-up
		# checks come first: show only guest output and suspicious lines
		awk -v re="$splat_re" '
			$0 ~ re { print; fflush(); next }
			/^\[ *[0-9]+\.[0-9]+\]/ { next }
			/^(Core dump limits|\tsoft - |\thard - |Checking |Adding [0-9]+ bytes to physical memory)/ { next }
			{ print; fflush() }'
	fi
}
t_boot=$(date +%s)
set +e
TMPDIR=$umltmp timeout --kill-after=15 "$boot_timeout" "$build/linux" "${cmdline[@]}" < /dev/null 2>&1 |
	tr -d '\r' | tee "$run/console.log" | show
rcs=("${PIPESTATUS[@]}")
set -e
uml_rc=${rcs[0]}
boot_secs=$(( $(date +%s) - t_boot ))

# ---- 6. verdict -------------------------------------------------------------------
fail=()
if [ "$uml_rc" = 124 ] || [ "$uml_rc" = 137 ]; then
	fail+=("guest timed out after ${boot_timeout}s")
fi
if ! grep -q '^PAGERPC-GUEST-RESULT: PASS' "$run/console.log"; then
	fail+=("no PAGERPC-GUEST-RESULT: PASS marker")
fi
if grep -q '^PAGERPC-GUEST-RESULT: FAIL' "$run/console.log"; then
	fail+=("guest reported FAIL")
fi
if grep -q 'PAGERPC-TEST .*: FAIL' "$run/console.log"; then
	fail+=("a C test failed")
fi
if [ "$(cat "$run/guest-result.txt" 2>/dev/null)" != PASS ]; then
	fail+=("guest-result.txt is not PASS")
fi
# kernel text only: timestamped console lines and dmesg (the commands' own
# output may legitimately say "WARNING:")
splats=$( { grep -E '^\[ *[0-9]+\.[0-9]+\]' "$run/console.log"; cat "$run/dmesg.txt"; } 2>/dev/null |
	grep -E "$splat_re" | sort -u | head -20 || true)
if [ -n "$splats" ]; then
	fail+=("kernel warnings/lockdep reports found")
fi

cmd_ok=$(grep -c '^PAGERPC-GUEST-CMD-RESULT: rc=0 ' "$run/console.log" || true)
cmd_bad=$(grep '^PAGERPC-GUEST-CMD-RESULT: rc=' "$run/console.log" | grep -vc '^PAGERPC-GUEST-CMD-RESULT: rc=0 ' || true)
if [ "$negative" = 1 ]; then
	log "negative control: console $run/console.log"
	if grep -q 'possible circular locking dependency' "$run/console.log" "$run/dmesg.txt" 2>/dev/null; then
		log "negative control OK: lockdep reported the 2018 lock order, and the harness verdict was: ${fail[*]:-PASS}"
		[ ${#fail[@]} -gt 0 ] || { log "but the harness did not fail"; exit 1; }
		exit 0
	fi
	log "negative control FAILED: lockdep did not report the 2018 lock order"
	exit 1
fi
if [ -n "$splats" ]; then
	log "kernel reports (full text in $run/console.log and $run/dmesg.txt):"
	printf '  %s\n' "$splats"
fi
log "guest: $(grep '^PAGERPC-GUEST-KERNEL:' "$run/console.log" | tail -1 | cut -d' ' -f2-)," \
	"commands ok $cmd_ok, failed $cmd_bad, boot+run ${boot_secs}s, total $(( $(date +%s) - t_start ))s"
# one more check besides the commands: the kernel stayed clean
kernel_ok=0
if [ -z "$splats" ] && grep -q '^PAGERPC-GUEST-KERNEL: debug_locks=1 tainted=0$' "$run/console.log"; then
	kernel_ok=1
fi
if [ ${#fail[@]} -eq 0 ]; then
	log "PASS"
	echo "run-uml: $(( cmd_ok + kernel_ok )) passed, 0 failed"
	exit 0
fi
for f in "${fail[@]}"; do log "FAIL: $f"; done
n_failed=$(( cmd_bad + 1 - kernel_ok ))
[ "$n_failed" -gt 0 ] || n_failed=1
echo "run-uml: $(( cmd_ok + kernel_ok )) passed, $n_failed failed"
exit 1
