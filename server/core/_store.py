"""Where session state is persisted between steps, so another replica can resume a session."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._sessions import FrameResult

__all__ = [
    "SessionRecord",
    "StateStore",
    "StepRecord",
    "decode_result",
    "decode_states",
    "encode_result",
    "encode_states",
]

Arrays = list[npt.NDArray[Any]]


@dataclass(frozen=True)
class StepRecord:
    """One session after one batch step: written before the step's outputs are sent."""

    owner: str
    session_id: str
    model: str
    emit: str
    next_index: int
    states: Arrays  # per session: each state without its batch axis
    result: FrameResult | None  # the step's outputs, for the output ring


@dataclass(frozen=True)
class SessionRecord:
    """A stored session, as loaded to resume it."""

    model: str
    emit: str
    next_index: int
    states: Arrays
    ring: list[FrameResult]  # oldest first


class StateStore(Protocol):
    """Persistence of session state; every call may raise when the store is unreachable."""

    async def save(self, spec: ModelSpec, steps: Sequence[StepRecord]) -> None:
        """Write every step in one round trip."""

    async def load(
        self, specs: dict[str, ModelSpec], owner: str, session_id: str
    ) -> SessionRecord | None:
        """The stored session, or None when the store has none under that owner and id."""

    async def delete(self, owner: str, session_id: str) -> None: ...

    async def close(self) -> None: ...


_HEADER = struct.Struct("<QB")  # frame index, number of outputs
_DIMS = struct.Struct("<B")


def encode_result(result: FrameResult) -> bytes:
    """Frame index, then each output as rank, dims and raw little-endian bytes."""
    parts = [_HEADER.pack(result.index, len(result.outputs))]
    for array in result.outputs:
        parts.append(_DIMS.pack(array.ndim))
        parts.append(struct.pack(f"<{array.ndim}I", *array.shape))
        parts.append(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes())
    return b"".join(parts)


def decode_result(spec: ModelSpec, data: bytes) -> FrameResult:
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
    return FrameResult(index, outputs)


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
