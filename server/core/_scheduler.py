"""Per-model scheduler: steps the waiting frames of many sessions in one ONNX Runtime call.

It conducts the rooms that do the work: the sessions' own queues (_session), the ready queue
(_batcher), the pacing of batches (_arrivals), the ORT runner (_runner), persistence with undo
(_persistence), controls (_controls), the answers (_answers) and the counters (_stats)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

import numpy.typing as npt

from rnnstream.server.core._answers import BatchAnswers
from rnnstream.server.core._arrivals import Pacer
from rnnstream.server.core._batch import Batch
from rnnstream.server.core._batcher import ReadyQueue
from rnnstream.server.core._controls import Controls
from rnnstream.server.core._errors import Internal, NotFound, RnnstreamError, Unavailable
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._persistence import Persistence
from rnnstream.server.core._rollouts import RolloutQueue
from rnnstream.server.core._runner import BatchRunner
from rnnstream.server.core._runtime import OrtModel
from rnnstream.server.core._session import Session
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._stats import ModelCounters
from rnnstream.server.core._store import StateStore
from rnnstream.server.core._work import (
    AUTO_INDEX,
    ControlWork,
    FrameBlock,
    FrameWork,
    as_index_array,
)

__all__ = ["ModelScheduler"]

log = logging.getLogger("rnnstream.scheduler")

_STOPPED = "the server stopped while the frame was running; it was not applied: send it again"
_STOPPING = "server is shutting down; resume the session on another replica"


class ModelScheduler:
    """Oldest-first batching: each call takes at most one frame per ready session, in arrival order.

    There is no batching window: a batch starts as soon as the previous one ends, with whatever
    has arrived, so a lone session waits for nothing. Everything except the ORT call itself runs
    on the event loop, which makes the pool and the sessions single-threaded.
    """

    def __init__(
        self,
        model: OrtModel,
        *,
        pool: StatePool | None = None,
        max_batch_size: int,
        executor: Executor | None = None,
        metrics: CoreMetrics | None = None,
        store: StateStore | None = None,
        max_batch_bytes: int = 0,
    ) -> None:
        self.model = model
        self.spec = model.spec
        self.pool = pool if pool is not None else StatePool(self.spec.states)
        self.counters = ModelCounters(self.spec.name, metrics)
        self.stats = self.counters.stats
        self.ready = ReadyQueue(max_batch_size, max_batch_bytes)
        self.runner = BatchRunner(model, self.pool, executor, host_states=store is not None)
        self.rollouts = RolloutQueue(executor, self.ready.wake)
        self.persistence = Persistence(store, self.spec, self.pool)
        self.controls = Controls(self)
        waits = metrics.gather_observer(self.spec.name) if metrics is not None else None
        self.pacer = Pacer(self, waits)
        self.answers = BatchAnswers(self.spec.name, self.counters, self.ready)
        self.max_batch_size = self.ready.max_batch_size
        self.queued_frames = 0
        self.submitted = 0  # items submitted so far (the pacer watches it grow)
        self._slot_owner: list[Session | None] = []  # by slot: 8 bytes a slot, shrinks with it
        self._task: asyncio.Task[None] | None = None
        self._halted = False
        self.holding = False  # shutting down: no new batch starts
        self._side_tasks: set[asyncio.Task[None]] = set()  # forecasts and store writes
        # Told when the last session leaves: a retired model version is freed then.
        self.on_empty: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.spec.name)

    async def stop(self) -> None:
        self._halted = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._side_tasks):
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)

    def ready_count(self) -> int:
        return len(self.ready)

    def session_count(self) -> int:
        return self.pool.live

    def idle(self) -> bool:
        return not len(self.ready) and not self.busy()

    def busy(self) -> bool:
        """A batch, forecast or store write of one of its sessions is under way."""
        return any(s.in_flight for s in self._slot_owner if s is not None)

    def count(self, status: str, frames: int = 1) -> None:
        self.counters.count(status, frames)

    # -- sessions --------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        session.place(self.pool.allocate())
        owners = self._slot_owner
        if session.slot >= len(owners):
            owners.extend([None] * (self.pool.capacity - len(owners)))
        owners[session.slot] = session

    def submit(self, session: Session, work: FrameWork | ControlWork) -> None:
        if self._halted:  # the server is stopping: nothing would run it
            self._refuse(work, Unavailable(_STOPPING, session_id=session.id))
            return
        self.submitted += 1
        if isinstance(work, FrameWork):
            self.queued_frames += 1
        session.push(work)
        self.ready.mark_ready(session)

    def submit_block(self, block: FrameBlock) -> None:
        """Queue a block of frames, one per session, whose sessions had nothing else queued or
        running and are now in flight (Session.claim_block): it runs whole, or split over
        batches, with no object per frame."""
        if self._halted:  # the server is stopping: nothing would run it
            self.answers.fail_block(block, Unavailable(_STOPPING))
            return
        self.submitted += 1
        self.queued_frames += len(block)
        self.ready.add_block(block)

    def read_state(self, session: Session) -> list[npt.NDArray[Any]]:
        return self.pool.read(session.slot)

    def write_state(self, session: Session, states: list[npt.NDArray[Any]]) -> None:
        self.pool.write(session.slot, states)

    def mark_ready(self, session: Session) -> None:
        self.ready.mark_ready(session)

    def release(self, session: Session) -> None:
        """The session ended: free its slot and refuse what it still had queued."""
        self._slot_owner[session.slot] = None
        self.pool.release(session.slot)
        if self.pool.live <= self.pool.capacity // 4:
            self.ready.wake.set()  # the loop shrinks the pool once no batch holds slot numbers
        for work in session.close():
            self._refuse(work, NotFound(f"session {session.id!r} has ended", session_id=session.id))
        if not self.pool.live and self.on_empty is not None:
            self.on_empty()

    def refuse_queued(self, message: str) -> None:
        """Shutting down: refuse with UNAVAILABLE, in order, everything that has not started;
        what runs finishes (or is abandoned by stop)."""
        for session in [s for s in self._slot_owner if s is not None]:
            before = session.frames_queued
            for work in session.take_queued():
                index = getattr(work, "index", None)
                at = None if index == AUTO_INDEX else index
                self._refuse(work, Unavailable(message, session_id=session.id, frame_index=at))
            self.queued_frames -= before - session.frames_queued
        for block in self.ready.take_blocks():
            self.queued_frames -= len(block) - block.taken
            self.answers.fail_block(block, Unavailable(message))

    def _refuse(self, work: FrameWork | ControlWork, error: RnnstreamError) -> None:
        if isinstance(work, FrameWork):
            self.counters.reject(work, error)
        elif not work.future.done():
            work.future.set_exception(error)
            work.future.exception()  # retrieved: an end queued by expiry has no one waiting

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a session's work off the batch loop (forecasts, a control's store write)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    def _relocate(self, old: int, new: int) -> None:
        session = self._slot_owner[old]
        assert session is not None
        self._slot_owner[old] = None
        session.place(new)
        self._slot_owner[new] = session

    # -- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        ready = self.ready
        while True:
            if not len(ready) or self.holding:
                if self.rollouts:  # nothing else to run: the forecasts' turn
                    await self.rollouts.step()
                    continue
                if self.holding:  # shutting down: what waits is refused by stop's caller
                    await asyncio.Event().wait()
                ready.wake.clear()
                while self.pool.compact(self._relocate):  # down to a quarter full or more
                    del self._slot_owner[self.pool.capacity :]
                await ready.wake.wait()
                continue
            await self.pacer.gather_arrivals()
            batch = ready.take(self._head)
            size = len(batch)
            self.queued_frames -= size
            if size:
                await self._run_batch(batch)
            if self.rollouts:  # one slice of a forecast between two batches
                await self.rollouts.step()

    def _head(self, session: Session) -> FrameWork | None:
        """The session's runnable frame, once the controls and stale frames before it are done
        with; the frames those drop leave the queue depth."""
        before = session.frames_queued
        frame = session.next_frame(self.controls.apply, self.counters)
        self.queued_frames -= before - session.frames_queued
        return frame

    async def _run_batch(self, batch: Batch) -> None:
        runner, answers = self.runner, self.answers
        try:
            sessions = batch.sessions()
            slots = as_index_array([s.slot for s in sessions])
            feeds = runner.feeds(batch, slots)
            bad = runner.nonfinite(len(sessions), feeds)
            if bad:
                batch = answers.refuse_nonfinite(batch, bad)
                if not batch:
                    return
                sessions = batch.sessions()
                slots = as_index_array([s.slot for s in sessions])
                feeds = runner.feeds(batch, slots)
        except Exception as exc:
            self._batch_failed(batch, exc)
            return
        started = time.perf_counter()
        try:
            outputs, states, seconds = await runner.run(feeds, slots)
        except asyncio.CancelledError:
            # Nothing was applied: the client sends the frame again, to another replica.
            answers.fail(batch, Unavailable(_STOPPED))
            raise
        except Exception as exc:
            self._batch_failed(batch, exc)
            return
        singles, blocks = runner.scatter(slots, batch, outputs, states, seconds)
        if self.persistence.store is not None:
            old_states = runner.old_states(feeds)
            results = singles + [b.row(i) for b in blocks for i in range(len(b))]
            try:
                error = await self.persistence.save_batch(
                    sessions, results, slots, old_states, states
                )
            except asyncio.CancelledError:  # the states were put back
                answers.fail(batch, Unavailable(_STOPPED))
                raise
            if error is not None:
                answers.fail(batch, error)
                return
        answers.applied(batch, singles, blocks, started, seconds)

    def _batch_failed(self, batch: Batch, exc: Exception) -> None:
        self.counters.batch_failed(len(batch))
        log.exception("model %s failed on a batch of %d", self.spec.name, len(batch))
        self.answers.fail(batch, Internal(f"model {self.spec.name!r} failed: {exc}"))
