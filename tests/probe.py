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
    """State slots in use over every loaded model version's pool."""
    return sum(s.scheduler.pool.live for s in engine._models.all_served())


def queued_frames(engine: Engine) -> int:
    return sum(s.scheduler.queued_frames for s in engine._models.all_served())


def block_ort(engine: Engine, release: threading.Event, model: str = "gru") -> None:
    """Keep the ORT executor thread of the model's newest version busy until `release` is set."""
    engine._models.pick(model).executor.submit(release.wait)


def pool_capacity(engine: Engine, model: str) -> int:
    """Slots the newest version's state pool holds (grows and shrinks with the sessions)."""
    return int(engine._models.pick(model).scheduler.pool.capacity)


def loaded_versions(engine: Engine, model: str) -> list[int]:
    """Versions of the model still loaded, retired (draining) ones included, oldest first."""
    return sorted(s.version for s in engine._models.all_served() if s.name == model)


def held_by(engine: Engine, principal: str) -> int:
    """Sessions the principal holds (what --max-sessions-per-principal counts)."""
    return engine._sessions.held_by(principal)


def polls_started(engine: Engine) -> int:
    """Repository rescans the poll (--model-control-mode poll) has started."""
    return engine._loader.polls


def session_options(engine: Engine, model: str) -> Any:
    """The ONNX Runtime session options the model's newest version really runs with."""
    return engine._models.pick(model).model.session.get_session_options()


def held(engine: Engine, principal: str, session_id: str) -> bool:
    """Whether the session is in this server's memory (not spilled, not ended)."""
    return engine._sessions.find(session_id, principal) is not None


def spill_in_flight(engine: Engine, principal: str, session_id: str) -> bool:
    """Whether the session is being marked spilled in the store right now."""
    session = engine._sessions.find(session_id, principal)
    return session is not None and session.in_flight == 3  # _session.SPILL


async def sweep(engine: Engine) -> None:
    """Run one idle sweep now (counts states, shrinks idle sessions, expires or spills)."""
    await engine._idle.sweep()


def holds_queue(engine: Engine, principal: str, session_id: str) -> bool:
    """Whether the session holds a frame queue (an idle one gives it back at a sweep)."""
    return engine._sessions.get(session_id, principal)._pending is not None
