"""The transport-neutral data plane: models, sessions and schedulers behind one small API."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from rnnstream.server._metrics import Metrics
from rnnstream.server._settings import Settings
from rnnstream.server.core._errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    RnnstreamError,
    Unavailable,
)
from rnnstream.server.core._forecast import first_from_frame
from rnnstream.server.core._models import ModelConfigError, ModelSpec
from rnnstream.server.core._results import (
    Emit,
    Ended,
    Flushed,
    Forecasted,
    FrameOutput,
    ModelInfo,
    ModelStats,
    Opened,
    Reset,
    SessionInfo,
)
from rnnstream.server.core._runtime import OrtModel, load_model
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._sessions import (
    ControlWork,
    EndListener,
    ForecastParams,
    FrameReply,
    FrameWork,
    Session,
    SessionManager,
)
from rnnstream.server.core._store import StateStore, StepRecord
from rnnstream.server.core._validation import FrameValidator, NamedArray, validate_frame

__all__ = ["Engine", "NamedArray", "discover_models"]

log = logging.getLogger("rnnstream.engine")

# Room for everything in an output message besides the tensor bytes (ids, names, shapes).
_MESSAGE_OVERHEAD = 1024


def output_bytes(spec: ModelSpec, shapes: Sequence[tuple[int, ...]]) -> int | None:
    """Bytes of one frame's outputs, given its input shapes, when they fix them; else None."""
    steps = next(
        (
            shape[t.frame_time_axis]
            for t, shape in zip(spec.inputs, shapes, strict=True)
            if t.frame_time_axis is not None
        ),
        None,
    )
    total = 0
    for out in spec.outputs:
        dims = [steps if i == out.frame_time_axis else d for i, d in enumerate(out.frame_shape)]
        known = [d for d in dims if d is not None]
        if len(known) != len(dims):
            return None
        total += math.prod(known) * out.dtype.itemsize
    return total


def discover_models(repository: Path, only: Sequence[str] = ()) -> dict[str, Path]:
    """Model name -> folder, for every folder of the repository holding a model.onnx."""
    if not repository.is_dir():
        raise ModelConfigError(f"model repository {repository} is not a folder")
    found = {p.parent.name: p.parent for p in sorted(repository.glob("*/model.onnx"))}
    missing = [name for name in only if name not in found]
    if missing:
        raise ModelConfigError(f"models {missing} not found in {repository}; found {sorted(found)}")
    return {name: found[name] for name in (only or found)}


