"""Sessions, the work queued on them, and the registry that opens, finds and expires them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from rnnstream.server.core._results import EMIT_MODES, Emit, Ended, FrameOutput

if TYPE_CHECKING:
    from rnnstream.server._metrics import Metrics
    from rnnstream.server.core._scheduler import ModelScheduler
    from rnnstream.server.core._store import SessionRecord

__all__ = [
    "ControlWork",
    "EndListener",
    "ForecastParams",
    "FrameReply",
    "FrameWork",
    "Session",
    "SessionManager",
]

log = logging.getLogger("rnnstream.sessions")

Arrays = list[npt.NDArray[Any]]
_MAX_ID_LENGTH = 128
_EXPIRED_MEMORY = 100_000
EndListener = Callable[[Ended], None]


class FrameReply(Protocol):
    """Whoever waits for a frame's answer: an asyncio.Future, or a stream's direct callback,
    which answers within the scheduler's turn instead of one loop turn later. The answer is
    None when the frame was applied but its session emits only on flush and end (emit last)."""

    def done(self) -> bool: ...

    def set_result(self, result: FrameOutput | None, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


@dataclass(slots=True)
class FrameWork:
    """One frame waiting to be applied: its inputs in the model's input order."""

    index: int
    inputs: Arrays
    key: tuple[tuple[int, ...], ...]  # frames batch together only when their shapes agree
    reply: FrameReply
    emit: bool = True  # False: answered with None (the outputs wait for a flush or the end)
    enqueued_at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class ForecastParams:
    """A forecast's request: `first` holds step 1's inputs (None: the last output feeds it)."""

    steps: int
    commit: bool
    first: Arrays | None = None


@dataclass(slots=True)
class ControlWork:
    """A reset, end, flush or forecast, applied in order with the session's frames."""

    action: Literal["reset", "end", "flush", "forecast"]
    future: asyncio.Future[Any]
    reason: str = "client"
    at_index: int | None = None  # a reset applies only while this is the next frame index
    reset_after: bool = False  # flush: back to the initial state once answered
    forecast: ForecastParams | None = None
    enqueued_at: float = field(default_factory=time.perf_counter)  # orders the ready sessions


class Session:
    """A client's stream of frames through one model, and where its state lives."""

    __slots__ = (
        "closed",
        "emit",
        "expected_since",
        "frames_queued",
        "id",
        "in_flight",
        "last",
        "last_active",
        "listener",
        "model",
        "next_index",
        "owner",
        "pending",
        "queued",
        "ring",
        "ring_size",
        "slot",
        "space_waiter",
    )

    def __init__(
        self, session_id: str, model: str, owner: str, ring_size: int, emit: Emit = "every"
    ) -> None:
        self.id = session_id
        self.model = model
        self.owner = owner
        self.slot = -1
        self.next_index = 0
        self.pending: deque[FrameWork | ControlWork] = deque()
        self.in_flight = False
        self.queued = False
        self.closed = False
        self.ring: deque[FrameOutput] | None = None  # created on first output: idle ones stay small
        self.ring_size = ring_size
        self.last_active = time.monotonic()
        self.expected_since = 0.0  # when its next frame became expected (0: not expected)
        # Told when the server ends the session (expired, evicted, shutdown): the attached stream.
        self.listener: EndListener | None = None
        self.frames_queued = 0
        # Set by a reader that stopped reading because this session's queue is full.
        self.space_waiter: asyncio.Future[None] | None = None
        self.emit: Emit = emit  # "last": frames are answered by flush and end only
        self.last: FrameOutput | None = None  # the latest output since open or reset

    def remember(self, result: FrameOutput) -> None:
        self.last = result
        if self.ring_size <= 0:
            return
        if self.ring is None:
            self.ring = deque(maxlen=self.ring_size)
        self.ring.append(result)

    def replay(self, index: int) -> FrameOutput | None:
        for result in reversed(self.ring or ()):
            if result.index == index:
                return FrameOutput(index, result.outputs, result.names, replayed=True)
        return None

    def pending_frames(self) -> int:
        return self.frames_queued


