"""rnnstream.v1 servicer: translates messages and calls the engine, nothing more."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from rnnstream_pb.tensor_codec import NUMPY_TO_DTYPE, decode, encode
from rnnstream_pb.v1 import rnnstream_pb2 as pb

from server.core import (
    Engine,
    FlushResult,
    ForecastResult,
    FrameResult,
    InvalidArgument,
    ModelSpec,
    TensorSpec,
)
from server.core._validation import NamedArray
from server.transport.grpc._auth import Authenticator
from server.transport.grpc._status import BadRequest, stream_error, tolerant, unary

__all__ = ["NativeServicer", "model_info"]

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "rnnstream.v1.Rnnstream"


def _wire_dtype(dtype: np.dtype[Any]) -> pb.DataType.ValueType:
    return pb.DataType.ValueType(NUMPY_TO_DTYPE[dtype])


def _tensor_info(spec: TensorSpec) -> pb.TensorInfo:
    return pb.TensorInfo(
        name=spec.name,
        dtype=_wire_dtype(spec.dtype),
        shape=[-1 if d is None else d for d in spec.shape],
        batch_axis=spec.batch_axis,
        time_axis=-1 if spec.time_axis is None else spec.time_axis,
    )


def model_info(spec: ModelSpec, provider: str, max_batch_size: int) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=spec.name,
        inputs=[_tensor_info(t) for t in spec.inputs],
        outputs=[_tensor_info(t) for t in spec.outputs],
        states=[
            pb.StateInfo(
                input_name=s.input_name,
                output_name=s.output_name,
                dtype=_wire_dtype(s.dtype),
                shape=[-1 if d is None else d for d in s.shape],
                batch_axis=s.batch_axis,
            )
            for s in spec.states
        ],
        execution_provider=provider,
        max_batch_size=max_batch_size,
    )


def _named_arrays(tensors: Any) -> list[NamedArray]:
    return [(t.name, decode(t)) for t in tensors]


def _encode_outputs(spec: ModelSpec, result: FrameResult) -> list[pb.Tensor]:
    return [encode(a, t.name) for a, t in zip(result.outputs, spec.outputs, strict=True)]


_EMIT_NAMES = {pb.EMIT_EVERY: "every", pb.EMIT_LAST: "last"}


def _emit_name(value: int) -> str:
    try:
        return _EMIT_NAMES[pb.Emit.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"unknown emit mode {value}; use EMIT_EVERY or EMIT_LAST") from None


def _flushed(spec: ModelSpec, session_id: str, result: FlushResult) -> pb.SessionFlushed:
    message = pb.SessionFlushed(
        session_id=session_id, next_frame_index=result.next_index, reset=result.reset
    )
    if result.last is not None:
        message.outputs.extend(_encode_outputs(spec, result.last))
        if result.last.index >= 0:
            message.frame_index = result.last.index
    return message


def _forecasted(spec: ModelSpec, session_id: str, result: ForecastResult) -> pb.ForecastResponse:
    return pb.ForecastResponse(
        session_id=session_id,
        outputs=[encode(a, t.name) for a, t in zip(result.outputs, spec.outputs, strict=True)],
        next_frame_index=result.next_index,
        committed=result.committed,
    )


def _flushed_response(spec: ModelSpec, session_id: str, result: FlushResult) -> pb.StreamResponse:
    return pb.StreamResponse(flushed=_flushed(spec, session_id, result))


def _forecast_response(
    spec: ModelSpec, session_id: str, result: ForecastResult
) -> pb.StreamResponse:
    return pb.StreamResponse(forecast=_forecasted(spec, session_id, result))


def _ended(
    spec: ModelSpec, session_id: str, next_index: int, last: FrameResult | None
) -> pb.SessionEnded:
    """`last` is given for emit-last sessions: their final answer rides on the end."""
    message = pb.SessionEnded(session_id=session_id, reason="client", next_frame_index=next_index)
    if last is not None:
        message.last_outputs.extend(_encode_outputs(spec, last))
        if last.index >= 0:
            message.last_frame_index = last.index
    return message


class _StreamState:
    """Bookkeeping of one Stream call: responses to send and work still outstanding."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        self.outstanding = 0
        self.reading = True

    def track(self, future: asyncio.Future[Any], respond: Callable[[Any], pb.StreamResponse | None],
              session_id: str, frame_index: int | None = None) -> None:
        self.outstanding += 1

        def done(f: asyncio.Future[Any]) -> None:
            self.outstanding -= 1
            if f.cancelled():
                return
            error = f.exception()
            response = (
                stream_error(error, session_id, frame_index) if error else respond(f.result())
            )
            if response is not None:  # None: an emit-last frame, answered by flush or end
                self.outbox.put_nowait(response)
            self.finish_if_done()

        future.add_done_callback(done)

    def finish_if_done(self) -> None:
        if not self.reading and self.outstanding == 0:
            self.outbox.put_nowait(None)


