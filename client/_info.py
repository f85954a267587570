"""What the server tells about its models and sessions, as plain dataclasses (not protobuf)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rnnstream._frames import Outputs, decode_tensors
from rnnstream.proto.tensor_codec import DTYPE_TO_NUMPY
from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = [
    "ModelInfo",
    "ModelVersion",
    "SessionEnded",
    "SessionInfo",
    "SessionPage",
    "StateInfo",
    "TensorInfo",
    "dtype_name",
    "model_info",
    "session_ended",
    "session_info",
    "session_page",
]


def dtype_name(code: int) -> str:
    """The numpy name of a wire dtype ("float32", ...); "unspecified" for one the codec lacks."""
    dtype = DTYPE_TO_NUMPY.get(code)
    return dtype.name if dtype is not None else "unspecified"


def _numpy(name: str) -> np.dtype[Any]:
    return np.dtype(np.float32) if name == "unspecified" else np.dtype(name)


def _axis(value: int) -> int | None:
    return value if value >= 0 else None


@dataclass(frozen=True)
class TensorInfo:
    """A data input or output of a model; -1 in `shape` marks a dynamic axis."""

    name: str
    dtype: str  # numpy's name: "float32", "int64", "bool", ...
    shape: tuple[int, ...]
    batch_axis: int | None  # the axis that holds sessions in a batch
    time_axis: int | None  # the axis that holds time steps

    def numpy_dtype(self) -> np.dtype[Any]:
        """`dtype` as numpy's (float32 for one this client does not know)."""
        return _numpy(self.dtype)


@dataclass(frozen=True)
class StateInfo:
    """A state the server keeps per session: fed to `input_name`, read from `output_name`."""

    input_name: str
    output_name: str
    dtype: str
    shape: tuple[int, ...]
    batch_axis: int | None

    def numpy_dtype(self) -> np.dtype[Any]:
        return _numpy(self.dtype)


@dataclass(frozen=True)
class ModelInfo:
    """A served model: its data inputs and outputs, state pairs and where it runs."""

    name: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    states: tuple[StateInfo, ...]
    execution_provider: str
    max_batch_size: int
    version: int = 1  # the version described
    versions: tuple[ModelVersion, ...] = ()  # every version of the model and its state

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: lists for tuples, nulls for absent axes."""
        plain: dict[str, Any] = _plain(dataclasses.asdict(self))
        return plain


@dataclass(frozen=True)
class ModelVersion:
    """A model version and its state: READY (takes new sessions), LOADING, UNLOADING (serves
    only the sessions opened on it until they end) or UNAVAILABLE, and why."""

    version: int
    state: str
    reason: str
    sessions: int


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server holds it."""

    session_id: str
    model: str
    next_frame_index: int
    pending_frames: int
    idle_seconds: float
    expires_in_seconds: float  # until it leaves memory (or, spilled, the store); 0: never
    model_version: int = 1  # the version it runs on until it ends
    principal: str = ""
    state: str = "idle"  # active (work queued or running), idle, or spilled (in the store only)
    memory_bytes: int = 0  # held in the server's memory
    store_bytes: int = 0  # held in the state store

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SessionPage:
    """One page of a session listing; pass `next_page_token` for the next ('' at the end)."""

    sessions: list[SessionInfo]
    next_page_token: str


@dataclass(frozen=True)
class SessionEnded:
    """Answer to ending a session: why, where its numbering stopped, and for an emit-last
    session the last frame's index and outputs (None and empty when no frame was applied)."""

    session_id: str
    reason: str  # "client", "expired", "evicted", "shutdown" or "unloaded"
    next_frame_index: int
    last_frame_index: int | None = None
    last_outputs: Outputs = field(default_factory=dict)
    message: str = ""  # why, in words, when the server ended it


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _tensor(info: pb.TensorInfo) -> TensorInfo:
    return TensorInfo(
        info.name,
        dtype_name(info.dtype),
        tuple(info.shape),
        _axis(info.batch_axis),
        _axis(info.time_axis),
    )


def _tensors(infos: Iterable[pb.TensorInfo]) -> tuple[TensorInfo, ...]:
    return tuple(_tensor(info) for info in infos)


def model_info(message: pb.ModelInfo) -> ModelInfo:
    states = tuple(
        StateInfo(
            s.input_name, s.output_name, dtype_name(s.dtype), tuple(s.shape), _axis(s.batch_axis)
        )
        for s in message.states
    )
    return ModelInfo(
        message.name,
        _tensors(message.inputs),
        _tensors(message.outputs),
        states,
        message.execution_provider,
        message.max_batch_size,
        message.version or 1,
        tuple(ModelVersion(v.version, v.state, v.reason, v.sessions) for v in message.versions),
    )


_STATE_NAMES = {pb.SESSION_ACTIVE: "active", pb.SESSION_IDLE: "idle", pb.SESSION_SPILLED: "spilled"}
STATE_NUMBERS = {name: number for number, name in _STATE_NAMES.items()}


def session_info(message: pb.SessionInfo) -> SessionInfo:
    return SessionInfo(
        message.session_id,
        message.model,
        message.next_frame_index,
        message.pending_frames,
        message.idle_seconds,
        message.expires_in_seconds,
        message.model_version or 1,
        message.principal,
        _STATE_NAMES.get(message.state, "unknown"),
        message.memory_bytes,
        message.store_bytes,
    )


def session_page(message: pb.ListSessionsResponse) -> SessionPage:
    return SessionPage([session_info(s) for s in message.sessions], message.next_page_token)


def session_ended(message: pb.SessionEnded) -> SessionEnded:
    last = message.last_frame_index if message.HasField("last_frame_index") else None
    return SessionEnded(
        message.session_id,
        message.reason,
        message.next_frame_index,
        last,
        decode_tensors(message.last_outputs),
        message.message,
    )
