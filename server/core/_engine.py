"""The Engine: the one way into the core, calls that name sessions and answer typed results."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Literal

from rnnstream.server.core._admission import SHUTTING_DOWN, FrameDoor
from rnnstream.server.core._budget import Holding, MemoryBudget
from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import RnnstreamError
from rnnstream.server.core._forecast import forecast_params
from rnnstream.server.core._groups import FrameGroups
from rnnstream.server.core._idle import IdleSweep
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._listing import SessionViews
from rnnstream.server.core._model_loader import ModelLoader
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._principals import PrincipalLimits
from rnnstream.server.core._reach import SessionReach, forward, runs_on
from rnnstream.server.core._registry import SessionManager
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
    SessionPage,
    VersionState,
)
from rnnstream.server.core._session import Session
from rnnstream.server.core._spill import Spiller, SpillingStore, SpillPolicy
from rnnstream.server.core._store import StateStore
from rnnstream.server.core._stored_sessions import StoredSessions
from rnnstream.server.core._validation import NamedArray
from rnnstream.server.core._work import ControlWork, EndListener, FrameAnswer, FrameReply

__all__ = ["Engine", "NamedArray"]

Action = Literal["reset", "flush"]
Items = Sequence[Sequence[NamedArray]]  # the frames of a stateless batch
Hold = Holding | None  # a stream's share of the memory budget; None: a unary call


class Engine:
    """The one way into the core. Every call names its session by (principal, session_id), so a
    principal never reaches another's sessions, and answers with a typed result (_results.py) or
    raises an RnnstreamError; transports see neither ONNX Runtime nor sessions nor the pool."""

    def __init__(self, settings: EngineSettings, metrics: CoreMetrics | None = None) -> None:
        self._settings = settings
        self._models = ModelRegistry(
            settings,
            metrics,
            end_sessions=lambda key, why: self._sessions.end_instance(key, why),
            session_count=lambda name: self._sessions.count(name),
        )
        self._loader = ModelLoader(self._models, settings, metrics)
        self._sessions = SessionManager.from_settings(self._models, settings, metrics)
        self._idle = IdleSweep(self._sessions, metrics)
        self._views = SessionViews(self._sessions, self._models, settings.spill_after)
        self._reach = SessionReach(self._sessions)  # in memory, or back from the store
        # What each principal may send (pace a stream, admit a unary call): one bucket each.
        self.limits = PrincipalLimits.from_settings(settings, metrics)
        # The bytes held for clients: frames, answers not yet taken, unary work, output rings.
        self.budget = MemoryBudget.from_settings(settings, metrics)
        self._sessions.rings = self.budget.rings
        self._door = FrameDoor(self._models, self.budget, settings.max_message_bytes)
        limit = settings.max_pending_frames
        self.groups = FrameGroups(self._sessions, self._models, limit, lambda: self._door.accepting)
        self._store: StateStore | None = None  # closed by stop(), even after a failed start
        self._stored: StoredSessions | None = None
        self._spiller: Spiller | None = None
        self._tasks: list[asyncio.Task[None]] = []  # expiry, and the repository poll

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self, store: StateStore | None = None) -> None:
        """Load the models and start serving; with `store`, session state is persisted there
        (the engine closes it on stop), and idle sessions spill to it (EngineSettings)."""
        policy = SpillPolicy(self._settings.spill_after, self._settings.store_ttl)
        if store is not None and policy.after > 0:
            store = SpillingStore(store, policy, self._settings.session_ttl)
        self._store = self._models.store = self._views.store = store
        await self._loader.start()
        if store is not None:
            self._stored = StoredSessions(store, self._sessions, self._models)
            if policy.after > 0:
                self._spiller = Spiller(self._sessions, self._models, store, policy)
                self._reach.spill_to(self._stored, self._spiller)
                self.groups.reach = self._reach
                self._idle.spill_to(self._spiller, store)
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._idle.run()))
        if self._settings.model_control_mode == "poll":
            self._tasks.append(loop.create_task(self._loader.poll()))

    def stop_accepting(self) -> None:
        """Shutting down: refuse new sessions and frames; what is queued is still answered."""
        self._sessions.accepting = False
        self._door.accepting = False

    @property
    def ready(self) -> bool:
        """Sessions accepted, and models loaded (explicit control: ready with none loaded)."""
        return self._models.ready() and self._sessions.accepting

    async def drain(self, timeout: float, finish: float | None = None) -> None:
        """Wait until every queued frame is answered, or `timeout` passes. Shutting down (with
        `finish`): then start nothing more, give what runs `finish` seconds, abandon what still
        runs and refuse everything left (UNAVAILABLE, nothing of it applied), in order: every
        frame received is answered, whatever the grace."""
        await self._models.drain(timeout, finish, SHUTTING_DOWN)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reach.stop()
        await self._models.stop()
        if self._stored is not None:
            await self._stored.drain()
        if self._store is not None:
            await self._store.close()
            self._store = None

    # -- models ----------------------------------------------------------------------------
    def model_names(self) -> list[str]:
        """Models with a version that takes new sessions."""
        return self._models.names()

    def model(self, name: str, version: int | None = None) -> ModelInfo:
        """The newest ready version of the model, or `version` (retired ones too)."""
        return self._models.info(name, version)

    def model_stats(self, name: str, version: int | None = None) -> ModelStats:
        return self._models.scheduler_for(name, version).counters.snapshot()

    def repository_index(self, ready_only: bool = False) -> list[VersionState]:
        """Every model version in the repository (read again now, unless only the ready ones,
        which are the loaded ones, are asked for), with its state."""
        if not ready_only:
            self._loader.refresh()
        return self._models.index(ready_only)

    async def load_model(self, name: str) -> list[VersionState]:
        """Load or reload a model (explicit control mode); its live sessions stay on theirs."""
        return await self._loader.load(name, requested=True)

    async def unload_model(self, name: str) -> list[VersionState]:
        """Retire every version of a model (explicit control mode); live sessions drain."""
        return await self._loader.unload(name, requested=True)

    async def rescan(self) -> None:
        """Follow the repository now (SIGHUP): new, changed and removed models."""
        await self._loader.rescan()

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
        version: int | None = None,
    ) -> Opened:
        """Open a session, or resume the one `session_id` names. `on_end` hears when the server
        ends it on its own (expired, evicted). With a state store, a session this server does
        not hold is loaded from the store (another replica held it), and a new one is stored
        before it is announced, so a client never holds an id that no replica could resume."""
        stored = self._stored
        if stored is None or self._sessions.holds(principal, session_id):
            return self._open(principal, session_id, model, emit, resume_only, on_end, version)
        found = await stored.load(principal, session_id, resume_only)
        opened = self._open(principal, session_id, model, emit, resume_only, on_end, version)
        if not found and not opened.resumed:
            await stored.save_new(principal, opened.session_id)
        return opened

    def _open(
        self, principal: str, session_id: str, model: str, emit: Emit, resume_only: bool,
        on_end: EndListener | None, version: int | None,
    ) -> Opened:  # fmt: skip
        session, resumed = self._sessions.open(
            model, session_id, principal, emit, resume_only=resume_only, version=version
        )
        if on_end is not None:
            session.listen(on_end)
        return Opened(session.id, session.model, session.next_index, resumed, session.version)

    def detach(self, principal: str, session_id: str, on_end: EndListener) -> None:
        """Stop telling `on_end` about the session (its stream is gone)."""
        if (session := self._sessions.find(session_id, principal)) is not None:
            session.unlisten(on_end)
        elif self._spiller is not None:
            self._spiller.detach(principal, session_id, on_end)

    def session(self, principal: str, session_id: str) -> SessionInfo:  # in memory only
        return self._views.info(self._sessions.get(session_id, principal))

    async def describe(self, principal: str, session_id: str) -> SessionInfo:  # or spilled
        return await self._views.describe(principal, session_id)

    async def list_sessions(self, principal: str | None, **filters: Any) -> SessionPage:
        """Sessions of `principal` (None: all), filtered (SessionViews.page), a page at a time."""
        return await self._views.page(principal, **filters)

    # -- frames ----------------------------------------------------------------------------
    def submit(
        self,
        principal: str,
        session_id: str,
        index: int | None,
        tensors: Sequence[NamedArray],
        reply: FrameReply,
        holding: Hold = None,
    ) -> bool:
        """Queue a frame whose answer goes to `reply` (see FrameReply): its outputs, or None
        for a session that emits only on flush and end; raises if it is refused. `index` None:
        numbered at the head of the queue (no caller shares one; a refusal leaves no gap). True
        when the session's queue is now full: call wait_for_space before the next frame. A
        spilled session's frame waits until it is back (refusals then go to `reply`). A stream's
        `holding` counts the frame's bytes (MemoryBudget)."""
        full = False

        def use(session: Session, restored: bool) -> None:
            nonlocal full
            emit = session.emit != "last"
            self._door.queue(session, index, tensors, forward(reply, restored), emit, holding)
            full = session.frames_queued >= self._settings.max_pending_frames

        self._reach.reach(principal, session_id, use, reply.set_exception)
        return full

    def infer(
        self,
        principal: str,
        session_id: str,
        model: str,
        index: int | None,
        tensors: Sequence[NamedArray],
        version: int | None = None,
        holding: Hold = None,
    ) -> asyncio.Future[FrameOutput]:
        """One frame whose outputs are always answered: on the session `session_id` names
        (`model` and `version`, when given, must be its own), or, with no session, on a fresh
        state that is dropped after it (stateless), on the newest ready version or `version`.
        Without a `holding` (a stream's), a frame over the memory budget is refused."""
        if session_id:

            def start(session: Session) -> asyncio.Future[FrameOutput]:
                runs_on(session, model, version)
                answer: asyncio.Future[FrameOutput] = asyncio.get_running_loop().create_future()
                self._door.queue(session, index, tensors, FrameAnswer(answer), True, holding)
                return answer

            return self._reach.future(principal, session_id, start)
        future: asyncio.Future[FrameOutput] = asyncio.get_running_loop().create_future()
        scratch, drop = self._sessions.scratch(principal, model, version)
        try:
            self._door.queue(scratch, 0, tensors, FrameAnswer(future), True, holding)
        except BaseException:
            drop()
            raise
        future.add_done_callback(drop)
        return future

    def infer_batch(
        self, principal: str, model: str, items: Items, version: int | None, holding: Hold
    ) -> list[asyncio.Future[FrameOutput]]:
        """Stateless frames of one request, checked whole (size, answer, budget) before any runs."""
        copy = self._models.pick(model, version)
        self._door.check_batch(copy, items, principal, holding is None)
        return [self.infer(principal, "", model, None, i, copy.version, holding) for i in items]

    def refuse(self, principal: str, session_id: str, error: RnnstreamError) -> None:
        """Count a frame the transport refused before it could submit it (undecodable)."""
        if (session := self._sessions.find(session_id, principal)) is not None:
            self._models.scheduler_of(session).count(error.code.name)  # not when spilled

    async def wait_for_space(self, principal: str, session_id: str) -> None:
        """Return once the session has room for another queued frame (back-pressure)."""
        if (session := self._sessions.find(session_id, principal)) is not None:  # else gone
            await session.wait_for_space(self._settings.max_pending_frames)

    # -- controls, in order with the session's frames ----------------------------------------
    def reset(
        self, principal: str, session_id: str, at_index: int | None = None
    ) -> asyncio.Future[Reset]:
        """Back to the initial state. With `at_index` it applies only while that is the next
        frame index, so a reset resent after a reconnect is not applied twice."""
        return self._control(principal, session_id, "reset", at_index=at_index)

    def end(self, principal: str, session_id: str, operator: str = "") -> asyncio.Future[Ended]:
        """Remove the session now; its queued frames still run, then it ends. An emit-last
        session's end carries its last output. `operator`: the admin principal ending another
        principal's session (its stream hears reason "operator")."""
        future = self._reach.future(
            principal, session_id, lambda s: self._sessions.end(s.id, s.owner, operator=operator)
        )
        if self._stored is not None:
            self._stored.forget_once_ended(principal, session_id, future)
        return future

    def flush(
        self, principal: str, session_id: str, reset: bool = False
    ) -> asyncio.Future[Flushed]:
        """Resolves, after every frame queued before it, with the session's last output."""
        return self._control(principal, session_id, "flush", reset_after=reset)

    def _control(
        self, principal: str, session_id: str, action: Action, **fields: Any
    ) -> asyncio.Future[Any]:
        def start(session: Session) -> asyncio.Future[Any]:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._models.scheduler_of(session).submit(
                session, ControlWork(action, future, **fields)
            )
            return future

        return self._reach.future(principal, session_id, start)

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

        def start(session: Session) -> asyncio.Future[Forecasted]:
            scheduler = self._models.scheduler_of(session)
            limits = (self._settings.max_forecast_steps, self._settings.max_message_bytes)
            params = forecast_params(scheduler.spec, session.id, steps, commit, tensors, *limits)
            future: asyncio.Future[Forecasted] = asyncio.get_running_loop().create_future()
            scheduler.submit(session, ControlWork("forecast", future, forecast=params))
            return future

        return self._reach.future(principal, session_id, start)
