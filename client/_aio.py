"""asyncio client: many sessions multiplexed over one bidirectional stream."""

from __future__ import annotations

import asyncio
import secrets
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import grpc

from rnnstream._errors import RnnstreamError, SessionLost
from rnnstream._frames import EMIT, FrameInput, Outputs, decode_outputs, encode_frame
from rnnstream._mux import RetryPolicy, StreamMux
from rnnstream._routing import SESSION_ID_METADATA_KEY
from rnnstream.proto.metadata import PACK_OUTPUTS_METADATA_KEY
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc

__all__ = ["AsyncClient", "AsyncSession"]
DEFAULT_RETRY = RetryPolicy()

DEFAULT_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a dropped connection; the stream mux adds its own backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def _status_error(exc: grpc.aio.AioRpcError) -> RnnstreamError:
    return RnnstreamError(exc.code(), exc.details() or "")


class AsyncSession:
    """A session on the server: `step` one frame, or `stream` many with several in flight."""

    def __init__(
        self, mux: StreamMux, model: pb.ModelInfo, opened: pb.SessionOpened, emit: str = "every"
    ) -> None:
        self._mux = mux
        self.model = model
        self.id = opened.session_id
        self.resumed = opened.resumed
        self.next_index = opened.next_frame_index
        # Requests not yet answered, in send order: resent as they are after a reconnect.
        self._frames: dict[int, tuple[pb.StreamRequest, asyncio.Future[Outputs], bool]] = {}
        self._controls: deque[tuple[pb.StreamRequest, asyncio.Future[Any]]] = deque()
        self._order: dict[object, pb.StreamRequest] = {}
        self.resuming = False
        self.recovering = False
        self.ended = False
        self._ended_error: RnnstreamError | None = None  # what later calls raise once ended
        # "last": frames get no answer; flush() (or end()) returns the last frame's outputs.
        self.emit = emit
        self.last_outputs: Outputs | None = None  # set by end() of an emit-last session
        self._frame_errors: list[RnnstreamError] = []  # emit-last frame errors, raised by flush

    async def send(self, frame: FrameInput, index: int | None = None) -> asyncio.Future[Outputs]:
        """Send one frame now; the returned future resolves with its outputs."""
        self._check_open()
        tensors, squeeze = encode_frame(self.model, frame)
        if index is None:
            index = self.next_index
        self.next_index = max(self.next_index, index + 1)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        request = pb.StreamRequest(
            frame=pb.Frame(session_id=self.id, frame_index=index, inputs=tensors)
        )
        if self.emit == "last":
            # No answer will come: the frame counts as done once sent; errors wait for flush.
            await self._mux.send(request)
            future.set_result({})
            return future
        self._frames[index] = (request, future, squeeze)
        self._order[("frame", index)] = request
        try:
            await self._mux.send(request)
        except BaseException:
            self._frames.pop(index, None)
            self._order.pop(("frame", index), None)
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
            raise self._ended_error or RnnstreamError(
                grpc.StatusCode.NOT_FOUND, "session ended", session_id=self.id
            )

    async def _control(self, request: pb.StreamRequest) -> Any:
        self._check_open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._controls.append((request, future))
        self._order[("control", id(future))] = request
        await self._mux.send(request)
        return await future

    async def reset(self) -> int:
        """Back to the initial state; returns the next frame index (numbering goes on)."""
        reset = pb.ResetSession(session_id=self.id, frame_index=self.next_index)
        next_index: int = await self._control(pb.StreamRequest(reset=reset))
        return next_index

    async def end(self) -> int:
        """Free the session on the server after its queued frames; returns frames applied.

        For an emit-last session the last frame's outputs land in `last_outputs`.
        """
        end = pb.EndSessionRequest(session_id=self.id)
        next_index: int = await self._control(pb.StreamRequest(end=end))
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

    # -- called by the stream mux --------------------------------------------------------
    def unanswered(self) -> list[pb.StreamRequest]:
        return list(self._order.values())

    def on_output(self, output: pb.FrameOutput) -> None:
        entry = self._frames.pop(output.frame_index, None)
        self._order.pop(("frame", output.frame_index), None)
        if entry is None or entry[1].done():
            return
        try:
            outputs = decode_outputs(self.model, output.outputs, entry[2])
        except ValueError as exc:
            # A bad tensor fails its frame only; raised here it would kill the stream's reader.
            entry[1].set_exception(
                RnnstreamError(
                    grpc.StatusCode.INTERNAL,
                    f"undecodable output: {exc}",
                    session_id=self.id,
                    frame_index=output.frame_index,
                )
            )
            return
        entry[1].set_result(outputs)

    def on_frame_error(self, index: int, exc: RnnstreamError) -> None:
        if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
            # The server refused the frame before queueing it, so its index is still the next.
            self.next_index = min(self.next_index, index)
        entry = self._frames.pop(index, None)
        self._order.pop(("frame", index), None)
        if entry is not None and not entry[1].done():
            entry[1].set_exception(exc)
        elif entry is None and self.emit == "last":
            self._frame_errors.append(exc)

    def on_reply(self, reply: pb.SessionFlushed | pb.ForecastResponse) -> None:
        entry = self._pop_control()
        if entry is not None and not entry[1].done():
            entry[1].set_result(reply)

    def _pop_control(self) -> tuple[pb.StreamRequest, asyncio.Future[Any]] | None:
        if not self._controls:
            return None
        request, future = self._controls.popleft()
        self._order.pop(("control", id(future)), None)
        return request, future

    def on_control(self, next_index: int) -> None:
        entry = self._pop_control()
        if entry is not None and not entry[1].done():
            entry[1].set_result(next_index)

    def on_control_error(self, exc: RnnstreamError) -> None:
        entry = self._pop_control()
        if entry is not None and not entry[1].done():
            entry[1].set_exception(exc)

    def on_ended(self, ended: pb.SessionEnded) -> None:
        self.ended = True
        if self.emit == "last":
            self.last_outputs = decode_outputs(self.model, ended.last_outputs)
        if ended.reason == "client":
            self.on_control(ended.next_frame_index)
            error: RnnstreamError = RnnstreamError(
                grpc.StatusCode.NOT_FOUND, "session ended", session_id=self.id
            )
        else:
            error = SessionLost(
                grpc.StatusCode.NOT_FOUND,
                f"the server ended the session ({ended.reason}); it cannot be resumed",
                session_id=self.id,
            )
        # Later calls say why too: "expired" or "evicted", not just "ended".
        self._ended_error = error
        self.fail_all(error)

    def lose(self, error: SessionLost) -> None:
        """The server no longer holds the session: fail what waits and refuse what follows."""
        self.ended = True
        self._ended_error = error
        self.fail_all(error)

    def fail_all(self, exc: RnnstreamError) -> None:
        for _, future, _ in self._frames.values():
            if not future.done():
                future.set_exception(exc)
        self._frames.clear()
        while (entry := self._pop_control()) is not None:
            if not entry[1].done():
                entry[1].set_exception(exc)
        self._order.clear()


