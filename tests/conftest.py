"""Shared fixtures: real rnnstream servers on 127.0.0.1 with OS-chosen ports."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest
from hypothesis import settings as hypothesis_settings

from rnnstream.server import GrpcServer, Settings

T = TypeVar("T")

# Property tests: the same examples every run by default; `--hypothesis-profile=random
# --hypothesis-seed=N` draws new ones (.ci/run does, with a fresh N it prints).
hypothesis_settings.register_profile("fixed", derandomize=True)
hypothesis_settings.register_profile("random", derandomize=False)
hypothesis_settings.load_profile("fixed")
REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"


class RunningServer:
    """A GrpcServer on its own event-loop thread, as a deployed server would run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server = GrpcServer(settings)
        self.port = self.call(self.server.start())
        self.target = f"127.0.0.1:{self.port}"
        self.engine = self.server.engine

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        """Run a coroutine on the server's loop (engine state lives there)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.call(wrapper())

    def stop(self, grace: float = 2.0) -> None:
        async def stop() -> None:
            await self.server.stop(grace)

        self.call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def test_settings(**overrides: Any) -> Settings:
    base = Settings(
        host="127.0.0.1", port=0, model_repository=MODELS, session_ttl=0, metrics_port=0
    )
    return replace(base, **overrides)


test_settings.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture
def make_server() -> Iterator[Callable[..., RunningServer]]:
    """Start servers with settings overrides; every one is stopped at teardown."""
    started: list[RunningServer] = []

    def make(**overrides: Any) -> RunningServer:
        running = RunningServer(test_settings(**overrides))
        started.append(running)
        return running

    yield make
    for running in started:
        running.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[RunningServer]:
    """One shared server over the shipped models (expiry off)."""
    running = RunningServer(test_settings())
    yield running
    running.stop()


def missing_dependency(reason: str) -> None:
    """Skip for a missing external tool locally; in CI (.ci/run installs it) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must provide this: {reason}")
    pytest.skip(reason)


# PyTorch is an opt-in extra: from the package index alone it brings gigabytes of CUDA wheels.
NO_TORCH = (
    "PyTorch comparisons need the torch extra (pip install -e '.[torch]'; a CPU-only build is "
    "enough); .ci/run installs it where a CPU build lies on local disk"
)
HAS_TORCH = importlib.util.find_spec("torch") is not None


def require_torch() -> ModuleType:
    """The torch module, or a skip that says how to get it."""
    return pytest.importorskip("torch", reason=NO_TORCH)
