"""Blocking client: the asyncio client driven from a private event-loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc

from rnnstream._aio import DEFAULT_OPTIONS, DEFAULT_RETRY, AsyncClient
from rnnstream._errors import FrameGroupError
from rnnstream._frames import FrameInput, Outputs
from rnnstream._info import ModelInfo, SessionEnded, SessionInfo, SessionPage
from rnnstream._mux import RetryPolicy
from rnnstream._session import AsyncSession

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
    """Blocking view of an AsyncSession. `with client.open(model) as session:` ends it on the
    way out (unless it has ended already)."""

    def __init__(self, runner: _LoopThread, inner: AsyncSession) -> None:
        self._runner = runner
        self._inner = inner

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._inner.ended:
            self.end()

    @property
    def model(self) -> ModelInfo:
        return self._inner.model

    @property
    def ended(self) -> bool:
        return self._inner.ended

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
    """Blocking client. Use `with Client(target) as client`; the arguments are AsyncClient's."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        retry: RetryPolicy | None = DEFAULT_RETRY,
        stream_per_session: bool = False,
        options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS,
        pack_outputs: bool = True,
        pack_frames: bool = True,
    ) -> None:
        self._runner = _LoopThread()

        async def make() -> AsyncClient:
            # The channel must be created on the loop that will use it.
            return AsyncClient(
                target,
                credentials=credentials,
                token=token,
                metadata=metadata,
                retry=retry,
                stream_per_session=stream_per_session,
                options=options,
                pack_outputs=pack_outputs,
                pack_frames=pack_frames,
            )

        try:
            self._inner = self._runner.run(make())
        except BaseException:
            self._runner.stop()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self._inner.close())
        self._runner.stop()

    @property
    def target(self) -> str:
        return self._inner.target

    def list_models(self) -> list[ModelInfo]:
        return self._runner.run(self._inner.list_models())

    def get_model(self, name: str, version: int = 0) -> ModelInfo:
        return self._runner.run(self._inner.get_model(name, version))

    def get_session(self, session_id: str, principal: str = "") -> SessionInfo:
        return self._runner.run(self._inner.get_session(session_id, principal))

    def end_session(self, session_id: str, principal: str = "") -> SessionEnded:
        return self._runner.run(self._inner.end_session(session_id, principal))

    def list_sessions(
        self,
        *,
        model: str = "",
        principal: str = "",
        state: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> SessionPage:
        """See AsyncClient.list_sessions."""
        return self._runner.run(
            self._inner.list_sessions(
                model=model,
                principal=principal,
                state=state,
                page_size=page_size,
                page_token=page_token,
            )
        )

    def open(
        self,
        model: str,
        session_id: str = "",
        emit: str = "every",
        *,
        resume: bool = False,
        version: int = 0,
    ) -> Session:
        """See AsyncClient.open; `resume=True` raises SessionLost when the server lacks it."""
        opening = self._inner.open(model, session_id, emit, resume=resume, version=version)
        return Session(self._runner, self._runner.run(opening))

    def step_many(self, frames: Mapping[Session, FrameInput]) -> dict[Session, Outputs]:
        """See AsyncClient.step_many: one frame for each session, in one message."""
        inner = {session._inner: frame for session, frame in frames.items()}
        by_inner = {session._inner: session for session in frames}
        try:
            answered = self._runner.run(self._inner.step_many(inner))
        except FrameGroupError as exc:
            raise FrameGroupError(
                {by_inner[s]: o for s, o in exc.outputs.items()},
                {by_inner[s]: e for s, e in exc.errors.items()},
            ) from None
        return {by_inner[s]: outputs for s, outputs in answered.items()}

    def open_many(
        self,
        model: str,
        count: int = 0,
        session_ids: Sequence[str] = (),
        emit: str = "every",
        *,
        resume: bool = False,
    ) -> list[Session]:
        """See AsyncClient.open_many (OpenManyError's sessions are AsyncSessions)."""
        opening = self._inner.open_many(model, count, session_ids, emit, resume=resume)
        return [Session(self._runner, s) for s in self._runner.run(opening)]

    def step_stacked(self, sessions: Sequence[Session], frames: FrameInput) -> Outputs:
        """See AsyncClient.step_stacked: frames stacked K first, outputs likewise."""
        inner = [session._inner for session in sessions]
        by_inner = dict(zip(inner, sessions, strict=True))
        try:
            return self._runner.run(self._inner.step_stacked(inner, frames))
        except FrameGroupError as exc:
            errors = {by_inner[s]: e for s, e in exc.errors.items()}
            raise FrameGroupError(exc.outputs, errors) from None

    def infer(
        self,
        model: str,
        frame: FrameInput,
        *,
        session_id: str = "",
        frame_index: int | None = None,
        version: int = 0,
    ) -> Outputs:
        """See AsyncClient.infer."""
        call = self._inner.infer(
            model, frame, session_id=session_id, frame_index=frame_index, version=version
        )
        return self._runner.run(call)

    def forecast(self, model: str, session_id: str, steps: int, *, commit: bool = False) -> Outputs:
        """See AsyncClient.forecast."""
        return self._runner.run(self._inner.forecast(model, session_id, steps, commit=commit))
