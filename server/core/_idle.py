"""Idle sessions: a periodic sweep counts sessions by state and ends those idle past their TTL,
or, with spilling, moves those idle for --spill-after out of memory into the state store."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping

from rnnstream.server.core._heap import give_back_heap
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._session import Session
from rnnstream.server.core._spill import Spiller
from rnnstream.server.core._store import StateStore

__all__ = ["IdleSweep"]

log = logging.getLogger("rnnstream.sessions")

_CHUNK = 20_000  # sessions looked at between two turns of the event loop
_SESSIONS_PER_SECOND = 200_000  # a sweep runs at most this often per session held
_EXPIRE_BATCH = 1000  # spilled sessions whose time ran out, turned into "expired" per call
_GIVE_BACK = 1024  # sessions that left memory since the last trim before the heap is trimmed again


class IdleSweep:
    """Looks at every session held in memory every so often: a quarter of the shortest TTL in
    force (or of --spill-after), at least once a second, less often when millions are held (a
    sweep of a million takes about a tenth of a second of the loop, in chunks that let frames
    through). With spilling, sessions spill instead of expiring in memory; their time in the
    store runs out there (store upkeep, each sweep)."""

    def __init__(self, sessions: SessionManager, metrics: CoreMetrics | None = None) -> None:
        self._sessions = sessions
        self._spiller: Spiller | None = None
        self._store: StateStore | None = None
        self._spilled = 0
        self._store_error = ""
        self._high = 0  # most sessions in memory at a sweep since the heap was last trimmed
        self._trim = False  # many left: trim the heap at the next sweep (their pool has shrunk)
        self.states: Mapping[str, int] = {"active": 0, "idle": 0, "spilled": 0}
        if metrics is not None:
            metrics.watch_session_states(lambda: self.states)

    def spill_to(self, spiller: Spiller, store: StateStore) -> None:
        self._spiller = spiller
        self._store = store

    def period(self) -> float:
        ttl = self._sessions.shortest_ttl() if self._spiller is None else self._spiller.policy.after
        base = min(max(ttl / 4, 0.05), 5.0) if ttl > 0 else 1.0
        return max(base, len(self._sessions) / _SESSIONS_PER_SECOND)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period())
            await self.sweep()

    async def sweep(self) -> list[Session]:
        """One pass: count the states, spill or expire the sessions idle long enough; returns
        those it spilled or expired."""
        sessions = self._sessions.sessions()
        spiller = self._spiller
        due: list[Session] = []
        active = 0
        for start in range(0, len(sessions), _CHUNK):
            if start:
                await asyncio.sleep(0)
            now = time.monotonic()
            for session in sessions[start : start + _CHUNK]:
                if session.busy():
                    active += 1
                    continue
                session.shrink()  # its empty queue goes: idle sessions stay small
                if spiller is not None:
                    if spiller.due(session, now):
                        due.append(session)
                elif 0 < session.ttl < now - session.last_active:
                    due.append(session)
        if spiller is not None:
            await spiller.spill(due)
            await self._store_upkeep(spiller)
        else:
            for session in due:
                self._sessions.expire(session)
        held = len(self._sessions)
        self.states = {"active": active, "idle": max(0, held - active), "spilled": self._spilled}
        await self._give_back(held)
        return due

    async def _give_back(self, held: int) -> None:
        """After many sessions left memory (spilled, expired or ended), give their memory back:
        the table that held them is copied smaller, and the next sweep trims the heap."""
        self._sessions.compact()
        if self._trim:  # decided at the last sweep: the state pools have shrunk since
            self._trim = False
            await give_back_heap()
        self._high = max(self._high, held)
        if self._high - held >= _GIVE_BACK:
            self._trim, self._high = True, held

    async def _store_upkeep(self, spiller: Spiller) -> None:
        """Spilled sessions whose time ran out become "expired" (on every replica's next look);
        the streams here still attached to them are told."""
        assert self._store is not None
        try:
            await self._store.expire_spilled(_EXPIRE_BATCH)
            self._spilled = await self._store.spilled_count()
        except Exception as exc:
            if str(exc) != self._store_error:  # once per kind of failure, not every sweep
                log.warning("state store upkeep failed: %s", exc)
            self._store_error = str(exc)
        else:
            self._store_error = ""
        spiller.notify_expired(time.monotonic())
