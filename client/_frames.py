"""Turns user arrays into a model's frame tensors and output tensors back into arrays."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb

if TYPE_CHECKING:
    from rnnstream._info import ModelInfo, TensorInfo

__all__ = ["EMIT", "FrameInput", "Outputs", "decode_outputs", "decode_tensors", "encode_frame"]

EMIT = {"every": pb.EMIT_EVERY, "last": pb.EMIT_LAST}
Array = npt.NDArray[Any]
FrameInput = Array | Mapping[str, Any]
Outputs = dict[str, Array]


def _frame_rank(info: TensorInfo) -> int:
    return len(info.shape) - (1 if info.batch_axis is not None else 0)


def _frame_time_axis(info: TensorInfo) -> int | None:
    """The time axis of one session's frame (the model's shape less its batch axis)."""
    if info.time_axis is None:
        return None
    batch = info.batch_axis
    return info.time_axis - (1 if batch is not None and info.time_axis > batch else 0)


def encode_frame(model: ModelInfo, frame: FrameInput) -> tuple[list[pb.Tensor], bool]:
    """Tensors for one frame, and whether a single time step was given without its time axis.

    A bare array feeds a single-input model. An input one rank short of the model's frame shape
    is taken as one time step and gets its time axis added, so `step(x)` works on a plain vector.
    """
    if isinstance(frame, Mapping):
        items = list(frame.items())
    else:
        if len(model.inputs) != 1:
            names = [t.name for t in model.inputs]
            raise ValueError(f"model {model.name!r} has inputs {names}: pass a dict of arrays")
        items = [(model.inputs[0].name, frame)]
    infos = {t.name: t for t in model.inputs}
    tensors: list[pb.Tensor] = []
    added_time = False
    for name, value in items:
        array = np.asarray(value)
        info = infos.get(name)
        if info is not None and array.ndim == _frame_rank(info) - 1:
            axis = _frame_time_axis(info)
            if axis is not None:
                array = np.expand_dims(array, axis)
                added_time = True
        tensors.append(encode(array, name))
    return tensors, added_time


def decode_tensors(tensors: Iterable[pb.Tensor]) -> Outputs:
    return {tensor.name: decode(tensor) for tensor in tensors}


def decode_outputs(
    model: ModelInfo, tensors: Iterable[pb.Tensor], squeeze_time: bool = False
) -> Outputs:
    """Arrays by output name; `squeeze_time` drops a time axis of length 1 (a step's output)."""
    if not squeeze_time:
        return decode_tensors(tensors)
    infos = {t.name: t for t in model.outputs}
    outputs: Outputs = {}
    for tensor in tensors:
        array = decode(tensor)
        info = infos.get(tensor.name)
        axis = _frame_time_axis(info) if info is not None else None
        if axis is not None and array.shape[axis] == 1:
            array = np.squeeze(array, axis)
        outputs[tensor.name] = array
    return outputs
