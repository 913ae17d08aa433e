#!/usr/bin/env bash
# Runs every test of pagerpc on a fresh machine: installs what the tests
# need, then the workspace tests, then a short fuzz run of every target.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
if [ ${#need_apt[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

echo "== cargo test (workspace, release) =="
cargo test --workspace --release

if [ -x fuzz/run.sh ]; then
    echo "== fuzz smoke run =="
    fuzz/run.sh "${FUZZ_SECONDS:-20}"
fi
