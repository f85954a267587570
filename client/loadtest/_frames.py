"""Frames the load test sends: seeded random arrays, or rows of a .npy file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream._info import ModelInfo, TensorInfo
from rnnstream.loadtest._options import OptionsError

__all__ = ["Frame", "FrameSource", "GroupFrames", "SessionFrames", "frame_shape"]

Frame = dict[str, npt.NDArray[Any]]
_BLOCK = 64  # random frames drawn per call, so the generator's overhead is shared


def frame_shape(info: TensorInfo) -> list[int]:
    """One frame's shape for a data input: no batch axis, one time step."""
    shape: list[int] = []
    for axis, dim in enumerate(info.shape):
        if axis == info.batch_axis:
            continue
        if axis == info.time_axis:
            shape.append(1)
        elif dim < 0:
            raise OptionsError(
                f"input {info.name!r} has a dynamic axis {axis} besides batch and time; "
                "give the frames with --frames-file"
            )
        else:
            shape.append(int(dim))
    return shape


def _time_axis_of_frame(info: TensorInfo) -> int | None:
    if info.time_axis is None:
        return None
    batch = info.batch_axis
    return info.time_axis - (1 if batch is not None and batch < info.time_axis else 0)


class SessionFrames:
    """The frames of one session, in order; the same seed gives the same frames."""

    def __init__(self, source: FrameSource, session: int) -> None:
        self._source = source
        self._session = session
        self._rng = np.random.default_rng([source.seed, session])
        self._count = 0
        self._block: list[Frame] = []

    def next(self) -> Frame:
        source = self._source
        if source.rows is not None:
            row = source.rows[(self._session + self._count) % len(source.rows)]
            self._count += 1
            return {source.inputs[0].name: row}
        if not self._block:
            self._block = self._draw()
        return self._block.pop()

    def _draw(self) -> list[Frame]:
        arrays: dict[str, npt.NDArray[Any]] = {}
        for info in self._source.inputs:
            dtype = info.numpy_dtype()
            shape = [_BLOCK, *frame_shape(info)]
            if dtype.kind == "f":
                arrays[info.name] = self._rng.standard_normal(shape).astype(dtype)
            elif dtype.kind == "b":
                arrays[info.name] = self._rng.random(shape) < 0.5
            else:
                arrays[info.name] = self._rng.integers(0, 10, shape).astype(dtype)
        # Popped from the end, so reverse to keep the drawn order.
        return [{name: a[i] for name, a in arrays.items()} for i in reversed(range(_BLOCK))]


class GroupFrames:
    """The frames of a group of sessions (first..first+K-1), stacked with the sessions first, no
    array per session. Random frames are drawn once, _BLOCK steps of them, and then cycle: a
    load generator that drew fresh ones for hundreds of sessions a step would spend more CPU on
    them than on sending (the state still moves on every step; --verify checks every output)."""

    def __init__(self, source: FrameSource, first: int, count: int) -> None:
        self._source = source
        self._first = first
        self._count = count
        self._steps = 0
        self._block: dict[str, npt.NDArray[Any]] = {}
        if source.rows is None:
            rng = np.random.default_rng([source.seed, first, count])
            for info in source.inputs:
                dtype = info.numpy_dtype()
                shape = [_BLOCK, count, *frame_shape(info)]
                if dtype.kind == "f":
                    array = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
                elif dtype.kind == "b":
                    array = rng.random(shape) < 0.5
                else:
                    array = rng.integers(0, 10, shape).astype(dtype)
                self._block[info.name] = array

    def next(self) -> Frame:
        source, step = self._source, self._steps
        self._steps += 1
        if source.rows is not None:
            first = self._first + step
            rows = np.arange(first, first + self._count) % len(source.rows)
            return {source.inputs[0].name: source.rows[rows]}
        return {name: array[step % _BLOCK] for name, array in self._block.items()}


class FrameSource:
    """Makes each session's frames for a model."""

    def __init__(self, model: ModelInfo, seed: int, frames_file: Path | None = None) -> None:
        self.inputs = list(model.inputs)
        self.seed = seed
        self.rows: npt.NDArray[Any] | None = None
        if frames_file is not None:
            self.rows = self._load(frames_file)
        else:
            for info in self.inputs:
                frame_shape(info)  # fails early on shapes random frames cannot fill

    def _load(self, path: Path) -> npt.NDArray[Any]:
        if len(self.inputs) != 1:
            names = [t.name for t in self.inputs]
            raise OptionsError(f"--frames-file feeds a single input; the model has {names}")
        info = self.inputs[0]
        rows = np.load(path)
        frame_rank = len(info.shape) - (1 if info.batch_axis is not None else 0)
        time_axis = _time_axis_of_frame(info)
        if rows.ndim == frame_rank and time_axis is not None:
            # Rows one rank short are single time steps: give them their time axis back.
            rows = np.expand_dims(rows, 1 + time_axis)
        if rows.ndim != frame_rank + 1 or len(rows) == 0:
            raise OptionsError(
                f"--frames-file {path}: shape {list(rows.shape)} is not [n, ...frame] for input "
                f"{info.name!r} of shape {list(info.shape)}"
            )
        return np.ascontiguousarray(rows, dtype=info.numpy_dtype().newbyteorder("="))

    def session(self, index: int) -> SessionFrames:
        return SessionFrames(self, index)
