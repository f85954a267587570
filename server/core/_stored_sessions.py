"""A session's life in the state store: loaded when a server that does not hold it opens it,
stored when it is new (before it is announced), deleted once its client ends it."""

from __future__ import annotations

import asyncio
import logging

from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._results import Ended
from rnnstream.server.core._store import StateStore, StepRecord

__all__ = ["StoredSessions"]

log = logging.getLogger("rnnstream.engine")


class StoredSessions:
    def __init__(self, store: StateStore, sessions: SessionManager, models: ModelRegistry) -> None:
        self._store = store
        self._sessions = sessions
        self._models = models
        self._tasks: set[asyncio.Task[None]] = set()

    async def load(self, principal: str, session_id: str) -> bool:
        """Take over the session `session_id` names if the store holds it (another replica
        held it, or this one before a restart); True if it does."""
        if not session_id:
            return False
        # A session of a version this replica lacks is refused (FailedPrecondition) by spec_of.
        record = await self._store.load(self._models.spec_of, principal, session_id)
        if record is None:
            return False
        if not self._sessions.holds(principal, session_id):  # opened meanwhile: keep that one
            self._sessions.restore(session_id, principal, record)
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
