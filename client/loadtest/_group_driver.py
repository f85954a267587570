"""A group of sessions under load: one message carries a frame for each (FrameGroup), in a
closed loop; times the group's answer and feeds each session's verifier."""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream._aio import AsyncClient
from rnnstream._errors import FrameGroupError, RnnstreamError
from rnnstream._frames import Outputs
from rnnstream._session import AsyncSession
from rnnstream.loadtest._driver import RunClock, clock
from rnnstream.loadtest._frames import GroupFrames
from rnnstream.loadtest._stats import WorkerStats
from rnnstream.loadtest._verify import SessionCheck

__all__ = ["GroupDriver"]


class GroupDriver:
    """Closed loop: the next message once the previous one is answered. Frames are drawn for the
    whole group at once and sent stacked (AsyncClient.step_stacked). A session whose frame fails
    leaves the group (the server now expects that index again); the others go on."""

    def __init__(
        self,
        client: AsyncClient,
        sessions: list[AsyncSession],
        frames: GroupFrames,
        checks: list[SessionCheck] | None,
        run: RunClock,
        stats: WorkerStats,
        limit: int | None,
    ) -> None:
        self._client = client
        self.sessions = sessions
        self._frames = frames
        self._checks = checks
        self._run = run
        self._stats = stats
        self._limit = limit
        self._alive: npt.NDArray[np.intp] | None = None  # rows still in the group (None: all)
        self.assigned = 0  # measured messages sent so far
        # The message in flight, as the worker's drain watches it: (future, measured, rows).
        self.window: deque[tuple[asyncio.Future[Outputs], bool, int]] = deque()

    async def closed_loop(self) -> None:
        while self.sessions and self._run.sending():
            if self._limit is not None and self.assigned >= self._limit:
                return
            await self._step()

    async def _step(self) -> None:
        sessions, checks = self.sessions, self._checks
        frame = self._frames.next()
        if self._alive is not None:
            frame = {name: array[self._alive] for name, array in frame.items()}
        seqs = []
        if checks is not None:
            seqs = [c.sent({n: a[k] for n, a in frame.items()}) for k, c in enumerate(checks)]
        intended = clock()
        measured = intended >= self._run.origin
        if measured:
            self.assigned += 1
            self._stats.sent += len(sessions)
        future = asyncio.ensure_future(self._client.step_stacked(sessions, frame))
        self.window.append((future, measured, len(sessions)))
        await asyncio.wait([future])  # cancelled at the drain's end: abandon() counts it
        self.window.clear()
        outputs: Outputs = {}
        failed: dict[Any, RnnstreamError] = {}
        error = future.exception()
        if error is None:
            outputs = future.result()
        elif isinstance(error, FrameGroupError):
            outputs, failed = error.outputs, error.errors
        elif isinstance(error, RnnstreamError):  # the stream is gone: every frame failed
            failed = dict.fromkeys(sessions, error)
        else:
            raise error
        now = clock()
        if measured and len(failed) < len(sessions):
            self._stats.answer(now - intended, now, count=len(sessions) - len(failed))
        if checks is not None:
            for k, (session, check) in enumerate(zip(sessions, checks, strict=True)):
                if session not in failed:
                    check.answered(seqs[k], {n: a[k] for n, a in outputs.items()})
        if failed:
            self._drop(failed, measured)

    def _drop(self, failed: dict[Any, RnnstreamError], measured: bool) -> None:
        keep = [k for k, s in enumerate(self.sessions) if s not in failed]
        for k, session in enumerate(self.sessions):
            if session in failed:
                self._fail(k, failed[session].code.name, measured)
        rows = np.asarray(keep, dtype=np.intp)
        self._alive = rows if self._alive is None else self._alive[rows]
        self.sessions = [self.sessions[k] for k in keep]
        if self._checks is not None:
            self._checks = [self._checks[k] for k in keep]

    def _fail(self, row: int, code: str, measured: bool) -> None:
        if measured:
            self._stats.fail(code, clock())
        if self._checks is not None:
            self._checks[row].failed()

    def abandon(self, count_unsent: bool) -> None:
        """Count the frames of the message still unanswered as failed, and stop waiting."""
        for future, measured, rows in self.window:
            if not future.done():
                future.cancel()
                for row in range(rows):
                    self._fail(row, "DEADLINE_EXCEEDED", measured)
        self.window.clear()