class NativeServicer:
    def __init__(self, engine: Engine, auth: Authenticator) -> None:
        self._engine = engine
        self._auth = auth

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose deserializers answer garbage bytes instead of failing."""

        def unary_handler(method: Any, request_type: Any, response_type: Any) -> Any:
            return grpc.unary_unary_rpc_method_handler(
                method,
                request_deserializer=tolerant(request_type.FromString, request_type.DESCRIPTOR.full_name),
                response_serializer=response_type.SerializeToString,
            )

        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.Stream,
                    request_deserializer=tolerant(
                        pb.StreamRequest.FromString, "rnnstream.v1.StreamRequest"
                    ),
                    response_serializer=pb.StreamResponse.SerializeToString,
                ),
                "Infer": unary_handler(self.Infer, pb.InferRequest, pb.InferResponse),
                "ListModels": unary_handler(self.ListModels, pb.ListModelsRequest, pb.ListModelsResponse),
                "GetModel": unary_handler(self.GetModel, pb.GetModelRequest, pb.ModelInfo),
                "GetSession": unary_handler(self.GetSession, pb.GetSessionRequest, pb.SessionInfo),
                "EndSession": unary_handler(self.EndSession, pb.EndSessionRequest, pb.SessionEnded),
                "Forecast": unary_handler(self.Forecast, pb.ForecastRequest, pb.ForecastResponse),
            },
        )

    # -- streaming -------------------------------------------------------------------------
    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest | BadRequest], context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        owner = await self._auth.principal(context)
        state = _StreamState()
        reader = asyncio.get_running_loop().create_task(self._read(requests, state, owner))
        try:
            while (response := await state.outbox.get()) is not None:
                yield response
        finally:
            reader.cancel()
        await reader

    async def _read(
        self, requests: AsyncIterator[pb.StreamRequest | BadRequest], state: _StreamState, owner: str
    ) -> None:
        try:
            async for request in requests:
                self._dispatch(request, state, owner)
        finally:
            state.reading = False
            state.finish_if_done()

    def _dispatch(self, request: pb.StreamRequest | BadRequest, state: _StreamState, owner: str) -> None:
        engine = self._engine
        if isinstance(request, BadRequest):
            state.outbox.put_nowait(
                stream_error(InvalidArgument(request.message))
            )
            return
        kind = request.WhichOneof("kind")
        session_id = ""
        frame_index: int | None = None
        try:
            if kind == "frame":
                frame = request.frame
                session_id, frame_index = frame.session_id, frame.frame_index
                future = engine.submit_frame(
                    session_id, frame_index, _named_arrays(frame.inputs), owner
                )
                spec = engine.model_spec(engine.sessions.get(session_id, owner).model)
                silent = engine.session_emit(session_id, owner) == "last"
                state.track(
                    future,
                    lambda r, sid=session_id: None if silent else pb.StreamResponse(
                        output=pb.FrameOutput(
                            session_id=sid, frame_index=r.index, outputs=_encode_outputs(spec, r)
                        )
                    ),
                    session_id,
                    frame_index,
                )
            elif kind == "open":
                session_id = request.open.session_id
                opened = engine.open_session(
                    request.open.model, session_id, owner, _emit_name(request.open.emit)
                )
                state.outbox.put_nowait(
                    pb.StreamResponse(
                        opened=pb.SessionOpened(
                            session_id=opened.session_id,
                            model=opened.model,
                            next_frame_index=opened.next_index,
                            resumed=opened.resumed,
                        )
                    )
                )
            elif kind == "reset":
                session_id = request.reset.session_id
                state.track(
                    engine.reset(session_id, owner),
                    lambda n, sid=session_id: pb.StreamResponse(
                        reset=pb.SessionReset(session_id=sid, next_frame_index=n)
                    ),
                    session_id,
                )
            elif kind == "end":
                session_id = request.end.session_id
                state.track(*self._end(session_id, owner), session_id)
            elif kind == "flush":
                session_id = request.flush.session_id
                spec = engine.model_spec(engine.sessions.get(session_id, owner).model)
                state.track(
                    engine.flush(session_id, owner, request.flush.reset),
                    functools.partial(_flushed_response, spec, session_id),
                    session_id,
                )
            elif kind == "forecast":
                session_id = request.forecast.session_id
                forecast, spec = self._forecast(request.forecast, owner)
                state.track(
                    forecast, functools.partial(_forecast_response, spec, session_id), session_id
                )
            else:
                raise InvalidArgument(
                    "empty StreamRequest: set one of open, frame, reset, end, flush, forecast"
                )
        except Exception as exc:
            state.outbox.put_nowait(stream_error(exc, session_id, frame_index))

    # -- unary -----------------------------------------------------------------------------
    @unary
    async def Infer(self, request: pb.InferRequest, context: Context) -> pb.InferResponse:
        owner = await self._auth.principal(context)
        index = request.frame_index if request.HasField("frame_index") else None
        session_id, result = await self._engine.infer(
            request.model, request.session_id, index, _named_arrays(request.inputs), owner
        )
        model = request.model or self._engine.sessions.get(session_id, owner).model
        return pb.InferResponse(
            session_id=session_id,
            frame_index=result.index,
            outputs=_encode_outputs(self._engine.model_spec(model), result),
        )

    @unary
    async def ListModels(self, request: pb.ListModelsRequest, context: Context) -> pb.ListModelsResponse:
        await self._auth.principal(context)
        return pb.ListModelsResponse(models=[self._info(name) for name in sorted(self._engine.models)])

    @unary
    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelInfo:
        await self._auth.principal(context)
        return self._info(request.name)

    def _info(self, name: str) -> pb.ModelInfo:
        model = self._engine.model(name)
        return model_info(model.spec, model.provider, self._engine.settings.max_batch_size)

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.SessionInfo:
        owner = await self._auth.principal(context)
        snap = self._engine.snapshot(request.session_id, owner)
        return pb.SessionInfo(
            session_id=snap.session_id,
            model=snap.model,
            next_frame_index=snap.next_index,
            pending_frames=snap.pending_frames,
            idle_seconds=snap.idle_seconds,
            expires_in_seconds=snap.expires_in,
        )

    @unary
    async def EndSession(self, request: pb.EndSessionRequest, context: Context) -> pb.SessionEnded:
        owner = await self._auth.principal(context)
        future, respond = self._end(request.session_id, owner)
        ended = respond(await future).ended
        return ended

    def _end(
        self, session_id: str, owner: str
    ) -> tuple[asyncio.Future[int], Callable[[int], pb.StreamResponse]]:
        """End a session; emit-last sessions answer their end with their last output."""
        engine = self._engine
        session = engine.sessions.get(session_id, owner)
        spec = engine.model_spec(session.model)
        future = engine.end(session_id, owner)

        def respond(next_index: int) -> pb.StreamResponse:
            last = session.last if session.emit == "last" else None
            return pb.StreamResponse(ended=_ended(spec, session_id, next_index, last))

        return future, respond

    def _forecast(
        self, request: pb.ForecastRequest, owner: str
    ) -> tuple[asyncio.Future[ForecastResult], ModelSpec]:
        engine = self._engine
        spec = engine.model_spec(engine.sessions.get(request.session_id, owner).model)
        future = engine.forecast(
            request.session_id, request.steps, request.commit, _named_arrays(request.inputs), owner
        )
        return future, spec

    @unary
    async def Forecast(self, request: pb.ForecastRequest, context: Context) -> pb.ForecastResponse:
        owner = await self._auth.principal(context)
        future, spec = self._forecast(request, owner)
        return _forecasted(spec, request.session_id, await future)