class Engine:
    """The one way into the core. Every call names its session by (principal, session_id), so a
    principal never reaches another's sessions, and answers with a typed result (_results.py) or
    raises an RnnstreamError; transports see neither ONNX Runtime nor sessions nor the pool."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._models: dict[str, OrtModel] = {}
        self._schedulers: dict[str, ModelScheduler] = {}
        self._sessions = SessionManager(
            self._schedulers,
            max_sessions=settings.max_sessions,
            ttl=settings.session_ttl,
            ring_size=settings.output_ring,
            evict_when_full=settings.evict_idle_when_full,
            metrics=metrics,
        )
        # One thread per model would let models overlap; ORT releases the GIL while it runs.
        self._executor: ThreadPoolExecutor | None = None
        self._accepting_frames = True
        self._store: StateStore | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._validators: dict[str, FrameValidator] = {}
        self._expiry: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, store: StateStore | None = None) -> None:
        """Load the models and start serving; with `store`, session state is persisted there
        (the engine closes it on stop)."""
        self._store = store
        settings = self._settings
        folders = discover_models(settings.model_repository, settings.models)
        if not folders:
            raise ModelConfigError(f"no */model.onnx under {settings.model_repository}")
        for name, folder in folders.items():
            self._models[name] = load_model(name, folder, settings.device, settings.ort_threads)
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, len(self._models)), thread_name_prefix="ort"
        )
        for name, model in self._models.items():
            scheduler = ModelScheduler(
                model,
                max_batch_size=settings.max_batch_size,
                executor=self._executor,
                metrics=self._metrics,
                inline_run_seconds=settings.inline_run_us * 1e-6,
                busy_poll_seconds=settings.busy_poll_us * 1e-6,
                gather_seconds=settings.gather_us * 1e-6,
            )
            scheduler.store = store
            self._calibrate(scheduler)
            scheduler.start()
            self._schedulers[name] = scheduler
            self._validators[name] = FrameValidator(
                model.spec,
                settings.max_steps_per_frame,
                functools.partial(self._check_output_size, model.spec),
            )
            if self._metrics is not None:
                self._metrics.active_sessions.labels(name).set_function(
                    functools.partial(self._sessions.count, name)
                )
        self._expiry = asyncio.get_running_loop().create_task(self._sessions.run_expiry())

    @staticmethod
    def _calibrate(scheduler: ModelScheduler) -> None:
        timed = scheduler.calibrate()
        if timed:
            runs = ", ".join(f"{size}: {seconds * 1e6:.0f}" for size, seconds in timed)
            name = scheduler.spec.name
            log.info("model %s: ORT µs per single-step batch, by size: %s", name, runs)

    def stop_accepting(self) -> None:
        """Shutting down: refuse new sessions and frames; what is queued is still answered."""
        self._sessions.accepting = False
        self._accepting_frames = False

    @property
    def ready(self) -> bool:
        """Models loaded and sessions accepted."""
        return bool(self._schedulers) and self._sessions.accepting

    async def drain(self, timeout: float) -> None:
        """Wait until every queued frame has been answered, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(s.idle() for s in self._schedulers.values()):
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        for scheduler in self._schedulers.values():
            await scheduler.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        if self._store is not None:
            await self._store.close()

    # -- models ----------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return sorted(self._models)

    def model(self, name: str) -> ModelInfo:
        model = self._sessions.scheduler(name).model  # the one lookup that names the loaded ones
        return ModelInfo(model.spec, model.provider, self._settings.max_batch_size)

    def model_stats(self, name: str) -> ModelStats:
        stats = self._sessions.scheduler(name).stats
        return ModelStats(
            batches=stats.batches,
            frames=stats.frames,
            failed_frames=stats.failed_frames,
            frame_run_seconds=stats.frame_run_seconds,
            queue_seconds=stats.queue_seconds,
            last_batch_unix=stats.last_batch_unix,
            by_size={size: (int(n), seconds) for size, (n, seconds) in stats.by_size.items()},
        )

    # -- sessions --------------------------------------------------------------------------
    async def open(
        self,
        principal: str,
        session_id: str,
        model: str,
        emit: Emit = "every",
        *,
        resume_only: bool = False,
        on_end: EndListener | None = None,
    ) -> Opened:
        """Open a session, or resume the one `session_id` names. `on_end` hears when the server
        ends it on its own (expired, evicted). With a state store, a session this server does
        not hold is loaded from the store (another replica held it), and a new one is stored
        before it is announced, so a client never holds an id that no replica could resume."""
        if self._store is None or self._sessions.holds(principal, session_id):
            return self._open(principal, session_id, model, emit, resume_only, on_end)
        record = None
        if session_id:
            specs = {name: m.spec for name, m in self._models.items()}
            record = await self._store.load(specs, principal, session_id)
        if record is not None and not self._sessions.holds(principal, session_id):
            self._sessions.restore(session_id, principal, record)
        opened = self._open(principal, session_id, model, emit, resume_only, on_end)
        if record is None and not opened.resumed:
            session = self._sessions.get(opened.session_id, principal)
            scheduler = self._schedulers[session.model]
            step = StepRecord(
                principal, session.id, model, emit, 0, scheduler.read_state(session), None
            )
            try:
                await self._store.save(scheduler.spec, [step])
            except Exception:
                self._sessions.end(session.id, principal, "store-unavailable")
                raise
        return opened

    def _open(
        self,
        principal: str,
        session_id: str,
        model: str,
        emit: Emit,
        resume_only: bool,
        on_end: EndListener | None,
    ) -> Opened:
        session, resumed = self._sessions.open(
            model, session_id, principal, emit, resume_only=resume_only
        )
        if on_end is not None:
            session.listener = on_end
        return Opened(session.id, session.model, session.next_index, resumed)

    def detach(self, principal: str, session_id: str, on_end: EndListener) -> None:
        """Stop telling `on_end` about the session (its stream is gone); NotFound if it is."""
        session = self._sessions.get(session_id, principal)
        if session.listener == on_end:
            session.listener = None

    def session(self, principal: str, session_id: str) -> SessionInfo:
        session = self._sessions.get(session_id, principal)
        idle = time.monotonic() - session.last_active
        ttl = self._sessions.ttl
        return SessionInfo(
            session.id,
            session.model,
            session.next_index,
            session.pending_frames(),
            idle,
            max(0.0, ttl - idle) if ttl > 0 else 0.0,
        )

    # -- frames ----------------------------------------------------------------------------
    def submit(
        self,
        principal: str,
        session_id: str,
        index: int | None,
        tensors: Sequence[NamedArray],
        reply: FrameReply,
    ) -> bool:
        """Queue a frame whose answer goes to `reply` (see FrameReply): its outputs, or None
        for a session that emits only on flush and end. `index` None takes the next free one.
        Raises if the frame is refused. True when the session's queue is now full: call
        wait_for_space before the next frame."""
        session = self._sessions.get(session_id, principal)
        self._queue(session, index, tensors, reply, session.emit != "last")
        return session.frames_queued >= self._settings.max_pending_frames

    def infer(
        self,
        principal: str,
        session_id: str,
        model: str,
        index: int | None,
        tensors: Sequence[NamedArray],
    ) -> asyncio.Future[FrameOutput]:
        """One frame whose outputs are always answered: on the session `session_id` names
        (`model`, when given, must be its model), or, with no session, on a fresh state that is
        dropped after it (stateless)."""
        future: asyncio.Future[FrameOutput] = asyncio.get_running_loop().create_future()
        if session_id:
            session = self._sessions.get(session_id, principal)
            if model and session.model != model:
                raise InvalidArgument(
                    f"session {session_id!r} runs model {session.model!r}, not {model!r}",
                    session_id=session_id,
                )
            self._queue(session, index, tensors, _Answer(future), True)
            return future
        scheduler = self._sessions.scheduler(model)
        scratch = Session("", model, principal, ring_size=0)
        scheduler.attach(scratch)

        def drop(_: object = None) -> None:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            scheduler.submit(scratch, ControlWork("end", done, "stateless"))

        try:
            self._queue(scratch, 0, tensors, _Answer(future), True)
        except BaseException:
            drop()
            raise
        future.add_done_callback(drop)
        return future

    def refuse(self, principal: str, session_id: str, error: RnnstreamError) -> None:
        """Count a frame the transport refused before it could submit it (undecodable)."""
        session = self._sessions.get(session_id, principal)
        self._schedulers[session.model].count(error.code.name)

    def _queue(
        self,
        session: Session,
        index: int | None,
        tensors: Sequence[NamedArray],
        reply: FrameReply,
        emit: bool,
    ) -> None:
        # Every frame is counted once: here if refused, else by the scheduler that answers it.
        try:
            if not self._accepting_frames:
                raise Unavailable(
                    "server is shutting down; resume the session on another replica",
                    session_id=session.id,
                    frame_index=index,
                )
            if index is None:
                index = (
                    session.next_index + session.pending_frames() + (1 if session.in_flight else 0)
                )
            elif index < 0:
                raise InvalidArgument(f"frame index {index} is negative", session_id=session.id)
            try:
                arrays, key = self._validators[session.model].validate(tensors)
            except InvalidArgument as exc:
                exc.session_id, exc.frame_index = session.id, index
                raise
        except RnnstreamError as exc:
            self._schedulers[session.model].count(exc.code.name)
            raise
        self._schedulers[session.model].submit(session, FrameWork(index, arrays, key, reply, emit))

    def _check_output_size(self, spec: ModelSpec, shapes: tuple[tuple[int, ...], ...]) -> None:
        # Refused before it runs: once applied, an output too big to send would be lost.
        size = output_bytes(spec, shapes)
        limit = self._settings.max_message_bytes
        if size is not None and size + _MESSAGE_OVERHEAD > limit:
            raise InvalidArgument(
                f"the frame's outputs would take {size} bytes, over the server's message limit "
                f"of {limit} bytes (--max-message-bytes); send fewer time steps per frame"
            )

    async def wait_for_space(self, principal: str, session_id: str) -> None:
        """Return once the session has room for another queued frame (back-pressure)."""
        limit = self._settings.max_pending_frames
        while True:
            try:
                session = self._sessions.get(session_id, principal)
            except NotFound:
                return
            if session.frames_queued < limit or session.closed:
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            session.space_waiter = waiter
            try:
                await waiter
            finally:
                session.space_waiter = None

    # -- controls, in order with the session's frames ----------------------------------------
    def reset(
        self, principal: str, session_id: str, at_index: int | None = None
    ) -> asyncio.Future[Reset]:
        """Back to the initial state. With `at_index` it applies only while that is the next
        frame index, so a reset resent after a reconnect is not applied twice."""
        session = self._sessions.get(session_id, principal)
        future: asyncio.Future[Reset] = asyncio.get_running_loop().create_future()
        self._schedulers[session.model].submit(
            session, ControlWork("reset", future, at_index=at_index)
        )
        return future

    def end(self, principal: str, session_id: str) -> asyncio.Future[Ended]:
        """Remove the session now; its queued frames still run, then it ends. An emit-last
        session's end carries its last output."""
        future = self._sessions.end(session_id, principal)
        if self._store is not None:
            store = self._store

            async def forget(_: object) -> None:
                try:
                    await store.delete(principal, session_id)
                except Exception as exc:  # its keys still expire with the idle TTL
                    log.warning("could not delete stored session %s: %s", session_id, exc)

            future.add_done_callback(lambda f: self._background(forget(f)))
        return future

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def flush(
        self, principal: str, session_id: str, reset: bool = False
    ) -> asyncio.Future[Flushed]:
        """Resolves, after every frame queued before it, with the session's last output."""
        session = self._sessions.get(session_id, principal)
        future: asyncio.Future[Flushed] = asyncio.get_running_loop().create_future()
        work = ControlWork("flush", future, reset_after=reset)
        self._schedulers[session.model].submit(session, work)
        return future

    def forecast(
        self,
        principal: str,
        session_id: str,
        steps: int,
        commit: bool,
        tensors: Sequence[NamedArray],
    ) -> asyncio.Future[Forecasted]:
        """Roll the session `steps` steps forward, feeding outputs back as inputs, in order with
        its frames; `tensors` are step 1's inputs (none: the last output feeds step 1)."""
        session = self._sessions.get(session_id, principal)
        spec = self._schedulers[session.model].spec
        if not spec.feedback:
            raise FailedPrecondition(spec.feedback_problem, session_id=session.id)
        limit = self._settings.max_steps_per_frame
        if not 1 <= steps <= limit:
            raise InvalidArgument(
                f"forecast steps must be between 1 and {limit} (--max-steps-per-frame), "
                f"got {steps}",
                session_id=session.id,
            )
        first = None
        if tensors:
            try:
                first = first_from_frame(spec, validate_frame(spec, tensors, limit))
            except InvalidArgument as exc:
                exc.session_id = session.id
                raise
        future: asyncio.Future[Forecasted] = asyncio.get_running_loop().create_future()
        work = ControlWork("forecast", future, forecast=ForecastParams(steps, commit, first))
        self._schedulers[session.model].submit(session, work)
        return future


class _Answer:
    """A future as a FrameReply for frames whose outputs are always answered."""

    __slots__ = ("_future",)

    def __init__(self, future: asyncio.Future[FrameOutput]) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def set_result(self, result: FrameOutput | None, /) -> None:
        assert result is not None  # queued with emit=True
        self._future.set_result(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self._future.set_exception(exception)
