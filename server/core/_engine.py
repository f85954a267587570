"""The transport-neutral data plane: models, sessions and schedulers behind one small API."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from rnnstream.server.core._forecast import FlushResult, ForecastResult, first_from_frame
from rnnstream.server.core._models import ModelConfigError, ModelSpec
from rnnstream.server.core._runtime import OrtModel, load_model
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._sessions import (
    ControlWork,
    ForecastParams,
    FrameReply,
    FrameResult,
    FrameWork,
    Session,
    SessionManager,
)
from rnnstream.server.core._store import StateStore, StepRecord
from rnnstream.server.core._validation import FrameValidator, NamedArray, validate_frame

__all__ = ["Engine", "OpenedSession", "SessionSnapshot", "discover_models"]

log = logging.getLogger("rnnstream.engine")

# Room for everything in an output message besides the tensor bytes (ids, names, shapes).
_MESSAGE_OVERHEAD = 1024


@dataclass(frozen=True)
class OpenedSession:
    session_id: str
    model: str
    next_index: int
    resumed: bool


@dataclass(frozen=True)
class SessionSnapshot:
    session_id: str
    model: str
    next_index: int
    pending_frames: int
    idle_seconds: float
    expires_in: float


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
    """Everything a transport needs; it never sees ONNX Runtime or the state pool."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.models: dict[str, OrtModel] = {}
        self.schedulers: dict[str, ModelScheduler] = {}
        self.metrics = Metrics()
        self.sessions = SessionManager(
            self.schedulers,
            max_sessions=settings.max_sessions,
            ttl=settings.session_ttl,
            ring_size=settings.output_ring,
            evict_when_full=settings.evict_idle_when_full,
            metrics=self.metrics,
        )
        # One thread per model would let models overlap; ORT releases the GIL while it runs.
        self._executor: ThreadPoolExecutor | None = None
        self.accepting_frames = True
        self.store: StateStore | None = None  # set before start() to persist session state
        self._tasks: set[asyncio.Task[None]] = set()
        self._validators: dict[str, FrameValidator] = {}
        self._expiry: asyncio.Task[None] | None = None

    async def start(self) -> None:
        folders = discover_models(self.settings.model_repository, self.settings.models)
        if not folders:
            raise ModelConfigError(f"no */model.onnx under {self.settings.model_repository}")
        for name, folder in folders.items():
            self.models[name] = load_model(
                name, folder, self.settings.device, self.settings.ort_threads
            )
        self._executor = ThreadPoolExecutor(
            max_workers=max(1, len(self.models)), thread_name_prefix="ort"
        )
        for name, model in self.models.items():
            scheduler = ModelScheduler(
                model,
                max_batch_size=self.settings.max_batch_size,
                executor=self._executor,
                metrics=self.metrics,
                inline_run_seconds=self.settings.inline_run_us * 1e-6,
                busy_poll_seconds=self.settings.busy_poll_us * 1e-6,
                gather_seconds=self.settings.gather_us * 1e-6,
            )
            scheduler.store = self.store
            self._calibrate(scheduler)
            scheduler.start()
            self.schedulers[name] = scheduler
            self._validators[name] = FrameValidator(
                model.spec,
                self.settings.max_steps_per_frame,
                functools.partial(self._check_output_size, model.spec),
            )
            self.metrics.active_sessions.labels(name).set_function(
                functools.partial(self.sessions.count, name)
            )
        self._expiry = asyncio.get_running_loop().create_task(self.sessions.run_expiry())

    @staticmethod
    def _calibrate(scheduler: ModelScheduler) -> None:
        timed = scheduler.calibrate()
        if timed:
            runs = ", ".join(f"{size}: {seconds * 1e6:.0f}" for size, seconds in timed)
            name = scheduler.spec.name
            log.info("model %s: ORT µs per single-step batch, by size: %s", name, runs)

    async def stop(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
        for scheduler in self.schedulers.values():
            await scheduler.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def drain(self, timeout: float) -> None:
        """Wait until every queued frame has been answered, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not all(s.idle() for s in self.schedulers.values()):
            await asyncio.sleep(0.01)

    # -- models --------------------------------------------------------------------------
    def model_spec(self, name: str) -> ModelSpec:
        return self.model(name).spec

    def model(self, name: str) -> OrtModel:
        return self.sessions.scheduler(name).model  # the one lookup that names the loaded models

    # -- sessions --------------------------------------------------------------------------
    def open_session(
        self,
        model: str,
        session_id: str,
        owner: str,
        emit: str = "every",
        *,
        resume_only: bool = False,
        listener: Callable[[Session, str], None] | None = None,
    ) -> OpenedSession:
        """Open or resume; `listener` hears when the server ends the session on its own."""
        session, resumed = self.sessions.open(
            model, session_id, owner, emit, resume_only=resume_only
        )
        if listener is not None:
            session.listener = listener
        return OpenedSession(session.id, session.model, session.next_index, resumed)

    async def open_or_restore(
        self,
        model: str,
        session_id: str,
        owner: str,
        emit: str = "every",
        *,
        resume_only: bool = False,
        listener: Callable[[Session, str], None] | None = None,
    ) -> OpenedSession:
        """open_session, but with a state store: a session this server does not hold is loaded
        from the store (another replica held it), and a new session is stored before it is
        announced, so a client never holds an id that no replica could resume."""
        if self.store is None or self.sessions.holds(owner, session_id):
            return self.open_session(
                model, session_id, owner, emit, resume_only=resume_only, listener=listener
            )
        record = None
        if session_id:
            specs = {name: m.spec for name, m in self.models.items()}
            record = await self.store.load(specs, owner, session_id)
        if record is not None and not self.sessions.holds(owner, session_id):
            self.sessions.restore(session_id, owner, record)
        opened = self.open_session(
            model, session_id, owner, emit, resume_only=resume_only, listener=listener
        )
        if record is None and not opened.resumed:
            session = self.sessions.get(opened.session_id, owner)
            scheduler = self.schedulers[session.model]
            step = StepRecord(
                owner, session.id, model, emit, 0, scheduler.read_state(session), None
            )
            try:
                await self.store.save(scheduler.spec, [step])
            except Exception:
                self.sessions.end(session.id, owner, "store-unavailable")
                raise
        return opened

    def submit_frame(
        self, session: Session, index: int, tensors: Sequence[NamedArray]
    ) -> asyncio.Future[FrameResult]:
        """Queue a frame on a session the caller looked up (sessions.get); the future resolves
        with its outputs once the frame is applied."""
        future: asyncio.Future[FrameResult] = asyncio.get_running_loop().create_future()
        self.queue_frame(session, index, tensors, future)
        return future

    def queue_frame(
        self, session: Session, index: int, tensors: Sequence[NamedArray], reply: FrameReply
    ) -> None:
        """Queue a frame whose answer goes to `reply` (see FrameReply); raises if it is refused."""
        # Every frame is counted once: here if refused, else by the scheduler that answers it.
        try:
            if not self.accepting_frames:
                raise Unavailable(
                    "server is shutting down; resume the session on another replica",
                    session_id=session.id,
                    frame_index=index,
                )
            if index < 0:
                raise InvalidArgument(f"frame index {index} is negative", session_id=session.id)
            try:
                arrays, key = self._validators[session.model].validate(tensors)
            except InvalidArgument as exc:
                exc.session_id, exc.frame_index = session.id, index
                raise
        except RnnstreamError as exc:
            self.count_frame(session.model, exc.code.name)
            raise
        self.schedulers[session.model].submit(session, FrameWork(index, arrays, key, reply))

    def count_frame(self, model: str, status: str) -> None:
        """One frame answered with `status` (a gRPC code name or OK), for the metrics."""
        self.schedulers[model].count(status)

    def _check_output_size(self, spec: ModelSpec, shapes: tuple[tuple[int, ...], ...]) -> None:
        # Refused before it runs: once applied, an output too big to send would be lost.
        size = output_bytes(spec, shapes)
        limit = self.settings.max_message_bytes
        if size is not None and size + _MESSAGE_OVERHEAD > limit:
            raise InvalidArgument(
                f"the frame's outputs would take {size} bytes, over the server's message limit "
                f"of {limit} bytes (--max-message-bytes); send fewer time steps per frame"
            )

    async def wait_for_space(self, session_id: str, owner: str) -> None:
        """Return once the session has room for another queued frame (back-pressure)."""
        limit = self.settings.max_pending_frames
        while True:
            try:
                session = self.sessions.get(session_id, owner)
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

    def reset(
        self, session_id: str, owner: str, at_index: int | None = None
    ) -> asyncio.Future[int]:
        """Queue a reset. With `at_index` it applies only while that is the next frame index,
        so a reset resent after a reconnect is not applied twice."""
        session = self.sessions.get(session_id, owner)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.schedulers[session.model].submit(
            session, ControlWork("reset", future, at_index=at_index)
        )
        return future

    def end(self, session_id: str, owner: str) -> asyncio.Future[int]:
        future = self.sessions.end(session_id, owner)
        if self.store is not None:
            store = self.store

            async def forget(_: object) -> None:
                try:
                    await store.delete(owner, session_id)
                except Exception as exc:  # its keys still expire with the idle TTL
                    log.warning("could not delete stored session %s: %s", session_id, exc)

            future.add_done_callback(lambda f: self._background(forget(f)))
        return future

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def snapshot(self, session_id: str, owner: str) -> SessionSnapshot:
        session = self.sessions.get(session_id, owner)
        idle = time.monotonic() - session.last_active
        ttl = self.sessions.ttl
        return SessionSnapshot(
            session.id,
            session.model,
            session.next_index,
            session.pending_frames(),
            idle,
            max(0.0, ttl - idle) if ttl > 0 else 0.0,
        )

    async def infer(
        self,
        model: str,
        session_id: str,
        index: int | None,
        tensors: Sequence[NamedArray],
        owner: str,
    ) -> tuple[str, FrameResult]:
        """One call, one frame: stateless when `session_id` is empty."""
        if session_id:
            session = self.sessions.get(session_id, owner)
            if session.model != model and model:
                raise InvalidArgument(
                    f"session {session_id!r} runs model {session.model!r}, not {model!r}",
                    session_id=session_id,
                )
            expected = session.next_index + session.pending_frames()
            return session.id, await self.submit_frame(
                session, expected if index is None else index, tensors
            )
        scheduler = self.sessions.scheduler(model)
        scratch = Session("", model, owner, ring_size=0)
        scheduler.attach(scratch)
        try:
            return "", await self.submit_frame(scratch, 0, tensors)
        finally:
            done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            scheduler.submit(scratch, ControlWork("end", done, "stateless"))

    # -- sequence patterns -------------------------------------------------------------------
    def flush(
        self, session_id: str, owner: str, reset: bool = False
    ) -> asyncio.Future[FlushResult]:
        """Resolves, after every frame queued before it, with the session's last output."""
        session = self.sessions.get(session_id, owner)
        future: asyncio.Future[FlushResult] = asyncio.get_running_loop().create_future()
        work = ControlWork("flush", future, reset_after=reset)
        self.schedulers[session.model].submit(session, work)
        return future

    def forecast(
        self,
        session_id: str,
        steps: int,
        commit: bool,
        tensors: Sequence[NamedArray],
        owner: str,
    ) -> asyncio.Future[ForecastResult]:
        """Roll the session `steps` steps forward, in order with its frames; see ForecastRequest."""
        session = self.sessions.get(session_id, owner)
        spec = self.schedulers[session.model].spec
        if not spec.feedback:
            raise FailedPrecondition(spec.feedback_problem, session_id=session.id)
        limit = self.settings.max_steps_per_frame
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
        future: asyncio.Future[ForecastResult] = asyncio.get_running_loop().create_future()
        work = ControlWork("forecast", future, forecast=ForecastParams(steps, commit, first))
        self.schedulers[session.model].submit(session, work)
        return future
