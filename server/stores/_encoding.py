"""The byte encoding of stored session states and output ring entries (little-endian)."""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core import FrameOutput, ModelSpec

__all__ = ["decode_result", "decode_states", "encode_result", "encode_states"]

Arrays = list[npt.NDArray[Any]]

_HEADER = struct.Struct("<QB")  # frame index, number of outputs
_DIMS = struct.Struct("<B")


def encode_result(result: FrameOutput) -> bytes:
    """Frame index, then each output as rank, dims and raw little-endian bytes, then the digest
    of the frame's inputs (entries written before it was kept end with the outputs)."""
    parts = [_HEADER.pack(result.index, len(result.outputs))]
    for array in result.outputs:
        parts.append(_DIMS.pack(array.ndim))
        parts.append(struct.pack(f"<{array.ndim}I", *array.shape))
        parts.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    parts.append(result.inputs_digest)
    return b"".join(parts)


def decode_result(spec: ModelSpec, data: bytes) -> FrameOutput:
    index, count = _HEADER.unpack_from(data, 0)
    offset = _HEADER.size
    outputs: Arrays = []
    for tensor in spec.outputs[:count]:
        (ndim,) = _DIMS.unpack_from(data, offset)
        offset += _DIMS.size
        shape = struct.unpack_from(f"<{ndim}I", data, offset)
        offset += 4 * ndim
        dtype = tensor.dtype.newbyteorder("<")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        array = np.frombuffer(data, dtype=dtype, count=size // dtype.itemsize, offset=offset)
        outputs.append(array.reshape(shape).astype(tensor.dtype))
        offset += size
    names = tuple(t.name for t in spec.outputs[:count])
    return FrameOutput(index, outputs, names, inputs_digest=bytes(data[offset:]))


def encode_states(states: Arrays) -> bytes:
    return b"".join(
        np.ascontiguousarray(s, dtype=s.dtype.newbyteorder("<")).tobytes() for s in states
    )


def decode_states(spec: ModelSpec, data: bytes) -> Arrays:
    states: Arrays = []
    offset = 0
    for state in spec.states:
        dtype = state.dtype.newbyteorder("<")
        count = state.initial.size
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        states.append(array.reshape(state.initial.shape).astype(state.dtype))
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError(f"stored state has {len(data)} bytes, model needs {offset}")
    return states
