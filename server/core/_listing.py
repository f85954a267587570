"""Seeing sessions: one session's info, and listings a page at a time that stay in place while
sessions come and go."""

from __future__ import annotations

import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterator
from typing import Protocol

from rnnstream.server.core._errors import InvalidArgument, NotFound, quoted
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._results import SESSION_STATES, SessionInfo, SessionPage, SessionState
from rnnstream.server.core._session import Session
from rnnstream.server.core._store import Gone, SpilledSession, StateStore

__all__ = [
    "DEFAULT_PAGE",
    "MAX_PAGE",
    "OpenOrder",
    "SessionViews",
    "session_info",
    "spilled_info",
]

DEFAULT_PAGE = 100
MAX_PAGE = 1000
_MEMORY = "m:"  # a page token naming the registration number of the last session listed
_STORE = "s:"  # a page token naming the last spilled session listed (the store's cursor)


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
    session: Session, principal: str, state_bytes: int, stored: bool, spill_after: float = 0.0
) -> SessionInfo:
    """What a client or an operator sees of a session held in memory."""
    idle = time.monotonic() - session.last_active
    ttl = spill_after or session.ttl  # it leaves memory then
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


def spilled_info(spilled: SpilledSession) -> SessionInfo:
    now = time.time()
    kept = spilled.kept_until
    return SessionInfo(
        spilled.session_id,
        spilled.model,
        spilled.next_index,
        0,
        max(0.0, now - spilled.idle_since),
        max(0.0, kept - now) if kept else 0.0,
        spilled.version,
        spilled.owner,
        "spilled",
        0,
        spilled.store_bytes,
    )


def _position(token: str) -> tuple[int | None, str]:
    """(the registration number a page token continues after, or None past memory; the
    store's cursor); InvalidArgument for a token no listing gave."""
    if not token:
        return -1, ""
    if token.startswith(_MEMORY) and token[len(_MEMORY) :].isdigit():
        return int(token[len(_MEMORY) :]), ""
    if token.startswith(_STORE):
        return None, token[len(_STORE) :]
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


class Holder(Protocol):
    """Where the sessions in memory are (the SessionManager)."""

    order: OpenOrder

    def find(self, session_id: str, owner: str) -> Session | None: ...

    def missing(self, session_id: str, owner: str) -> NotFound: ...


class SessionViews:
    """What the Engine answers about sessions: one session's info, and pages of them (those
    in memory, in the order they were registered; then those spilled to the store)."""

    def __init__(self, sessions: Holder, models: ModelRegistry, spill_after: float) -> None:
        self._sessions = sessions
        self._order = sessions.order
        self._models = models
        self._spill_after = spill_after
        self.store: StateStore | None = None

    def info(self, session: Session) -> SessionInfo:
        pool = self._models.scheduler_of(session).pool
        stored = self.store is not None  # every session has a copy there
        spill = self._spill_after if stored else 0.0
        return session_info(session, session.owner, pool.slot_bytes, stored, spill)

    async def describe(self, principal: str, session_id: str) -> SessionInfo:
        sessions = self._sessions
        session = sessions.find(session_id, principal)
        if session is not None:
            return self.info(session)
        if self.store is not None and self._spill_after and session_id:
            spilled = await self.store.spilled_session(principal, session_id)
            if isinstance(spilled, Gone):
                raise NotFound(f"session {quoted(session_id)} {spilled.why}", session_id=session_id)
            if spilled is not None:
                return spilled_info(spilled)
        raise sessions.missing(session_id, principal)

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
        after, cursor = _position(page_token)
        found: list[SessionInfo] = []
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
            if token:
                return SessionPage(tuple(found), token)
        if self.store is None or not self._spill_after or state not in ("", "spilled"):
            return SessionPage(tuple(found), "")
        if len(found) == size:
            return SessionPage(tuple(found), _STORE)
        spilled, cursor = await self.store.spilled_page(principal, cursor, size - len(found))
        found += [spilled_info(s) for s in spilled if not model or s.model == model]
        return SessionPage(tuple(found), _STORE + cursor if cursor else "")
