#!/usr/bin/env bash
# End-to-end benchmark on a local stack of its own (`bench`, ports 39092/38081, fresh data):
# the processor with exactly-once against a transactional passthrough, throughput, CPU, peak
# RSS and event-time-to-commit latency at half the processor's maximum rate.
#
#   scripts/bench.sh [--events 200000] [--latency-seconds 20] [--json out.json]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export KSCORE_STACK_NAME=bench
export KSCORE_KAFKA_PORT="${KSCORE_BENCH_KAFKA_PORT:-39092}"
export KSCORE_REGISTRY_PORT="${KSCORE_BENCH_REGISTRY_PORT:-38081}"
export KSCORE_PROFILE=release
cargo build --release --locked
scripts/stack.sh stop >/dev/null 2>&1 || true
scripts/stack.sh reset >/dev/null
trap 'scripts/stack.sh stop' EXIT
scripts/stack.sh start
eval "$(scripts/stack.sh env)"
export RUST_LOG="${RUST_LOG:-warn}"
python3 scripts/bench_e2e.py "$@"
