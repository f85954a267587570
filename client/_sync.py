"""Blocking client: the asyncio client driven from a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar

from rnnstream._aio import AsyncClient, AsyncSession
from rnnstream._frames import FrameInput, Outputs
from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = ["Client", "Session"]

T = TypeVar("T")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="rnnstream-client", daemon=True
        )
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.submit(coro).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


class Session:
    """Blocking view of an AsyncSession."""

    def __init__(self, runner: _LoopThread, inner: AsyncSession) -> None:
        self._runner = runner
        self._inner = inner

    @property
    def id(self) -> str:
        return self._inner.id

    @property
    def resumed(self) -> bool:
        return self._inner.resumed

    @property
    def next_index(self) -> int:
        return self._inner.next_index

    def step(self, frame: FrameInput) -> Outputs:
        return self._runner.run(self._inner.step(frame))

    def stream(self, frames: Iterable[FrameInput], inflight: int = 8) -> Iterator[Outputs]:
        """Yield outputs in order while up to `inflight` frames are on the wire."""
        window: deque[Future[Outputs]] = deque()
        for frame in frames:
            if len(window) >= max(1, inflight):
                yield window.popleft().result()
            # Frames must reach the wire in order, so each send is awaited before the next.
            sent = self._runner.run(self._inner.send(frame))
            window.append(self._runner.submit(_await(sent)))
        while window:
            yield window.popleft().result()

    @property
    def emit(self) -> str:
        return self._inner.emit

    @property
    def last_outputs(self) -> Outputs | None:
        return self._inner.last_outputs

    def reset(self) -> int:
        return self._runner.run(self._inner.reset())

    def flush(self, reset: bool = False) -> Outputs:
        """See AsyncSession.flush."""
        return self._runner.run(self._inner.flush(reset))

    def forecast(
        self, steps: int, commit: bool = False, first: FrameInput | None = None
    ) -> Outputs:
        """See AsyncSession.forecast."""
        return self._runner.run(self._inner.forecast(steps, commit, first))

    def end(self) -> int:
        return self._runner.run(self._inner.end())


async def _await(future: asyncio.Future[T]) -> T:
    return await future


class Client:
    """Blocking client. Use `with Client(target) as client`."""

    def __init__(self, target: str, **kwargs: Any) -> None:
        self._runner = _LoopThread()
        self._inner: AsyncClient = self._runner.run(_make(target, kwargs))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._inner.close())
        self._runner.stop()

    def list_models(self) -> list[pb.ModelInfo]:
        return self._runner.run(self._inner.list_models())

    def get_model(self, name: str) -> pb.ModelInfo:
        return self._runner.run(self._inner.get_model(name))

    def get_session(self, session_id: str) -> pb.SessionInfo:
        return self._runner.run(self._inner.get_session(session_id))

    def end_session(self, session_id: str) -> pb.SessionEnded:
        return self._runner.run(self._inner.end_session(session_id))

    def open(
        self, model: str, session_id: str = "", emit: str = "every", *, resume: bool = False
    ) -> Session:
        """See AsyncClient.open; `resume=True` raises SessionLost when the server lacks it."""
        opening = self._inner.open(model, session_id, emit, resume=resume)
        return Session(self._runner, self._runner.run(opening))

    def infer(self, model: str, frame: FrameInput, **kwargs: Any) -> Outputs:
        return self._runner.run(self._inner.infer(model, frame, **kwargs))


async def _make(target: str, kwargs: dict[str, Any]) -> AsyncClient:
    # The channel must be created on the loop that will use it.
    return AsyncClient(target, **kwargs)
