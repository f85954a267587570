"""Model versions made for the tests: small GRUs built by models/build_models.py, each seed its
own weights, written into a repository of the test's own, with full-sequence ONNX Runtime runs
of each as the reference."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from tests.conftest import MODELS

F32 = npt.NDArray[np.float32]
FEATURES = 4
HIDDEN = 8


@functools.cache
def _build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_models", MODELS / "build_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_models"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@functools.cache
def gru_bytes(seed: int, hidden: int = HIDDEN) -> bytes:
    """A GRU (input FEATURES, hidden `hidden`) whose weights come from `seed`."""
    build = _build()
    spec = build.ModelSpec(
        name="gru",
        op_type="GRU",
        input_size=FEATURES,
        hidden_size=hidden,
        seed=seed,
        description=f"test GRU, seed {seed}",
        linear_before_reset=1,
    )
    data: bytes = build.build_model(spec).SerializeToString()
    return data


def write_version(
    repo: Path, name: str, version: int | None, seed: int, hidden: int = HIDDEN
) -> Path:
    """repo/name/version/model.onnx (repo/name/model.onnx for version None)."""
    folder = repo / name if version is None else repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(gru_bytes(seed, hidden))
    return path


def write_corrupt(repo: Path, name: str, version: int) -> Path:
    folder = repo / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(gru_bytes(1)[:200])  # cut short: not a model ONNX Runtime can read
    return path


@functools.cache
def _session(seed: int, hidden: int) -> ort.InferenceSession:
    return ort.InferenceSession(gru_bytes(seed, hidden), providers=["CPUExecutionProvider"])


def reference(seed: int, x: F32, hidden: int = HIDDEN) -> F32:
    """The version's outputs y [T, H] for x [T, F] from the zero state, in one ORT run."""
    feeds = {"x": x[:, None, :], "initial_h": np.zeros((1, 1, hidden), np.float32)}
    y: F32 = _session(seed, hidden).run(["y"], feeds)[0][:, 0]
    return y


def inputs(steps: int, seed: int) -> F32:
    return np.random.default_rng(seed).standard_normal((steps, FEATURES)).astype(np.float32)
