"""Persistence with undo: a step's new states are stored before any of its outputs is sent, and
a failed write puts the states back as they were."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import numpy as np

from rnnstream.server.core._errors import Internal, RnnstreamError
from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._results import FrameOutput
from rnnstream.server.core._session import Session
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._store import StateStore, StepRecord
from rnnstream.server.core._work import Arrays

__all__ = ["Persistence", "Undo"]

log = logging.getLogger("rnnstream.scheduler")


@dataclass(frozen=True, slots=True)
class Undo:
    """A session as it was before a control changed it."""

    states: Arrays  # empty without a store: nothing to undo
    last: FrameOutput | None


class Persistence:
    """One model's writes to the state store (None: state lives in this process only)."""

    def __init__(self, store: StateStore | None, spec: ModelSpec, pool: StatePool) -> None:
        self.store = store
        self._spec = spec
        self._pool = pool

    async def save_batch(
        self,
        sessions: list[Session],
        results: list[FrameOutput],
        slots: np.ndarray,
        old_states: Arrays,
        new_states: Arrays | None,
    ) -> RnnstreamError | None:
        """Store the batch's step; on failure put every state back and return the error (the
        frames fail with UNAVAILABLE, the client sends them again once the store is back, and
        nothing is applied twice)."""
        assert self.store is not None and new_states is not None
        spec = self._spec
        per_state = [
            np.moveaxis(a, st.batch_axis, 0) for a, st in zip(new_states, spec.states, strict=True)
        ]
        steps = [
            StepRecord(
                s.owner,
                s.id,
                s.model,
                s.emit,
                result.index + 1,
                [a[i] for a in per_state],
                result,
                s.version,
                s.ttl,
            )
            for i, (s, result) in enumerate(zip(sessions, results, strict=True))
        ]
        try:
            await self.store.save(spec, steps)
        except asyncio.CancelledError:
            self._pool.scatter(slots, old_states)
            raise
        except Exception as exc:
            self._pool.scatter(slots, old_states)
            error = _classified(exc)
            log.warning("could not store a batch of %d: %s", len(results), error.message)
            return error
        return None

    def undo_point(self, session: Session) -> Undo:
        states = self._pool.read(session.slot) if self.store is not None else []
        return Undo(states, session.last)

    async def save_session(self, session: Session, undo: Undo) -> None:
        """Store a session's state after a control changed it outside a batch (reset, flush
        with reset, committed forecast); on failure undo the change and raise UNAVAILABLE."""
        if self.store is None:
            return
        step = StepRecord(
            session.owner,
            session.id,
            session.model,
            session.emit,
            session.next_index,
            self._pool.read(session.slot),
            session.last,
            session.version,
            session.ttl,
            control=True,
        )
        try:
            await self.store.save(self._spec, [step])
        except BaseException as exc:  # the server stopping (cancelled) undoes it too
            self._pool.write(session.slot, undo.states)  # slots may have moved: read afresh
            session.set_last(undo.last)
            if not isinstance(exc, Exception):
                raise
            raise _classified(exc) from exc


def _classified(exc: Exception) -> RnnstreamError:
    """A store that cannot be reached raises Unavailable, which the client waits out; anything
    else is a fault that retrying would only repeat: INTERNAL, its traceback logged here once."""
    if isinstance(exc, RnnstreamError):
        return exc
    log.error("the state store failed", exc_info=exc)
    return Internal(f"the state store failed: {type(exc).__name__}: {exc}")
