"""Turns user arrays into a model's frame tensors and output tensors back into arrays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = ["EMIT", "FrameInput", "Outputs", "decode_outputs", "encode_frame"]

EMIT = {"every": pb.EMIT_EVERY, "last": pb.EMIT_LAST}
Array = npt.NDArray[Any]
FrameInput = Array | Mapping[str, Any]
Outputs = dict[str, Array]


def _frame_rank(info: pb.TensorInfo) -> int:
    return len(info.shape) - (1 if info.batch_axis >= 0 else 0)


def _frame_time_axis(info: pb.TensorInfo) -> int:
    if info.time_axis < 0:
        return -1
    return info.time_axis - (1 if info.batch_axis >= 0 and info.time_axis > info.batch_axis else 0)


def encode_frame(model: pb.ModelInfo, frame: FrameInput) -> tuple[list[pb.Tensor], bool]:
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
        if info is not None and info.time_axis >= 0 and array.ndim == _frame_rank(info) - 1:
            array = np.expand_dims(array, _frame_time_axis(info))
            added_time = True
        tensors.append(encode(array, name))
    return tensors, added_time


def decode_outputs(model: pb.ModelInfo, tensors: Any, squeeze_time: bool = False) -> Outputs:
    infos = {t.name: t for t in model.outputs}
    outputs: Outputs = {}
    for tensor in tensors:
        array = decode(tensor)
        info = infos.get(tensor.name)
        if squeeze_time and info is not None and info.time_axis >= 0:
            axis = _frame_time_axis(info)
            if array.shape[axis] == 1:
                array = np.squeeze(array, axis)
        outputs[tensor.name] = array
    return outputs
