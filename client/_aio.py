"""asyncio client: many sessions multiplexed over one bidirectional stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any, cast

import grpc
from rnnstream_pb.v1 import rnnstream_pb2 as pb
from rnnstream_pb.v1 import rnnstream_pb2_grpc as pb_grpc

from client._errors import RnnstreamError
from client._frames import FrameInput, Outputs, decode_outputs, encode_frame

__all__ = ["AsyncClient", "AsyncSession"]

DEFAULT_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)


def _status_error(exc: grpc.aio.AioRpcError) -> RnnstreamError:
    return RnnstreamError(exc.code(), exc.details() or "")


class _Mux:
    """One Stream call; routes each response to the session or request it answers."""

    def __init__(self, stub: pb_grpc.RnnstreamStub, metadata: Sequence[tuple[str, str]]) -> None:
        # The generated stub is typed for the blocking API; on an aio channel this is the call.
        self._call: grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse] = cast(
            Any, stub
        ).Stream(metadata=tuple(metadata))
        self._write_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._opening: asyncio.Future[pb.SessionOpened] | None = None
        self.sessions: dict[str, AsyncSession] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())
        self.closed: RnnstreamError | None = None

    async def send(self, request: pb.StreamRequest) -> None:
        if self.closed is not None:
            raise self.closed
        async with self._write_lock:
            try:
                await self._call.write(request)
            except grpc.aio.AioRpcError as exc:
                # The call ended before the reader noticed: same error the reader will report.
                raise _status_error(exc) from None
            except grpc.aio.UsageError as exc:
                raise RnnstreamError(grpc.StatusCode.CANCELLED, f"stream closed: {exc}") from None

    async def open(self, request: pb.OpenSession) -> pb.SessionOpened:
        # Opens go one at a time: the reply to an open carries no request id.
        async with self._open_lock:
            self._opening = asyncio.get_running_loop().create_future()
            await self.send(pb.StreamRequest(open=request))
            try:
                return await self._opening
            finally:
                self._opening = None

    async def _read(self) -> None:
        try:
            async for response in self._call:
                self._route(response)
            error = RnnstreamError(grpc.StatusCode.UNAVAILABLE, "stream closed by the server")
        except grpc.aio.AioRpcError as exc:
            error = _status_error(exc)
        except asyncio.CancelledError:
            error = RnnstreamError(grpc.StatusCode.CANCELLED, "stream closed by the client")
        except Exception as exc:  # a bug in routing must fail the waiters, not strand them
            error = RnnstreamError(grpc.StatusCode.INTERNAL, f"stream reader failed: {exc!r}")
            self._call.cancel()
        self.closed = error
        if self._opening is not None and not self._opening.done():
            self._opening.set_exception(error)
        for session in list(self.sessions.values()):
            session._fail_all(error)

    def _route(self, response: pb.StreamResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "output":
            session = self.sessions.get(response.output.session_id)
            if session is not None:
                session._on_output(response.output)
        elif kind == "opened":
            if self._opening is not None and not self._opening.done():
                self._opening.set_result(response.opened)
        elif kind == "error":
            self._route_error(response.error)
        elif kind == "reset":
            session = self.sessions.get(response.reset.session_id)
            if session is not None:
                session._on_control(response.reset.next_frame_index)
        elif kind == "ended":
            session = self.sessions.pop(response.ended.session_id, None)
            if session is not None:
                session._on_ended(response.ended)

    def _route_error(self, error: pb.StreamError) -> None:
        exc = RnnstreamError.from_number(
            error.code,
            error.message,
            error.session_id,
            error.frame_index if error.HasField("frame_index") else None,
        )
        session = self.sessions.get(error.session_id)
        if error.HasField("frame_index"):
            # A frame's error, even for a session this stream no longer knows, never fails an
            # open that happens to be in flight.
            if session is not None:
                session._on_frame_error(error.frame_index, exc)
        elif session is not None and session._controls:
            session._controls.popleft().set_exception(exc)
        elif self._opening is not None and not self._opening.done():
            self._opening.set_exception(exc)

    async def close(self) -> None:
        if self.closed is None:
            with contextlib.suppress(Exception):
                async with self._write_lock:
                    await self._call.done_writing()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._reader), timeout=5)
        self._reader.cancel()
        self._call.cancel()


class AsyncSession:
    """A session on the server: `step` one frame, or `stream` many with several in flight."""

    def __init__(self, mux: _Mux, model: pb.ModelInfo, opened: pb.SessionOpened) -> None:
        self._mux = mux
        self.model = model
        self.id = opened.session_id
        self.resumed = opened.resumed
        self.next_index = opened.next_frame_index
        self._frames: dict[int, tuple[asyncio.Future[Outputs], bool]] = {}
        self._controls: deque[asyncio.Future[int]] = deque()
        self.ended = False

    async def send(self, frame: FrameInput, index: int | None = None) -> asyncio.Future[Outputs]:
        """Send one frame now; the returned future resolves with its outputs."""
        self._check_open()
        tensors, squeeze = encode_frame(self.model, frame)
        if index is None:
            index = self.next_index
        self.next_index = max(self.next_index, index + 1)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self._frames[index] = (future, squeeze)
        request = pb.Frame(session_id=self.id, frame_index=index, inputs=tensors)
        try:
            await self._mux.send(pb.StreamRequest(frame=request))
        except BaseException:
            self._frames.pop(index, None)
            raise
        return future

    async def step(self, frame: FrameInput) -> Outputs:
        return await (await self.send(frame))

    async def stream(
        self, frames: Iterable[FrameInput], inflight: int = 8
    ) -> AsyncIterator[Outputs]:
        """Yield each frame's outputs in order, keeping up to `inflight` frames on the wire."""
        window: deque[asyncio.Future[Outputs]] = deque()
        for frame in frames:
            if len(window) >= max(1, inflight):
                yield await window.popleft()
            window.append(await self.send(frame))
        while window:
            yield await window.popleft()

    def _check_open(self) -> None:
        # The stream forgets an ended session, so the server's answer to anything sent for it
        # could reach no one: the call would wait forever. Refuse it here instead.
        if self.ended:
            raise RnnstreamError(grpc.StatusCode.NOT_FOUND, "session ended", session_id=self.id)

    async def _control(self, request: pb.StreamRequest) -> int:
        self._check_open()
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._controls.append(future)
        await self._mux.send(request)
        return await future

    async def reset(self) -> int:
        """Back to the initial state; returns the next frame index (numbering goes on)."""
        return await self._control(pb.StreamRequest(reset=pb.ResetSession(session_id=self.id)))

    async def end(self) -> int:
        """Free the session on the server after its queued frames; returns frames applied."""
        return await self._control(pb.StreamRequest(end=pb.EndSessionRequest(session_id=self.id)))

    # -- called by the mux ---------------------------------------------------------------
    def _on_output(self, output: pb.FrameOutput) -> None:
        entry = self._frames.pop(output.frame_index, None)
        if entry is None or entry[0].done():
            return
        try:
            outputs = decode_outputs(self.model, output.outputs, entry[1])
        except ValueError as exc:
            # A bad tensor fails its frame only; raised here it would kill the stream's reader
            # and leave every other frame of every session waiting forever.
            entry[0].set_exception(
                RnnstreamError(
                    grpc.StatusCode.INTERNAL,
                    f"undecodable output: {exc}",
                    session_id=self.id,
                    frame_index=output.frame_index,
                )
            )
            return
        entry[0].set_result(outputs)

    def _on_frame_error(self, index: int, exc: RnnstreamError) -> None:
        entry = self._frames.pop(index, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(exc)

    def _on_control(self, next_index: int) -> None:
        if self._controls:
            self._controls.popleft().set_result(next_index)

    def _on_ended(self, ended: pb.SessionEnded) -> None:
        self.ended = True
        if self._controls:
            self._controls.popleft().set_result(ended.next_frame_index)
        self._fail_all(
            RnnstreamError(
                grpc.StatusCode.NOT_FOUND, f"session ended ({ended.reason})", session_id=self.id
            )
        )

    def _fail_all(self, exc: RnnstreamError) -> None:
        for future, _ in self._frames.values():
            if not future.done():
                future.set_exception(exc)
        self._frames.clear()
        while self._controls:
            control = self._controls.popleft()
            if not control.done():
                control.set_exception(exc)


class AsyncClient:
    """Talks to one rnnstream server. Use `async with AsyncClient(target) as client`."""

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        options: Sequence[tuple[str, Any]] = DEFAULT_OPTIONS,
    ) -> None:
        self.target = target
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.RnnstreamStub(self._channel)
        self._metadata = tuple(metadata)
        self._models: dict[str, pb.ModelInfo] = {}
        self._mux: _Mux | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._mux is not None:
            await self._mux.close()
            self._mux = None
        await self._channel.close()

    async def _unary(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, metadata=self._metadata)
        except grpc.aio.AioRpcError as exc:
            raise _status_error(exc) from None

    async def list_models(self) -> list[pb.ModelInfo]:
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return list(response.models)

    async def get_model(self, name: str) -> pb.ModelInfo:
        if name not in self._models:
            self._models[name] = await self._unary(
                self._stub.GetModel, pb.GetModelRequest(name=name)
            )
        return self._models[name]

    async def get_session(self, session_id: str) -> pb.SessionInfo:
        info: pb.SessionInfo = await self._unary(
            self._stub.GetSession, pb.GetSessionRequest(session_id=session_id)
        )
        return info

    async def end_session(self, session_id: str) -> pb.SessionEnded:
        ended: pb.SessionEnded = await self._unary(
            self._stub.EndSession, pb.EndSessionRequest(session_id=session_id)
        )
        return ended

    def _stream(self) -> _Mux:
        if self._mux is None or self._mux.closed is not None:
            self._mux = _Mux(self._stub, self._metadata)
        return self._mux

    async def open(self, model: str, session_id: str = "") -> AsyncSession:
        """Open a session on `model`, or resume `session_id` if the server holds it."""
        info = await self.get_model(model)
        mux = self._stream()
        opened = await mux.open(pb.OpenSession(model=model, session_id=session_id))
        session = AsyncSession(mux, info, opened)
        mux.sessions[session.id] = session
        return session

    async def infer(
        self,
        model: str,
        frame: FrameInput,
        *,
        session_id: str = "",
        frame_index: int | None = None,
    ) -> Outputs:
        """A whole sequence in one call; stateless unless `session_id` names a session."""
        info = await self.get_model(model)
        tensors, squeeze = encode_frame(info, frame)
        request = pb.InferRequest(model=model, session_id=session_id, inputs=tensors)
        if frame_index is not None:
            request.frame_index = frame_index
        response = await self._unary(self._stub.Infer, request)
        return decode_outputs(info, response.outputs, squeeze)
