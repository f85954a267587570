"""The ready queue: sessions with a runnable head, oldest head first, taken a batch at a time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

from rnnstream.server.core._session import Session
from rnnstream.server.core._work import BatchKey, FrameWork

__all__ = ["ReadyQueue"]


class ReadyQueue:
    """Ready sessions in a heap keyed by the arrival of their head item. A batch takes at most
    one frame per session, oldest first, all with the same shapes (the oldest frame's T leads;
    the others wait for a later batch)."""

    def __init__(self, max_batch_size: int) -> None:
        self.max_batch_size = max(1, max_batch_size)
        self._heap: list[tuple[float, int, Session]] = []
        self._ties = itertools.count()
        self._queued: set[Session] = set()  # in the heap
        self.wake = asyncio.Event()  # set when a session becomes ready

    def __len__(self) -> int:
        return len(self._heap)

    def mark_ready(self, session: Session) -> None:
        if session.runnable() and session not in self._queued:
            self._push(session, session.head_arrival())
            self.wake.set()

    def _push(self, session: Session, arrived: float) -> None:
        self._queued.add(session)
        heapq.heappush(self._heap, (arrived, next(self._ties), session))

    def take(
        self, head: Callable[[Session], FrameWork | None]
    ) -> tuple[list[Session], list[FrameWork]]:
        """The next batch: `head` settles a session's head and returns its runnable frame."""
        sessions: list[Session] = []
        frames: list[FrameWork] = []
        skipped: list[Session] = []
        key: BatchKey | None = None
        heap = self._heap
        while heap and len(frames) < self.max_batch_size:
            session = heapq.heappop(heap)[2]
            self._queued.discard(session)
            frame = head(session)
            if frame is None:
                continue
            if key is None:
                key = frame.key
            elif frame.key != key:
                skipped.append(session)  # a different T: it leads a later batch
                continue
            session.start(frame)
            sessions.append(session)
            frames.append(frame)
        for session in skipped:
            self._push(session, session.head_arrival())
        return sessions, frames
