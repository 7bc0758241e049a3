#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the local stack and Prometheus, starts a separate
# `test` stack (its own ports and a fresh data directory, so a running demo is left alone),
# runs every test against it, and stops what it started.
#
#   scripts/test.sh [extra cargo test arguments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

export KSCORE_STACK_NAME=test
export KSCORE_KAFKA_PORT="${KSCORE_TEST_KAFKA_PORT:-19092}"
export KSCORE_REGISTRY_PORT="${KSCORE_TEST_REGISTRY_PORT:-18081}"

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

scripts/stack.sh install-prometheus
scripts/stack.sh stop >/dev/null 2>&1 || true
scripts/stack.sh reset >/dev/null
trap 'scripts/stack.sh stop' EXIT
scripts/stack.sh start
eval "$(scripts/stack.sh env)"

LOG="$(mktemp)"
status=0
# (The backpressure test's million-event run is `cargo test --release --test backpressure`, by
# hand: not yet measured to fit CI's time.)
{ cargo test --locked --doc && cargo test --locked --all-targets "$@"; } 2>&1 | tee "$LOG" || status=$?
scripts/stack.sh stop
trap - EXIT
# One closing line for the whole suite, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$LOG"
rm -f "$LOG"
exit "$status"
