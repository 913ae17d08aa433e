#!/usr/bin/env bash
# Soak: a bounded mixed load (bulk, small calls, churn, injected faults).
# Usage: scripts/soak.sh [seconds]   (default 180)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p pagerpc-bench
exec target/release/pagerpc-bench soak --seconds "${1:-180}"
