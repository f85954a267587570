"""A batch: the single frames and the parts of frame blocks that one ORT call steps together."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._session import Session
from rnnstream.server.core._work import BatchKey, FrameBlock, FrameWork, Rows

__all__ = ["Batch", "BlockPart"]


class BlockPart:
    """Some rows of a block (a contiguous range, or row numbers once a row was refused)."""

    __slots__ = ("block", "rows", "size")

    def __init__(self, block: FrameBlock, rows: Rows) -> None:
        self.block = block
        self.rows = rows
        self.size = int(rows.stop - rows.start) if isinstance(rows, slice) else len(rows)

    def __len__(self) -> int:
        return self.size

    def sessions(self) -> list[Session]:
        sessions: list[Session] = self.block.sessions
        rows = self.rows
        if isinstance(rows, slice):
            return sessions[rows]
        return [sessions[i] for i in rows]

    def inputs(self, axes: tuple[int, ...]) -> list[npt.NDArray[Any]]:
        """Each input's rows (views for a range), on the input's batch axis."""
        rows = self.rows
        if isinstance(rows, slice):
            return [
                a[(slice(None),) * axis + (rows,)]
                for a, axis in zip(self.block.inputs, axes, strict=True)
            ]
        return [
            np.take(a, rows, axis=axis) for a, axis in zip(self.block.inputs, axes, strict=True)
        ]

    def indices(self) -> npt.NDArray[np.int64]:
        return self.block.indices[self.rows]

    def group_rows(self) -> Rows:
        """The frame group's row numbers of these rows."""
        return self.block.group_rows(self.rows)

    def group_row(self, i: int) -> int:
        """The frame group's row number of the part's row i."""
        rows = self.rows
        row = rows.start + i if isinstance(rows, slice) else int(rows[i])
        return row if self.block.rows is None else int(self.block.rows[row])

    def without(self, drop: set[int]) -> BlockPart | None:
        """These rows less the part's own row numbers in `drop` (0 is its first); None if
        nothing is left."""
        rows = self.rows
        numbers = np.arange(rows.start, rows.stop) if isinstance(rows, slice) else rows
        kept = np.asarray([r for i, r in enumerate(numbers) if i not in drop], dtype=np.intp)
        return BlockPart(self.block, kept) if len(kept) else None


class Batch:
    """What one ORT call steps: single frames first (row i is frames[i]), then each block
    part's rows in order. At most one row per session; every row has the same key. `size`
    counts the rows (add rows with add_frame and add_part only)."""

    __slots__ = ("frames", "key", "parts", "single_sessions", "size")

    def __init__(self) -> None:
        self.single_sessions: list[Session] = []
        self.frames: list[FrameWork] = []
        self.parts: list[BlockPart] = []
        self.key: BatchKey | None = None
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return bool(self.frames or self.parts)

    def sessions(self) -> list[Session]:
        """Every row's session, in row order."""
        if not self.parts:
            return self.single_sessions
        sessions = list(self.single_sessions)
        for part in self.parts:
            sessions += part.sessions()
        return sessions

    def add_frame(self, session: Session, frame: FrameWork) -> None:
        self.single_sessions.append(session)
        self.frames.append(frame)
        self.size += 1

    def add_part(self, part: BlockPart) -> None:
        self.parts.append(part)
        self.size += part.size

    def sole_block(self) -> FrameBlock | None:
        """The block whose every row, and nothing else, this batch holds (its inputs are then
        the ORT feeds as they came)."""
        if self.frames or len(self.parts) != 1:
            return None
        part = self.parts[0]
        block = part.block
        rows = part.rows
        if isinstance(rows, slice) and rows.start == 0 and rows.stop == len(block):
            return block
        return None
