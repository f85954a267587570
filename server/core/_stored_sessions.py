"""A session's life in the state store: loaded when a server that does not hold it opens it,
stored when it is new (before it is announced), deleted once its client ends it."""

from __future__ import annotations

import asyncio
import logging
import time

from rnnstream.server.core._errors import NotFound, quoted
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._results import Ended
from rnnstream.server.core._store import Gone, StateStore, StepRecord

__all__ = ["StoredSessions"]

log = logging.getLogger("rnnstream.engine")


class StoredSessions:
    def __init__(self, store: StateStore, sessions: SessionManager, models: ModelRegistry) -> None:
        self._store = store
        self._sessions = sessions
        self._models = models
        self._metrics = sessions.metrics
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(
        self, principal: str, session_id: str, resume_only: bool = False, spilled_only: bool = False
    ) -> bool:
        """Take over the session `session_id` names if the store holds it (it was spilled, or
        another replica held it, or this one before a restart); True if it does. A spilled
        session whose time in the store ran out is NotFound, saying so, for `resume_only`
        (an open without it makes a new session of that id). `spilled_only`: only a spilled
        session (a frame or control for a session another replica holds live is refused as
        before: the client resumes it explicitly)."""
        if not session_id:
            return False
        started = time.perf_counter()
        # A session of a version this replica lacks is refused (FailedPrecondition) by spec_of.
        specs = self._models.spec_of
        record = await self._store.load(specs, principal, session_id, None, spilled_only)
        if isinstance(record, Gone):
            if resume_only:
                raise NotFound(f"session {quoted(session_id)} {record.why}", session_id=session_id)
            return False
        if record is None:
            return False
        if not self._sessions.holds(principal, session_id):  # opened meanwhile: keep that one
            self._sessions.restore(session_id, principal, record)
            if self._metrics is not None:
                self._metrics.session_restored(record.model, time.perf_counter() - started)
        return True

    async def save_new(self, principal: str, session_id: str) -> None:
        """Store a new session before it is announced, so a client never holds an id that no
        replica could resume; if that fails the session is ended and the open fails."""
        session = self._sessions.get(session_id, principal)
        scheduler = self._models.scheduler_of(session)
        state = scheduler.read_state(session)
        step = StepRecord(
            principal, session.id, session.model, session.emit, 0, state, None, session.version,
            session.ttl,
        )  # fmt: skip
        try:
            await self._store.save(scheduler.spec, [step])
        except Exception:
            self._sessions.end(session.id, principal, "store-unavailable")
            raise

    def forget_once_ended(
        self, principal: str, session_id: str, ended: asyncio.Future[Ended]
    ) -> None:
        """Delete the stored session once its end has been applied."""

        def forget(_: object) -> None:
            task = asyncio.get_running_loop().create_task(self._delete(principal, session_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        ended.add_done_callback(forget)

    async def _delete(self, principal: str, session_id: str) -> None:
        try:
            await self._store.delete(principal, session_id)
        except Exception as exc:  # its keys still expire with the idle TTL
            log.warning("could not delete stored session %s: %s", session_id, exc)

    async def drain(self) -> None:
        """Wait for the deletes still under way."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
