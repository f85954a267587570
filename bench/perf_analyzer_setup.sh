#!/usr/bin/env bash
# Sets up .venv-triton: tritonclient 2.51.0 (the gRPC client and its perf_analyzer binary) with
# the libraries perf_analyzer loads (libb64 from Debian, unpacked; libcudart from PyPI).
# tritonclient pins protobuf<5 while rnnstream needs protobuf 7, so it lives in its own venv.
# Idempotent; prints the path of the perf_analyzer wrapper it leaves in .venv-triton/bin/pa.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-triton
if [ ! -x "$VENV/bin/pa" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q 'tritonclient[grpc]==2.51.0' 'nvidia-cuda-runtime-cu12' >&2
  mkdir -p "$VENV/libb64"
  ( cd "$VENV/libb64" && rm -f ./*.deb && apt-get download libb64-0d >/dev/null 2>&1 && dpkg -x ./libb64-0d_*.deb . )
  cudart=$("$VENV/bin/python" -c 'import nvidia.cuda_runtime, os; print(os.path.join(nvidia.cuda_runtime.__path__[0], "lib"))')
  b64=$(dirname "$(find "$PWD/$VENV/libb64" -name 'libb64.so.0d' | head -1)")
  cat > "$VENV/bin/pa" <<WRAP
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$b64:$cudart\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$PWD/$VENV/bin/perf_analyzer" "\$@"
WRAP
  chmod +x "$VENV/bin/pa"
fi
echo "$PWD/$VENV/bin/pa"
