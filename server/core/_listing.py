"""Seeing sessions: one session's info, and listings a page at a time that stay in place while
sessions come and go."""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator

from rnnstream.server.core._errors import InvalidArgument, quoted
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._results import SESSION_STATES, SessionInfo, SessionPage, SessionState
from rnnstream.server.core._session import Session

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "OpenOrder",
    "SessionViews",
    "session_info",
]

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_MEMORY = "m:"  # a page token naming the registration number of the last session listed


class OpenOrder:
    """Open sessions in the order they were registered (opened or restored). A page token
    names the last registration number it listed, so the next page starts right after it
    whatever opened or ended meanwhile; a binary search finds that place."""

    def __init__(self) -> None:
        self._seqs = array("q")  # ascending; 8 bytes a session
        self._sessions: list[Session | None] = []  # None: ended (a hole until compacted)
        self._holes = 0
        self._next = 0

    def add(self, session: Session) -> None:
        session.numbered(self._next)
        self._next += 1
        self._seqs.append(session.seq)
        self._sessions.append(session)

    def remove(self, session: Session) -> None:
        i = bisect_left(self._seqs, session.seq)
        if i < len(self._seqs) and self._sessions[i] is session:
            self._sessions[i] = None
            self._holes += 1
            if self._holes > 1024 and 2 * self._holes > len(self._sessions):
                self._compact()

    def _compact(self) -> None:
        kept = [(q, s) for q, s in zip(self._seqs, self._sessions, strict=True) if s is not None]
        self._seqs = array("q", (q for q, _ in kept))
        self._sessions = [s for _, s in kept]
        self._holes = 0

    def after(self, seq: int) -> Iterator[Session]:
        """Sessions registered after `seq`, oldest first (do not open or end any meanwhile)."""
        sessions = self._sessions
        for i in range(bisect_right(self._seqs, seq), len(sessions)):
            session = sessions[i]
            if session is not None:
                yield session


def session_info(
    session: Session, principal: str, state_bytes: int, stored: bool, now: float | None = None
) -> SessionInfo:
    """What a client or an operator sees of a session held in memory."""
    idle = (time.monotonic() if now is None else now) - session.last_active
    ttl = session.ttl
    held = session.held_bytes()
    ring = session.ring_bytes()
    return SessionInfo(
        session.id,
        session.model,
        session.next_index,
        session.frames_queued,
        idle,
        max(0.0, ttl - idle) if ttl > 0 else 0.0,
        session.version,
        principal,
        "active" if session.busy() else "idle",
        state_bytes + held,
        state_bytes + ring if stored else 0,
    )


def check_listing(state: str, page_size: int) -> int:
    """The page size to use; InvalidArgument for a state or size no listing has."""
    if state and state not in SESSION_STATES:
        raise InvalidArgument(
            f"session state must be one of {list(SESSION_STATES)}, not {quoted(state)}"
        )
    if page_size < 0 or page_size > MAX_PAGE:
        raise InvalidArgument(f"page size must be within 0..{MAX_PAGE} (0: {DEFAULT_PAGE})")
    return page_size or DEFAULT_PAGE


def memory_position(token: str) -> int | None:
    """The registration number a page token continues after; None for a token past memory
    (InvalidArgument for one no listing gave)."""
    if not token:
        return -1
    if token.startswith(_MEMORY) and token[len(_MEMORY) :].isdigit():
        return int(token[len(_MEMORY) :])
    raise InvalidArgument(f"page token {quoted(token)} was not given by a session listing")


def page_of(
    order: OpenOrder,
    after: int,
    size: int,
    keep: Callable[[Session], bool],
    info: Callable[[Session], SessionInfo],
    state: SessionState | None,
) -> tuple[list[SessionInfo], str]:
    """Up to `size` sessions held in memory after registration number `after` that `keep`
    accepts and are in `state` (None: any); and the token of the next page ('' at the end)."""
    found: list[SessionInfo] = []
    for session in order.after(after):
        if not keep(session):
            continue
        if state is not None and ("active" if session.busy() else "idle") != state:
            continue
        found.append(info(session))
        if len(found) == size:
            return found, f"{_MEMORY}{session.seq}"
    return found, ""


class SessionViews:
    """What the Engine answers about sessions: one session's info, and pages of them."""

    def __init__(self, order: OpenOrder, models: ModelRegistry) -> None:
        self._order = order
        self._models = models

    def info(self, session: Session) -> SessionInfo:
        pool = self._models.scheduler_of(session).pool
        stored = self._models.store is not None  # every session has a copy there
        return session_info(session, session.owner, pool.slot_bytes, stored)

    async def page(
        self,
        principal: str | None,
        *,
        model: str = "",
        state: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> SessionPage:
        """A page of the sessions of `principal` (None: every principal), `model` and `state`
        (empty: any) after the one `page_token` names."""
        size = check_listing(state, page_size)
        after = memory_position(page_token)
        found: list[SessionInfo] = []
        token = ""
        if after is not None and state != "spilled":
            found, token = page_of(
                self._order,
                after,
                size,
                lambda s: (
                    (principal is None or s.owner == principal) and (not model or s.model == model)
                ),
                self.info,
                "active" if state == "active" else "idle" if state else None,
            )
        return SessionPage(tuple(found), token)
