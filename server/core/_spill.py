"""Spilling: an idle session leaves memory for the state store, where every step already put its
state, next index and output ring; its next request brings it back (_door.py)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from rnnstream.server.core._heap import PeakTable
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._results import Ended
from rnnstream.server.core._session import Session
from rnnstream.server.core._store import (
    Gone,
    SessionRecord,
    SpecOf,
    SpilledSession,
    SpillRecord,
    StateStore,
    StepRecord,
)
from rnnstream.server.core._work import EndListener

__all__ = ["SpillPolicy", "Spiller", "SpillingStore"]

log = logging.getLogger("rnnstream.sessions")

_BATCH = 512  # sessions marked spilled in one store call


@dataclass(frozen=True)
class SpillPolicy:
    after: float  # seconds idle before a session leaves memory; 0: never
    store_ttl: float  # seconds its state then stays in the store; 0: its session TTL

    def kept_for(self, session_ttl: float) -> float:
        """Seconds a spilled session's state stays in the store (0: for good)."""
        return self.store_ttl or session_ttl

    def live_ttl(self, session_ttl: float) -> float:
        """How long a live session's stored copy must outlive its last step: until it would
        spill, then its time in the store (0: for good)."""
        kept = self.kept_for(session_ttl)
        return self.after + kept if kept > 0 else 0.0

    def why(self, session_ttl: float) -> str:
        kept = self.kept_for(session_ttl)
        return (
            f"expired after {self.after + kept:g} s idle (it left memory after {self.after:g} s "
            f"and its state was kept in the state store {kept:g} s more)"
        )


class SpillingStore:
    """The state store with spilling on: a live session's stored copy lives until it would
    spill plus its time in the store, not just its session TTL (the store knows no spilling)."""

    def __init__(self, inner: StateStore, policy: SpillPolicy, default_ttl: float) -> None:
        self._inner = inner
        self._policy = policy
        self._default = default_ttl

    def _ttl(self, ttl: float | None) -> float:
        return self._policy.live_ttl(self._default if ttl is None else ttl)

    async def save(self, spec: ModelSpec, steps: Sequence[StepRecord]) -> None:
        await self._inner.save(spec, [replace(s, ttl=self._ttl(s.ttl)) for s in steps])

    async def load(
        self,
        specs: SpecOf,
        owner: str,
        session_id: str,
        ttl: float | None = None,
        spilled_only: bool = False,
    ) -> SessionRecord | Gone | None:
        return await self._inner.load(specs, owner, session_id, self._ttl(ttl), spilled_only)

    async def delete(self, owner: str, session_id: str) -> None:
        await self._inner.delete(owner, session_id)

    async def spill(self, spills: Sequence[SpillRecord]) -> list[bool]:
        return await self._inner.spill(spills)

    async def expire_spilled(self, limit: int) -> int:
        return await self._inner.expire_spilled(limit)

    async def spilled_count(self) -> int:
        return await self._inner.spilled_count()

    async def spilled_page(
        self, owner: str | None, after: str, count: int
    ) -> tuple[list[SpilledSession], str]:
        return await self._inner.spilled_page(owner, after, count)

    async def spilled_session(self, owner: str, session_id: str) -> SpilledSession | Gone | None:
        return await self._inner.spilled_session(owner, session_id)

    async def close(self) -> None:
        await self._inner.close()


class Spiller:
    """Moves idle sessions out of memory. A session is marked spilled in the store only if the
    store holds it as it is here (same next index); while the mark is written, whatever
    arrives for it waits, and if anything did, it stays (the frame wins; the frame's step
    clears the mark). A failed write leaves it in memory, to be tried again later."""

    def __init__(
        self,
        sessions: SessionManager,
        models: ModelRegistry,
        store: StateStore,
        policy: SpillPolicy,
    ) -> None:
        self._sessions = sessions
        self._models = models
        self._store = store
        self.policy = policy
        # Streams still attached to spilled sessions: told if the session expires in the
        # store, and attached again when it comes back (monotonic time of expiry, inf: never;
        # and its next index).
        self._listeners: dict[tuple[str, str], tuple[EndListener, float, int]] = {}
        self._table = PeakTable()

    def due(self, session: Session, now: float) -> bool:
        return now - session.last_active > self.policy.after and not session.busy()

    async def spill(self, sessions: list[Session]) -> int:
        """Spill those of `sessions` still open and idle; returns how many left memory."""
        spilled = 0
        for start in range(0, len(sessions), _BATCH):
            batch = [
                s
                for s in sessions[start : start + _BATCH]
                if self._sessions.find(s.id, s.owner) is s and not s.busy()
            ]
            if batch:
                spilled += await self._spill_batch(batch)
        return spilled

    async def _spill_batch(self, batch: list[Session]) -> int:
        policy = self.policy
        wall, now = time.time(), time.monotonic()
        records = [
            SpillRecord(
                s.owner,
                s.id,
                s.next_index,
                policy.kept_for(s.ttl),
                wall - (now - s.last_active),
                policy.why(s.ttl),
            )
            for s in batch
        ]
        for session in batch:
            session.start_spill()
        failed = False
        try:
            marked = await self._store.spill(records)
        except Exception as exc:  # the store is down: they stay, nothing is lost
            log.warning(
                "could not spill %d idle sessions; they stay in memory: %s", len(batch), exc
            )
            marked, failed = [False] * len(batch), True
        finally:
            for session in batch:
                session.spill_done()
        spilled = missing = 0
        for session, ok in zip(batch, marked, strict=True):
            if session.has_work():  # something arrived meanwhile: it runs here
                self._models.scheduler_of(session).mark_ready(session)
            elif not ok:  # tried again after another spell of idleness
                session.touch()
                missing += 1
            elif self._sessions.find(session.id, session.owner) is session:
                kept = policy.kept_for(session.ttl)
                if session.listener is not None:
                    until = now + kept if kept > 0 else float("inf")
                    entry = (session.listener, until, session.next_index)
                    self._listeners[(session.owner, session.id)] = entry
                    self._table.grew(len(self._listeners))
                self._sessions.spill(session)
                spilled += 1
        if missing and not failed:
            log.warning(
                "%d idle sessions stay in memory: the store does not hold them as they are here "
                "(restarted empty?); each is stored again with its next step",
                missing,
            )
        return spilled

    def reattach(self, session: Session) -> None:
        """A spilled session is back: the stream that held it hears of it again."""
        entry = self._listeners.pop((session.owner, session.id), None)
        if entry is not None and session.listener is None:
            session.listen(entry[0])

    def detach(self, owner: str, session_id: str, listener: EndListener) -> None:
        entry = self._listeners.get((owner, session_id))
        if entry is not None and entry[0] == listener:
            del self._listeners[(owner, session_id)]

    def notify_expired(self, now: float) -> None:
        """Tell the streams still attached to spilled sessions whose time ran out."""
        expired = [(key, e) for key, e in self._listeners.items() if e[1] <= now]
        for (owner, session_id), (listener, _, next_index) in expired:
            del self._listeners[(owner, session_id)]
            why = "its state left the state store"
            listener(Ended(session_id, "expired", next_index, message=why))
        self._listeners = self._table.shrunk(self._listeners)
