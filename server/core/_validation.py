"""Checks a frame's tensors against the model before anything touches a session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._errors import InvalidArgument, quoted
from rnnstream.server.core._models import ModelSpec, TensorSpec

__all__ = ["FrameValidator", "describe_shape", "nonfinite_rows", "validate_frame"]

NamedArray = tuple[str, npt.NDArray[Any]]


def describe_shape(spec: TensorSpec) -> str:
    """The shape a session sends for `spec`, e.g. [T, 16]."""
    time_axis = spec.frame_time_axis
    dims = [
        "T" if i == time_axis else ("?" if d is None else str(d))
        for i, d in enumerate(spec.frame_shape)
    ]
    return "[" + ", ".join(dims) + "]"


def _batched_shape(spec: TensorSpec) -> str:
    """The shape a frame group sends for `spec`, e.g. [T, K, 16]."""
    dims = describe_shape(spec)[1:-1].split(", ")
    dims.insert(spec.batch_axis, "K")
    return "[" + ", ".join(dims) + "]"


def _check_one(spec: TensorSpec, array: npt.NDArray[Any], model: str, max_steps: int) -> int | None:
    label = f"model {model!r} input {spec.name!r}"
    if array.dtype != spec.dtype:
        raise InvalidArgument(f"{label} must be {spec.dtype.name}, got {array.dtype.name}")
    expected = spec.frame_shape
    if array.ndim != len(expected):
        raise InvalidArgument(
            f"{label} must have shape {describe_shape(spec)} (the model's shape without its "
            f"batch axis), got {list(array.shape)}"
        )
    for axis, (want, got) in enumerate(zip(expected, array.shape, strict=True)):
        if want is not None and want != got:
            raise InvalidArgument(
                f"{label} must have shape {describe_shape(spec)}, got {list(array.shape)} "
                f"(axis {axis} is {got}, expected {want})"
            )
    steps = None if spec.frame_time_axis is None else int(array.shape[spec.frame_time_axis])
    if steps is not None:
        if steps < 1:
            raise InvalidArgument(f"{label} carries 0 time steps; a frame needs at least one")
        if steps > max_steps:
            raise InvalidArgument(
                f"{label} carries {steps} time steps; the limit is {max_steps} per frame "
                "(--max-steps-per-frame)"
            )
    return steps


def _check_finite(spec: ModelSpec, arrays: Sequence[npt.NDArray[Any]]) -> None:
    for tensor, array in zip(spec.inputs, arrays, strict=True):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            # A NaN or infinity would poison the recurrent state for every later frame.
            raise InvalidArgument(
                f"model {spec.name!r} input {tensor.name!r} contains NaN or infinity"
            )


def _check_layout(
    spec: ModelSpec, tensors: Sequence[NamedArray], max_steps: int
) -> list[npt.NDArray[Any]]:
    """The frame's arrays in the model's input order, after every check but the values'."""
    names = [t.name for t in spec.inputs]
    if not tensors:
        raise InvalidArgument(f"frame carries no tensors; model {spec.name!r} expects {names}")
    by_name: dict[str, npt.NDArray[Any]] = {}
    for name, array in tensors:
        if not name and len(spec.inputs) == 1 and len(tensors) == 1:
            name = spec.inputs[0].name  # a single unnamed tensor feeds a single-input model
        if name not in names:
            raise InvalidArgument(
                f"model {spec.name!r} has no data input {quoted(name)}; its data inputs are {names}"
            )
        if name in by_name:
            raise InvalidArgument(f"frame carries input {quoted(name)} twice")
        by_name[name] = array
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InvalidArgument(f"frame lacks input(s) {missing} of model {spec.name!r}")
    steps = {s for t in spec.inputs if (s := _check_one(t, by_name[t.name], spec.name, max_steps))}
    if len(steps) > 1:
        raise InvalidArgument(f"frame inputs disagree on the number of time steps: {sorted(steps)}")
    return [by_name[n] for n in names]


