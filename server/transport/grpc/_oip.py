"""Open Inference Protocol (KServe v2) servicer with Triton's sequence extension, over the engine.

A sequence is an ordinary engine session named ``oip-<sequence_id>``: sequence_start opens it
(or resets a live one), each request is that session's next frame, sequence_end ends it once
the request is answered. ModelStreamInfer reads ahead and hands every request to the scheduler
at once, so the sequences one stream carries batch together.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.server._settings import Settings
from rnnstream.server.core import (
    Engine,
    FailedPrecondition,
    FrameOutput,
    InvalidArgument,
    ModelInfo,
    NotFound,
    quoted,
    quoted_list,
)
from rnnstream.server.transport.grpc._interceptor import call_principal
from rnnstream.server.transport.grpc._oip_codec import batch_items, decode_inputs, encode_outputs
from rnnstream.server.transport.grpc._oip_config import parse_version
from rnnstream.server.transport.grpc._oip_models import EXTENSIONS, MODEL_METHODS, ModelRpcs
from rnnstream.server.transport.grpc._oip_stream import Stream, chain, consume, error_response
from rnnstream.server.transport.grpc._rate import keep_pace, oip_frames
from rnnstream.server.transport.grpc._status import BadRequest, tolerant, tolerant_unary, unary

__all__ = ["EXTENSIONS", "SERVICE", "OipServicer", "session_id_for"]

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "inference.GRPCInferenceService"


def session_id_for(sequence_id: int | str) -> str:
    """The engine session that carries an OIP sequence (uint64 and string ids alike)."""
    return f"oip-{sequence_id}"


@dataclass(frozen=True)
class _Controls:
    session_id: str  # "" when the request belongs to no sequence
    start: bool
    end: bool


def _flag(params: Any, name: str) -> bool:
    if name not in params:
        return False
    kind = params[name].WhichOneof("parameter_choice")
    if kind != "bool_param":
        raise InvalidArgument(f"parameter {name} must be a bool, got {kind or 'no value'}")
    return bool(params[name].bool_param)


def _controls(request: oip.ModelInferRequest) -> _Controls:
    params = request.parameters
    session_id = ""
    if "sequence_id" in params:
        param = params["sequence_id"]
        kind = param.WhichOneof("parameter_choice")
        if kind in ("int64_param", "uint64_param"):
            value = getattr(param, kind)
            if value < 0:
                raise InvalidArgument(f"sequence_id must not be negative, got {value}")
            session_id = session_id_for(value) if value else ""
        elif kind == "string_param":
            session_id = session_id_for(param.string_param) if param.string_param else ""
        else:
            raise InvalidArgument(f"sequence_id must be a uint64 or a string, got {kind}")
    start, end = _flag(params, "sequence_start"), _flag(params, "sequence_end")
    if (start or end) and not session_id:
        raise InvalidArgument("sequence_start and sequence_end need a non-zero sequence_id")
    return _Controls(session_id, start, end)


def _session_key(request: oip.ModelInferRequest) -> str:
    """Best-effort sequence of a request that failed, to answer it in that sequence's order."""
    try:
        return _controls(request).session_id
    except Exception:
        return ""


