"""Turns user arrays into a model's frame tensors and output tensors back into arrays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rnnstream.proto.tensor_codec import NUMPY_TO_DTYPE, decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb

if TYPE_CHECKING:
    from rnnstream._info import ModelInfo, TensorInfo

__all__ = [
    "EMIT",
    "FrameInput",
    "NamedArrays",
    "Outputs",
    "decode_outputs",
    "decode_tensors",
    "encode_frame",
    "frame_arrays",
    "squeeze_time",
    "squeeze_time_axes",
    "stack_frames",
    "stacked_arrays",
]

EMIT = {"every": pb.EMIT_EVERY, "last": pb.EMIT_LAST}
Array = npt.NDArray[Any]
FrameInput = Array | Mapping[str, Any]
Outputs = dict[str, Array]
NamedArrays = list[tuple[str, Array]]


def _frame_rank(info: TensorInfo) -> int:
    return len(info.shape) - (1 if info.batch_axis is not None else 0)


def _frame_time_axis(info: TensorInfo) -> int | None:
    """The time axis of one session's frame (the model's shape less its batch axis)."""
    if info.time_axis is None:
        return None
    batch = info.batch_axis
    return info.time_axis - (1 if batch is not None and info.time_axis > batch else 0)


def encode_frame(model: ModelInfo, frame: FrameInput) -> tuple[list[pb.Tensor], bool]:
    """Tensors for one frame, and whether a single time step was given without its time axis
    (see frame_arrays)."""
    arrays, added_time = frame_arrays(model, frame)
    return [encode(array, name) for name, array in arrays], added_time


# Per model (by identity): each input's (frame rank, frame time axis), and the name of its only
# input (None when it has several). Looked up per frame, built once.
_Layout = tuple[dict[str, tuple[int, int | None]], str | None]
_LAYOUTS: dict[int, tuple[ModelInfo, _Layout]] = {}


def _layout(model: ModelInfo) -> _Layout:
    known = _LAYOUTS.get(id(model))
    if known is None or known[0] is not model:
        inputs = {t.name: (_frame_rank(t), _frame_time_axis(t)) for t in model.inputs}
        single = model.inputs[0].name if len(model.inputs) == 1 else None
        if len(_LAYOUTS) >= 256:  # models come and go: stay small
            _LAYOUTS.clear()
        known = _LAYOUTS[id(model)] = (model, (inputs, single))
    return known[1]


def _items(model: ModelInfo, single: str | None, frame: FrameInput) -> list[tuple[str, Any]]:
    if isinstance(frame, Mapping):
        return list(frame.items())
    if single is None:
        names = [t.name for t in model.inputs]
        raise ValueError(f"model {model.name!r} has inputs {names}: pass a dict of arrays")
    return [(single, frame)]


def _checked(array: Array) -> Array:
    if array.dtype not in NUMPY_TO_DTYPE and _native(array.dtype) not in NUMPY_TO_DTYPE:
        # Found now, not when the frame is sent.
        raise TypeError(f"dtype {array.dtype} cannot travel as an rnnstream tensor")
    return array


def frame_arrays(model: ModelInfo, frame: FrameInput) -> tuple[NamedArrays, bool]:
    """One frame's arrays by input name, and whether a single time step was given without its
    time axis.

    A bare array feeds a single-input model. An input one rank short of the model's frame shape
    is taken as one time step and gets its time axis added, so `step(x)` works on a plain vector.
    """
    inputs, single = _layout(model)
    arrays: NamedArrays = []
    added_time = False
    for name, value in _items(model, single, frame):
        array = np.asarray(value)
        known = inputs.get(name)
        if known is not None and array.ndim == known[0] - 1 and known[1] is not None:
            axis = known[1]
            array = array.reshape((*array.shape[:axis], 1, *array.shape[axis:]))
            added_time = True
        arrays.append((name, _checked(array)))
    return arrays, added_time


def stack_frames(
    model: ModelInfo, frames: Sequence[FrameInput], batch_axes: dict[str, int]
) -> tuple[NamedArrays, bool]:
    """K frames (each as frame_arrays takes it) stacked on each input's batch axis, and whether
    they were single time steps given without a time axis. Every frame must carry the same
    inputs with the same shapes and dtypes."""
    inputs, single = _layout(model)
    first = _items(model, single, frames[0])
    names = [name for name, _ in first]
    columns: list[list[Array]] = [[] for _ in names]
    for frame in frames:
        items = _items(model, single, frame)
        if [name for name, _ in items] != names:
            raise ValueError(f"frames carry different inputs: {names} and {[n for n, _ in items]}")
        for column, (_, value) in zip(columns, items, strict=True):
            column.append(np.asarray(value))
    stacked: NamedArrays = []
    added_time = False
    for name, column in zip(names, columns, strict=True):
        head = column[0]
        if any(a.shape != head.shape or a.dtype != head.dtype for a in column):
            raise ValueError(f"frames of input {name!r} differ in shape or dtype")
        array = _checked(np.stack(column))  # [K, ...frame]
        known = inputs.get(name)
        if known is not None and head.ndim == known[0] - 1 and known[1] is not None:
            axis = 1 + known[1]
            array = array.reshape((*array.shape[:axis], 1, *array.shape[axis:]))
            added_time = True
        stacked.append((name, np.moveaxis(array, 0, batch_axes.get(name, 0))))
    return stacked, added_time


def stacked_arrays(
    model: ModelInfo, frames: FrameInput, rows: int, batch_axes: dict[str, int]
) -> tuple[NamedArrays, bool]:
    """K frames already stacked (K first on each input) put on each input's batch axis, and
    whether they were single time steps given without a time axis (see frame_arrays)."""
    inputs, single = _layout(model)
    arrays: NamedArrays = []
    added_time = False
    for name, value in _items(model, single, frames):
        array = _checked(np.asarray(value))
        if array.ndim == 0 or array.shape[0] != rows:
            raise ValueError(
                f"input {name!r} must hold the {rows} sessions' frames on its first axis, got "
                f"shape {list(array.shape)}"
            )
        known = inputs.get(name)
        if known is not None and array.ndim == known[0] and known[1] is not None:
            axis = 1 + known[1]
            array = array.reshape((*array.shape[:axis], 1, *array.shape[axis:]))
            added_time = True
        arrays.append((name, np.moveaxis(array, 0, batch_axes.get(name, 0))))
    return arrays, added_time


def _native(dtype: np.dtype[Any]) -> np.dtype[Any]:
    return dtype.newbyteorder("=") if dtype.byteorder != "|" else dtype


def decode_tensors(tensors: Iterable[pb.Tensor]) -> Outputs:
    return {tensor.name: decode(tensor) for tensor in tensors}


def decode_outputs(
    model: ModelInfo, tensors: Iterable[pb.Tensor], squeeze_time: bool = False
) -> Outputs:
    """Arrays by output name; `squeeze_time` drops a time axis of length 1 (a step's output)."""
    outputs = decode_tensors(tensors)
    return squeeze_time_axes(model, outputs) if squeeze_time else outputs


def squeeze_time(info: TensorInfo | None, array: Array) -> Array:
    """`array` (one frame's output) less its time axis when that holds one step."""
    axis = _frame_time_axis(info) if info is not None else None
    if axis is not None and array.shape[axis] == 1:
        return np.squeeze(array, axis)
    return array


def squeeze_time_axes(model: ModelInfo, outputs: Outputs) -> Outputs:
    infos = {t.name: t for t in model.outputs}
    return {name: squeeze_time(infos.get(name), array) for name, array in outputs.items()}
