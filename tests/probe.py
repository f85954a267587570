"""White-box views of a server's engine, for checks no client could make (open sessions, live
state slots, queued frames, a busy ORT thread): the one place tests reach past the Engine's API."""

from __future__ import annotations

import threading
from typing import Any

from rnnstream.server.core import Engine


def session_count(engine: Engine) -> int:
    return len(engine._sessions)


def next_indices(engine: Engine) -> dict[str, int]:
    """session id -> next frame index, for every open session."""
    return {s.id: s.next_index for s in engine._sessions.sessions()}


def session(engine: Engine, principal: str, session_id: str) -> Any:
    """The core's own session object (in_flight, frames_queued, next_index)."""
    return engine._sessions.get(session_id, principal)


def max_frames_queued(engine: Engine) -> int:
    return max((s.frames_queued for s in engine._sessions.sessions()), default=0)


def live_slots(engine: Engine) -> int:
    """State slots in use over every model's pool."""
    return sum(s.pool.live for s in engine._schedulers.values())


def queued_frames(engine: Engine) -> int:
    return sum(s.queued_frames for s in engine._schedulers.values())


def block_ort(engine: Engine, release: threading.Event) -> None:
    """Keep the (one) ORT executor thread busy until `release` is set."""
    assert engine._executor is not None
    engine._executor.submit(release.wait)


def pool_capacity(engine: Engine, model: str) -> int:
    """Slots the model's state pool holds (grows and shrinks with the sessions)."""
    return int(engine._schedulers[model].pool.capacity)


def held_by(engine: Engine, principal: str) -> int:
    """Sessions the principal holds (what --max-sessions-per-principal counts)."""
    return engine._sessions.held_by(principal)
