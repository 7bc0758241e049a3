#!/usr/bin/env bash
# The local stack: a Kafka-protocol broker, the project's Schema Registry stand-in and the ONNX
# Runtime shared library, all installed and kept under .local/ in the repository (git ignores it).
#
#   scripts/stack.sh install   idempotent: venv + broker from pip, ONNX Runtime from its wheel
#   scripts/stack.sh install-prometheus   idempotent: Prometheus and promtool (apt-get), for
#                              the observability tests (scripts/test.sh calls it)
#   scripts/stack.sh install-gpu   idempotent: the CUDA build of ONNX Runtime (the
#                              onnxruntime-gpu wheel of the same version, with NVIDIA's CUDA 13 and
#                              cuDNN 9 user libraries from pip) in .local/gpu-venv
#   scripts/stack.sh gpu-env   the variables that point kscore at that build instead
#   scripts/stack.sh start     install, build the kscore binary, start broker and registry, wait
#   scripts/stack.sh stop      stop what `start` started (by the pids it recorded), nothing else
#   scripts/stack.sh status    what is running, and where
#   scripts/stack.sh env       the environment variables that point programs at this stack
#   scripts/stack.sh restart-broker   stop the broker and start it again (tests)
#   scripts/stack.sh stop-broker | start-broker   the broker alone, for outage tests
#
# Ports and locations come from the environment (defaults in brackets):
#   KSCORE_KAFKA_PORT [9092]  KSCORE_REGISTRY_PORT [8081]  KSCORE_STACK_DIR [<repo>/.local]
#   KSCORE_PROFILE [debug|release: which build of kscore serves the registry; default debug]
#   KSCORE_STACK_NAME [default]: a second stack (say `test`) keeps its own pids, logs and data,
#                     so the test suite never touches a running demo's broker.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK="${KSCORE_STACK_DIR:-$ROOT/.local}"
KAFKA_PORT="${KSCORE_KAFKA_PORT:-9092}"
REGISTRY_PORT="${KSCORE_REGISTRY_PORT:-8081}"
PROFILE="${KSCORE_PROFILE:-debug}"

NOIDA_VERSION="0.2.3"
ORT_VERSION="1.31.1"

VENV="$STACK/venv"
NAME="${KSCORE_STACK_NAME:-default}"
RUN="$STACK/$NAME/run"    # pid files and logs
DATA="$STACK/$NAME/data"  # broker and registry state
ORT_DIR="$STACK/onnxruntime"
ORT_LIB="$ORT_DIR/lib/libonnxruntime.so.$ORT_VERSION"
GPU_VENV="$STACK/gpu-venv"

say() { printf '[stack] %s\n' "$*" >&2; }
die() { printf '[stack] error: %s\n' "$*" >&2; exit 1; }

install_broker() {
  local bin="$VENV/lib/python3.11/site-packages/noida_db/noida-db"
  # pip's output is read whole, not piped into `grep -q`: under `pipefail` the pipe broken by
  # grep's early exit failed the test and reinstalled the broker on every start.
  local shown
  shown="$("$VENV/bin/pip" show noida-db 2>/dev/null || true)"
  if [[ -x "$bin" && $'\n'"$shown"$'\n' == *$'\nVersion: '"$NOIDA_VERSION"$'\n'* ]]; then
    return
  fi
  say "installing noida-db==$NOIDA_VERSION into $VENV"
  python3 -m venv "$VENV" || die "could not create a virtual environment at $VENV (is python3-venv installed?)"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "noida-db==$NOIDA_VERSION" \
    || die "pip could not install noida-db==$NOIDA_VERSION"
}

broker_bin() {
  local bin
  bin="$(ls "$VENV"/lib/python3*/site-packages/noida_db/noida-db 2>/dev/null | head -1)"
  [[ -x "$bin" ]] || die "broker binary not found under $VENV; run: scripts/stack.sh install"
  printf '%s' "$bin"
}

