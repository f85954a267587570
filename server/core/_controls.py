"""Controls at the head of a session's queue: reset, end, flush and forecast, each applied in
order with the frames sent before it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Protocol

from rnnstream.server.core._errors import (
    FailedPrecondition,
    Internal,
    RnnstreamError,
    Unavailable,
)
from rnnstream.server.core._forecast import check_answer_size, first_from_last
from rnnstream.server.core._persistence import Persistence, Undo
from rnnstream.server.core._results import Ended, Flushed, Forecasted, FrameOutput, Reset
from rnnstream.server.core._rollouts import RolloutQueue, Stepper
from rnnstream.server.core._runner import BatchRunner
from rnnstream.server.core._session import Session
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._work import ControlWork

__all__ = ["Controls", "Host"]

log = logging.getLogger("rnnstream.scheduler")


class Host(Protocol):
    """What controls need of their model's scheduler."""

    pool: StatePool
    runner: BatchRunner
    persistence: Persistence
    rollouts: RolloutQueue

    def mark_ready(self, session: Session) -> None: ...

    def release(self, session: Session) -> None: ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None: ...


def _answer(work: ControlWork, result: Any) -> None:
    if not work.future.done():
        work.future.set_result(result)


def _fail(session: Session, work: ControlWork, error: RnnstreamError) -> None:
    if not work.future.done():
        work.future.set_exception(type(error)(error.message, session_id=session.id))


class Controls:
    def __init__(self, host: Host) -> None:
        self._host = host
        self._names = tuple(t.name for t in host.runner.spec.outputs)

    def apply(self, session: Session, work: ControlWork) -> None:
        if work.action == "reset":
            self._reset(session, work)
        elif work.action == "end":
            self._host.release(session)
            last = session.last if session.emit == "last" else None
            _answer(work, Ended(session.id, work.reason, session.next_index, last))
        elif work.action == "flush":
            self._flush(session, work)
        else:
            # The session runs nothing else until its forecast is done, like a frame in flight.
            session.start_control()
            self._host.spawn(self._forecast(session, work))

    def _reset(self, session: Session, work: ControlWork) -> None:
        reset = Reset(session.id, session.next_index)
        at = work.at_index
        if at is None or at == session.next_index:
            self._to_initial_state(session, work, reset)
        elif at < session.next_index:
            _answer(work, reset)  # a resent reset that was applied already
        else:
            # Sent after frames the session never applied: like a frame, it is out of order.
            _fail(
                session,
                work,
                FailedPrecondition(
                    f"reset at frame {at} is out of order: session {session.id!r} expects frame "
                    f"{session.next_index}"
                ),
            )

    def _flush(self, session: Session, work: ControlWork) -> None:
        result = Flushed(session.id, session.next_index, work.reset_after, session.last)
        if work.reset_after:
            self._to_initial_state(session, work, result)
        else:
            _answer(work, result)

    def _to_initial_state(self, session: Session, work: ControlWork, result: Any) -> None:
        """Reset the session's state; with a store, answer only once the reset is stored."""
        host = self._host
        undo = host.persistence.undo_point(session)
        session.set_last(None)
        host.pool.reset(session.slot)
        if host.persistence.store is None:
            _answer(work, result)
            return
        session.start_control()  # nothing else of this session runs until the write is done

        async def store_and_answer() -> None:
            try:
                await host.persistence.save_session(session, undo)
            except RnnstreamError as exc:
                _fail(session, work, exc)
            else:
                _answer(work, result)
            finally:
                session.control_done()
                host.mark_ready(session)

        host.spawn(store_and_answer())

    async def _forecast(self, session: Session, work: ControlWork) -> None:
        host = self._host
        spec = host.runner.spec
        params = work.forecast
        try:
            if params is None:
                raise Internal("forecast work without its parameters")
            first = params.first
            if first is None:
                first = first_from_last(spec, session.last)
            states = host.pool.read(session.slot)
            # Run a slice at a time between batches: other sessions' frames do not wait for it.
            stepper = Stepper(host.runner.model, states, first, params.steps)
            rolled = await host.rollouts.run(stepper)
            if params.answer_limit:  # checked before it ran when the model fixes the sizes
                size = sum(a.nbytes for a in rolled.outputs)
                check_answer_size(size, params.answer_limit, session.id)
            if params.commit:
                undo = Undo(states, session.last)
                # Slots may have moved during the await: session.slot is read afresh.
                host.pool.write(session.slot, rolled.states)
                session.set_last(FrameOutput(session.next_index - 1, rolled.last_step, self._names))
                await host.persistence.save_session(session, undo)
            result = Forecasted(
                session.id, rolled.outputs, self._names, session.next_index, params.commit
            )
        except asyncio.CancelledError:
            _fail(session, work, Unavailable("the server stopped during the forecast; ask again"))
            raise
        except RnnstreamError as exc:
            _fail(session, work, exc)
        except Exception as exc:
            log.exception("model %s failed on a forecast", spec.name)
            _fail(session, work, Internal(f"model {spec.name!r} failed: {exc}"))
        else:
            _answer(work, result)
        finally:
            session.control_done()
            host.mark_ready(session)
