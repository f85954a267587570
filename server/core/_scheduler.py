"""Per-model scheduler: steps the waiting frames of many sessions in one ONNX Runtime call."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._arrivals import Pacer
from rnnstream.server.core._errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    RnnstreamError,
    Unavailable,
)
from rnnstream.server.core._forecast import first_from_last, rollout
from rnnstream.server.core._results import Ended, Flushed, Forecasted, FrameOutput, Reset
from rnnstream.server.core._run_timing import RunTimes
from rnnstream.server.core._runtime import OrtModel
from rnnstream.server.core._sessions import ControlWork, FrameWork, Session, as_index_array
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._store import StateStore, StepRecord
from rnnstream.server.core._validation import nonfinite_rows

__all__ = ["BatchStats", "ModelScheduler"]

log = logging.getLogger("rnnstream.scheduler")


@dataclass
class BatchStats:
    """Running totals, read by metrics and benchmarks."""

    batches: int = 0
    frames: int = 0
    failed_batches: int = 0
    run_seconds: float = 0.0
    # Per-frame totals: each frame counts its batch's run time and its own queue wait.
    failed_frames: int = 0
    frame_run_seconds: float = 0.0
    queue_seconds: float = 0.0
    last_batch_unix: float = 0.0  # wall-clock end of the latest successful batch
    by_size: dict[int, list[float]] = field(default_factory=dict)  # size -> [batches, seconds]


if TYPE_CHECKING:
    from rnnstream.server._metrics import Metrics


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
        max_batch_size: int,
        executor: Executor | None = None,
        metrics: Metrics | None = None,
        inline_run_seconds: float = 0.0,
        busy_poll_seconds: float = 0.0,
        gather_seconds: float = 0.0,
    ) -> None:
        self.model = model
        self.spec = model.spec
        self._output_names = tuple(t.name for t in self.spec.outputs)
        self.max_batch_size = max(1, max_batch_size)
        self.pool = StatePool(self.spec.states)
        self.stats = BatchStats()
        self._executor = executor
        # Batches expected to run faster than inline_run_seconds run on the event loop; 0 sends
        # every batch to the executor.
        self.run_times = RunTimes(inline_run_seconds)
        self.pacer = Pacer(self, busy_poll_seconds, gather_seconds)
        self._expected = self.pacer.expected
        self.queued_frames = 0
        self.submitted = 0
        self.store: StateStore | None = None  # set by the engine when state is persisted
        self._observe: tuple[Any, Any, Any] | None = None
        self._metrics = metrics
        self._frame_counters: dict[str, Any] = {}
        if metrics is not None:
            name = self.spec.name
            self._observe = (
                metrics.ort_run.labels(name),
                metrics.batch_size.labels(name),
                metrics.frame_latency.labels(name),
            )
            metrics.queue_depth.labels(name).set_function(lambda: self.queued_frames)
        # Ready sessions ordered by the arrival of their head item: the oldest frame runs first.
        self._ready: list[tuple[float, int, Session]] = []
        self._ties = itertools.count()
        self._slot_owner: dict[int, Session] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._side_tasks: set[asyncio.Task[None]] = set()  # forecasts running off the batch loop

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.spec.name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._side_tasks):
            task.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)

    def ready_count(self) -> int:
        return len(self._ready)

    def session_count(self) -> int:
        return len(self._slot_owner)

    def idle(self) -> bool:
        return not self._ready and not any(s.in_flight for s in self._slot_owner.values())

    # -- sessions --------------------------------------------------------------------------
    def attach(self, session: Session) -> None:
        session.slot = self.pool.allocate()
        self._slot_owner[session.slot] = session

    def submit(self, session: Session, work: FrameWork | ControlWork) -> None:
        self.submitted += 1
        if session.expected_since:
            self._expected.arrived(session)
        if isinstance(work, FrameWork):
            self.queued_frames += 1
            session.frames_queued += 1
        session.pending.append(work)
        session.last_active = time.monotonic()
        self._mark_ready(session)

    def read_state(self, session: Session) -> list[npt.NDArray[Any]]:
        return self.pool.read(session.slot)

    def _mark_ready(self, session: Session) -> None:
        if session.pending and not session.in_flight and not session.queued:
            self._push_ready(session, session.pending[0].enqueued_at)
            self._wake.set()

    def _push_ready(self, session: Session, arrived: float) -> None:
        session.queued = True
        heapq.heappush(self._ready, (arrived, next(self._ties), session))

    def _close(self, session: Session) -> None:
        session.closed = True
        self._expected.arrived(session)
        del self._slot_owner[session.slot]
        self.pool.release(session.slot)
        while session.pending:
            work = session.pending.popleft()
            error = NotFound(f"session {session.id!r} has ended", session_id=session.id)
            if isinstance(work, FrameWork):
                self._dequeued(session)
                self._reject(work, error)
            elif not work.future.done():
                work.future.set_exception(error)

    def _dequeued(self, session: Session) -> None:
        self.queued_frames -= 1
        session.frames_queued -= 1
        waiter = session.space_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- answers (every frame is counted once, by status, where it is answered) -------------
    def count(self, status: str, frames: int = 1) -> None:
        """Frames answered with `status` (a gRPC code name or OK): the rnnstream_frames metric."""
        if self._metrics is None:
            return
        counter = self._frame_counters.get(status)
        if counter is None:
            counter = self._frame_counters[status] = self._metrics.frames.labels(
                self.spec.name, status
            )
        counter.inc(frames)

    def _reject(self, work: FrameWork, error: RnnstreamError) -> None:
        if work.reply.done():  # cancelled by its caller (a deadline passed)
            self.count("CANCELLED")
            return
        work.reply.set_exception(error)
        self.count(error.code.name)

    def _relocate(self, old: int, new: int) -> None:
        session = self._slot_owner.pop(old)
        session.slot = new
        self._slot_owner[new] = session

    # -- the loop --------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            if not self._ready:
                if await self.pacer.poll_for_work():
                    continue
                self._wake.clear()
                self.pool.compact(self._relocate)
                await self._wake.wait()
                continue
            await self.pacer.gather_arrivals()
            sessions, frames = self._take_batch()
            self.pacer.last_batch_size = len(frames)
            if frames:
                await self._run_batch(sessions, frames)

    def _head_frame(self, session: Session) -> FrameWork | None:
        """Apply controls and answer stale or early frames at the head; return a runnable frame."""
        while session.pending:
            work = session.pending[0]
            if isinstance(work, ControlWork):
                session.pending.popleft()
                self._apply_control(session, work)
                if session.closed or session.in_flight:  # in flight: a forecast took it
                    return None
                continue
            if work.index == session.next_index and not work.reply.done():
                return work
            session.pending.popleft()
            self._dequeued(session)
            if work.reply.done():  # cancelled before it ran (deadline passed): its index stays free
                self.count("CANCELLED")
                continue
            if work.index < session.next_index:
                replayed = session.replay(work.index)
                if replayed is not None:
                    work.reply.set_result(replayed if work.emit else None)
                    self.count("OK")
                else:
                    self._reject(
                        work,
                        FailedPrecondition(
                            f"frame {work.index} was already applied and its output is no longer "
                            f"kept (the ring holds the last {session.ring_size}); next expected "
                            f"frame is {session.next_index}",
                            session_id=session.id,
                            frame_index=work.index,
                        ),
                    )
            else:
                self._reject(
                    work,
                    FailedPrecondition(
                        f"frame {work.index} is out of order: session {session.id!r} expects "
                        f"frame {session.next_index}",
                        session_id=session.id,
                        frame_index=work.index,
                    ),
                )
        return None

    def _apply_control(self, session: Session, work: ControlWork) -> None:
        if work.action in ("flush", "forecast"):
            self._apply_sequence_control(session, work)
            return
        if work.action == "reset":
            reset = Reset(session.id, session.next_index)
            if work.at_index is None or work.at_index >= session.next_index:
                undo = self._undo_point(session)
                session.last = None
                self.pool.reset(session.slot)
                if self._store_then_answer(session, work, reset, undo):
                    return
            result: Reset | Ended = reset
        else:
            self._close(session)
            last = session.last if session.emit == "last" else None
            result = Ended(session.id, work.reason, session.next_index, last)
        if not work.future.done():
            work.future.set_result(result)

    def _take_batch(self) -> tuple[list[Session], list[FrameWork]]:
        sessions: list[Session] = []
        frames: list[FrameWork] = []
        skipped: list[Session] = []
        key = None
        while self._ready and len(frames) < self.max_batch_size:
            session = heapq.heappop(self._ready)[2]
            session.queued = False
            frame = self._head_frame(session)
            if frame is None:
                continue
            if key is None:
                key = frame.key
            elif frame.key != key:
                skipped.append(session)  # a different T: it leads a later batch
                continue
            session.pending.popleft()
            self._dequeued(session)
            session.in_flight = True
            sessions.append(session)
            frames.append(frame)
        for session in skipped:
            self._push_ready(session, session.pending[0].enqueued_at)
        return sessions, frames

    def _feeds(self, frames: list[FrameWork], slots: npt.NDArray[np.intp]) -> dict[str, Any]:
        feeds: dict[str, Any] = {}
        for i, spec in enumerate(self.spec.inputs):
            feeds[spec.name] = np.stack([f.inputs[i] for f in frames], axis=spec.batch_axis)
        for state, array in zip(self.spec.states, self.pool.gather(slots), strict=True):
            feeds[state.input_name] = array
        return feeds

    def _timed_run(
        self, feeds: dict[str, Any]
    ) -> tuple[list[npt.NDArray[Any]], list[npt.NDArray[Any]], float]:
        started = time.perf_counter()
        outputs, states = self.model.run(feeds)
        return outputs, states, time.perf_counter() - started

    def calibrate(self) -> list[tuple[int, float]]:
        """Time the model at growing batch sizes before serving (RunTimes.calibrate)."""
        return self.run_times.calibrate(
            self.spec, self.max_batch_size, lambda feeds: self._timed_run(feeds)[2]
        )

    def _refuse_nonfinite(
        self, sessions: list[Session], frames: list[FrameWork], feeds: dict[str, Any]
    ) -> tuple[list[Session], list[FrameWork]]:
        """Answer frames holding a NaN or infinity (it would poison the state for good) before
        the batch runs; the others go on. Checked per batch: one vector check, not one per frame."""
        bad = nonfinite_rows(self.spec, feeds, len(frames))
        if not bad:
            return sessions, frames
        kept_sessions, kept_frames = [], []
        for row, (session, frame) in enumerate(zip(sessions, frames, strict=True)):
            if row not in bad:
                kept_sessions.append(session)
                kept_frames.append(frame)
                continue
            session.in_flight = False
            message = f"model {self.spec.name!r} input {bad[row]!r} contains NaN or infinity"
            self._reject(
                frame, InvalidArgument(message, session_id=session.id, frame_index=frame.index)
            )
            self._mark_ready(session)
        return kept_sessions, kept_frames

    async def _run_batch(self, sessions: list[Session], frames: list[FrameWork]) -> None:
        try:
            slots = as_index_array([s.slot for s in sessions])
            feeds = self._feeds(frames, slots)
            kept = self._refuse_nonfinite(sessions, frames, feeds)
            if len(kept[1]) < len(frames):
                sessions, frames = kept
                if not frames:
                    return
                slots = as_index_array([s.slot for s in sessions])
                feeds = self._feeds(frames, slots)
        except Exception as exc:
            self._batch_failed(sessions, frames, exc)
            return
        started = time.perf_counter()
        try:
            if self.run_times.runs_inline(frames[0].key, len(frames)):
                outputs, states, seconds = self._timed_run(feeds)
            else:
                loop = asyncio.get_running_loop()
                outputs, states, seconds = await loop.run_in_executor(
                    self._executor, self._timed_run, feeds
                )
        except asyncio.CancelledError:
            self._fail(sessions, frames, Internal("server stopped while the frame was running"))
            raise
        except Exception as exc:
            self._batch_failed(sessions, frames, exc)
            return
        results = self._scatter(slots, frames, outputs, states, seconds)
        if self.store is None or await self._persist_batch(
            sessions, frames, results, slots, feeds, states
        ):
            self._answer(sessions, frames, results, started, seconds)

    def _batch_failed(
        self, sessions: list[Session], frames: list[FrameWork], exc: Exception
    ) -> None:
        self.stats.failed_batches += 1
        self.stats.failed_frames += len(frames)
        log.exception("model %s failed on a batch of %d", self.spec.name, len(frames))
        self._fail(sessions, frames, Internal(f"model {self.spec.name!r} failed: {exc}"))

    def _scatter(
        self,
        slots: npt.NDArray[np.intp],
        frames: list[FrameWork],
        outputs: list[npt.NDArray[Any]],
        states: list[npt.NDArray[Any]],
        seconds: float,
    ) -> list[FrameOutput]:
        """Store the new states; each frame's outputs, copied out of the batch."""
        self.run_times.record(frames[0].key, len(frames), seconds)
        self.pool.scatter(slots, states)
        per_output = [
            np.moveaxis(out, spec.batch_axis, 0)
            for out, spec in zip(outputs, self.spec.outputs, strict=True)
        ]
        names = self._output_names
        return [
            FrameOutput(frame.index, [np.array(out[i]) for out in per_output], names)
            for i, frame in enumerate(frames)
        ]

    def _answer(
        self,
        sessions: list[Session],
        frames: list[FrameWork],
        results: list[FrameOutput],
        started: float,
        elapsed: float,
    ) -> None:
        """The batch is applied (and stored, with a store): advance and answer its sessions."""
        done_at = time.perf_counter()
        now = time.monotonic()
        cancelled = 0
        for session, frame, result in zip(sessions, frames, results, strict=True):
            session.next_index += 1
            session.remember(result)
            session.in_flight = False
            session.last_active = now
            if frame.reply.done():
                cancelled += 1  # its caller stopped waiting; the frame is applied all the same
            else:
                frame.reply.set_result(result if frame.emit else None)
            if session.pending:
                self._mark_ready(session)
            else:
                self._expected.answered(session, done_at)
        self.count("OK", len(frames) - cancelled)
        if cancelled:
            self.count("CANCELLED", cancelled)
        self.stats.batches += 1
        self.stats.frames += len(frames)
        self.stats.run_seconds += elapsed
        self.stats.frame_run_seconds += elapsed * len(frames)
        self.stats.queue_seconds += sum(started - f.enqueued_at for f in frames)
        self.stats.last_batch_unix = time.time()
        size = self.stats.by_size.setdefault(len(frames), [0, 0.0])
        size[0] += 1
        size[1] += elapsed
        if self._observe is not None:
            ort_run, batch_size, latency = self._observe
            ort_run.observe(elapsed)
            batch_size.observe(len(frames))
            for frame in frames:
                latency.observe(done_at - frame.enqueued_at)

    async def _persist_batch(
        self,
        sessions: list[Session],
        frames: list[FrameWork],
        results: list[FrameOutput],
        slots: npt.NDArray[np.intp],
        feeds: dict[str, Any],
        states: list[npt.NDArray[Any]],
    ) -> bool:
        """Store the step before any output is sent, so every output seen is backed by stored
        state. On failure the step is undone and its frames fail with UNAVAILABLE: the client
        sends them again once the store is back, and nothing is applied twice."""
        assert self.store is not None
        per_state = [
            np.moveaxis(a, st.batch_axis, 0) for a, st in zip(states, self.spec.states, strict=True)
        ]
        steps = [
            StepRecord(
                s.owner, s.id, s.model, s.emit, f.index + 1, [a[i] for a in per_state], result
            )
            for i, (s, f, result) in enumerate(zip(sessions, frames, results, strict=True))
        ]
        try:
            await self.store.save(self.spec, steps)
        except Exception as exc:
            self.pool.scatter(slots, [feeds[st.input_name] for st in self.spec.states])
            error = exc if isinstance(exc, RnnstreamError) else Unavailable(str(exc))
            log.warning("could not store a batch of %d: %s", len(frames), error)
            self._fail(sessions, frames, error)
            return False
        return True

    def _fail(
        self, sessions: list[Session], frames: list[FrameWork], error: RnnstreamError
    ) -> None:
        """A failed run leaves every state as it was: the frames may be sent again."""
        for session, frame in zip(sessions, frames, strict=True):
            session.in_flight = False
            self._reject(
                frame, type(error)(error.message, session_id=session.id, frame_index=frame.index)
            )
            self._mark_ready(session)

    # -- flush and forecast ----------------------------------------------------------------
    def _apply_sequence_control(self, session: Session, work: ControlWork) -> None:
        if work.action == "flush":
            result = Flushed(session.id, session.next_index, work.reset_after, session.last)
            if work.reset_after:
                undo = self._undo_point(session)
                self.pool.reset(session.slot)
                session.last = None
                if self._store_then_answer(session, work, result, undo):
                    return
            if not work.future.done():
                work.future.set_result(result)
            return
        # The session runs nothing else until its forecast is done, like a frame in flight.
        session.in_flight = True
        task = asyncio.get_running_loop().create_task(self._forecast(session, work))
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _forecast(self, session: Session, work: ControlWork) -> None:
        params = work.forecast
        try:
            if params is None:
                raise Internal("forecast work without its parameters")
            first = (
                params.first
                if params.first is not None
                else first_from_last(self.spec, session.last)
            )
            states = self.pool.read(session.slot)
            loop = asyncio.get_running_loop()
            rolled = await loop.run_in_executor(
                self._executor, rollout, self.model, states, first, params.steps
            )
            if params.commit:
                # Slots may have moved during the await: session.slot is read afresh.
                undo = (states, session.last)
                self.pool.write(session.slot, rolled.states)
                last = FrameOutput(session.next_index - 1, rolled.last_step, self._output_names)
                session.last = last
                await self._store_or_undo(session, undo)
            result = Forecasted(
                session.id, rolled.outputs, self._output_names, session.next_index, params.commit
            )
        except asyncio.CancelledError:
            self._fail_control(session, work, Internal("server stopped during the forecast"))
            raise
        except RnnstreamError as exc:
            self._fail_control(session, work, exc)
        except Exception as exc:
            log.exception("model %s failed on a forecast", self.spec.name)
            self._fail_control(session, work, Internal(f"model {self.spec.name!r} failed: {exc}"))
        else:
            if not work.future.done():
                work.future.set_result(result)
        finally:
            session.in_flight = False
            session.last_active = time.monotonic()
            self._mark_ready(session)

    # -- persistence of state changes outside batches (reset, flush reset, forecast commit) ----
    def _undo_point(self, session: Session) -> tuple[list[npt.NDArray[Any]], FrameOutput | None]:
        states = self.pool.read(session.slot) if self.store is not None else []
        return states, session.last

    def _store_then_answer(
        self,
        session: Session,
        work: ControlWork,
        result: Any,
        undo: tuple[list[npt.NDArray[Any]], FrameOutput | None],
    ) -> bool:
        """With a store, answer the control only once its new state is stored; True if so."""
        if self.store is None:
            return False
        session.in_flight = True  # nothing else of this session runs until the write is done

        async def store_and_answer() -> None:
            try:
                await self._store_or_undo(session, undo)
            except RnnstreamError as exc:
                self._fail_control(session, work, exc)
            else:
                if not work.future.done():
                    work.future.set_result(result)
            finally:
                session.in_flight = False
                self._mark_ready(session)

        task = asyncio.get_running_loop().create_task(store_and_answer())
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return True

    async def _store_or_undo(
        self, session: Session, undo: tuple[list[npt.NDArray[Any]], FrameOutput | None]
    ) -> None:
        if self.store is None:
            return
        states = self.pool.read(session.slot)
        step = StepRecord(
            session.owner, session.id, session.model, session.emit, session.next_index, states, None
        )
        try:
            await self.store.save(self.spec, [step])
        except Exception as exc:
            self.pool.write(session.slot, undo[0])
            session.last = undo[1]
            raise exc if isinstance(exc, RnnstreamError) else Unavailable(str(exc)) from exc

    @staticmethod
    def _fail_control(session: Session, work: ControlWork, error: RnnstreamError) -> None:
        if not work.future.done():
            work.future.set_exception(type(error)(error.message, session_id=session.id))