class OipServicer(ModelRpcs):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        try:
            self._version = importlib.metadata.version("rnnstream")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree only
            self._version = "0"

    @property
    def server_version(self) -> str:
        return self._version

    def handler(self) -> grpc.GenericRpcHandler:
        """Method handlers whose deserializers answer garbage bytes instead of failing."""

        methods = {
            **MODEL_METHODS,
            "ModelInfer": (oip.ModelInferRequest, oip.ModelInferResponse),
        }
        handlers = {
            name: tolerant_unary(getattr(self, name), req, resp)
            for name, (req, resp) in methods.items()
        }
        handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
            self.ModelStreamInfer,
            request_deserializer=tolerant(
                oip.ModelInferRequest.FromString, "inference.ModelInferRequest"
            ),
            response_serializer=oip.ModelStreamInferResponse.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    # -- inference ---------------------------------------------------------------------------
    def _target(self, request: oip.ModelInferRequest, controls: _Controls, owner: str) -> ModelInfo:
        """The model version a request runs on: a live sequence's own, else the one named."""
        version = parse_version(request.model_version)
        if controls.session_id and not version:
            try:
                live = self._engine.session(owner, controls.session_id)
            except NotFound:
                live = None
            if live is not None and live.model == request.model_name:
                version = live.version
        return self._engine.model(request.model_name, version)

    async def _sequence(self, model: ModelInfo, controls: _Controls, owner: str) -> None:
        """The request's sequence is live on `model` once this returns (opened if it starts)."""
        engine = self._engine
        sid = controls.session_id
        try:
            live = engine.session(owner, sid)
        except NotFound as exc:
            if not controls.start:
                raise FailedPrecondition(
                    f"sequence {quoted(sid.removeprefix('oip-'))} is not active ({exc.message}): "
                    "its first request must set sequence_start=true",
                    session_id=sid,
                ) from None
            opened = await engine.open(owner, sid, model.name, version=model.version)
            if opened.resumed:  # loaded from the state store: it starts over all the same
                consume(engine.reset(owner, sid))
            return
        if (live.model, live.version) != (model.name, model.version):
            raise InvalidArgument(
                f"sequence {quoted(sid.removeprefix('oip-'))} runs model {live.model!r} version "
                f"{live.version}, not {quoted(model.name)} version {model.version}",
                session_id=sid,
            )
        if controls.start:
            # A new sequence on a live id starts from the initial state, after what was queued.
            consume(engine.reset(owner, sid))

    async def submit(
        self, request: oip.ModelInferRequest, owner: str
    ) -> tuple[str, asyncio.Future[oip.ModelInferResponse]]:
        """Check and queue a request now; the future resolves with its response."""
        controls = _controls(request)
        model = self._target(request, controls, owner)
        spec = model.spec
        requested = [o.name for o in request.outputs]
        unknown = [n for n in requested if n not in {t.name for t in spec.outputs}]
        if unknown:
            raise InvalidArgument(
                f"model {spec.name!r} has no output(s) {quoted_list(unknown)}; its outputs are "
                f"{[t.name for t in spec.outputs]}"
            )
        items, squeeze = batch_items(spec, decode_inputs(request))

        def respond(results: Sequence[FrameOutput]) -> oip.ModelInferResponse:
            response = oip.ModelInferResponse(
                model_name=spec.name, model_version=str(model.version), id=request.id
            )
            encode_outputs(spec.outputs, [r.outputs for r in results], squeeze, requested, response)
            return response

        engine = self._engine
        if not controls.session_id:
            version = model.version
            frames = [engine.infer(owner, "", spec.name, None, i, version) for i in items]
            return "", chain(asyncio.gather(*frames), respond)
        sid = controls.session_id
        if len(items) != 1:
            raise InvalidArgument(
                f"a sequence request carries batch size 1 (one frame of one sequence), "
                f"got {len(items)}",
                session_id=sid,
            )
        await self._sequence(model, controls, owner)
        try:
            frame = engine.infer(owner, sid, spec.name, None, items[0])
        finally:
            if controls.end:
                # The end queues behind the frame: the sequence is freed once it is answered.
                consume(engine.end(owner, sid))
        return sid, chain(frame, lambda result: respond([result]))

    @unary
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: Context
    ) -> oip.ModelInferResponse:
        owner = call_principal()
        self._engine.limits.admit(owner, oip_frames(request))
        _, future = await self.submit(request, owner)
        return await future

    async def ModelStreamInfer(
        self, requests: AsyncIterator[oip.ModelInferRequest | BadRequest], context: Context
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        stream = Stream(self._settings.max_pending_frames)
        reader = asyncio.get_running_loop().create_task(
            self._read(requests, stream, call_principal())
        )
        try:
            while (response := await stream.outbox.get()) is not None:
                assert isinstance(response, oip.ModelStreamInferResponse)
                yield response
                stream.outbox.wrote()
        finally:
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    async def _read(
        self,
        requests: AsyncIterator[oip.ModelInferRequest | BadRequest],
        stream: Stream,
        owner: str,
    ) -> None:
        try:
            async for request in requests:
                await stream.outbox.wait_for_room(stream.max_unsent)
                if isinstance(request, BadRequest):
                    stream.answer("", error_response(None, InvalidArgument(request.message)))
                    continue
                await keep_pace(self._engine, owner, oip_frames(request))
                try:
                    session_id, future = await self.submit(request, owner)
                except Exception as exc:
                    stream.answer(_session_key(request), error_response(request, exc))
                    continue
                stream.track(session_id, future, request)
                await stream.room.wait()
        finally:
            stream.reading = False
            stream.finish_if_done()
