"""The `rnnstream` command, run as a subprocess against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rnnstream import __version__
from tests.conftest import MODELS, RunningServer
from tests.streaming import FEATURES, HIDDEN, assert_matches_references, ort_full, sequence

CLI = Path(sys.executable).with_name("rnnstream")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    return subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def _stream(
    server: RunningServer, source: Path, target: Path, *extra: str, model: str = "gru"
) -> subprocess.CompletedProcess[str]:
    return _run(
        "stream", "--target", server.target, "--model", model,
        "--input", str(source), "--output", str(target), *extra,
    )  # fmt: skip


@pytest.mark.parametrize("suffix", [".npy", ".csv"])
def test_stream_a_file(server: RunningServer, tmp_path: Path, suffix: str) -> None:
    x = sequence("gru", 40, seed=80)
    source = tmp_path / f"x{suffix}"
    if suffix == ".npy":
        np.save(source, x)
    else:
        np.savetxt(source, x, delimiter=",", fmt="%.9g")  # 9 digits round-trip float32
    target = tmp_path / "y.npy"
    result = _stream(server, source, target, "--inflight", "5")
    assert result.returncode == 0, result.stderr
    assert f"streamed 40 frames of {source} through gru; wrote {target}" in result.stderr
    y = np.load(target)
    assert y.dtype == np.float32
    assert_matches_references("gru", x, y)


def test_csv_with_a_header_row(server: RunningServer, tmp_path: Path) -> None:
    x = sequence("gru", 12, seed=81)
    named = tmp_path / "named.csv"
    header = ",".join(f"x{i}" for i in range(x.shape[1]))
    np.savetxt(named, x, delimiter=",", fmt="%.9g", header=header, comments="")
    result = _stream(server, named, tmp_path / "y.npy")
    assert result.returncode == 0, result.stderr
    assert "(header row skipped)" in result.stderr
    assert_matches_references("gru", x, np.load(tmp_path / "y.npy"))
    # A header of numbers (column ids) cannot be told from data: --skip-header says so.
    numbered = tmp_path / "numbered.csv"
    ids = ",".join(str(i) for i in range(x.shape[1]))
    np.savetxt(numbered, x, delimiter=",", fmt="%.9g", header=ids, comments="")
    result = _stream(server, numbered, tmp_path / "z.npy", "--skip-header")
    assert result.returncode == 0, result.stderr
    assert_matches_references("gru", x, np.load(tmp_path / "z.npy"))


def test_bad_csv_is_named_not_a_traceback(server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "x.csv"
    source.write_text("1,2,3\n4,oops,6\n")
    result = _stream(server, source, tmp_path / "y.npy")
    assert result.returncode == 2
    assert result.stderr.strip() == f"rnnstream: {source} line 2: 'oops' is not a number"
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("1,2,3\n4,5\n")
    result = _stream(server, ragged, tmp_path / "y.npy")
    assert result.returncode == 2
    assert f"{ragged} line 2: 2 values, the first row has 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_output_as_csv_and_npz(server: RunningServer, tmp_path: Path) -> None:
    x = sequence("lstm", 10, seed=82)
    source = tmp_path / "x.npy"
    np.save(source, x)
    csv_out = tmp_path / "y.csv"
    result = _stream(server, source, csv_out, model="lstm")
    assert result.returncode == 0, result.stderr
    y = np.loadtxt(csv_out, delimiter=",", dtype=np.float32, ndmin=2)
    assert y.shape == (10, HIDDEN["lstm"])
    np.testing.assert_allclose(y, ort_full("lstm", x), rtol=0, atol=1e-5)
    npz_out = tmp_path / "y.npz"
    assert _stream(server, source, npz_out, model="lstm").returncode == 0
    with np.load(npz_out) as saved:
        assert list(saved) == ["y"]
        np.testing.assert_array_equal(saved["y"], y)


def test_output_suffix_is_checked_before_streaming(server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "x.npy"
    np.save(source, sequence("gru", 3, seed=83))
    for name in ("y.txt", "y"):
        result = _stream(server, source, tmp_path / name)
        assert result.returncode == 2
        assert "expected a .npy, .npz or .csv file" in result.stderr
        assert not (tmp_path / name).exists() and not list(tmp_path.glob("y.*.np*"))


def test_stream_errors(server: RunningServer, tmp_path: Path) -> None:
    source = tmp_path / "x.npy"
    np.save(source, np.zeros((3, 5), np.float32))
    result = _stream(server, source, tmp_path / "y.npy")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "shape [T, 16]" in result.stderr
    assert "Traceback" not in result.stderr
    unknown = _stream(server, source, tmp_path / "y.npy", model="nope")
    assert unknown.returncode == 1
    assert "NOT_FOUND: unknown model 'nope'" in unknown.stderr
    text = tmp_path / "x.txt"
    text.write_text("1,2\n")
    wrong = _stream(server, text, tmp_path / "y.npy")
    assert wrong.returncode == 2 and "expected a .npy or .csv file" in wrong.stderr


def test_models(server: RunningServer) -> None:
    result = _run("models", "--target", server.target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    shipped = sorted(p.parent.name for p in MODELS.glob("*/model.onnx"))
    assert [line.split("\t")[0] for line in lines] == shipped
    gru = next(line for line in lines if line.startswith("gru\t"))
    assert "CPUExecutionProvider" in gru
    assert "x float32[-1, -1, 16]" in gru and "y float32[-1, -1, 128]" in gru
    assert "initial_h->Y_h float32[1, -1, 128]" in gru


def test_models_as_json(server: RunningServer) -> None:
    result = _run("models", "--target", server.target, "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json.loads(result.stdout)}
    assert sorted(models) == sorted(p.parent.name for p in MODELS.glob("*/model.onnx"))
    assert models["lstm"]["inputs"] == [
        {
            "name": "x",
            "dtype": "float32",
            "shape": [-1, -1, FEATURES["lstm"]],
            "batch_axis": 1,
            "time_axis": 0,
        }
    ]
    assert [s["input_name"] for s in models["lstm"]["states"]] == ["initial_h", "initial_c"]
    assert models["lstm"]["execution_provider"] == "CPUExecutionProvider"


def test_version() -> None:
    result = _run("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"rnnstream {__version__}")


def test_health_imports_neither_numpy_nor_the_load_tester(server: RunningServer) -> None:
    probe = (
        "import sys\n"
        "from rnnstream._cli import main\n"
        f"code = main(['health', '--target', '{server.target}'])\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('numpy', 'rich', 'hdrh')\n"
        "    or m.startswith('rnnstream.loadtest._') and m != 'rnnstream.loadtest._options'\n"
        "    or m in ('rnnstream._aio', 'rnnstream._sync'))\n"
        "print(code, heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.splitlines()[-1] == "0 []", result.stdout + result.stderr