install_onnxruntime() {
  [[ -f "$ORT_LIB" ]] && return
  say "installing ONNX Runtime $ORT_VERSION (shared library from the pip wheel) into $ORT_DIR"
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --implementation cp --python-version 3.11 --platform manylinux_2_28_x86_64 \
    --dest "$tmp" "onnxruntime==$ORT_VERSION" || die "could not download the onnxruntime==$ORT_VERSION wheel"
  mkdir -p "$ORT_DIR/lib"
  python3 - "$tmp" "$ORT_DIR/lib" <<'PY' || die "could not unpack the ONNX Runtime library from the wheel"
import glob, os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(src, "onnxruntime-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if name.startswith("onnxruntime/capi/") and base.startswith("libonnxruntime") and ".so" in base:
            with z.open(name) as f, open(os.path.join(dst, base), "wb") as out:
                out.write(f.read())
PY
  rm -rf "$tmp"
  [[ -f "$ORT_LIB" ]] || die "the wheel did not contain libonnxruntime.so.$ORT_VERSION"
  ln -sf "libonnxruntime.so.$ORT_VERSION" "$ORT_DIR/lib/libonnxruntime.so"
}

# The CUDA build: `onnxruntime-gpu[cuda,cudnn]` pulls NVIDIA's CUDA runtime, cuBLAS, cuFFT,
# cuRAND and cuDNN wheels, so only the GPU driver has to be on the machine already.
gpu_lib() {
  ls "$GPU_VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so."$ORT_VERSION" 2>/dev/null | head -1
}

install_gpu() {
  [[ -n "$(gpu_lib)" ]] && return
  say "installing onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION into $GPU_VENV (about 1.5 GB)"
  python3 -m venv "$GPU_VENV" || die "could not create a virtual environment at $GPU_VENV"
  "$GPU_VENV/bin/pip" install --quiet --disable-pip-version-check "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" \
    || die "pip could not install onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION"
  [[ -n "$(gpu_lib)" ]] || die "the onnxruntime-gpu wheel did not contain libonnxruntime.so.$ORT_VERSION"
}

# ORT_DYLIB_PATH at the CUDA build, and the NVIDIA libraries' directories on the loader's path
# (the CUDA provider library is opened by ONNX Runtime and needs them).
print_gpu_env() {
  local lib dirs
  lib="$(gpu_lib)"
  [[ -n "$lib" ]] || die "the CUDA build is not installed; run: scripts/stack.sh install-gpu"
  dirs="$(find "$GPU_VENV"/lib/python3*/site-packages/nvidia -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
  echo "export ORT_DYLIB_PATH=$lib"
  echo "export LD_LIBRARY_PATH=${dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
}

# Prometheus and promtool, for the observability and alert-rule tests: the distribution's
# package (the server is not started by it; the tests start their own).
install_prometheus() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return
  command -v apt-get >/dev/null \
    || die "prometheus and promtool not found, and no apt-get to install them: install Prometheus (https://prometheus.io/download/) and put both on PATH"
  local sudo=()
  [[ "$(id -u)" == 0 ]] || sudo=(sudo)
  say "installing prometheus and promtool (apt-get install prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 \
    || { "${sudo[@]}" apt-get update -qq >/dev/null && "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null; } \
    || die "apt-get could not install prometheus"
  command -v promtool >/dev/null || die "the prometheus package did not provide promtool"
}

install() {
  mkdir -p "$STACK" "$RUN" "$DATA"
  install_broker
  install_onnxruntime
}

kscore_bin() {
  local bin="$ROOT/target/$PROFILE/kscore"
  local flag=()
  [[ "$PROFILE" == "release" ]] && flag=(--release)
  say "building kscore ($PROFILE)"
  (cd "$ROOT" && cargo build --quiet "${flag[@]}" --bin kscore) || die "cargo build failed"
  printf '%s' "$bin"
}

# pid_alive NAME: the recorded process for NAME is running
pid_alive() {
  local f="$RUN/$1.pid"
  [[ -f "$f" ]] && kill -0 "$(cat "$f")" 2>/dev/null
}