class SessionManager:
    """Every open session, keyed by (owner, id): one principal never sees another's sessions."""

    def __init__(
        self,
        schedulers: dict[str, ModelScheduler],
        *,
        max_sessions: int,
        ttl: float,
        ring_size: int,
        evict_when_full: bool = False,
        metrics: Metrics | None = None,
    ) -> None:
        self._schedulers = schedulers
        self._sessions: dict[tuple[str, str], Session] = {}
        self._expired: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._per_model: dict[str, int] = {}
        self.max_sessions = max_sessions
        self.ttl = ttl
        self.ring_size = ring_size
        self.evict_when_full = evict_when_full
        self.metrics = metrics
        self.accepting = True

    def __len__(self) -> int:
        return len(self._sessions)

    def count(self, model: str) -> int:
        return self._per_model.get(model, 0)

    def scheduler(self, model: str) -> ModelScheduler:
        try:
            return self._schedulers[model]
        except KeyError:
            raise NotFound(
                f"unknown model {model!r}; loaded models: {sorted(self._schedulers)}"
            ) from None

    def open(
        self,
        model: str,
        session_id: str,
        owner: str,
        emit: Emit = "every",
        *,
        resume_only: bool = False,
    ) -> tuple[Session, bool]:
        """Open a session, or resume it when `session_id` names one this owner holds."""
        scheduler = self.scheduler(model)
        if emit not in EMIT_MODES:
            raise InvalidArgument(f"emit must be one of {list(EMIT_MODES)}, not {emit!r}")
        if session_id:
            if len(session_id) > _MAX_ID_LENGTH or not session_id.isprintable():
                raise InvalidArgument(
                    f"session id must be at most {_MAX_ID_LENGTH} printable characters"
                )
            existing = self._sessions.get((owner, session_id))
            if existing is not None:
                if existing.model != model:
                    raise FailedPrecondition(
                        f"session {session_id!r} runs model {existing.model!r}, not {model!r}",
                        session_id=session_id,
                    )
                if existing.emit != emit:
                    raise FailedPrecondition(
                        f"session {session_id!r} was opened with emit {existing.emit!r}; resume "
                        f"it with the same emit mode, not {emit!r}",
                        session_id=session_id,
                    )
                existing.last_active = time.monotonic()
                log.info("session resumed", extra={"session_id": session_id, "model": model})
                return existing, True
            if resume_only:
                raise self._missing(session_id, owner)
        if not self.accepting:
            raise Unavailable("server is shutting down and opens no new sessions")
        if len(self._sessions) >= self.max_sessions and not self._evict_one():
            raise ResourceExhausted(
                f"session limit reached ({self.max_sessions} open); end idle sessions or raise "
                "--max-sessions"
            )
        session = Session(session_id or secrets.token_hex(16), model, owner, self.ring_size, emit)
        scheduler.attach(session)
        self._register(session)
        if self.metrics is not None:
            self.metrics.sessions_opened.labels(model).inc()
        log.info("session opened", extra={"session_id": session.id, "model": model})
        return session, False

    def _register(self, session: Session) -> None:
        key = (session.owner, session.id)
        self._sessions[key] = session
        self._expired.pop(key, None)
        self._per_model[session.model] = self._per_model.get(session.model, 0) + 1

    def holds(self, owner: str, session_id: str) -> bool:
        return (owner, session_id) in self._sessions

    def restore(self, session_id: str, owner: str, record: SessionRecord) -> Session:
        """Take over a session stored by another replica (or by this one before a restart)."""
        if len(self._sessions) >= self.max_sessions and not self._evict_one():
            raise ResourceExhausted(f"session limit reached ({self.max_sessions} open)")
        scheduler = self.scheduler(record.model)
        session = Session(session_id, record.model, owner, self.ring_size, record.emit)
        scheduler.attach(session)
        scheduler.pool.write(session.slot, record.states)
        session.next_index = record.next_index
        for result in record.ring:
            session.remember(result)
        if record.ring and record.ring[-1].index == record.next_index - 1:
            session.last = record.ring[-1]
        self._register(session)
        log.info(
            "session restored from the state store",
            extra={"session_id": session_id, "model": record.model},
        )
        return session

    def _evict_one(self) -> bool:
        if not self.evict_when_full:
            return False
        idle = [s for s in self._sessions.values() if not s.pending and not s.in_flight]
        if not idle:
            return False
        victim = min(idle, key=lambda s: s.last_active)
        self._end(victim, "evicted")
        return True

    def _missing(self, session_id: str, owner: str) -> NotFound:
        reason = self._expired.get((owner, session_id))
        if reason == "expired":
            return NotFound(
                f"session {session_id!r} expired after {self.ttl:g} s idle", session_id=session_id
            )
        if reason is not None:
            return NotFound(f"session {session_id!r} was {reason}", session_id=session_id)
        return NotFound(f"unknown session {session_id!r}", session_id=session_id)

    def get(self, session_id: str, owner: str) -> Session:
        session = self._sessions.get((owner, session_id))
        if session is None:
            raise self._missing(session_id, owner)
        return session

    def end(self, session_id: str, owner: str, reason: str = "client") -> asyncio.Future[Ended]:
        """Remove the session now; its queued frames still run, then its slot is freed."""
        return self._end(self.get(session_id, owner), reason)

    def _end(self, session: Session, reason: str) -> asyncio.Future[Ended]:
        del self._sessions[(session.owner, session.id)]
        self._per_model[session.model] -= 1
        if reason != "client":
            # Remembered so a later request hears why the session is gone, not just "unknown".
            self._expired[(session.owner, session.id)] = reason
            while len(self._expired) > _EXPIRED_MEMORY:
                self._expired.popitem(last=False)
            if session.listener is not None:
                session.listener(Ended(session.id, reason, session.next_index))
        if self.metrics is not None:
            self.metrics.sessions_ended.labels(session.model, reason).inc()
        log.info(
            "session ended (%s)", reason, extra={"session_id": session.id, "model": session.model}
        )
        future: asyncio.Future[Ended] = asyncio.get_running_loop().create_future()
        self._schedulers[session.model].submit(session, ControlWork("end", future, reason))
        return future

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def expire_idle(self) -> list[Session]:
        """End every idle session older than the TTL; returns the ones expired."""
        if self.ttl <= 0:
            return []
        cutoff = time.monotonic() - self.ttl
        idle = [
            s
            for s in self._sessions.values()
            if s.last_active < cutoff and not s.pending and not s.in_flight
        ]
        for session in idle:
            self._end(session, "expired")
        return idle

    async def run_expiry(self) -> None:
        if self.ttl <= 0:
            return
        interval = min(max(self.ttl / 4, 0.05), 5.0)
        while True:
            await asyncio.sleep(interval)
            self.expire_idle()


def as_index_array(slots: list[int]) -> npt.NDArray[np.intp]:
    return np.fromiter(slots, dtype=np.intp, count=len(slots))
