"""Open Inference Protocol API driven by tritonclient's gRPC client against a live server.

tritonclient 2.51 pins protobuf<5 and registers the `inference` protobuf package itself, so it
runs from .venv-triton (bench/perf_analyzer_setup.sh, run by .ci/run) in a child process.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rnnstream.server.core import MAX_GATHER_SECONDS
from tests import probe
from tests.conftest import MODELS, REPO, RunningServer, missing_dependency
from tests.reference import load_reference

TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
DRIVER = Path(__file__).with_name("oip_triton_driver.py")
ATOL = 1e-5


@pytest.fixture(autouse=True)
def _tritonclient_installed() -> None:
    if not TRITON_PYTHON.exists():
        missing_dependency(
            "tritonclient venv missing: run `bash bench/perf_analyzer_setup.sh` (.ci/run does)"
        )


F32 = npt.NDArray[np.float32]


def _reference(model: str, x: F32) -> F32:
    """Outputs [T, H] of the numpy reference run from the zero state."""
    ref = load_reference(MODELS / model / "model.onnx")
    y, _ = ref.run(x, ref.initial_state())
    return y


def _drive(
    server: RunningServer, tmp_path: Path, plan: dict[str, Any], arrays: dict[str, F32]
) -> tuple[dict[str, Any], dict[str, F32]]:
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    np.savez(tmp_path / "arrays.npz", **arrays)  # type: ignore[arg-type]
    args = [str(TRITON_PYTHON), str(DRIVER), server.target]
    args += [str(tmp_path / n) for n in ("plan.json", "arrays.npz", "out.npz")]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as out:
        outputs = {k: out[k] for k in out.files if k != "report"}
        return json.loads(str(out["report"])), outputs


def test_interleaved_sequences_over_one_stream(server: RunningServer, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lengths = {101: 6, "alpha": 5, 303: 7}  # uint64 and string sequence ids
    xs = {sid: rng.standard_normal((n, 16)).astype(np.float32) for sid, n in lengths.items()}
    arrays = {f"{sid}-{t}": xs[sid][t : t + 1] for sid in xs for t in range(lengths[sid])}
    arrays["bad"] = rng.standard_normal((1, 15)).astype(np.float32)
    stream: list[dict[str, Any]] = []
    for t in range(max(lengths.values())):
        for sid, n in lengths.items():
            if t < n:
                step = {"model": "gru", "sequence_id": sid, "input": f"{sid}-{t}"}
                stream.append({**step, "id": f"{sid}-{t}", "start": t == 0, "end": t == n - 1})
        if t == 2:
            # A bad frame in the middle of sequence 101, and a sequence never started.
            stream.append({"model": "gru", "sequence_id": 101, "input": "bad", "id": "bad"})
            stream.append({"model": "gru", "sequence_id": 999, "input": "101-0", "id": "lost"})
    report, outputs = _drive(server, tmp_path, {"model": "gru", "stream": stream}, arrays)

    assert len(report["stream_errors"]) == 2
    assert any("[1, 15]" in e and "16" in e for e in report["stream_errors"])
    assert any("999" in e and "sequence_start" in e for e in report["stream_errors"])
    for sid, x in xs.items():
        got = np.concatenate([outputs[f"{sid}-{t}"] for t in range(lengths[sid])])
        np.testing.assert_allclose(got, _reference("gru", x), atol=ATOL)
        order = [i for i in report["stream_order"] if i.startswith(f"{sid}-")]
        assert order == [f"{sid}-{t}" for t in range(lengths[sid])]
    # sequence_end freed every session once its last request was answered.
    assert server.run(lambda: list(probe.next_indices(server.engine))) == []


def test_unary_typed_contents_time_axis_and_descriptions(
    server: RunningServer, tmp_path: Path
) -> None:
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    arrays = {"first": x[None, :2], "rest": x[None, 2:4], "last": x[4:5]}
    plan = {
        "model": "lstm",
        # ModelInfer: a [1, T, F] request carries T steps; [1, F] one step.
        "unary": [
            {"model": "lstm", "sequence_id": 77, "start": True, "input": "first", "id": "u0"},
            {"model": "lstm", "sequence_id": 77, "input": "rest", "id": "u1"},
            {"model": "lstm", "sequence_id": 78, "input": "rest", "id": "never-started"},
        ],
        "typed": [{"model": "lstm", "sequence_id": 77, "end": True, "input": "last", "id": "t"}],
    }
    report, outputs = _drive(server, tmp_path, plan, arrays)

    assert outputs["u0"].shape == (1, 2, 96) and outputs["t"].shape == (1, 96)
    got = np.concatenate([outputs["u0"][0], outputs["u1"][0], outputs["t"]])
    np.testing.assert_allclose(got, _reference("lstm", x), atol=ATOL)
    status, message = report["unary_errors"]["never-started"]
    assert "FAILED_PRECONDITION" in status and "sequence_start" in message
    listed = report["repository_index"]["models"]
    index = {(m["name"], m.get("version")): m["state"] for m in listed}
    assert index[("lstm", "1")] == "READY" and index[("gru", "1")] == "READY"
    assert report["server_live"] and report["model_ready"]
    assert "sequence" in report["server_metadata"]["extensions"]
    metadata = report["model_metadata"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "64"]}]
    config = report["model_config"]["config"]
    assert int(config["max_batch_size"]) > 0 and config["input"][0]["dims"] == ["64"]
    # The values the server runs with (the fixture's defaults), not fixed ones.
    settings = server.settings
    assert config["version_policy"] == {"latest": {"num_versions": 1}}
    assert config["instance_group"] == [{"kind": "KIND_CPU", "count": 1}]
    assert int(config["max_batch_size"]) == settings.max_batch_size
    parameters = {k: v["string_value"] for k, v in config["parameters"].items()}
    assert parameters == {
        "intra_op_thread_count": str(settings.ort_threads),
        "inter_op_thread_count": "1",
    }
    oldest = config["sequence_batching"]["oldest"]
    # The most a batch that could start waits for frames arriving: the bound the scheduler keeps.
    assert int(oldest["max_queue_delay_microseconds"]) == round(MAX_GATHER_SECONDS * 1e6) == 1000
    states = config["sequence_batching"]["state"]
    assert {(s["input_name"], s["output_name"]) for s in states} == {
        ("initial_h", "Y_h"),
        ("initial_c", "Y_c"),
    }
    stats = report["statistics"]["model_stats"][0]
    assert stats["name"] == "lstm" and int(stats["inference_count"]) >= 3
    assert int(stats["inference_stats"]["compute_infer"]["ns"]) > 0
