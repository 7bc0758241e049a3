#!/usr/bin/env bash
# The main job on the local stack: installs and starts everything, builds kscore (release), then
# streams simulated card payments at a steady rate and shows them flowing, one line a second,
# until Ctrl-C or for a given duration. The stack keeps running afterwards; stop it with
# `scripts/stack.sh stop`.
#
#   scripts/demo.sh [--duration 60s] [--rate 200] [--topic payments]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION=""
RATE=200
TOPIC=payments
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --topic) TOPIC="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

export KSCORE_PROFILE=release
scripts/stack.sh start
eval "$(scripts/stack.sh env)"
BIN="$ROOT/target/release/kscore"
LOGS="$ROOT/.local/default/run"

limit=()
[[ -n "$DURATION" ]] && limit=(--duration "$DURATION")

echo "[demo] simulating payments to '$TOPIC' at $RATE/s (log: $LOGS/simulator.log); Ctrl-C to stop"
"$BIN" simulate --topic "$TOPIC" --rate "$RATE" --labels "$LOGS/labels.csv" "${limit[@]}" >"$LOGS/simulator.log" 2>&1 &
SIM=$!
cleanup() { kill "$SIM" 2>/dev/null || true; wait "$SIM" 2>/dev/null || true; echo "[demo] stopped; the stack is still up (scripts/stack.sh stop)"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

"$BIN" tail --topic "$TOPIC" "${limit[@]}"
