"""The work a session queues (frames and controls) and the protocol its answers go through."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._results import Ended, FrameOutput, inputs_digest

__all__ = [
    "AUTO_INDEX",
    "Arrays",
    "BatchKey",
    "ControlWork",
    "EndListener",
    "ForecastParams",
    "FrameAnswer",
    "FrameBlock",
    "FrameReply",
    "FrameWork",
    "GroupReply",
    "Rows",
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


# Rows of a frame group: a contiguous range, or the row numbers themselves.
Rows = slice | npt.NDArray[np.intp]


class GroupReply(Protocol):
    """Whoever waits for the answers of a frame group's rows (one frame for each of K sessions).
    Rows are answered in blocks (`rows_applied`) when they ran together, else one by one."""

    def done(self) -> bool:
        """True when no one waits any more (the stream is gone): rows still apply."""
        ...

    def rows_applied(self, rows: Rows, outputs: Arrays, /) -> None:
        """`rows` (of the group) were applied; `outputs` hold their outputs, in that order, on
        each output's batch axis."""
        ...

    def row_reply(self, row: int, /) -> FrameReply:
        """A FrameReply for one row that is queued as a frame of its own."""
        ...

    def row_failed(self, row: int, error: BaseException, /) -> None: ...


@dataclass(slots=True)
class FrameWork:
    """One frame waiting to be applied: its inputs in the model's input order."""

    index: int  # AUTO_INDEX until it reaches the head of its session's queue
    inputs: Arrays
    key: BatchKey
    reply: FrameReply
    emit: bool = True  # False: answered with None (the outputs wait for a flush or the end)
    enqueued_at: float = field(default_factory=time.perf_counter)
    cost: int = 0  # bytes it holds while queued: inputs and expected outputs


class FrameBlock:
    """Rows of a frame group whose sessions had nothing else queued or running, each with its
    next frame: they wait as one item and run as one block, with no object per frame. Their
    sessions count as in flight from the moment the block is queued, so anything they send
    meanwhile waits behind it in their own queues."""

    __slots__ = ("enqueued_at", "indices", "inputs", "key", "reply", "rows", "sessions", "taken")

    def __init__(
        self,
        sessions: list[Any],
        indices: npt.NDArray[np.int64],
        inputs: Arrays,
        key: BatchKey,
        reply: GroupReply,
        rows: npt.NDArray[np.intp] | None,
    ) -> None:
        self.sessions = sessions  # Session objects, one per row
        self.indices = indices  # each row's frame index (its session's next one)
        self.inputs = inputs  # per model input, the rows on its batch axis
        self.key = key
        self.reply = reply
        self.rows = rows  # the group's row number of each row (None: the same numbers)
        self.taken = 0  # rows already taken into batches (a block may span several)
        self.enqueued_at = time.perf_counter()

    def __len__(self) -> int:
        return len(self.sessions)

    def group_rows(self, rows: Rows) -> Rows:
        """The group's row numbers of these block rows."""
        return rows if self.rows is None else self.rows[rows]


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


def as_index_array(slots: list[int]) -> npt.NDArray[np.intp]:
    return np.fromiter(slots, dtype=np.intp, count=len(slots))
