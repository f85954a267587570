"""asyncio client: many sessions multiplexed over one bidirectional stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

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


_EMIT = {"every": pb.EMIT_EVERY, "last": pb.EMIT_LAST}


def _status_error(exc: grpc.aio.AioRpcError) -> RnnstreamError:
    return RnnstreamError(exc.code(), exc.details() or "")


class _Mux:
    """One Stream call; routes each response to the session or request it answers."""

    def __init__(self, stub: pb_grpc.RnnstreamStub, metadata: Sequence[tuple[str, str]]) -> None:
        self._call = stub.Stream(metadata=tuple(metadata))
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
            await self._call.write(request)

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
        elif kind == "flushed":
            session = self.sessions.get(response.flushed.session_id)
            if session is not None:
                session._on_reply(response.flushed)
        elif kind == "forecast":
            session = self.sessions.get(response.forecast.session_id)
            if session is not None:
                session._on_reply(response.forecast)

    def _route_error(self, error: pb.StreamError) -> None:
        exc = RnnstreamError.from_number(
            error.code,
            error.message,
            error.session_id,
            error.frame_index if error.HasField("frame_index") else None,
        )
        session = self.sessions.get(error.session_id)
        if error.HasField("frame_index") and session is not None:
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

    def __init__(
        self, mux: _Mux, model: pb.ModelInfo, opened: pb.SessionOpened, emit: str = "every"
    ) -> None:
        self._mux = mux
        self.model = model
        self.id = opened.session_id
        self.resumed = opened.resumed
        self.next_index = opened.next_frame_index
        self._frames: dict[int, tuple[asyncio.Future[Outputs], bool]] = {}
        self._controls: deque[asyncio.Future[Any]] = deque()
        self.ended = False
        # "last": frames get no answer; flush() (or end()) returns the last frame's outputs.
        self.emit = emit
        self.last_outputs: Outputs | None = None  # set by end() of an emit-last session
        self._frame_errors: list[RnnstreamError] = []  # emit-last frame errors, raised by flush

    async def send(self, frame: FrameInput, index: int | None = None) -> asyncio.Future[Outputs]:
        """Send one frame now; the returned future resolves with its outputs."""
        tensors, squeeze = encode_frame(self.model, frame)
        if index is None:
            index = self.next_index
        self.next_index = max(self.next_index, index + 1)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        request = pb.Frame(session_id=self.id, frame_index=index, inputs=tensors)
        if self.emit == "last":
            # No answer will come: the frame counts as done once sent; errors wait for flush.
            await self._mux.send(pb.StreamRequest(frame=request))
            future.set_result({})
            return future
        self._frames[index] = (future, squeeze)
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

    async def _control(self, request: pb.StreamRequest) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._controls.append(future)
        await self._mux.send(request)
        return await future

    async def reset(self) -> int:
        """Back to the initial state; returns the next frame index (numbering goes on)."""
        next_index: int = await self._control(
            pb.StreamRequest(reset=pb.ResetSession(session_id=self.id))
        )
        return next_index

    async def end(self) -> int:
        """Free the session on the server after its queued frames; returns frames applied.

        For an emit-last session the last frame's outputs land in `last_outputs`.
        """
        next_index: int = await self._control(
            pb.StreamRequest(end=pb.EndSessionRequest(session_id=self.id))
        )
        return next_index

    async def flush(self, reset: bool = False) -> Outputs:
        """Outputs of the last frame applied, once every frame sent before is applied.

        Empty when no frame was applied since the open or the last reset. With `reset`, the
        state then goes back to its initial value for the next sequence. On an emit-last
        session, raises the first error of a frame sent since the previous flush.
        """
        request = pb.FlushSession(session_id=self.id, reset=reset)
        flushed: pb.SessionFlushed = await self._control(pb.StreamRequest(flush=request))
        if self._frame_errors:
            error, self._frame_errors = self._frame_errors[0], []
            raise error
        return decode_outputs(self.model, flushed.outputs)

    async def forecast(
        self, steps: int, commit: bool = False, first: FrameInput | None = None
    ) -> Outputs:
        """Roll the session `steps` steps ahead, each output fed back as the next input.

        Step 1's input is `first` when given, else the session's last output. Each returned
        array holds the `steps` outputs along its time axis. The session is unchanged unless
        `commit`: then its state moves to after the last step.
        """
        request = pb.ForecastRequest(session_id=self.id, steps=steps, commit=commit)
        if first is not None:
            request.inputs.extend(encode_frame(self.model, first)[0])
        reply: pb.ForecastResponse = await self._control(pb.StreamRequest(forecast=request))
        return decode_outputs(self.model, reply.outputs)

    # -- called by the mux ---------------------------------------------------------------
    def _on_output(self, output: pb.FrameOutput) -> None:
        entry = self._frames.pop(output.frame_index, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(decode_outputs(self.model, output.outputs, entry[1]))

    def _on_frame_error(self, index: int, exc: RnnstreamError) -> None:
        entry = self._frames.pop(index, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(exc)
        elif entry is None and self.emit == "last":
            self._frame_errors.append(exc)

    def _on_reply(self, reply: pb.SessionFlushed | pb.ForecastResponse) -> None:
        if self._controls:
            future = self._controls.popleft()
            if not future.done():
                future.set_result(reply)

    def _on_control(self, next_index: int) -> None:
        if self._controls:
            self._controls.popleft().set_result(next_index)

    def _on_ended(self, ended: pb.SessionEnded) -> None:
        self.ended = True
        if self.emit == "last":
            self.last_outputs = decode_outputs(self.model, ended.last_outputs)
        if self._controls:
            self._controls.popleft().set_result(ended.next_frame_index)
        self._fail_all(
            RnnstreamError(grpc.StatusCode.NOT_FOUND, f"session ended ({ended.reason})",
                           session_id=self.id)
        )

    def _fail_all(self, exc: RnnstreamError) -> None:
        for future, _ in self._frames.values():
            if not future.done():
                future.set_exception(exc)
        self._frames.clear()
        while self._controls:
            future = self._controls.popleft()
            if not future.done():
                future.set_exception(exc)


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
            self._models[name] = await self._unary(self._stub.GetModel, pb.GetModelRequest(name=name))
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

    async def open(self, model: str, session_id: str = "", emit: str = "every") -> AsyncSession:
        """Open a session on `model`, or resume `session_id` if the server holds it.

        `emit="last"` opens a sequence-to-vector session: frames are not answered one by one;
        `flush()` returns the last frame's outputs.
        """
        if emit not in _EMIT:
            raise ValueError(f"emit must be one of {sorted(_EMIT)}, not {emit!r}")
        info = await self.get_model(model)
        mux = self._stream()
        opened = await mux.open(
            pb.OpenSession(model=model, session_id=session_id, emit=_EMIT[emit])
        )
        session = AsyncSession(mux, info, opened, emit)
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

    async def forecast(
        self, model: str, session_id: str, steps: int, *, commit: bool = False
    ) -> Outputs:
        """The Forecast RPC on a session named by id (it runs after frames the server holds)."""
        info = await self.get_model(model)
        request = pb.ForecastRequest(session_id=session_id, steps=steps, commit=commit)
        response = await self._unary(self._stub.Forecast, request)
        return decode_outputs(info, response.outputs)
