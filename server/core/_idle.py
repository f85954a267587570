"""Idle sessions: a periodic sweep counts sessions by state and ends those idle past their TTL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._session import Session

__all__ = ["IdleSweep"]

_CHUNK = 20_000  # sessions looked at between two turns of the event loop
_SESSIONS_PER_SECOND = 200_000  # a sweep runs at most this often per session held


class IdleSweep:
    """Looks at every session held in memory every so often: a quarter of the shortest TTL in
    force, at least once a second, less often when millions are held (a sweep of a million
    takes about a tenth of a second of the loop, in chunks that let frames through)."""

    def __init__(self, sessions: SessionManager, metrics: CoreMetrics | None = None) -> None:
        self._sessions = sessions
        self.states: Mapping[str, int] = {"active": 0, "idle": 0, "spilled": 0}
        if metrics is not None:
            metrics.watch_session_states(lambda: self.states)

    def period(self) -> float:
        ttl = self._sessions.shortest_ttl()
        base = min(max(ttl / 4, 0.05), 5.0) if ttl > 0 else 1.0
        return max(base, len(self._sessions) / _SESSIONS_PER_SECOND)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.period())
            await self.sweep()

    async def sweep(self) -> list[Session]:
        """One pass: count the states, expire the sessions idle past their TTL; returns those."""
        sessions = self._sessions.sessions()
        expired: list[Session] = []
        active = 0
        for start in range(0, len(sessions), _CHUNK):
            if start:
                await asyncio.sleep(0)
            now = time.monotonic()
            for session in sessions[start : start + _CHUNK]:
                if session.busy():
                    active += 1
                elif 0 < session.ttl < now - session.last_active:
                    expired.append(session)
        for session in expired:
            self._sessions.expire(session)
        held = len(self._sessions)
        self.states = {"active": active, "idle": max(0, held - active), "spilled": 0}
        return expired
