"""`rnnstream-server --check-model PATH`: load one model, say what was detected, self-test it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import numpy.typing as npt

from rnnstream.server.core import DeviceError, ModelConfigError, ModelSpec, TensorSpec
from rnnstream.server.core._models import load_config
from rnnstream.server.core._runtime import OrtModel, load_model

__all__ = ["CheckFailed", "check_model", "run_check"]

Arrays = list[npt.NDArray[Any]]
_STEPS = 6
_FREE_DIM = 3  # size picked for dynamic axes that are neither batch nor time


class CheckFailed(Exception):
    """The model loads but does not behave as a streamed model must; the message says why."""


def _locate(path: Path) -> tuple[str, Path]:
    """Model name and folder; PATH is a model folder or its model.onnx."""
    if path.is_dir():
        folder = path
    elif path.name == "model.onnx":
        folder = path.parent
    elif path.exists():
        raise ModelConfigError(
            f"{path}: the server loads models/NAME/model.onnx; put the file in a folder of its "
            "own as model.onnx (with config.toml beside it when needed) and check that folder"
        )
    else:
        raise ModelConfigError(f"{path} does not exist")
    if not (folder / "model.onnx").exists():
        raise ModelConfigError(f"{folder} holds no model.onnx")
    return folder.resolve().name, folder


def _axes_text(shape: tuple[int | None, ...], batch: int, time: int | None) -> str:
    dims = []
    for i, d in enumerate(shape):
        label = "batch" if i == batch else "time" if i == time else ("?" if d is None else str(d))
        dims.append(label)
    return "[" + ", ".join(dims) + "]"


def describe(model: OrtModel) -> list[str]:
    spec = model.spec
    lines = [f"model {spec.name}: {spec.path}", f"  execution provider: {model.provider}"]
    for title, tensors in (("data inputs", spec.inputs), ("data outputs", spec.outputs)):
        lines.append(f"  {title}:")
        for t in tensors:
            time = "none (a frame is one step)" if t.time_axis is None else str(t.time_axis)
            lines.append(
                f"    {t.name}: {t.dtype.name} {_axes_text(t.shape, t.batch_axis, t.time_axis)}"
                f"  batch axis {t.batch_axis}, time axis {time}"
            )
    lines.append("  state pairs:")
    for s in spec.states:
        lines.append(
            f"    {s.input_name} -> {s.output_name}: {s.dtype.name} "
            f"{_axes_text(s.shape, s.batch_axis, None)}  batch axis {s.batch_axis}"
            f"{'' if not s.initial.any() else ', initial state from config'}"
        )
    if spec.feedback:
        pairs = ", ".join(
            f"{spec.outputs[o].name} -> {spec.inputs[i].name}" for i, o in spec.feedback
        )
        lines.append(f"  forecast: feeds {pairs}")
    else:
        lines.append(f"  forecast: not available ({spec.feedback_problem})")
    return lines


def _sample(t: TensorSpec, batch: int, steps: int, rng: np.random.Generator) -> npt.NDArray[Any]:
    shape = [
        batch if i == t.batch_axis else steps if i == t.time_axis else (d or _FREE_DIM)
        for i, d in enumerate(t.shape)
    ]
    if t.dtype.kind == "f":
        return rng.standard_normal(shape).astype(t.dtype)
    if t.dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(t.dtype)
    return np.zeros(shape, dtype=t.dtype)  # ids: 0 is valid for any vocabulary


def _state_batch(spec: ModelSpec, batch: int) -> Arrays:
    return [
        np.ascontiguousarray(
            np.repeat(np.expand_dims(s.initial, s.batch_axis), batch, axis=s.batch_axis)
        )
        for s in spec.states
    ]


def _run(model: OrtModel, inputs: Arrays, states: Arrays) -> tuple[Arrays, Arrays]:
    spec = model.spec
    feeds = {t.name: a for t, a in zip(spec.inputs, inputs, strict=True)}
    feeds.update({s.input_name: a for s, a in zip(spec.states, states, strict=True)})
    try:
        return model.run(feeds)
    except Exception as exc:
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        raise CheckFailed(f"ONNX Runtime failed on inputs {shapes}: {exc}") from exc


def _compare(what: str, got: Arrays, want: Arrays, names: list[str]) -> None:
    for name, g, w in zip(names, got, want, strict=True):
        if g.shape != w.shape:
            raise CheckFailed(
                f"{what}: {name!r} has shape {list(g.shape)}, expected {list(w.shape)}"
            )
        if g.dtype.kind == "f":
            tolerance = 1e-4 if g.dtype.itemsize >= 4 else 1e-2
            error = float(np.max(np.abs(g.astype(np.float64) - w.astype(np.float64)), initial=0))
            if not np.allclose(g, w, rtol=tolerance, atol=tolerance):
                raise CheckFailed(f"{what}: {name!r} differs by up to {error:.3g}")
        elif not np.array_equal(g, w):
            raise CheckFailed(f"{what}: {name!r} differs")


def self_test(model: OrtModel, report: Callable[[str], None]) -> None:
    """Full-sequence run vs the same steps one at a time, and two sessions batched vs alone."""
    spec = model.spec
    rng = np.random.default_rng(0)
    timed = all(t.time_axis is not None for t in spec.inputs)
    steps = _STEPS if timed else 1
    sequences = [[_sample(t, 1, steps, rng) for t in spec.inputs] for _ in range(2)]
    out_names = [t.name for t in spec.outputs]
    state_names = [s.output_name for s in spec.states]

    full = [_run(model, seq, _state_batch(spec, 1)) for seq in sequences]
    if timed:
        outputs: list[Arrays] = [[] for _ in spec.outputs]
        states = _state_batch(spec, 1)
        for k in range(steps):
            frame = [
                np.take(a, [k], axis=t.time_axis)
                for a, t in zip(sequences[0], spec.inputs, strict=True)
            ]
            step_out, states = _run(model, frame, states)
            for bucket, out in zip(outputs, step_out, strict=True):
                bucket.append(out)
        stepped = [
            np.concatenate(parts, axis=t.time_axis) if t.time_axis is not None else parts[-1]
            for parts, t in zip(outputs, spec.outputs, strict=True)
        ]
        _compare(
            "stepping one frame at a time vs one full-sequence run", stepped, full[0][0], out_names
        )
        _compare(
            "final state after stepping vs after the full sequence", states, full[0][1], state_names
        )
        report(f"ok: {steps} steps one at a time match one {steps}-step run (outputs and states)")
    else:
        report("skipped full-sequence check: the inputs have no time axis (a frame is one step)")

    batched_in = [
        np.concatenate([seq[i] for seq in sequences], axis=t.batch_axis)
        for i, t in enumerate(spec.inputs)
    ]
    batched_out, batched_states = _run(model, batched_in, _state_batch(spec, 2))
    for b in range(2):
        got = [
            np.take(o, [b], axis=t.batch_axis)
            for o, t in zip(batched_out, spec.outputs, strict=True)
        ]
        got_states = [
            np.take(s, [b], axis=st.batch_axis)
            for s, st in zip(batched_states, spec.states, strict=True)
        ]
        _compare(f"session {b} batched with another vs alone", got, full[b][0], out_names)
        _compare(f"state of session {b} batched vs alone", got_states, full[b][1], state_names)
    report("ok: two sessions batched in one call match each run alone")


def run_check(path: Path, device: str, threads: int, out: TextIO) -> None:
    """Raises ModelConfigError, DeviceError or CheckFailed on the first problem."""
    name, folder = _locate(path)
    try:
        model = load_model(name, folder, device, threads)
    except (ModelConfigError, DeviceError):
        raise
    except Exception as exc:  # ORT's own load errors: not a valid or supported graph
        raise CheckFailed(f"ONNX Runtime cannot load {folder / 'model.onnx'}: {exc}") from exc
    for line in describe(model):
        print(line, file=out)
    try:
        self_test(model, lambda line: print(f"  {line}", file=out))
    except CheckFailed as exc:
        guessed = _guessed_axes(model)
        if guessed:
            raise CheckFailed(
                f"{exc}\nhint: the batch and time axes of {guessed} were guessed from unnamed "
                "dynamic dims as [time, batch, ...]; if the model is batch-first, name the dims "
                "'batch' and 'time' when exporting (dynamic_axes={'x': {0: 'batch', 1: 'time'}}) "
                "or set batch_axis and time_axis in config.toml"
            ) from exc
        raise


def _guessed_axes(model: OrtModel) -> list[str]:
    """Data tensors whose batch axis carries no name that says so."""
    graph = {a.name: a.shape for a in (*model.session.get_inputs(), *model.session.get_outputs())}
    config = load_config(model.spec.path.parent) or {}
    configured = {*config.get("inputs", {}), *config.get("outputs", {})}
    guessed = []
    for t in (*model.spec.inputs, *model.spec.outputs):
        if t.name in configured:
            continue
        dim = graph.get(t.name, [None] * (t.batch_axis + 1))[t.batch_axis]
        if not (isinstance(dim, str) and "batch" in dim.lower()):
            guessed.append(t.name)
    return guessed


def check_model(path: Path, device: str = "auto", threads: int = 1) -> int:
    """Exit status for --check-model: 0 when the model can be served, 1 otherwise."""
    try:
        run_check(path, device, threads, sys.stdout)
    except (ModelConfigError, DeviceError, CheckFailed) as exc:
        print(f"rnnstream-server --check-model: {exc}", file=sys.stderr)
        return 1
    print("model OK: rnnstream-server can serve it")
    return 0