class AsyncClient:
    """Talks to one rnnstream server. Use `async with AsyncClient(target) as client`."""

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
    ) -> None:
        """`token` is sent as a bearer token. `retry=None` turns reconnect-and-resume off.
        `stream_per_session` gives each session its own stream carrying the session id as
        `rnnstream-session-id` metadata, so a proxy can route every session by it.
        `pack_outputs` lets the server answer frames that are ready together in one message
        (FrameOutputs); off, every frame's output comes in a message of its own."""
        self.target = target
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._stub = pb_grpc.RnnstreamStub(self._channel)
        self._metadata = tuple(metadata) + (
            (("authorization", f"Bearer {token}"),) if token else ()
        )
        self._retry = retry
        self._stream_metadata = self._metadata + (
            ((PACK_OUTPUTS_METADATA_KEY, "1"),) if pack_outputs else ()
        )
        self._stream_per_session = stream_per_session
        self._models: dict[str, pb.ModelInfo] = {}
        self._mux: StreamMux | None = None
        self._own_muxes: list[StreamMux] = []

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for mux in [*self._own_muxes, *([self._mux] if self._mux else [])]:
            await mux.close()
        self._mux = None
        self._own_muxes.clear()
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

    def _stream(self, session_id: str) -> StreamMux:
        if self._stream_per_session:
            mux = StreamMux(
                self._stub,
                (*self._stream_metadata, (SESSION_ID_METADATA_KEY, session_id)),
                self._retry,
            )
            self._own_muxes.append(mux)
            return mux
        if self._mux is None or self._mux.failure is not None:
            self._mux = StreamMux(self._stub, self._stream_metadata, self._retry)
        return self._mux

    async def open(
        self, model: str, session_id: str = "", emit: str = "every", *, resume: bool = False
    ) -> AsyncSession:
        """Open a session on `model`, or resume `session_id` if the server holds it.

        `emit="last"` opens a sequence-to-vector session: frames are not answered one by one;
        `flush()` returns the last frame's outputs. With `resume=True` the server must already
        hold the session: SessionLost says why not.
        """
        if emit not in EMIT:
            raise ValueError(f"emit must be one of {sorted(EMIT)}, not {emit!r}")
        info = await self.get_model(model)
        if self._stream_per_session and not session_id:
            session_id = secrets.token_hex(16)  # chosen here so the proxy can route the stream
        mux = self._stream(session_id)
        try:
            opened = await mux.open(
                pb.OpenSession(model=model, session_id=session_id, resume=resume, emit=EMIT[emit])
            )
        except RnnstreamError as exc:
            if resume and exc.code == grpc.StatusCode.NOT_FOUND:
                raise SessionLost(exc.code, exc.message, session_id=session_id) from None
            raise
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
