#!/usr/bin/env bash
# The GPU check, one command, for a machine with an NVIDIA GPU (under 5 minutes there):
#   1. CPU half: build kscore, install the CPU build of ONNX Runtime, `kscore check-runtime`
#      (which provider runs each node of each model), score the stored reference batch and
#      compare with the stored scores, measure rows/s per batch size (kscore bench-models).
#   2. CUDA half, where nvidia-smi lists a GPU: install the CUDA build (scripts/stack.sh
#      install-gpu), `check-runtime --execution-provider cuda` (fails if any node of either
#      model runs on the CPU), score the reference batch on CUDA and compare with the stored CPU
#      scores (within 1e-4), measure rows/s per batch size.
#   3. One table: model, batch size, CPU rows/s, CUDA rows/s.
# Without a GPU it says so and exits 0 after the CPU half. Exit status 1 if any check failed.
# Batch sizes: KSCORE_GPU_CHECK_BATCHES (default 64,128,...,8192).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BATCHES="${KSCORE_GPU_CHECK_BATCHES:-64,128,256,512,1024,2048,4096,8192}"
KS=target/release/kscore
OUT="$(mktemp -d)"
say() { printf '[gpu_check] %s\n' "$*"; }

# rows_per_s lines of both halves -> one table.
table() {
  cat "$OUT"/rates.* 2>/dev/null | awk '
    $1 == "rows_per_s" { key = $3 " " $4; rate[$2, key] = $5; if (!(key in seen)) { seen[key] = 1; order[n++] = key } }
    END {
      printf "%-12s %8s %14s %14s\n", "model", "batch", "cpu rows/s", "cuda rows/s"
      for (i = 0; i < n; i++) {
        split(order[i], k, " ")
        cuda = (("cuda", order[i]) in rate) ? rate["cuda", order[i]] : "-"
        printf "%-12s %8s %14s %14s\n", k[1], k[2], rate["cpu", order[i]], cuda
      }
    }'
}

status=0
say "building kscore and installing the CPU build of ONNX Runtime"
cargo build --release --quiet --bin kscore
scripts/stack.sh install
(
  eval "$(scripts/stack.sh env)"
  "$KS" check-runtime --topology topologies/fraud.toml
  "$KS" bench-models --execution-provider cpu --batches "$BATCHES" --time-per-batch 500ms | tee "$OUT/rates.cpu"
) || status=1

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  say "no NVIDIA GPU on this machine (nvidia-smi lists none): CPU half only"
  table
  exit "$status"
fi
nvidia-smi -L
say "installing the CUDA build of ONNX Runtime"
scripts/stack.sh install-gpu
(
  eval "$(scripts/stack.sh gpu-env)"
  "$KS" check-runtime --topology topologies/fraud.toml --execution-provider cuda
) || { status=1; say "FAILED: a model does not run whole on CUDA (see above)"; }
(
  eval "$(scripts/stack.sh gpu-env)"
  "$KS" bench-models --execution-provider cuda --batches "$BATCHES" --time-per-batch 500ms | tee "$OUT/rates.cuda"
) || { status=1; say "FAILED: CUDA scores differ from the CPU reference, or CUDA did not run"; }
table
exit "$status"
