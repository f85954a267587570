"""Model versions driven through tritonclient (RepositoryModelLoad / Unload, RepositoryIndex)
while 50 sequences stream over one ModelStreamInfer stream, and a Triton model folder served
as it is."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests import probe
from tests.conftest import REPO, RunningServer, missing_dependency
from tests.versions import FEATURES, inputs, reference, write_corrupt, write_version

TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
DRIVER = Path(__file__).with_name("oip_triton_models.py")
ATOL = 1e-5
MODEL = "gru"


@pytest.fixture(autouse=True)
def _tritonclient_installed() -> None:
    if not TRITON_PYTHON.exists():
        missing_dependency(
            "tritonclient venv missing: run `bash bench/perf_analyzer_setup.sh` (.ci/run does)"
        )


def _drive(
    server: RunningServer, tmp_path: Path, plan: list[dict[str, Any]], arrays: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    np.savez(tmp_path / "arrays.npz", **arrays)
    args = [str(TRITON_PYTHON), str(DRIVER), server.target]
    args += [str(tmp_path / n) for n in ("plan.json", "arrays.npz", "out.npz")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as out:
        outputs = {k: out[k] for k in out.files if k != "report"}
        return json.loads(str(out["report"])), outputs


# A Triton config as Triton users write them: fields rnnstream reads and fields it ignores.
TRITON_CONFIG = """\
name: "tgru"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { specific: { versions: [ 1 ] } }
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1, F ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1, 8 ] } ]
instance_group [ { count: 2 kind: KIND_CPU } ]
sequence_batching {
  max_sequence_idle_microseconds: 5000000
  control_input [ { name: "START"
    control [ { kind: CONTROL_SEQUENCE_START int32_false_true: [ 0, 1 ] } ] } ]
}
dynamic_batching { }
"""


def _frames(sid: int, x: np.ndarray, start: int, stop: int, last: int) -> list[dict[str, Any]]:
    return [
        {"model": MODEL, "sequence_id": sid, "input": f"{sid}-{t}", "id": f"{sid}-{t}",
         "start": t == 0, "end": t == last}
        for t in range(start, stop)
    ]  # fmt: skip


def _all(sids: list[int], xs: dict[int, np.ndarray], start: int, stop: int) -> list[Any]:
    return [r for sid in sids for r in _frames(sid, xs[sid], start, stop, len(xs[sid]) - 1)]


def _states(index: dict[str, Any], model: str) -> dict[str, str]:
    return {m.get("version", ""): m["state"] for m in index["models"] if m["name"] == model}


async def _until_freed(server: RunningServer, versions: list[int]) -> None:
    for _ in range(500):
        if server.run(lambda: probe.loaded_versions(server.engine, MODEL)) == versions:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(server.run(lambda: probe.loaded_versions(server.engine, MODEL)))


async def test_load_v2_while_50_sequences_stream_on_v1(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_version(repo, MODEL, 1, seed=101)
    server = make_server(model_repository=repo, model_control_mode="explicit", load_model=(MODEL,))
    write_version(repo, MODEL, 2, seed=202)  # in the repository, not loaded until asked
    steps = 8
    old = list(range(1, 51))
    new = list(range(101, 106))
    xs = {sid: inputs(steps, seed=sid) for sid in old + new}
    arrays = {f"{sid}-{t}": xs[sid][t : t + 1] for sid in xs for t in range(steps)}
    plan = [
        {"send": [r for sid in old for r in _frames(sid, xs[sid], 0, 4, steps - 1)]},
        {"index": "before"},
        {"load": MODEL},
        {"index": "loaded"},
        {"config": MODEL, "label": "config"},
        # The v1 sequences go on to their end while new ones start (on v2), all interleaved.
        {"send": _all(old, xs, 4, steps) + _all(new, xs, 0, 4)},
        {"send": [r for sid in new for r in _frames(sid, xs[sid], 4, steps, steps - 1)]},
    ]
    report, outputs = _drive(server, tmp_path, plan, arrays)

    assert report["stream_errors"] == [] and report["control_errors"] == []
    assert _states(report["before"], MODEL) == {"1": "READY", "2": "UNAVAILABLE"}
    assert _states(report["loaded"], MODEL) == {"1": "UNLOADING", "2": "READY"}
    assert report["config"]["config"]["version_policy"] == {"latest": {"num_versions": 1}}
    for sid in old:  # every v1 sequence equals v1's reference to its end
        got = np.concatenate([outputs[f"{sid}-{t}"] for t in range(steps)])
        np.testing.assert_allclose(got, reference(101, xs[sid]), rtol=0, atol=ATOL)
        assert {report["versions"][f"{sid}-{t}"] for t in range(steps)} == {"1"}
    for sid in new:  # sequences started after the load get v2's
        got = np.concatenate([outputs[f"{sid}-{t}"] for t in range(steps)])
        np.testing.assert_allclose(got, reference(202, xs[sid]), rtol=0, atol=ATOL)
        assert {report["versions"][f"{sid}-{t}"] for t in range(steps)} == {"2"}
    assert not np.allclose(reference(101, xs[1]), reference(202, xs[1]), atol=1e-3)
    # The last v1 sequence ended: v1 is freed.
    await _until_freed(server, [2])
    index = server.run(lambda: server.engine.repository_index())
    assert [(s.version, s.state) for s in index if s.model == MODEL] == [
        (1, "UNAVAILABLE"),
        (2, "READY"),
    ]


async def test_unload_while_sequences_stream(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_version(repo, MODEL, 1, seed=101)
    server = make_server(model_repository=repo, model_control_mode="explicit", load_model=(MODEL,))
    steps = 6
    xs = {sid: inputs(steps, seed=sid) for sid in (1, 2, 3)}
    arrays = {f"{sid}-{t}": xs[sid][t : t + 1] for sid in xs for t in range(steps)}
    plan = [
        {"send": [r for sid in (1, 2) for r in _frames(sid, xs[sid], 0, 3, steps - 1)]},
        {"unload": MODEL},
        {"index": "unloaded"},
        {"send": [r for sid in (1, 2) for r in _frames(sid, xs[sid], 3, steps, steps - 1)]},
        {"send": _frames(3, xs[3], 0, 1, steps - 1)},  # a new sequence: refused
    ]
    report, outputs = _drive(server, tmp_path, plan, arrays)

    assert _states(report["unloaded"], MODEL) == {"1": "UNLOADING"}
    for sid in (1, 2):
        got = np.concatenate([outputs[f"{sid}-{t}"] for t in range(steps)])
        np.testing.assert_allclose(got, reference(101, xs[sid]), rtol=0, atol=ATOL)
    (error,) = report["stream_errors"]
    assert "no ready version" in error and "unloaded" in error
    await _until_freed(server, [])


def test_a_triton_model_folder_is_served(
    make_server: Callable[..., RunningServer], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = tmp_path / "models"
    write_version(repo, "tgru", 1, seed=7)
    write_version(repo, "tgru", 2, seed=8)
    (repo / "tgru" / "config.pbtxt").write_text(TRITON_CONFIG.replace("F ]", f"{FEATURES} ]"))
    with caplog.at_level("INFO", logger="rnnstream.models"):
        server = make_server(model_repository=repo)
    (ignored,) = [r.getMessage() for r in caplog.records if "not read" in r.getMessage()]
    assert ignored.startswith(
        "model tgru: config.pbtxt fields not read: dynamic_batching, input, output, "
        "sequence_batching.control_input, instance_group.count"
    )
    x = inputs(5, seed=4)
    arrays = {f"9-{t}": x[t : t + 1] for t in range(5)}
    plan = [
        {"send": [{**r, "model": "tgru"} for r in _frames(9, x, 0, 5, 4)]},
        {"index": "index"},
        {"config": "tgru", "label": "config"},
    ]
    report, outputs = _drive(server, tmp_path, plan, arrays)

    assert report["stream_errors"] == []
    got = np.concatenate([outputs[f"9-{t}"] for t in range(5)])
    np.testing.assert_allclose(got, reference(7, x), rtol=0, atol=ATOL)
    assert _states(report["index"], "tgru") == {"1": "READY", "2": "UNAVAILABLE"}
    config = report["config"]["config"]
    assert config["max_batch_size"] == 8
    assert config["version_policy"] == {"specific": {"versions": ["1"]}}
    assert config["sequence_batching"]["max_sequence_idle_microseconds"] == "5000000"
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]


def test_a_corrupt_v3_leaves_v2_serving(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_version(repo, MODEL, 2, seed=202)
    server = make_server(model_repository=repo, model_control_mode="explicit", load_model=(MODEL,))
    write_corrupt(repo, MODEL, 3)
    x = inputs(4, seed=21)
    arrays = {f"1-{t}": x[t : t + 1] for t in range(4)}
    plan = [
        {"load": MODEL},
        {"index": "after"},
        {"send": _frames(1, x, 0, 4, 3)},
    ]
    report, outputs = _drive(server, tmp_path, plan, arrays)

    ((status, message),) = report["control_errors"]
    assert "FAILED_PRECONDITION" in status and "version 3 failed to load" in message
    assert _states(report["after"], MODEL) == {"2": "READY", "3": "UNAVAILABLE"}
    (reason,) = [m["reason"] for m in report["after"]["models"] if m.get("version") == "3"]
    assert "ONNX Runtime cannot load" in reason
    got = np.concatenate([outputs[f"1-{t}"] for t in range(4)])
    np.testing.assert_allclose(got, reference(202, x), rtol=0, atol=ATOL)
    assert {report["versions"][f"1-{t}"] for t in range(4)} == {"2"}