# wait_port NAME PORT LOG: wait up to 30 s for a TCP port to answer; fail with the log's tail
wait_port() {
  local name="$1" port="$2" log="$3"
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    if ! pid_alive "$name"; then
      say "$name exited before its port $port answered; last lines of $log:"
      tail -n 20 "$log" >&2 || true
      rm -f "$RUN/$name.pid"
      exit 1
    fi
    sleep 0.1
  done
  say "$name did not open port $port within 30 s; its log is $log:"
  tail -n 20 "$log" >&2 || true
  exit 1
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_broker() {
  if pid_alive broker; then say "broker already running (pid $(cat "$RUN/broker.pid")) on 127.0.0.1:$KAFKA_PORT"; return; fi
  port_taken "$KAFKA_PORT" && die "port $KAFKA_PORT is already in use by a process this script did not start; set KSCORE_KAFKA_PORT"
  local bin log="$RUN/broker.log"
  bin="$(broker_bin)"
  mkdir -p "$DATA/broker"
  # The pip wrapper would fork the real binary; start the binary itself so the pid is the broker's.
  setsid "$bin" start --only kafka --host 127.0.0.1 --kafka-port "$KAFKA_PORT" --data-dir "$DATA/broker" \
    >"$log" 2>&1 < /dev/null &
  echo $! > "$RUN/broker.pid"
  wait_port broker "$KAFKA_PORT" "$log"
  say "broker up on 127.0.0.1:$KAFKA_PORT (pid $(cat "$RUN/broker.pid"), log $log)"
}

start_registry() {
  if pid_alive registry; then say "registry already running (pid $(cat "$RUN/registry.pid")) on 127.0.0.1:$REGISTRY_PORT"; return; fi
  port_taken "$REGISTRY_PORT" && die "port $REGISTRY_PORT is already in use by a process this script did not start; set KSCORE_REGISTRY_PORT"
  local bin log="$RUN/registry.log"
  bin="$(kscore_bin)"
  mkdir -p "$DATA/registry"
  setsid "$bin" registry --listen "127.0.0.1:$REGISTRY_PORT" --data-dir "$DATA/registry" \
    >"$log" 2>&1 < /dev/null &
  echo $! > "$RUN/registry.pid"
  wait_port registry "$REGISTRY_PORT" "$log"
  say "schema registry stand-in up on http://127.0.0.1:$REGISTRY_PORT (pid $(cat "$RUN/registry.pid"), log $log)"
}

# stop_one NAME [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 5). The broker writes
# its whole log to disk when it stops, which takes a while once it holds a lot.
stop_one() {
  local name="$1" f="$RUN/$1.pid" grace="${2:-5}"
  [[ -f "$f" ]] || return 0
  local pid
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 $((grace * 10))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then say "$name (pid $pid) did not stop on SIGTERM; sending SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
    say "stopped $name (pid $pid)"
  fi
  rm -f "$f"
}

status() {
  for name in broker registry; do
    if pid_alive "$name"; then echo "$name: running, pid $(cat "$RUN/$name.pid"), log $RUN/$name.log"; else echo "$name: stopped"; fi
  done
  if [[ -f "$ORT_LIB" ]]; then echo "onnxruntime: $ORT_LIB"; else echo "onnxruntime: not installed"; fi
}

# librdkafka settings every client of this stack needs. The stand-in broker ignores a fetch's
# max-bytes and answers with everything from the fetch offset on, so after a large backlog (a
# million events is over 100 MB) librdkafka's default 100 MB response limit drops the
# connection over and over; real Kafka splits such a backlog into fetch.max.bytes pieces.
client_properties() {
  local file="$STACK/$NAME/kafka.properties"
  mkdir -p "$STACK/$NAME"
  cat >"$file" <<'PROPS'
# Written by scripts/stack.sh for the local stand-in broker (see client_properties there).
receive.message.max.bytes=1000000000
PROPS
  printf '%s' "$file"
}

print_env() {
  echo "export KSCORE_BROKERS=127.0.0.1:$KAFKA_PORT"
  echo "export KSCORE_KAFKA_CONFIG=$(client_properties)"
  echo "export KSCORE_REGISTRY_URL=http://127.0.0.1:$REGISTRY_PORT"
  echo "export ORT_DYLIB_PATH=$ORT_LIB"
}

case "${1:-}" in
  install) install ;;
  install-prometheus) install_prometheus ;;
  install-gpu) install_gpu ;;
  gpu-env) print_gpu_env ;;
  start) install; start_broker; start_registry ;;
  stop) stop_one registry; stop_one broker 60 ;;
  # For the broker-restart test: stop the broker (SIGTERM) and start it again on the same port
  # and data directory. (SIGKILL is no use: the stand-in keeps its log in memory and writes it
  # out periodically, so a SIGKILLed stand-in loses acknowledged records, which real Kafka
  # does not.)
  restart-broker) stop_one broker 60; start_broker ;;
  stop-broker) stop_one broker 60 ;;
  start-broker) start_broker ;;
  status) status ;;
  env) print_env ;;
  reset)
    stop_one registry; stop_one broker 60
    rm -rf "$DATA"; say "removed $DATA" ;;
  *) echo "usage: $0 install|install-prometheus|install-gpu|gpu-env|start|stop|status|env|reset|restart-broker|stop-broker|start-broker" >&2; exit 2 ;;
esac
