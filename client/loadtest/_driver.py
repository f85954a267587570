"""One session under load: sends its frames, times their answers, feeds the verifier."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from rnnstream._errors import RnnstreamError
from rnnstream._frames import Outputs
from rnnstream._session import AsyncSession
from rnnstream.loadtest._frames import SessionFrames
from rnnstream.loadtest._stats import WorkerStats
from rnnstream.loadtest._verify import SessionCheck

__all__ = ["NO_ANSWER", "RunClock", "SessionDriver"]

clock = time.monotonic  # system-wide on Linux, so every client process shares the time base

# Code recorded for a frame still unanswered when the drain time ran out.
NO_ANSWER = "DEADLINE_EXCEEDED"


@dataclass
class RunClock:
    """When measuring starts and sending ends; `stopping` is set by Ctrl-C or the time limit."""

    origin: float  # end of warm-up: frames due from here on are measured
    send_until: float
    stopping: bool = False

    def sending(self) -> bool:
        return not self.stopping and clock() < self.send_until


class SessionDriver:
    """Closed loop (next frame when there is room) or open loop (frames when they are due)."""

    def __init__(
        self,
        session: AsyncSession,
        frames: SessionFrames,
        run: RunClock,
        stats: WorkerStats,
        check: SessionCheck | None,
        window: int,
        limit: int | None,
    ) -> None:
        self.session = session
        self._frames = frames
        self._run = run
        self._stats = stats
        self._check = check
        self._size = window
        self._limit = limit
        self.assigned = 0  # measured frames given to this session so far
        self.window: deque[tuple[asyncio.Future[Outputs], bool, int]] = deque()
        self.dead = False
        self._due: deque[float] = deque()
        self._wake = asyncio.Event()
        self._closed = False
        self._restored_index = -1  # the latest frame answered after a restore from the store
        session.on_restore = self._on_restore

    def _on_restore(self, index: int) -> None:
        self._restored_index = index

    # -- open loop: the schedule hands out due times ---------------------------------------
    def full(self) -> bool:
        return self.dead or (self._limit is not None and self.assigned >= self._limit)

    def due(self, intended: float) -> None:
        if intended >= self._run.origin:
            self.assigned += 1
        self._due.append(intended)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    async def open_loop(self) -> None:
        while True:
            while not self._due:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            intended = self._due.popleft()
            await self._room()
            if self.dead or self._run.stopping:
                return
            await self._send(intended)

    # -- closed loop -----------------------------------------------------------------------
    async def closed_loop(self) -> None:
        while not self.full() and self._run.sending():
            await self._room()
            if self.dead or not self._run.sending():
                return
            now = clock()
            if now >= self._run.origin:
                self.assigned += 1
            await self._send(now)

    # -- both ------------------------------------------------------------------------------
    async def _room(self) -> None:
        while len(self.window) >= self._size:
            await asyncio.wait([self.window[0][0]])
            while self.window and self.window[0][0].done():
                self.window.popleft()

    async def _send(self, intended: float) -> None:
        frame = self._frames.next()
        seq = self._check.sent(frame) if self._check is not None else -1
        measured = intended >= self._run.origin
        if measured:
            self._stats.sent += 1
        index = self.session.next_index
        try:
            future = await self.session.send(frame)
        except RnnstreamError as exc:  # the stream is gone: nothing more goes through it
            self._failed(exc.code.name, measured)
            return
        future.add_done_callback(lambda f: self._done(f, intended, measured, seq, index))
        self.window.append((future, measured, seq))

    def _done(
        self,
        future: asyncio.Future[Outputs],
        intended: float,
        measured: bool,
        seq: int,
        index: int,
    ) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            code = exc.code.name if isinstance(exc, RnnstreamError) else "UNKNOWN"
            self._failed(code, measured)
            return
        now = clock()
        if measured:
            self._stats.answer(now - intended, now, restored=index == self._restored_index)
        if self._check is not None:
            self._check.answered(seq, future.result())

    def _failed(self, code: str, measured: bool) -> None:
        # After a failed frame the server expects that index again, so every later frame of
        # this session would fail too: the session stops instead of repeating the failure.
        self.dead = True
        if measured:
            self._stats.fail(code, clock())
        if self._check is not None:
            self._check.failed()

    def abandon(self, count_unsent: bool) -> None:
        """Count the frames still unanswered as failed, and stop waiting for them.

        With `count_unsent`, measured frames that fell due but never left the client count as
        sent and failed too: an open-loop server that fell that far behind must not look better
        for it. (After Ctrl-C they are simply dropped.)
        """
        for future, measured, _ in self.window:
            if not future.done():
                self._failed(NO_ANSWER, measured)
                future.cancel()
        self.window.clear()
        if count_unsent:
            for intended in self._due:
                if intended >= self._run.origin:
                    self._stats.sent += 1
                    self._failed(NO_ANSWER, True)
        self._due.clear()
