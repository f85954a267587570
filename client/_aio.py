"""asyncio client: many sessions multiplexed over one bidirectional stream."""

from __future__ import annotations

import functools
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from rnnstream._errors import OpenManyError, RnnstreamError, SessionLost
from rnnstream._frames import EMIT, FrameInput, Outputs, decode_outputs, encode_frame
from rnnstream._group import step_many, step_stacked
from rnnstream._info import (
    STATE_NUMBERS,
    ModelInfo,
    SessionEnded,
    SessionInfo,
    SessionPage,
    model_info,
    session_ended,
    session_info,
    session_page,
)
from rnnstream._mux import Connect, RetryPolicy, StreamMux
from rnnstream._routing import SESSION_ID_METADATA_KEY
from rnnstream._session import AsyncSession
from rnnstream.proto.metadata import PACK_OUTPUTS_METADATA_KEY
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc

__all__ = ["DEFAULT_OPTIONS", "DEFAULT_RETRY", "AsyncClient", "AsyncSession"]
DEFAULT_RETRY = RetryPolicy()

DEFAULT_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Reconnect quickly after a dropped connection; the stream mux adds its own backoff. Not
    # grpc.min_reconnect_backoff_ms: gRPC also takes it as the shortest time a connection attempt
    # may take, and at 100 ms a slow handshake (a busy server, a long round trip) failed every call.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def _status_error(exc: grpc.aio.AioRpcError) -> RnnstreamError:
    return RnnstreamError(exc.code(), exc.details() or "")


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
        pack_frames: bool = True,
    ) -> None:
        """`token` is sent as a bearer token. `retry=None` turns reconnect-and-resume off.
        `stream_per_session` gives each session its own stream carrying the session id as
        `rnnstream-session-id` metadata, so a proxy can route every session by it.
        `pack_outputs` lets the server answer frames that are ready together in one message
        (FrameOutputs); off, every frame's output comes in a message of its own.
        `pack_frames` sends the frames that several sessions of a stream queue in the same
        turn of the event loop as one FrameGroup; off, every frame goes in a message of its
        own."""
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
        self._pack_frames = pack_frames
        self._models: dict[tuple[str, int], ModelInfo] = {}
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

    async def list_models(self) -> list[ModelInfo]:
        response = await self._unary(self._stub.ListModels, pb.ListModelsRequest())
        return [model_info(message) for message in response.models]

    async def get_model(self, name: str, version: int = 0) -> ModelInfo:
        """The model's newest ready version, or `version` (kept: versions do not change; the
        newest is asked again once a session opens on a newer one)."""
        key = (name, version)
        if key not in self._models:
            request = pb.GetModelRequest(name=name, version=version)
            self._models[key] = model_info(await self._unary(self._stub.GetModel, request))
        return self._models[key]

    async def _opened_on(self, name: str, version: int) -> ModelInfo:
        """The model version a session opened on; a newer one than the newest this client knew
        becomes its newest (a version loaded since), so calls without a version follow it."""
        info = await self.get_model(name, version)
        newest = self._models.get((name, 0))
        if newest is not None and newest.version < version:
            self._models[(name, 0)] = info
        return info

    async def get_session(self, session_id: str, principal: str = "") -> SessionInfo:
        """A session of this client's principal, or (an admin principal) of `principal`."""
        request = pb.GetSessionRequest(session_id=session_id, principal=principal)
        return session_info(await self._unary(self._stub.GetSession, request))

    async def end_session(self, session_id: str, principal: str = "") -> SessionEnded:
        """End a session of this client's principal, or (an admin principal) of `principal`."""
        request = pb.EndSessionRequest(session_id=session_id, principal=principal)
        return session_ended(await self._unary(self._stub.EndSession, request))

    async def list_sessions(
        self,
        *,
        model: str = "",
        principal: str = "",
        state: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> SessionPage:
        """A page of the sessions this principal holds (an admin principal: every principal's,
        or `principal`'s), of `model` and in `state` (active, idle, spilled) when given."""
        if state and state not in STATE_NUMBERS:
            raise ValueError(f"state must be one of {sorted(STATE_NUMBERS)}, not {state!r}")
        request = pb.ListSessionsRequest(
            page_size=page_size,
            page_token=page_token,
            model=model,
            principal=principal,
            state=STATE_NUMBERS.get(state, pb.SESSION_STATE_UNSPECIFIED),
        )
        return session_page(await self._unary(self._stub.ListSessions, request))

    def _stream(self, session_id: str) -> StreamMux:
        if self._stream_per_session:
            metadata = (*self._stream_metadata, (SESSION_ID_METADATA_KEY, session_id))
            mux = StreamMux(self._connect(metadata), self._retry, self._pack_frames)
            self._own_muxes.append(mux)
            return mux
        if self._mux is None or self._mux.failure is not None:
            connect = self._connect(self._stream_metadata)
            self._mux = StreamMux(connect, self._retry, self._pack_frames)
        return self._mux

    def _connect(self, metadata: Sequence[tuple[str, str]]) -> Connect:
        # wait_for_ready: a call made while the channel reconnects waits instead of failing.
        return functools.partial(self._stub.Stream, metadata=tuple(metadata), wait_for_ready=True)

    async def open(
        self,
        model: str,
        session_id: str = "",
        emit: str = "every",
        *,
        resume: bool = False,
        version: int = 0,
    ) -> AsyncSession:
        """Open a session on `model`, or resume `session_id` if the server holds it.

        `emit="last"` opens a sequence-to-vector session: frames are not answered one by one;
        `flush()` returns the last frame's outputs. With `resume=True` the server must already
        hold the session: SessionLost says why not. `version` 0 opens on the newest ready
        version; the session stays on the version it opened on until it ends.
        """
        if emit not in EMIT:
            raise ValueError(f"emit must be one of {sorted(EMIT)}, not {emit!r}")
        if self._stream_per_session and not session_id:
            session_id = secrets.token_hex(16)  # chosen here so the proxy can route the stream
        mux = self._stream(session_id)
        try:
            opened = await mux.open(
                pb.OpenSession(
                    model=model,
                    session_id=session_id,
                    resume=resume,
                    emit=EMIT[emit],
                    model_version=version,
                )
            )
        except RnnstreamError as exc:
            if resume and exc.code == grpc.StatusCode.NOT_FOUND:
                raise SessionLost(exc.code, exc.message, session_id=session_id) from None
            raise
        info = await self._opened_on(model, opened.model_version)
        return AsyncSession(mux, info, opened, emit)

    async def step_many(
        self, frames: Mapping[AsyncSession, FrameInput]
    ) -> dict[AsyncSession, Outputs]:
        """One frame for each of many sessions, sent as one FrameGroup message per stream and
        model and answered by one message: a gateway carrying many sessions pays for one
        message instead of one per session. Each frame is applied exactly as `session.step`
        would apply it. Frames of one model must agree on their shapes (the same T). When some
        frames fail, the others are applied all the same, and FrameGroupError holds both the
        outputs and the errors."""
        return await step_many(frames)

    async def open_many(
        self,
        model: str,
        count: int = 0,
        session_ids: Sequence[str] = (),
        emit: str = "every",
        *,
        resume: bool = False,
    ) -> list[AsyncSession]:
        """Open (or resume) many sessions on `model` in one message each way: `count` new ones
        with ids the server makes, or one per id in `session_ids`. All go on this client's
        stream. Refusals raise OpenManyError, which holds the sessions that did open."""
        if emit not in EMIT:
            raise ValueError(f"emit must be one of {sorted(EMIT)}, not {emit!r}")
        if count and session_ids:
            raise ValueError("give count or session_ids, not both")
        ids = list(session_ids) or [""] * count
        mux = self._stream("")
        request = pb.OpenSessions(
            sessions=[
                pb.OpenSession(model=model, session_id=i, resume=resume, emit=EMIT[emit])
                for i in ids
            ]
        )
        answer = await mux.open_many(request)
        sessions: list[AsyncSession] = []
        errors: dict[int, RnnstreamError] = {}
        for position, result in enumerate(answer.results):
            if result.HasField("opened"):
                info = await self._opened_on(model, result.opened.model_version)
                sessions.append(AsyncSession(mux, info, result.opened, emit))
            else:
                e = result.error
                errors[position] = RnnstreamError.from_number(e.code, e.message, e.session_id)
        if errors:
            raise OpenManyError(sessions, errors)
        return sessions

    async def step_stacked(self, sessions: Sequence[AsyncSession], frames: FrameInput) -> Outputs:
        """step_many for frames already stacked: `frames` holds sessions[k]'s frame in row k
        (an array, or arrays by input name, with the K sessions first); the outputs come back
        the same way, with no array per session. The sessions share one model and stream.
        FrameGroupError holds these arrays (a failed row zero) and the failed sessions' errors."""
        return await step_stacked(sessions, frames)

    async def infer(
        self,
        model: str,
        frame: FrameInput,
        *,
        session_id: str = "",
        frame_index: int | None = None,
        version: int = 0,
    ) -> Outputs:
        """A whole sequence in one call; stateless unless `session_id` names a session;
        `version` 0: the newest ready version (or the session's own)."""
        info = await self.get_model(model, version)
        tensors, squeeze = encode_frame(info, frame)
        request = pb.InferRequest(
            model=model, session_id=session_id, inputs=tensors, model_version=version
        )
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
