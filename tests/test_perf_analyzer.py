"""perf_analyzer (from tritonclient 2.51.0) drives the Open Inference Protocol API briefly."""

from __future__ import annotations

import re
import subprocess

from tests.conftest import REPO, RunningServer, missing_dependency

PERF_ANALYZER = REPO / ".venv-triton" / "bin" / "pa"  # wrapper setting LD_LIBRARY_PATH


def _runnable() -> str | None:
    """Why perf_analyzer cannot run here, or None when it can."""
    if not PERF_ANALYZER.exists():
        return "perf_analyzer not set up: run `bash bench/perf_analyzer_setup.sh` (.ci/run does)"
    probe = subprocess.run([str(PERF_ANALYZER)], capture_output=True, text=True, timeout=30)
    if "error while loading shared libraries" in probe.stderr:
        return f"perf_analyzer cannot load its libraries: {probe.stderr.strip()}"
    return None


def test_perf_analyzer_streams_sequences(server: RunningServer) -> None:
    reason = _runnable()
    if reason:
        missing_dependency(reason)
    args = [str(PERF_ANALYZER), "-m", "gru", "-i", "grpc", "-u", server.target, "--streaming"]
    args += ["--sequence-length", "20", "--sequence-id-range", "1000:100000"]
    args += ["--concurrency-range", "4", "--measurement-interval", "1500", "-s", "1000"]
    args += ["--max-trials", "6"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    # A smoke run, not a benchmark: -s 1000 accepts any measurement on a busy machine.
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    throughput = re.search(r"Throughput: ([0-9.]+) infer/sec", done.stdout)
    assert throughput is not None, done.stdout[-3000:]
    assert float(throughput.group(1)) > 0
    served = re.search(r"Inference count: (\d+)", done.stdout)
    assert served is not None and int(served.group(1)) > 0
