"""Reaching the session a call names: in memory now, or, with spilling, once brought back from
the state store (what arrives for it meanwhile waits, in order)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from rnnstream.server.core._errors import InvalidArgument, RnnstreamError, Unavailable, quoted
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._results import FrameOutput
from rnnstream.server.core._session import Session
from rnnstream.server.core._spill import Spiller
from rnnstream.server.core._stored_sessions import StoredSessions
from rnnstream.server.core._work import FrameReply

__all__ = ["Restored", "SessionReach", "forward", "runs_on"]

log = logging.getLogger("rnnstream.sessions")

T = TypeVar("T")
Use = Callable[[Session, bool], None]  # (the session, whether it was just brought back)
Fail = Callable[[RnnstreamError], None]


class Restored:
    """A frame's reply whose session was brought back from the store for it: its outputs say
    so (FrameOutput.restored)."""

    __slots__ = ("_reply",)

    def __init__(self, reply: FrameReply) -> None:
        self._reply = reply

    def done(self) -> bool:
        return self._reply.done()

    def set_result(self, result: FrameOutput | None, /) -> None:
        self._reply.set_result(None if result is None else replace(result, restored=True))

    def set_exception(self, exception: BaseException, /) -> None:
        self._reply.set_exception(exception)


class _Restorer:
    """Brings spilled sessions back, one store call per session however many requests wait."""

    def __init__(self, sessions: SessionManager, stored: StoredSessions, spiller: Spiller) -> None:
        self._sessions = sessions
        self._stored = stored
        self._spiller = spiller
        self._waiting: dict[tuple[str, str], list[tuple[Use, Fail]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def then(self, owner: str, session_id: str, use: Use, fail: Fail) -> None:
        key = (owner, session_id)
        waiting = self._waiting.get(key)
        if waiting is None:
            waiting = self._waiting[key] = []
            task = asyncio.get_running_loop().create_task(self._restore(owner, session_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        waiting.append((use, fail))

    async def _restore(self, owner: str, session_id: str) -> None:
        error: RnnstreamError | None = None
        restored = False
        try:
            restored = await self._stored.load(owner, session_id, True, spilled_only=True)
        except RnnstreamError as exc:
            error = exc
        except Exception as exc:
            log.exception("could not bring session %s back from the state store", session_id)
            error = Unavailable(f"could not bring the session back from the state store: {exc}")
        waiting = self._waiting.pop((owner, session_id), [])
        session = self._sessions.find(session_id, owner)
        if session is not None and restored:
            self._spiller.reattach(session)
        for use, fail in waiting:
            if session is None:
                fail(error or self._sessions.missing(session_id, owner))
                continue
            try:
                use(session, restored)
            except RnnstreamError as exc:
                fail(exc)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _chain(inner: asyncio.Future[T], outer: asyncio.Future[T]) -> None:
    def copy(done: asyncio.Future[T]) -> None:
        if outer.done():
            return
        if done.cancelled():
            outer.cancel()
        elif (exc := done.exception()) is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(done.result())

    inner.add_done_callback(copy)


class SessionReach:
    def __init__(self, sessions: SessionManager) -> None:
        self._sessions = sessions
        self._restorer: _Restorer | None = None

    def spill_to(self, stored: StoredSessions, spiller: Spiller) -> None:
        """Sessions may be spilled: a request for one not in memory looks in the store."""
        self._restorer = _Restorer(self._sessions, stored, spiller)

    @property
    def spilling(self) -> bool:
        return self._restorer is not None

    async def stop(self) -> None:
        if self._restorer is not None:
            await self._restorer.stop()

    def reach(self, principal: str, session_id: str, use: Use, fail: Fail) -> None:
        """`use` the session now; or once it is back from the store (`fail` if it cannot be);
        or raise NotFound."""
        session = self._sessions.find(session_id, principal)
        if session is not None:
            use(session, False)
        elif self._restorer is None or not session_id:
            raise self._sessions.missing(session_id, principal)
        else:
            self._restorer.then(principal, session_id, use, fail)

    def future(
        self, principal: str, session_id: str, start: Callable[[Session], asyncio.Future[T]]
    ) -> asyncio.Future[T]:
        """`start(session)`'s future, now or once the session is back from the store."""
        session = self._sessions.find(session_id, principal)
        if session is not None or self._restorer is None:
            return start(session or self._sessions.get(session_id, principal))
        outer: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        def fail(error: RnnstreamError) -> None:
            if not outer.done():
                outer.set_exception(error)

        self.reach(principal, session_id, lambda s, _: _chain(start(s), outer), fail)
        return outer


def forward(reply: FrameReply, restored: bool) -> FrameReply:
    """The reply a frame's answer goes to: marked restored when its session just came back."""
    return Restored(reply) if restored else reply


def runs_on(session: Session, model: str, version: int | None) -> None:
    """InvalidArgument unless the session runs `model` and `version` (when they are named)."""
    if model and session.model != model:
        raise InvalidArgument(
            f"session {quoted(session.id)} runs model {session.model!r}, not {quoted(model)}",
            session_id=session.id,
        )
    if version and session.version != version:
        raise InvalidArgument(
            f"session {quoted(session.id)} runs version {session.version}, not {version}",
            session_id=session.id,
        )
