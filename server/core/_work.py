"""The work a session queues (frames and controls) and the protocol its answers go through."""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._results import Ended, FrameOutput

__all__ = [
    "AUTO_INDEX",
    "Arrays",
    "BatchKey",
    "ControlWork",
    "EndListener",
    "ForecastParams",
    "FrameAnswer",
    "FrameReply",
    "FrameWork",
    "as_index_array",
    "inputs_digest",
]

Arrays = list[npt.NDArray[Any]]
BatchKey = tuple[tuple[int, ...], ...]  # a frame's input shapes: frames batch when they agree
EndListener = Callable[[Ended], None]
# The index of a frame sent without one: it takes the session's next index when it reaches the
# head of the queue, so a frame refused or cancelled before it leaves no gap for the next one.
AUTO_INDEX = -1


class FrameReply(Protocol):
    """Whoever waits for a frame's answer: an asyncio.Future, or a stream's direct callback,
    which answers within the scheduler's turn instead of one loop turn later. The answer is
    None when the frame was applied but its session emits only on flush and end (emit last)."""

    def done(self) -> bool: ...

    def set_result(self, result: FrameOutput | None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class FrameAnswer:
    """A future as a FrameReply, for frames whose outputs are always answered (emit=True)."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[FrameOutput]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def set_result(self, result: FrameOutput | None, /) -> None:
        assert result is not None  # queued with emit=True
        self._future.set_result(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self._future.set_exception(exception)


@dataclass(slots=True)
class FrameWork:
    """One frame waiting to be applied: its inputs in the model's input order."""

    index: int  # AUTO_INDEX until it reaches the head of its session's queue
    inputs: Arrays
    key: BatchKey
    reply: FrameReply
    emit: bool = True  # False: answered with None (the outputs wait for a flush or the end)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class ForecastParams:
    """A forecast's request: `first` holds step 1's inputs (None: the last output feeds it)."""

    steps: int
    commit: bool
    first: Arrays | None = None
    answer_limit: int = 0  # most bytes its answer may take (0: no limit)


@dataclass(slots=True)
class ControlWork:
    """A reset, end, flush or forecast, applied in order with the session's frames."""

    action: Literal["reset", "end", "flush", "forecast"]
    future: asyncio.Future[Any]
    reason: str = "client"
    at_index: int | None = None  # a reset applies only while this is the next frame index
    reset_after: bool = False  # flush: back to the initial state once answered
    forecast: ForecastParams | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)  # orders the ready sessions


def inputs_digest(inputs: Arrays) -> bytes:
    """A CRC-32 of a frame's input bytes: tells a resend that carries other inputs from a true
    one (the model fixes dtypes and every axis but T, and the CRC covers the length)."""
    crc = 0
    for array in inputs:
        contiguous = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        crc = zlib.crc32(contiguous.data, crc)
    return crc.to_bytes(4, "little")


def as_index_array(slots: list[int]) -> npt.NDArray[np.intp]:
    return np.fromiter(slots, dtype=np.intp, count=len(slots))
