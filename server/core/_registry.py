"""The registry of open sessions: opens, finds, ends, evicts and expires them."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable
from itertools import repeat
from typing import Any

from rnnstream.server.core._budget import RingLedger
from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    quoted,
)
from rnnstream.server.core._heap import PeakTable
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._listing import OpenOrder
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._results import EMIT_MODES, Emit, Ended
from rnnstream.server.core._session import Session
from rnnstream.server.core._store import SessionRecord
from rnnstream.server.core._work import ControlWork

__all__ = ["SessionManager"]

log = logging.getLogger("rnnstream.sessions")

_MAX_ID_LENGTH = 128
_EXPIRED_MEMORY = 100_000


class SessionManager:
    """Every open session, keyed by (owner, id): one principal never sees another's sessions."""

    def __init__(
        self,
        models: ModelRegistry,
        *,
        max_sessions: int,
        ttl: float,
        ring_size: int,
        evict_when_full: bool = False,
        max_per_owner: int = 0,
        metrics: CoreMetrics | None = None,
    ) -> None:
        self._models = models
        self._sessions: dict[tuple[str, str], Session] = {}
        self._table = PeakTable()  # compact() copies _sessions smaller once most have left
        self.order = OpenOrder()  # listings page through it
        self._expired: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._per_model: dict[str, int] = {}
        # Sessions per principal: the quota counts them whatever streams opened them. A
        # principal's share of the server's memory budget would be charged beside this count.
        self._per_owner: dict[str, int] = {}
        self.max_sessions = max_sessions
        self.max_per_owner = max_per_owner
        self.ttl = ttl
        self.ring_size = ring_size
        self.rings: RingLedger | None = None  # the budget's account of ring bytes
        self.evict_when_full = evict_when_full
        self.metrics = metrics
        self.accepting = True
        if metrics is not None:
            metrics.watch_principal_sessions(self.holders)

    @classmethod
    def from_settings(
        cls,
        models: ModelRegistry,
        settings: EngineSettings,
        metrics: CoreMetrics | None = None,
    ) -> SessionManager:
        return cls(
            models,
            max_sessions=settings.max_sessions,
            ttl=settings.session_ttl,
            ring_size=settings.output_ring,
            evict_when_full=settings.evict_idle_when_full,
            max_per_owner=settings.max_sessions_per_principal,
            metrics=metrics,
        )

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, model: str) -> int:
        return self._per_model.get(model, 0)

    def held_by(self, owner: str) -> int:
        return self._per_owner.get(owner, 0)

    def holders(self) -> dict[str, int]:
        """Open sessions by principal (a copy)."""
        return dict(self._per_owner)

    def open(
        self,
        model: str,
        session_id: str,
        owner: str,
        emit: Emit = "every",
        *,
        resume_only: bool = False,
        version: int | None = None,
    ) -> tuple[Session, bool]:
        """Open a session on the newest ready version of `model` (or on `version`), or resume
        it when `session_id` names one this owner holds: it stays on the version it opened on."""
        self._models.check_known(model)
        if resume_only and not session_id:
            raise InvalidArgument("resume needs the session_id of the session to resume")
        if emit not in EMIT_MODES:
            raise InvalidArgument(f"emit must be one of {list(EMIT_MODES)}, not {quoted(emit)}")
        if session_id:
            if len(session_id) > _MAX_ID_LENGTH or not session_id.isprintable():
                raise InvalidArgument(
                    f"session id must be at most {_MAX_ID_LENGTH} printable characters"
                )
            existing = self._sessions.get((owner, session_id))
            if existing is not None:
                if existing.model != model:
                    raise FailedPrecondition(
                        f"session {session_id!r} runs model {existing.model!r}, "
                        f"not {quoted(model)}",
                        session_id=session_id,
                    )
                if version is not None and existing.version != version:
                    raise FailedPrecondition(
                        f"session {quoted(session_id)} runs version {existing.version} of model "
                        f"{quoted(model)}, not version {version}",
                        session_id=session_id,
                    )
                if existing.emit != emit:
                    raise FailedPrecondition(
                        f"session {session_id!r} was opened with emit {existing.emit!r}; resume "
                        f"it with the same emit mode, not {quoted(emit)}",
                        session_id=session_id,
                    )
                existing.touch()
                log.info("session resumed", extra={"session_id": session_id, "model": model})
                return existing, True
            if resume_only:
                self._models.pick(model, version)  # an unknown model is named first
                raise self.missing(session_id, owner)
        copy = self._models.pick(model, version)
        if not self.accepting:
            raise Unavailable("server is shutting down and opens no new sessions")
        self._make_room(owner)
        session = Session(
            session_id or secrets.token_hex(16),
            model,
            owner,
            self.ring_size,
            emit,
            version=copy.version,
            instance=copy.key,
            ttl=copy.serving.session_ttl,
            ledger=self.rings,
        )
        copy.scheduler.attach(session)
        self._register(session)
        if self.metrics is not None:
            self.metrics.session_opened(model)
        log.info("session opened", extra={"session_id": session.id, "model": model})
        return session, False

    def _register(self, session: Session) -> None:
        key = (session.owner, session.id)
        self._sessions[key] = session
        self._table.grew(len(self._sessions))
        self.order.add(session)
        self._expired.pop(key, None)
        self._per_model[session.model] = self._per_model.get(session.model, 0) + 1
        self._per_owner[session.owner] = self._per_owner.get(session.owner, 0) + 1

    def scratch(
        self, owner: str, model: str, version: int | None
    ) -> tuple[Session, Callable[..., None]]:
        """A session for one stateless frame, and what drops it once the frame is answered."""
        copy = self._models.pick(model, version)
        scratch = Session("", model, owner, 0, version=copy.version, instance=copy.key)
        copy.scheduler.attach(scratch)

        def drop(_: object = None) -> None:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            copy.scheduler.submit(scratch, ControlWork("end", done, "stateless"))

        return scratch, drop

    def holds(self, owner: str, session_id: str) -> bool:
        return (owner, session_id) in self._sessions

    def restore(self, session_id: str, owner: str, record: SessionRecord) -> Session:
        """Take over a session stored by another replica (or by this one before a restart)."""
        copy = self._models.for_restore(record.model, record.version)
        self._make_room(owner)
        session = Session(
            session_id,
            record.model,
            owner,
            self.ring_size,
            record.emit,
            version=copy.version,
            instance=copy.key,
            ttl=copy.serving.session_ttl,
            ledger=self.rings,
        )
        copy.scheduler.attach(session)
        copy.scheduler.write_state(session, record.states)
        session.restore(record.next_index, record.ring)
        if record.last_kept:
            session.set_last(record.last)
        self._register(session)
        log.info(
            "session restored from the state store",
            extra={"session_id": session_id, "model": record.model},
        )
        return session

    def _make_room(self, owner: str) -> None:
        """Room for one more session of `owner`, or ResourceExhausted. A principal at its quota
        may only give up its own sessions; at the server's cap, a session is evicted only from a
        principal holding more than `owner` (or from `owner` itself), the largest first, so no
        one grows by pushing out a smaller tenant."""
        held = self.held_by(owner)
        if self.max_per_owner and held >= self.max_per_owner:
            if self._evict_one(lambda o, _: o == owner):
                return
            raise ResourceExhausted(
                f"principal {owner!r} holds {held} sessions, its limit "
                f"(--max-sessions-per-principal {self.max_per_owner}); end idle sessions"
            )
        if len(self._sessions) >= self.max_sessions:
            if self._evict_one(lambda o, count: o == owner or count > held):
                return
            raise ResourceExhausted(
                f"session limit reached ({self.max_sessions} open); end idle sessions or raise "
                "--max-sessions"
            )

    def _evict_one(self, may_evict: Callable[[str, int], bool]) -> bool:
        """End the longest-idle idle session of the largest principal `may_evict` allows."""
        if not self.evict_when_full:
            return False
        counts = self._per_owner
        idle = [
            s
            for s in self._sessions.values()
            if not s.has_work() and not s.in_flight and may_evict(s.owner, counts[s.owner])
        ]
        if not idle:
            return False
        victim = min(idle, key=lambda s: (-counts[s.owner], s.last_active))
        self._end(victim, "evicted")
        return True

    def find(self, session_id: str, owner: str) -> Session | None:
        return self._sessions.get((owner, session_id))

    def missing(self, session_id: str, owner: str) -> NotFound:
        why = self._expired.get((owner, session_id))
        if why is not None:
            return NotFound(f"session {quoted(session_id)} {why}", session_id=session_id)
        return NotFound(f"unknown session {quoted(session_id)}", session_id=session_id)

    def get(self, session_id: str, owner: str) -> Session:
        session = self._sessions.get((owner, session_id))
        if session is None:
            raise self.missing(session_id, owner)
        return session

    def find_many(self, session_ids: Iterable[str], owner: str) -> list[Session | None]:
        """The owner's session of each id, None where it holds none (get() says why)."""
        return list(map(self._sessions.get, zip(repeat(owner), session_ids)))  # keys made in C

    def end(
        self, session_id: str, owner: str, reason: str = "client", operator: str = ""
    ) -> asyncio.Future[Ended]:
        """Remove the session now; its queued frames still run, then its slot is freed.
        `operator`: the admin principal ending another principal's session."""
        session = self.get(session_id, owner)
        if operator:
            return self._end(session, "operator", f"principal {operator!r}")
        return self._end(session, reason)

    def end_instance(self, instance: int, message: str) -> None:
        """End every session on one loaded copy of a model version (it was retired and its
        drain timeout passed); each one's stream is told why."""
        for session in [s for s in self._sessions.values() if s.instance == instance]:
            self._end(session, "unloaded", message)

    def spill(self, session: Session) -> None:
        """The idle session left memory for the store (not ended: its next request returns it)."""
        self._unregister(session)
        self._models.scheduler_of(session).release(session)
        if self.metrics is not None:
            self.metrics.session_spilled(session.model)

    def _unregister(self, session: Session) -> None:
        del self._sessions[(session.owner, session.id)]
        self.order.remove(session)
        self._per_model[session.model] -= 1
        left = self._per_owner.pop(session.owner) - 1
        if left:  # principals come and go: no entry per past one
            self._per_owner[session.owner] = left

    def _end(self, session: Session, reason: str, message: str = "") -> asyncio.Future[Ended]:
        self._unregister(session)
        if reason != "client":
            # Remembered so a later request hears why the session is gone, not just "unknown".
            why = f"was {reason}" + (f": {message}" if message else "")
            if reason == "expired":
                why = f"expired after {session.ttl:g} s idle"
            elif reason == "operator":
                why = f"was ended by an operator ({message})"
            self._expired[(session.owner, session.id)] = why
            while len(self._expired) > _EXPIRED_MEMORY:
                self._expired.popitem(last=False)
            if session.listener is not None:
                session.listener(Ended(session.id, reason, session.next_index, message=message))
        if self.metrics is not None:
            self.metrics.session_ended(session.model, reason)
        log.info(
            "session ended (%s)", reason, extra={"session_id": session.id, "model": session.model}
        )
        future: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self._models.scheduler_of(session).submit(session, ControlWork("end", future, reason))
        return future

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def compact(self) -> None:
        self._sessions = self._table.shrunk(self._sessions)

    def expire(self, session: Session) -> None:
        """End an idle session whose TTL passed, if it is still open."""
        if self._sessions.get((session.owner, session.id)) is session:
            self._end(session, "expired")

    def shortest_ttl(self) -> float:
        """The shortest idle TTL in force, server-wide or per model (0: none)."""
        return min((t for t in (self.ttl, self._models.shortest_ttl()) if t > 0), default=0.0)
