"""rnnstream.v1 servicer: translates messages and calls the engine, nothing more."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np

from rnnstream.proto.metadata import PACK_OUTPUTS_METADATA_KEY
from rnnstream.proto.tensor_codec import NUMPY_TO_DTYPE
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server._metrics import Metrics
from rnnstream.server._settings import Settings
from rnnstream.server.core import (
    Engine,
    ModelInfo,
    PermissionDenied,
    TensorSpec,
    Unavailable,
    VersionState,
    quoted,
)
from rnnstream.server.transport.grpc._interceptor import call_is_admin, call_principal
from rnnstream.server.transport.grpc._native_messages import (
    encode_outputs,
    ended,
    forecasted,
    session_info,
    state_name,
)
from rnnstream.server.transport.grpc._native_stream import SHUTDOWN, StreamCall, named_arrays
from rnnstream.server.transport.grpc._rate import forecast_frames
from rnnstream.server.transport.grpc._status import (
    BadRequest,
    abort,
    tolerant,
    tolerant_unary,
    unary,
)

__all__ = ["NativeServicer", "model_info", "version_states"]

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


def version_states(states: list[VersionState] | tuple[VersionState, ...]) -> list[Any]:
    return [
        pb.ModelVersionState(
            model=s.model, version=s.version, state=s.state, reason=s.reason, sessions=s.sessions
        )
        for s in states
    ]


def model_info(info: ModelInfo) -> pb.ModelInfo:
    spec = info.spec
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
        execution_provider=info.provider,
        max_batch_size=info.max_batch_size,
        version=info.version,
        versions=version_states(info.versions),
    )


class NativeServicer:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics) -> None:
        self._engine = engine
        self._settings = settings
        self._metrics = metrics
        self.calls: set[StreamCall] = set()

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose deserializers answer garbage bytes instead of failing."""

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
                "Infer": tolerant_unary(self.Infer, pb.InferRequest, pb.InferResponse),
                "ListModels": tolerant_unary(
                    self.ListModels, pb.ListModelsRequest, pb.ListModelsResponse
                ),
                "GetModel": tolerant_unary(self.GetModel, pb.GetModelRequest, pb.ModelInfo),
                "GetSession": tolerant_unary(self.GetSession, pb.GetSessionRequest, pb.SessionInfo),
                "EndSession": tolerant_unary(
                    self.EndSession, pb.EndSessionRequest, pb.SessionEnded
                ),
                "ListSessions": tolerant_unary(
                    self.ListSessions, pb.ListSessionsRequest, pb.ListSessionsResponse
                ),
                "Forecast": tolerant_unary(self.Forecast, pb.ForecastRequest, pb.ForecastResponse),
                "ListRepository": tolerant_unary(
                    self.ListRepository, pb.ListRepositoryRequest, pb.ListRepositoryResponse
                ),
                "LoadModel": tolerant_unary(self.LoadModel, pb.LoadModelRequest, pb.ModelVersions),
                "UnloadModel": tolerant_unary(
                    self.UnloadModel, pb.UnloadModelRequest, pb.ModelVersions
                ),
            },
        )

    # -- streaming -------------------------------------------------------------------------
    async def Stream(
        self, requests: AsyncIterator[pb.StreamRequest | BadRequest], context: Context
    ) -> AsyncIterator[pb.StreamResponse]:
        call = StreamCall(
            self._engine,
            call_principal(),
            self._settings,
            self._metrics,
            self._packs_outputs(context),
        )
        self.calls.add(call)
        reader = asyncio.get_running_loop().create_task(call.read(requests))
        outbox, sent = call.outbox, self._metrics.stream_responses
        try:
            while True:
                # get_nowait when something waits: no coroutine per response while busy.
                response = await outbox.get() if outbox.empty() else outbox.get_nowait()
                if response is None:
                    return
                if response is SHUTDOWN:
                    await abort(
                        context,
                        Unavailable("server is shutting down; resume your sessions elsewhere"),
                    )
                assert isinstance(response, pb.StreamResponse)
                # Yielded, not context.write(): gRPC sends it from its own loop, as the echo
                # server does; a client that is gone ends this generator.
                yield response
                sent.value += 1
                outbox.wrote()
        finally:
            self.calls.discard(call)
            call.detach()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    def _packs_outputs(self, context: Context) -> bool:
        """Whether this stream gets FrameOutputs: the client asked, and the server allows it."""
        if not self._settings.pack_outputs:
            return False
        return any(
            key == PACK_OUTPUTS_METADATA_KEY and value == "1"
            for key, value in context.invocation_metadata() or ()
        )

    def settled(self) -> bool:
        """No stream waits for an answer from the engine."""
        return all(call.outstanding == 0 for call in self.calls)

    def open_streams(self) -> int:
        return len(self.calls)

    def shutdown_streams(self, message: str) -> None:
        for call in list(self.calls):
            call.shutdown(message)

    # -- unary -----------------------------------------------------------------------------
    @unary
    async def Infer(self, request: pb.InferRequest, context: Context) -> pb.InferResponse:
        owner = call_principal()
        self._engine.limits.admit(owner, 1)
        index = request.frame_index if request.HasField("frame_index") else None
        metrics = self._metrics
        metrics.bytes_received.inc(sum(len(t.data) for t in request.inputs))
        result = await self._engine.infer(
            owner,
            request.session_id,
            request.model,
            index,
            named_arrays(request.inputs),
            request.model_version or None,
        )
        outputs = encode_outputs(result)
        metrics.bytes_sent.inc(sum(len(t.data) for t in outputs))
        return pb.InferResponse(
            session_id=request.session_id, frame_index=result.index, outputs=outputs
        )

    @unary
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Context
    ) -> pb.ListModelsResponse:
        engine = self._engine
        return pb.ListModelsResponse(
            models=[model_info(engine.model(name)) for name in engine.model_names()]
        )

    @unary
    async def GetModel(self, request: pb.GetModelRequest, context: Context) -> pb.ModelInfo:
        return model_info(self._engine.model(request.name, request.version or None))

    # -- sessions: a principal reaches its own; an admin principal every one ---------------
    @staticmethod
    def _holder(requested: str) -> tuple[str, str]:
        """(the principal whose session a request names, the operator acting on another
        principal's session or ''); PermissionDenied unless the caller is an admin."""
        caller = call_principal()
        if not requested or requested == caller:
            return caller, ""
        if not call_is_admin():
            raise PermissionDenied(
                f"principal {caller!r} may not reach the sessions of principal "
                f"{quoted(requested)}: only admin principals (--admin-principals) may"
            )
        return requested, caller

    @unary
    async def GetSession(self, request: pb.GetSessionRequest, context: Context) -> pb.SessionInfo:
        holder, _ = self._holder(request.principal)
        return session_info(await self._engine.describe(holder, request.session_id))

    @unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        holder, _ = self._holder(request.principal)
        everyone = not request.principal and call_is_admin()
        page = await self._engine.list_sessions(
            None if everyone else holder,
            model=request.model,
            state=state_name(request.state),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListSessionsResponse(
            sessions=[session_info(info) for info in page.sessions],
            next_page_token=page.next_token,
        )

    @unary
    async def EndSession(self, request: pb.EndSessionRequest, context: Context) -> pb.SessionEnded:
        holder, operator = self._holder(request.principal)
        return ended(await self._engine.end(holder, request.session_id, operator))

    @unary
    async def Forecast(self, request: pb.ForecastRequest, context: Context) -> pb.ForecastResponse:
        owner = call_principal()
        self._engine.limits.admit(
            owner, forecast_frames(request.steps, self._settings.max_steps_per_frame)
        )
        future = self._engine.forecast(
            owner, request.session_id, request.steps, request.commit, named_arrays(request.inputs)
        )
        return forecasted(await future)

    # -- the model repository ----------------------------------------------------------------
    @unary
    async def ListRepository(
        self, request: pb.ListRepositoryRequest, context: Context
    ) -> pb.ListRepositoryResponse:
        index = self._engine.repository_index(request.ready)
        return pb.ListRepositoryResponse(versions=version_states(index))

    @unary
    async def LoadModel(self, request: pb.LoadModelRequest, context: Context) -> pb.ModelVersions:
        versions = await self._engine.load_model(request.name)
        return pb.ModelVersions(versions=version_states(versions))

    @unary
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: Context
    ) -> pb.ModelVersions:
        versions = await self._engine.unload_model(request.name)
        return pb.ModelVersions(versions=version_states(versions))
