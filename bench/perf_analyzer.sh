#!/usr/bin/env bash
# perf_analyzer (tritonclient 2.51.0) drives rnnstream's Open Inference Protocol API: the shipped
# gru model, sequences of 20 requests over one ModelStreamInfer stream per worker.
# Usage: bench/perf_analyzer.sh [PORT] [extra perf_analyzer flags...]
#   With no PORT (or 0) it starts rnnstream-server from .venv on a free port and stops it after.
# On 2 cores perf_analyzer needs the long measurement interval and the loose stability (-s 50).
set -euo pipefail
cd "$(dirname "$0")/.."
PA=$(bash bench/perf_analyzer_setup.sh)
PORT=${1:-0}
shift || true
server_pid=""
if [ "$PORT" = 0 ]; then
  PORT=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  log=$(mktemp)
  .venv/bin/rnnstream-server --model-repository models --models gru --host 127.0.0.1 \
    --port "$PORT" >"$log" 2>&1 &
  server_pid=$!
  trap 'kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null; rm -f "$log"' EXIT
  for _ in $(seq 100); do
    grep -q "serving" "$log" && break
    kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
    sleep 0.1
  done
fi
"$PA" -m gru -i grpc -u "127.0.0.1:$PORT" --streaming --sequence-length 20 \
  --sequence-id-range 1000:100000 --concurrency-range 8:64:28 --measurement-interval 5000 -s 50 \
  "$@"
