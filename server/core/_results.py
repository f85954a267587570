"""What the Engine answers: typed results carrying everything a transport needs to encode them."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._serving import ServingConfig, VersionPolicy

__all__ = [
    "EMIT_MODES",
    "SESSION_STATES",
    "BlockOutputs",
    "Emit",
    "Ended",
    "Flushed",
    "Forecasted",
    "FrameOutput",
    "Kept",
    "ModelInfo",
    "ModelStats",
    "Opened",
    "Reset",
    "SessionInfo",
    "SessionPage",
    "SessionState",
    "VersionState",
    "inputs_digest",
    "kept_bytes",
    "kept_index",
    "kept_output",
]

Arrays = list[npt.NDArray[Any]]
Emit = Literal["every", "last"]
EMIT_MODES: tuple[Emit, ...] = ("every", "last")
# active: work queued or running; idle: in memory with nothing to do; spilled: only in the
# state store (idle for --spill-after), brought back by its next request on any replica.
SessionState = Literal["active", "idle", "spilled"]
SESSION_STATES: tuple[SessionState, ...] = ("active", "idle", "spilled")


@dataclass(frozen=True, slots=True)
class FrameOutput:
    """One applied frame's outputs, in the model's output order, with their names."""

    index: int
    outputs: Arrays
    names: tuple[str, ...]
    replayed: bool = False  # answered from the output ring: the frame was applied before
    # A digest of the inputs that made it: a resend of its index must carry the same inputs to
    # be answered from the output ring (empty: not known, as in rings stored by older servers).
    inputs_digest: bytes = b""
    restored: bool = False  # its session was brought back from the state store for it


def inputs_digest(inputs: Arrays) -> bytes:
    """A CRC-32 of a frame's input bytes: tells a resend that carries other inputs from a true
    one (the model fixes dtypes and every axis but T, and the CRC covers the length)."""
    crc = 0
    for array in inputs:
        contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        crc = zlib.crc32(contiguous.data, crc)
    return crc.to_bytes(4, "little")


class BlockOutputs:
    """The outputs of a block of rows stepped together, kept as the batch made them: one row
    becomes a FrameOutput of its own only when someone reads it (a resend answered from the
    output ring, a flush, the state store), so the frame path makes no object per frame."""

    __slots__ = ("axes", "indices", "input_axes", "inputs", "names", "outputs", "row_bytes")

    def __init__(
        self,
        outputs: Arrays,
        axes: tuple[int, ...],
        names: tuple[str, ...],
        indices: npt.NDArray[np.int64],
        inputs: Arrays,
        input_axes: tuple[int, ...],
    ) -> None:
        self.outputs = outputs  # per data output, the rows on its batch axis
        self.axes = axes  # each output's batch axis
        self.names = names
        self.indices = indices  # each row's frame index
        self.inputs = inputs  # the rows' inputs (a resend must carry the same), likewise
        self.input_axes = input_axes
        # What the output ring counts for one row (its share of the block's outputs).
        self.row_bytes = sum(a.nbytes for a in outputs) // max(1, len(indices))

    def __len__(self) -> int:
        return len(self.indices)

    def index(self, row: int) -> int:
        return int(self.indices[row])

    def row(self, row: int) -> FrameOutput:
        """One row's outputs, copied out of the block, with the digest of its inputs."""
        outputs = [
            np.take(out, row, axis=axis) for out, axis in zip(self.outputs, self.axes, strict=True)
        ]
        inputs = [
            np.take(a, row, axis=axis) for a, axis in zip(self.inputs, self.input_axes, strict=True)
        ]
        return FrameOutput(
            self.index(row), outputs, self.names, inputs_digest=inputs_digest(inputs)
        )


@dataclass(frozen=True, slots=True)
class Opened:
    session_id: str
    model: str
    next_index: int
    resumed: bool  # the id named a session this principal holds (here or in the state store)
    version: int = 1  # the model version it runs on, until it ends


@dataclass(frozen=True, slots=True)
class Reset:
    session_id: str
    next_index: int


@dataclass(frozen=True, slots=True)
class Ended:
    """A session is gone: ended by its client, or by the server (expired, evicted, shutdown)."""

    session_id: str
    reason: str
    next_index: int
    last: FrameOutput | None = None  # an emit-last session's final answer (client ends only)
    message: str = ""  # why, in words, when the server ended it


@dataclass(frozen=True, slots=True)
class Flushed:
    """The session's last output when the flush reached the head of its queue."""

    session_id: str
    next_index: int
    reset: bool
    last: FrameOutput | None


@dataclass(frozen=True, slots=True)
class Forecasted:
    """One tensor per data output, with the rollout's steps along the output's time axis."""

    session_id: str
    outputs: Arrays
    names: tuple[str, ...]
    next_index: int
    committed: bool


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    model: str
    next_index: int
    pending_frames: int
    idle_seconds: float
    expires_in: float  # until it leaves memory (or, spilled, the store); 0: nothing ends it
    version: int = 1
    principal: str = ""
    state: SessionState = "idle"
    memory_bytes: int = 0  # state, queued inputs and output ring held in this process
    store_bytes: int = 0  # its copy in the state store; 0 without one


@dataclass(frozen=True, slots=True)
class SessionPage:
    """One page of a session listing; `next_token` is empty on the last page."""

    sessions: tuple[SessionInfo, ...]
    next_token: str


@dataclass(frozen=True, slots=True)
class VersionState:
    """A model version as the repository index tells it: READY (takes new sessions), LOADING,
    UNLOADING (retired: serves only the sessions pinned to it until they end) or UNAVAILABLE."""

    model: str
    version: int  # 0 when the model folder itself cannot be read
    state: str
    reason: str = ""
    sessions: int = 0  # open sessions pinned to it


@dataclass(frozen=True, slots=True)
class ModelInfo:
    spec: ModelSpec  # inputs, outputs and states, with their axes
    provider: str  # the ONNX Runtime execution provider that runs it
    max_batch_size: int
    version: int = 1
    serving: ServingConfig | None = None  # the values in force for this version
    policy: VersionPolicy | None = None
    versions: tuple[VersionState, ...] = ()  # every version of the model and its state

    @property
    def name(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Totals since start, per model."""

    batches: int
    frames: int
    failed_frames: int
    frame_run_seconds: float  # each frame counts its batch's run time
    queue_seconds: float  # each frame's wait from arrival to the start of its batch
    last_batch_unix: float  # wall-clock end of the latest successful batch (0: none yet)
    by_size: dict[int, tuple[int, float]]  # batch size -> (batches, ORT seconds)


# An output the session keeps: a frame's own, or a row of a block stepped together (read into a
# FrameOutput only when needed).
Kept = FrameOutput | tuple[BlockOutputs, int]


def kept_index(kept: Kept) -> int:
    return kept.index if isinstance(kept, FrameOutput) else kept[0].index(kept[1])


def kept_bytes(kept: Kept) -> int:
    if isinstance(kept, FrameOutput):
        return sum(a.nbytes for a in kept.outputs)
    return kept[0].row_bytes


def kept_output(kept: Kept) -> FrameOutput:
    return kept if isinstance(kept, FrameOutput) else kept[0].row(kept[1])
