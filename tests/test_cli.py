"""The `rnnstream` command, run as a subprocess against a live server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import MODELS, RunningServer
from tests.streaming import assert_matches_references, sequence

CLI = Path(sys.executable).with_name("rnnstream")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_stream_a_file(server: RunningServer, tmp_path: Path, suffix: str) -> None:
    x = sequence("gru", 40, seed=80)
    source = tmp_path / f"x{suffix}"
    if suffix == ".npy":
        np.save(source, x)
    else:
        np.savetxt(source, x, delimiter=",", fmt="%.9g")  # 9 digits round-trip float32
    target = tmp_path / "y.npy"
    result = _run(
        "stream", "--target", server.target, "--model", "gru",
        "--input", str(source), "--output", str(target), "--inflight", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"streamed 40 frames through gru; wrote {target}" in result.stderr
    y = np.load(target)
    assert y.dtype == np.float32
    assert_matches_references("gru", x, y)


def test_stream_errors(server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "x.npy"
    np.save(source, np.zeros((3, 5), np.float32))
    result = _run(
        "stream", "--target", server.target, "--model", "gru",
        "--input", str(source), "--output", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "shape [T, 16]" in result.stderr
    assert "Traceback" not in result.stderr
    unknown = _run(
        "stream", "--target", server.target, "--model", "nope",
        "--input", str(source), "--output", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert unknown.returncode == 1
    assert "NOT_FOUND: unknown model 'nope'" in unknown.stderr
    text = tmp_path / "x.txt"
    text.write_text("1,2\n")
    wrong = _run(
        "stream", "--target", server.target, "--model", "gru",
        "--input", str(text), "--output", str(tmp_path / "y.npy"),
    )  # fmt: skip
    assert wrong.returncode != 0 and "expected a .npy or .csv file" in wrong.stderr


def test_models(server: RunningServer) -> None:
    result = _run("models", "--target", server.target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    shipped = sorted(p.parent.name for p in MODELS.glob("*/model.onnx"))
    assert [line.split("\t")[0] for line in lines] == shipped
    gru = next(line for line in lines if line.startswith("gru\t"))
    assert "CPUExecutionProvider" in gru
    assert "x[-1, -1, 16]" in gru and "y[-1, -1, 128]" in gru and "initial_h->Y_h" in gru
