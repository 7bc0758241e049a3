#!/usr/bin/env bash
# The main job on the local stack: installs and starts everything, builds kscore (release), then
# streams simulated card payments at a steady rate through the processor with the shipped
# topology (topologies/fraud.toml), printing a live one-line summary each second, until Ctrl-C
# or for a given duration. The stack keeps running afterwards (`scripts/stack.sh stop`).
#
#   scripts/demo.sh [--duration 60s] [--rate 100] [--cards N]
#
# Without --cards the simulator spreads the rate over about 3,000 cards per event a second
# (299,401 at the default 100/s), so each card makes about 1.2 payments an hour, as in the data the shipped
# models were trained on.
#
# Scored events go to `payments-scored`, alerts to `payments-alerts`, bad records to
# `payments-dlq`; `kscore tail --topic payments` shows the input.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

DURATION=""
RATE=100
CARDS=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --rate) RATE="$2"; shift 2 ;;
    --cards) CARDS="$2"; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs)" >&2; exit 1; }

export KSCORE_PROFILE=release
scripts/stack.sh start
eval "$(scripts/stack.sh env)"
BIN="$ROOT/target/release/kscore"
LOGS="$ROOT/.local/${KSCORE_STACK_NAME:-default}/run"
"$BIN" validate topologies/fraud.toml

limit=()
[[ -n "$DURATION" ]] && limit=(--duration "$DURATION")

cards=()
[[ -n "$CARDS" ]] && cards=(--cards "$CARDS")

# The simulator's cards transact about 1.2 times an hour each unless --cards says otherwise, the
# activity the shipped models were trained on (scripts/train.sh).
echo "[demo] simulating payments to 'payments' at $RATE/s over ${CARDS:-about 3,000 per event a second of} cards (log: $LOGS/simulator.log)"
"$BIN" simulate --topic payments --rate "$RATE" "${cards[@]}" --labels "$LOGS/labels.csv" "${limit[@]}" \
  >"$LOGS/simulator.log" 2>&1 &
SIM=$!
cleanup() { kill "$SIM" 2>/dev/null || true; wait "$SIM" 2>/dev/null || true; echo "[demo] stopped; the stack is still up (scripts/stack.sh stop)"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "[demo] processor: kscore run --topology topologies/fraud.toml (log: $LOGS/processor.log; metrics on http://127.0.0.1:9464/metrics)"
"$BIN" run --topology topologies/fraud.toml --summary-every 1s --metrics-listen 127.0.0.1:9464 "${limit[@]}" 2>"$LOGS/processor.log"
