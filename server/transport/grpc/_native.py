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

from server.core import Engine, FrameResult, InvalidArgument, ModelSpec, TensorSpec
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


def _output_response(spec: ModelSpec, session_id: str, result: FrameResult) -> pb.StreamResponse:
    return pb.StreamResponse(
        output=pb.FrameOutput(
            session_id=session_id,
            frame_index=result.index,
            outputs=_encode_outputs(spec, result),
        )
    )


def _reset_response(session_id: str, next_index: int) -> pb.StreamResponse:
    return pb.StreamResponse(
        reset=pb.SessionReset(session_id=session_id, next_frame_index=next_index)
    )


def _ended_response(session_id: str, next_index: int) -> pb.StreamResponse:
    return pb.StreamResponse(
        ended=pb.SessionEnded(session_id=session_id, reason="client", next_frame_index=next_index)
    )


class _StreamState:
    """Bookkeeping of one Stream call: responses to send and work still outstanding."""

    def __init__(self) -> None:
        self.outbox: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        self.outstanding = 0
        self.reading = True

    def track(
        self,
        future: asyncio.Future[Any],
        respond: Callable[[Any], pb.StreamResponse],
        session_id: str,
        frame_index: int | None = None,
    ) -> None:
        self.outstanding += 1

        def done(f: asyncio.Future[Any]) -> None:
            self.outstanding -= 1
            if f.cancelled():
                return
            error = f.exception()
            self.outbox.put_nowait(
                stream_error(error, session_id, frame_index) if error else respond(f.result())
            )
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
                request_deserializer=tolerant(
                    request_type.FromString, request_type.DESCRIPTOR.full_name
                ),
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
                "ListModels": unary_handler(
                    self.ListModels, pb.ListModelsRequest, pb.ListModelsResponse
                ),
                "GetModel": unary_handler(self.GetModel, pb.GetModelRequest, pb.ModelInfo),
                "GetSession": unary_handler(self.GetSession, pb.GetSessionRequest, pb.SessionInfo),
                "EndSession": unary_handler(self.EndSession, pb.EndSessionRequest, pb.SessionEnded),
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
        self,
        requests: AsyncIterator[pb.StreamRequest | BadRequest],
        state: _StreamState,
        owner: str,
    ) -> None:
        try:
            async for request in requests:
                self._dispatch(request, state, owner)
        finally:
            state.reading = False
            state.finish_if_done()

    def _dispatch(
        self, request: pb.StreamRequest | BadRequest, state: _StreamState, owner: str
    ) -> None:
        engine = self._engine
        if isinstance(request, BadRequest):
            state.outbox.put_nowait(stream_error(InvalidArgument(request.message)))
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
                state.track(
                    future,
                    functools.partial(_output_response, spec, session_id),
                    session_id,
                    frame_index,
                )
            elif kind == "open":
                session_id = request.open.session_id
                opened = engine.open_session(request.open.model, session_id, owner)
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
                    functools.partial(_reset_response, session_id),
                    session_id,
                )
            elif kind == "end":
                session_id = request.end.session_id
                state.track(
                    engine.end(session_id, owner),
                    functools.partial(_ended_response, session_id),
                    session_id,
                )
            else:
                raise InvalidArgument("empty StreamRequest: set one of open, frame, reset, end")
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
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        await self._auth.principal(context)
        return pb.ListModelsResponse(
            models=[self._info(name) for name in sorted(self._engine.models)]
        )

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
        next_index = await self._engine.end(request.session_id, owner)
        return pb.SessionEnded(
            session_id=request.session_id, reason="client", next_frame_index=next_index
        )
