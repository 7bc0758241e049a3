#!/usr/bin/env bash
# Retrains the shipped models (models/*.onnx, report.json, reference_scores.json):
#   1. simulates labelled payments to a file (kscore simulate --output-file),
#   2. computes their features with the processor's own code (kscore features),
#   3. trains with pinned Python packages (models/requirements.txt) in .local/train-venv.
# Deterministic inputs (seeded simulator); about 5 minutes on 2 cores.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV=.local/train-venv
DATA=.local/train
if [[ ! -x "$VENV/bin/python" ]] || ! cmp -s models/requirements.txt "$VENV/requirements.txt"; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r models/requirements.txt
  cp models/requirements.txt "$VENV/requirements.txt"
fi
cargo build --release --quiet --bin kscore
mkdir -p "$DATA"
target/release/kscore simulate --output-file "$DATA/events.avro" --labels "$DATA/labels.csv" \
  --count 300000 --cards 5000 --merchants 1500 --event-rate 1.67 --fraud-per-10k 10 --seed 7
target/release/kscore features --topology topologies/fraud.toml --events "$DATA/events.avro" --output "$DATA/features.csv"
"$VENV/bin/python" scripts/train_models.py "$DATA"