def nonfinite_rows(
    spec: ModelSpec, feeds: dict[str, npt.NDArray[Any]], batch: int
) -> dict[int, str]:
    """Batch row -> the first input holding a NaN or infinity in that row (empty: all finite)."""
    bad: dict[int, str] = {}
    for tensor in spec.inputs:
        array = feeds[tensor.name]
        if array.dtype.kind != "f" or np.isfinite(array).all():
            continue
        rows = np.moveaxis(array, tensor.batch_axis, 0).reshape(batch, -1)
        for row in np.flatnonzero(~np.isfinite(rows).all(axis=1)):
            bad.setdefault(int(row), tensor.name)
    return bad


def validate_frame(
    spec: ModelSpec, tensors: Sequence[NamedArray], max_steps: int
) -> list[npt.NDArray[Any]]:
    """Return the frame's arrays in the model's input order, or raise InvalidArgument."""
    arrays = _check_layout(spec, tensors, max_steps)
    _check_finite(spec, arrays)
    return arrays


Signature = tuple[tuple[str, np.dtype[Any], tuple[int, ...]], ...]


class FrameValidator:
    """validate_frame for the per-frame path, less the value check: names, dtypes and shapes
    are checked once per distinct signature and remembered. The scheduler checks the values of
    a whole batch at once (nonfinite_rows) before it runs."""

    def __init__(
        self,
        spec: ModelSpec,
        max_steps: int,
        check_shapes: Callable[..., int | None] = lambda shapes, rows=1: None,
    ) -> None:
        self._spec = spec
        self._max_steps = max_steps
        # Further checks of a signature (the outputs' size), given the frames' shapes and how
        # many of them one answer carries.
        self._check_shapes = check_shapes
        # signature -> (where each model input sits among the tensors, the batching key, the
        # bytes the frame holds while queued: its inputs and its expected outputs)
        self._known: dict[Signature, tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]] = {}

    def validate(
        self, tensors: Sequence[NamedArray]
    ) -> tuple[list[npt.NDArray[Any]], tuple[tuple[int, ...], ...], int]:
        """The frame's arrays in input order, its batching key (their shapes) and the bytes it
        holds while queued (inputs and expected outputs)."""
        positions, key, cost = self._layout(tensors)
        return [tensors[i][1] for i in positions], key, cost

    def validate_group(
        self, tensors: Sequence[NamedArray], rows: int
    ) -> tuple[list[npt.NDArray[Any]], tuple[tuple[int, ...], ...]]:
        """A frame group's stacked arrays (`rows` frames on each input's batch axis) in input
        order, and the batching key of each row's frame: every row passes validate's checks."""
        spec = self._spec
        inputs = {t.name: t for t in spec.inputs}
        if not tensors:
            names = list(inputs)
            raise InvalidArgument(
                f"frame group carries no tensors; model {spec.name!r} expects {names}"
            )
        frames: list[NamedArray] = []
        for name, array in tensors:
            tensor = inputs.get(name)
            if tensor is None and not name and len(spec.inputs) == 1 and len(tensors) == 1:
                tensor = spec.inputs[0]
            if tensor is None:  # validate names the problem
                frames.append((name, array))
                continue
            axis = tensor.batch_axis
            if array.ndim <= axis or array.shape[axis] != rows:
                raise InvalidArgument(
                    f"model {spec.name!r} input {tensor.name!r} of a frame group must carry its "
                    f"{rows} sessions' frames on the batch axis {axis} (shape "
                    f"{_batched_shape(tensor)}), got shape {list(array.shape)}"
                )
            frames.append((name, array[(slice(None),) * axis + (0,)]))
        positions, key, _ = self._layout(frames)
        self._check_shapes(key, rows)  # the answer carries every row's outputs
        return [tensors[i][1] for i in positions], key

    def _layout(
        self, tensors: Sequence[NamedArray]
    ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...], int]:
        """Where each model input sits among `tensors`, the batching key, and the bytes the
        frame holds while queued (its inputs and its expected outputs)."""
        signature = tuple((name, array.dtype, array.shape) for name, array in tensors)
        known = self._known.get(signature)
        if known is None:
            arrays = _check_layout(self._spec, tensors, self._max_steps)
            key = tuple(a.shape for a in arrays)
            cost = (self._check_shapes(key) or 0) + sum(a.nbytes for a in arrays)
            positions = tuple(next(i for i, t in enumerate(tensors) if t[1] is a) for a in arrays)
            if len(self._known) >= 1024:  # many distinct shapes: start over, stay small
                self._known.clear()
            known = self._known[signature] = (positions, key, cost)
        return known
