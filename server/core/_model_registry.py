"""The model registry: which versions of which models are loaded, which take new sessions, and
how the others drain. A session stays on the copy of the version it opened on until it ends;
a retired copy is freed when its last session ends, or ends them after the drain timeout."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import (
    FailedPrecondition,
    NotFound,
    Unavailable,
    quoted,
)
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._loading import Served
from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._repository import (
    ModelSource,
)
from rnnstream.server.core._results import ModelInfo, VersionState
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._serving import ServingConfig
from rnnstream.server.core._session import Session
from rnnstream.server.core._store import StateStore

__all__ = ["LOADING", "READY", "UNAVAILABLE", "UNLOADING", "ModelRegistry"]

log = logging.getLogger("rnnstream.models")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
EndSessions = Callable[[int, str], None]  # (copy key, why): end every session on that copy


async def _until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not done():
        await asyncio.sleep(0.01)


class ModelRegistry:
    def __init__(
        self,
        settings: EngineSettings,
        metrics: CoreMetrics | None,
        end_sessions: EndSessions,
        session_count: Callable[[str], int],
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._end_sessions = end_sessions
        self._session_count = session_count
        self.defaults = ServingConfig(
            settings.max_batch_size,
            settings.ort_threads,
            1,
            "all",
            settings.device,
            (),
            settings.session_ttl,
        )
        self.store: StateStore | None = None  # given to every scheduler made from now on
        self.sources: dict[str, ModelSource] = {}  # as last scanned
        self._served: dict[int, Served] = {}  # every loaded copy, retired ones too
        self._current: dict[str, dict[int, Served]] = {}  # the copies taking new sessions
        self._status: dict[str, dict[int, tuple[str, str]]] = {}  # versions without a copy
        self.wanted: set[str] = set()  # the models this server means to serve (loader's)
        self._tasks: set[asyncio.Task[None]] = set()
        self._watched: set[str] = set()

    # -- lookups (every one synchronous: a session is placed in the same turn it is picked) --
    def served(self, key: int) -> Served:
        return self._served[key]

    def scheduler_of(self, session: Session) -> ModelScheduler:
        return self._served[session.instance].scheduler

    def all_served(self) -> list[Served]:
        return list(self._served.values())

    def idle(self) -> bool:
        return all(s.scheduler.idle() for s in self._served.values())

    def ready(self) -> bool:
        """Models serve (in explicit control mode, none need to)."""
        return bool(self.names()) or self._settings.model_control_mode == "explicit"

    def names(self) -> list[str]:
        """Models with a version that takes new sessions."""
        return sorted(name for name, copies in self._current.items() if copies)

    def check_known(self, name: str) -> None:
        """NotFound, naming the loaded models, for a name that is no model here."""
        if name not in self.sources and not self._current.get(name):
            raise NotFound(f"unknown model {quoted(name)}; loaded models: {self.names()}")

    def pick(self, name: str, version: int | None = None) -> Served:
        """The copy a new session (or a stateless frame) runs on: the newest ready version, or
        the one asked for."""
        copies = self._current.get(name)
        if not copies:
            self.check_known(name)
            states = [s for s in self.versions(name) if s.reason]
            why = "; ".join(f"version {s.version}: {s.state}, {s.reason}" for s in states)
            raise Unavailable(f"model {name!r} has no ready version ({why or 'not loaded'})")
        if version is None:
            return copies[max(copies)]
        if version in copies:
            return copies[version]
        state = next((s for s in self.versions(name) if s.version == version), None)
        why = f" ({state.state}: {state.reason})" if state is not None and state.reason else ""
        raise NotFound(
            f"model {name!r} has no ready version {version}{why}; ready versions: {sorted(copies)}",
        )

    def for_restore(self, name: str, version: int) -> Served:
        """The copy a stored session of that version resumes on: a ready one, else a retired
        one still loaded (the session was opened on that version before it was retired)."""
        copy = self._current.get(name, {}).get(version)
        if copy is None:
            loaded = [s for s in self._served.values() if (s.name, s.version) == (name, version)]
            copy = loaded[-1] if loaded else None
        if copy is None:
            ready = sorted(self._current.get(name, {}))
            raise FailedPrecondition(
                f"the stored session runs model {name!r} version {version}, which this replica "
                f"does not serve (ready versions of {name!r} here: {ready}); resume it on a "
                "replica that serves that version"
            )
        return copy

    def scheduler_for(self, name: str, version: int | None) -> ModelScheduler:
        return (self.pick(name) if version is None else self._any_copy(name, version)).scheduler

    def spec_of(self, name: str, version: int) -> ModelSpec:
        return self.for_restore(name, version).model.spec

    def info(self, name: str, version: int | None = None) -> ModelInfo:
        copy = self.pick(name, version) if version is None else self._any_copy(name, version)
        source = self.sources.get(name)
        return ModelInfo(
            copy.model.spec,
            copy.model.provider,
            copy.serving.max_batch_size,
            copy.version,
            copy.serving,
            source.policy if source is not None else None,
            tuple(self.versions(name)),
        )

    def _any_copy(self, name: str, version: int) -> Served:
        """A ready copy of that version, else a retired one still serving its sessions."""
        copy = self._current.get(name, {}).get(version)
        retired = [s for s in self._served.values() if (s.name, s.version) == (name, version)]
        if copy is None and retired:
            return retired[-1]
        return copy or self.pick(name, version)

    def current(self, name: str) -> dict[int, Served]:
        """The model's copies that take new sessions, by version (made on first ask)."""
        return self._current.setdefault(name, {})

    def set_status(self, name: str, version: int, state: str = "", reason: str = "") -> None:
        """The state of a version without a ready copy (LOADING, UNAVAILABLE and why); an
        empty state forgets it."""
        status = self._status.setdefault(name, {})
        if state:
            status[version] = (state, reason)
        else:
            status.pop(version, None)

    def retire_all(self, name: str, why: str) -> None:
        for copy in self._current.pop(name, {}).values():
            self.retire(copy, why)

    def shortest_ttl(self) -> float:
        ttls = [s.serving.session_ttl for s in self._served.values() if s.serving.session_ttl > 0]
        return min(ttls, default=0.0)

    # -- the index ---------------------------------------------------------------------------
    def versions(self, name: str) -> list[VersionState]:
        """Every version of the model this server knows of, with its state."""
        found: list[VersionState] = []
        status = self._status.get(name, {})
        current = self._current.get(name, {})
        source = self.sources.get(name)
        numbers = set(status) | set(current) | set(source.versions if source else ())
        numbers |= {s.version for s in self._served.values() if s.name == name}
        retired = [s for s in self._served.values() if s.retired and s.name == name]
        for version in sorted(numbers):
            copy = current.get(version)
            draining = [old for old in retired if old.version == version]
            state, reason = status.get(version, ("", ""))
            if copy is not None:
                found.append(VersionState(name, version, READY, reason, copy.sessions()))
            elif draining:
                pass  # said below
            elif state:
                found.append(VersionState(name, version, state, reason))
            elif version:
                why = self._why_not(name, version)
                found.append(VersionState(name, version, UNAVAILABLE, why))
            for old in draining:
                left = f"{old.retired}; draining, {old.sessions()} sessions left"
                found.append(VersionState(name, version, UNLOADING, left, old.sessions()))
        return found

    def _why_not(self, name: str, version: int) -> str:
        source = self.sources.get(name)
        if name in self.wanted and source is not None and version not in source.wanted():
            return f"not served by its version policy ({source.policy.describe()})"
        return "not loaded"

    def index(self, ready_only: bool = False) -> list[VersionState]:
        names = sorted(set(self.sources) | set(self._current) | set(self._status))
        found = [s for name in names for s in self.versions(name)]
        return [s for s in found if s.state == READY] if ready_only else found

    def swap(self, name: str, fresh: dict[int, Served], wanted: list[int]) -> None:
        """New copies take new sessions from now on; the ones they replace, and versions the
        policy no longer serves, retire."""
        current = self._current[name]
        for version, copy in fresh.items():
            self._served[copy.key] = copy
            old = current.get(version)
            current[version] = copy
            self._state_metric(name, version, READY)
            if old is not None:
                self.retire(old, f"replaced by a reload of version {version}")
        newest = max(current)
        for version in [v for v in current if v not in wanted]:
            self.retire(current.pop(version), f"replaced by version {newest}")
        log.info("model %s: versions %s take new sessions", name, sorted(current))

    def retire(self, copy: Served, why: str) -> None:
        copy.retired = why
        if copy.version not in self._current.get(copy.name, {}):
            self._status.setdefault(copy.name, {})[copy.version] = (UNAVAILABLE, why)
        log.info(
            "model %s version %d retired (%s): %d sessions drain",
            copy.name,
            copy.version,
            why,
            copy.sessions(),
        )
        copy.scheduler.on_empty = lambda: self._spawn(self._free(copy))
        if not copy.sessions():
            self._spawn(self._free(copy))
            return
        self._state_metric(copy.name, copy.version, UNLOADING)
        if self._settings.drain_timeout > 0:
            copy.drain = asyncio.get_running_loop().create_task(self._drain_deadline(copy))

    async def _drain_deadline(self, copy: Served) -> None:
        timeout = self._settings.drain_timeout
        await asyncio.sleep(timeout)
        self._end_sessions(
            copy.key,
            f"model {copy.name!r} version {copy.version} was retired ({copy.retired}) and its "
            f"sessions were ended after --drain-timeout {timeout:g} s",
        )

    async def _free(self, copy: Served) -> None:
        # A stored session of this version may have been resumed onto it meanwhile: it then
        # drains too (on_empty stays set).
        if copy.sessions() or self._served.pop(copy.key, None) is None:
            return
        if copy.drain is not None and copy.drain is not asyncio.current_task():
            copy.drain.cancel()
        await copy.scheduler.stop()
        copy.executor.shutdown(wait=False)
        if copy.version not in self._current.get(copy.name, {}):
            self._state_metric(copy.name, copy.version, UNAVAILABLE)
        log.info("model %s version %d freed (%s)", copy.name, copy.version, copy.retired)

    async def drain(self, timeout: float, finish: float | None, message: str) -> None:
        """Wait until every queued frame is answered, or `timeout` passes; with `finish`
        (shutting down), start no new batch, give what runs `finish` seconds, then halt."""
        await _until(self.idle, timeout)
        if finish is not None:
            for copy in self._served.values():
                copy.scheduler.holding = True
            await _until(lambda: not any(s.scheduler.busy() for s in self._served.values()), finish)
            await self.halt(message)

    async def halt(self, message: str) -> None:
        """Stop every batch loop: what runs is abandoned (its frames refused, nothing of them
        applied), then what waits is refused with UNAVAILABLE, in order; so is all later work."""
        for copy in self._served.values():
            await copy.scheduler.stop()
        for copy in self._served.values():
            copy.scheduler.refuse_queued(message)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for copy in list(self._served.values()):
            if copy.drain is not None:
                copy.drain.cancel()
            await copy.scheduler.stop()
            copy.executor.shutdown(wait=True)
        self._served.clear()
        self._current.clear()

    # -- helpers -----------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def watch(self, name: str) -> None:
        metrics = self._metrics
        if metrics is None or name in self._watched:
            return
        self._watched.add(name)
        copies = self._served.values
        metrics.watch_queue_depth(
            name, lambda: sum(s.scheduler.queued_frames for s in copies() if s.name == name)
        )
        metrics.watch_sessions(name, lambda: self._session_count(name))

    def count_load(self, name: str, version: int, *, ok: bool) -> None:
        if self._metrics is not None:
            self._metrics.model_loaded(name, version, ok)

    def _state_metric(self, name: str, version: int, state: str) -> None:
        if self._metrics is not None:
            self._metrics.model_state(name, version, state)
