"""bench/gpu.py: on a machine without CUDA it says so and exits 0; its CPU half (models built,
ONNX Runtime on the CPU, the server on the CPU) runs end to end with small sizes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from tests.conftest import REPO

SCRIPT = REPO / "bench" / "gpu.py"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=REPO
    )


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is here: the command would run the full benchmark")
def test_without_a_gpu_it_says_so_and_exits_0() -> None:
    done = _run()
    assert done.returncode == 0, done.stderr
    assert "no GPU here" in done.stdout and "CUDAExecutionProvider" in done.stdout


def test_the_cpu_half_runs(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    done = _run(
        *("--cpu-half", "--hidden", "32,48", "--batches", "1,8", "--sessions", "8"),
        *("--per-message", "4", "--seconds", "0.5", "--warmup", "0.2", "--ort-seconds", "0.05"),
        *("--out", str(out)),
    )
    assert done.returncode == 0, done.stderr + done.stdout
    result = json.loads(out.read_text())
    for hidden in ("32", "48"):
        rows = result["ort_alone"][hidden]
        assert [r["batch"] for r in rows if r["provider"] == "CPUExecutionProvider"] == [1, 8]
        assert all(r["frames_per_s"] > 0 for r in rows)
    (run,) = [r for r in result["server"] if r["device"] == "cpu"]
    assert run["sessions"] == 8 and run["answered"] > 0 and run["failed"] == 0
    assert run["connections"] == 2  # 8 sessions in groups of 4, a connection each
    assert "| cpu | 8 | 2 |" in done.stdout
