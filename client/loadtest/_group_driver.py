"""A group of sessions under load: one message carries a frame for each (FrameGroup), in a
closed loop; times the group's answer and feeds each session's verifier."""

from __future__ import annotations

import asyncio
from collections import deque

from rnnstream._aio import AsyncClient
from rnnstream._errors import FrameGroupError, RnnstreamError
from rnnstream._frames import Outputs
from rnnstream._session import AsyncSession
from rnnstream.loadtest._driver import RunClock, clock
from rnnstream.loadtest._frames import Frame, SessionFrames
from rnnstream.loadtest._stats import WorkerStats
from rnnstream.loadtest._verify import SessionCheck

__all__ = ["GroupDriver"]

Answer = dict[AsyncSession, Outputs]


class _Member:
    __slots__ = ("check", "frames", "session")

    def __init__(
        self, session: AsyncSession, frames: SessionFrames, check: SessionCheck | None
    ) -> None:
        self.session = session
        self.frames = frames
        self.check = check


class GroupDriver:
    """Closed loop: the next message once the previous one is answered. A session whose frame
    fails leaves the group (the server now expects that index again); the others go on."""

    def __init__(
        self,
        client: AsyncClient,
        members: list[tuple[AsyncSession, SessionFrames, SessionCheck | None]],
        run: RunClock,
        stats: WorkerStats,
        limit: int | None,
    ) -> None:
        self._client = client
        self._members = [_Member(*m) for m in members]
        self.sessions = [m.session for m in self._members]
        self._run = run
        self._stats = stats
        self._limit = limit
        self.assigned = 0  # measured messages sent so far
        # The message in flight, as the worker's drain watches it: (future, measured, rows).
        self.window: deque[tuple[asyncio.Future[Answer], bool, int]] = deque()

    async def closed_loop(self) -> None:
        while self._members and self._run.sending():
            if self._limit is not None and self.assigned >= self._limit:
                return
            await self._step()

    async def _step(self) -> None:
        members = self._members
        frames: dict[AsyncSession, Frame] = {}
        seqs: list[int] = []
        for member in members:
            frame = member.frames.next()
            frames[member.session] = frame
            seqs.append(member.check.sent(frame) if member.check is not None else -1)
        intended = clock()
        measured = intended >= self._run.origin
        if measured:
            self.assigned += 1
            self._stats.sent += len(members)
        future = asyncio.ensure_future(self._client.step_many(frames))
        self.window.append((future, measured, len(members)))
        await asyncio.wait([future])  # cancelled at the drain's end: abandon() counts it
        self.window.clear()
        answered: Answer = {}
        failed: dict[AsyncSession, RnnstreamError] = {}
        error = future.exception()
        if error is None:
            answered = future.result()
        elif isinstance(error, FrameGroupError):
            answered, failed = error.outputs, error.errors
        elif isinstance(error, RnnstreamError):  # the stream is gone: every frame failed
            failed = {m.session: error for m in members}
        else:
            raise error
        now = clock()
        if measured and answered:
            self._stats.answer(now - intended, now, count=len(answered))
        for member, seq in zip(members, seqs, strict=True):
            outputs = answered.get(member.session)
            if outputs is not None:
                if member.check is not None:
                    member.check.answered(seq, outputs)
                continue
            self._fail(member, failed[member.session].code.name, measured)
        if failed:
            self._members = [m for m in members if m.session not in failed]

    def _fail(self, member: _Member, code: str, measured: bool) -> None:
        if measured:
            self._stats.fail(code, clock())
        if member.check is not None:
            member.check.failed()

    def abandon(self, count_unsent: bool) -> None:
        """Count the frames of the message still unanswered as failed, and stop waiting."""
        for future, measured, rows in self.window:
            if not future.done():
                future.cancel()
                for member in self._members[:rows]:
                    self._fail(member, "DEADLINE_EXCEEDED", measured)
        self.window.clear()
