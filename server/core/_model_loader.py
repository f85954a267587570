"""Loading and unloading models as the control mode says (Triton's none, poll and explicit): at
start, on request, on a rescan (SIGHUP) and, polling, when the repository changes."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import FailedPrecondition, NotFound, RnnstreamError
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._loading import Served, load_version
from rnnstream.server.core._model_registry import LOADING, UNAVAILABLE, ModelRegistry
from rnnstream.server.core._models import ModelConfigError
from rnnstream.server.core._repository import (
    ModelSource,
    scan_model,
    scan_repository,
    version_stamp,
)
from rnnstream.server.core._results import VersionState
from rnnstream.server.core._runtime import DeviceError
from rnnstream.server.core._triton_config import describe_ignored

__all__ = ["CONTROL_MODES", "ModelLoader"]

log = logging.getLogger("rnnstream.models")

CONTROL_MODES = ("none", "poll", "explicit")


class ModelLoader:
    """Changes what the registry serves; one load or unload of a model at a time."""

    def __init__(
        self, registry: ModelRegistry, settings: EngineSettings, metrics: CoreMetrics | None
    ) -> None:
        self._registry = registry
        self._settings = settings
        self._metrics = metrics
        self._tried: dict[str, tuple[Any, ...]] = {}  # fingerprint at the last load of each
        self._seen: dict[str, tuple[Any, ...]] = {}  # fingerprint at the previous poll
        self._locks: dict[str, asyncio.Lock] = {}
        self.polls = 0  # rescans the poll has started

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _scan(self, name: str) -> ModelSource:
        settings, registry = self._settings, self._registry
        source = None
        if not settings.models or name in settings.models:
            folder = settings.model_repository / name
            source = scan_model(folder, registry.defaults) if folder.is_dir() else None
        if source is None:
            registry.sources.pop(name, None)
            raise NotFound(
                f"unknown model {name!r}: the repository {settings.model_repository} has no "
                f"model folder {name!r}"
            )
        registry.sources[name] = source
        return source

    def _check_requests(self, action: str) -> None:
        if (mode := self._settings.model_control_mode) != "explicit":
            raise FailedPrecondition(
                f"models are not {action}ed on request: the server runs with "
                f"--model-control-mode {mode} (start it with explicit to {action} models)"
            )

    async def load(
        self, name: str, *, requested: bool = False, strict: bool = False
    ) -> list[VersionState]:
        """Load (or reload) the versions the model's policy serves. A version already loaded
        from unchanged files stays; new copies take new sessions once loaded, the copies they
        replace drain. If no wanted version loads, what was serving serves on. `requested`:
        a client asked, which only the explicit control mode allows; `strict` (at start): a
        version that fails raises what it raised."""
        if requested:
            self._check_requests("load")
        registry = self._registry
        async with self._lock(name):
            registry.wanted.add(name)
            source = self._scan(name)
            self._tried[name] = source.fingerprint
            registry.set_status(name, 0)
            wanted = source.wanted()
            if source.problem or not wanted:
                problem = source.problem or (
                    f"its version policy ({source.policy.describe()}) selects none of the "
                    f"versions found {sorted(source.versions)}"
                )
                registry.set_status(name, 0, UNAVAILABLE, problem)
                registry.count_load(name, 0, ok=False)
                raise FailedPrecondition(f"model {name!r} cannot be loaded: {problem}")
            if source.triton is not None and source.triton.ignored:
                log.info("%s", describe_ignored(name, source.triton))
            current = registry.current(name)
            fresh: dict[int, Served] = {}
            failures: list[str] = []
            for version in wanted:
                copy = current.get(version)
                if copy is not None and copy.stamp == version_stamp(source, version):
                    continue
                registry.set_status(name, version, LOADING)
                try:
                    fresh[version] = await load_version(
                        source, version, self._settings, self._metrics, registry.store
                    )
                except Exception as exc:
                    reason = f"failed to load: {_describe(exc)}"
                    registry.set_status(name, version, UNAVAILABLE, reason)
                    registry.count_load(name, version, ok=False)
                    if strict and isinstance(exc, DeviceError | ModelConfigError):
                        raise
                    if strict:
                        raise ModelConfigError(
                            f"model {name!r} version {version} cannot be loaded: {_describe(exc)}"
                        ) from exc
                    failures.append(f"version {version} {reason}")
                    log.error("model %s version %d %s", name, version, reason)
                else:
                    registry.set_status(name, version)
                    registry.count_load(name, version, ok=True)
            if fresh or any(v in current for v in wanted):
                registry.swap(name, fresh, wanted)
            registry.watch(name)
            if failures:
                raise FailedPrecondition(f"model {name!r}: " + "; ".join(failures))
            return registry.versions(name)

    async def unload(
        self, name: str, why: str = "unloaded", *, requested: bool = False
    ) -> list[VersionState]:
        """Retire every copy of the model: open sessions drain, new ones are refused."""
        if requested:
            self._check_requests("unload")
        registry = self._registry
        async with self._lock(name):
            if name not in registry.sources and not registry.current(name):
                self._scan(name)  # NotFound names the model folder it lacks
            registry.wanted.discard(name)
            registry.retire_all(name, why)
            return registry.versions(name)

    async def start(self) -> None:
        """Load what the control mode loads at start; a model that fails stops the start."""
        settings, registry = self._settings, self._registry
        found = scan_repository(settings.model_repository, registry.defaults, settings.models)
        registry.sources.update(found)
        missing = [name for name in settings.models if name not in found]
        if settings.model_control_mode == "explicit":
            named = settings.load_model
            wanted = sorted(found) if "*" in named else list(named)
            missing += [name for name in wanted if name not in found]
        else:
            wanted = sorted(found)
            if not found and settings.model_control_mode == "none":
                raise ModelConfigError(f"no */model.onnx under {settings.model_repository}")
        if missing:
            raise ModelConfigError(
                f"models {sorted(set(missing))} not found in {settings.model_repository}; "
                f"found {sorted(found)}"
            )
        results = await asyncio.gather(
            *(self.load(n, strict=True) for n in wanted), return_exceptions=True
        )
        failed = {n: r for n, r in zip(wanted, results, strict=True) if isinstance(r, Exception)}
        for error in failed.values():
            if isinstance(error, DeviceError):
                raise error  # the server's own settings: said as they are
        if settings.skip_bad_models:
            for name, error in failed.items():
                log.error("skipping model %s: %s", name, _describe(error))
            if wanted and not registry.names():
                raise ModelConfigError(
                    f"no model under {settings.model_repository} could be loaded"
                )
        elif failed:
            raise ModelConfigError(
                "; ".join(_describe(e) for e in failed.values())
                + " (to serve the other models without it: --bad-models skip)"
            )

    def refresh(self) -> None:
        """Read the repository again for the index (loads nothing): versions and models added
        or removed since the last load are listed as they are on disk."""
        settings, registry = self._settings, self._registry
        try:
            found = scan_repository(settings.model_repository, registry.defaults, settings.models)
        except ModelConfigError:
            return  # the repository folder is gone: the index tells what is loaded
        for name in set(registry.sources) - set(found):
            del registry.sources[name]
        registry.sources.update(found)

    async def rescan(self, *, settle: bool = False) -> None:
        """Follow the repository: load models that are new (none and poll modes), reload those
        whose files changed, unload those whose folder is gone. With `settle` (polling) a model
        is loaded once its files held still for one poll period, not while being copied."""
        settings, registry = self._settings, self._registry
        found = scan_repository(settings.model_repository, registry.defaults, settings.models)
        if settings.model_control_mode != "explicit":
            registry.wanted |= set(found)
        for name in sorted(set(found) | set(registry.sources) | set(registry.names())):
            source = found.get(name)
            if source is None:
                registry.sources.pop(name, None)
                if registry.current(name):
                    await self.unload(name, "removed from the repository")
                continue
            if not registry.current(name):
                registry.sources[name] = source
            if name not in registry.wanted or source.fingerprint == self._tried.get(name):
                continue
            if settle and self._seen.get(name) != source.fingerprint:
                self._seen[name] = source.fingerprint
                continue
            try:
                await self.load(name)
            except RnnstreamError as exc:
                log.warning("rescan: %s", exc.message)

    async def poll(self) -> None:
        period = self._settings.repository_poll_seconds
        while True:
            await asyncio.sleep(period)
            self.polls += 1
            try:
                await self.rescan(settle=True)
            except (ModelConfigError, OSError) as exc:
                log.warning("repository poll failed: %s", exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, RnnstreamError):
        return exc.message
    if isinstance(exc, ModelConfigError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
