"""Open Inference Protocol (KServe v2) servicer with Triton's sequence extension, over the engine.

A sequence is an ordinary engine session named ``oip-<sequence_id>`` (_oip_sequences.py):
sequence_start opens it (or resets a live one), each request is that session's next frame,
sequence_end ends it once the request is answered. ModelStreamInfer reads ahead and hands
every request to the scheduler at once, so the sequences one stream carries batch together.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.server._settings import Settings
from rnnstream.server.core import (
    Engine,
    FrameOutput,
    Holding,
    InvalidArgument,
    ModelInfo,
    Unavailable,
    quoted_list,
)
from rnnstream.server.transport.grpc._interceptor import call_principal
from rnnstream.server.transport.grpc._oip_codec import batch_items, decode_inputs, encode_outputs
from rnnstream.server.transport.grpc._oip_config import parse_version
from rnnstream.server.transport.grpc._oip_models import EXTENSIONS, MODEL_METHODS, ModelRpcs
from rnnstream.server.transport.grpc._oip_sequences import controls_of, enter, leave, sequence_key
from rnnstream.server.transport.grpc._oip_stream import SHUTDOWN, Stream, chain, error_response
from rnnstream.server.transport.grpc._rate import keep_pace, oip_frames
from rnnstream.server.transport.grpc._status import (
    BadRequest,
    abort,
    tolerant,
    tolerant_unary,
    unary,
)

__all__ = ["EXTENSIONS", "SERVICE", "OipServicer"]

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE = "inference.GRPCInferenceService"


class OipServicer(ModelRpcs):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine = engine
        self._settings = settings
        self.streams: set[Stream] = set()
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
    async def submit(
        self, request: oip.ModelInferRequest, owner: str, holding: Holding | None = None
    ) -> tuple[str, asyncio.Future[oip.ModelInferResponse]]:
        """Check and queue a request now; the future resolves with its response. A stream
        passes its `holding` (see MemoryBudget); without one a request over budget is refused."""
        controls = controls_of(request)
        sid = controls.session_id
        engine = self._engine
        version = parse_version(request.model_version)
        if not sid:
            model = engine.model(request.model_name, version)
            return "", self._queue(request, owner, model, "", holding)
        model = await enter(engine, owner, request.model_name, version, controls)
        try:
            return sid, self._queue(request, owner, model, sid, holding)
        finally:
            leave(engine, owner, controls)

    def _queue(
        self,
        request: oip.ModelInferRequest,
        owner: str,
        model: ModelInfo,
        sid: str,
        holding: Holding | None,
    ) -> asyncio.Future[oip.ModelInferResponse]:
        spec = model.spec
        requested = [o.name for o in request.outputs]
        unknown = [n for n in requested if n not in {t.name for t in spec.outputs}]
        if unknown:
            raise InvalidArgument(
                f"model {spec.name!r} has no output(s) {quoted_list(unknown)}; its outputs are "
                f"{[t.name for t in spec.outputs]}"
            )
        most = 1 if sid else model.max_batch_size

        def too_many(size: int) -> InvalidArgument:
            if sid:
                return InvalidArgument(
                    "a sequence request carries batch size 1 (one frame of one sequence), "
                    f"got {size}",
                    session_id=sid,
                )
            return InvalidArgument(
                f"the request's batch of {size} is over model {spec.name!r}'s max_batch_size "
                f"of {most}; split it"
            )

        items, squeeze = batch_items(spec, decode_inputs(request), most, too_many)

        def respond(results: Sequence[FrameOutput]) -> oip.ModelInferResponse:
            response = oip.ModelInferResponse(
                model_name=spec.name, model_version=str(model.version), id=request.id
            )
            encode_outputs(spec.outputs, [r.outputs for r in results], squeeze, requested, response)
            return response

        engine = self._engine
        if not sid:
            frames = engine.infer_batch(owner, spec.name, items, model.version, holding)
            return chain(asyncio.gather(*frames), respond)
        frame = engine.infer(owner, sid, spec.name, None, items[0], holding=holding)
        return chain(frame, lambda result: respond([result]))

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
        owner = call_principal()
        stream = Stream(self._settings.max_pending_frames, self._engine.budget, owner)
        self.streams.add(stream)
        reader = asyncio.get_running_loop().create_task(self._read(requests, stream, owner))
        try:
            while (response := await stream.outbox.get()) is not None:
                if response is SHUTDOWN:  # after every answer owed: the call ends
                    await abort(context, Unavailable(stream.shutdown_message))
                assert isinstance(response, oip.ModelStreamInferResponse)
                yield response
                stream.outbox.wrote()
        finally:
            self.streams.discard(stream)
            stream.close()
            reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)

    def settled(self) -> bool:
        """No stream waits for an answer from the engine."""
        return all(stream.outstanding == 0 for stream in self.streams)

    def open_streams(self) -> int:
        return len(self.streams)

    def shutdown_streams(self, message: str) -> None:
        """End every stream with UNAVAILABLE once it has written what it owes."""
        for stream in list(self.streams):
            stream.shutdown(message)

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
                budget = self._engine.budget
                if not budget.has_room(owner, stream.holding):  # its client takes no answers
                    await budget.wait_for_room(owner, stream.holding)
                try:
                    session_id, future = await self.submit(request, owner, stream.holding)
                except Exception as exc:
                    stream.answer(sequence_key(request), error_response(request, exc))
                    continue
                stream.track(session_id, future, request)
                await stream.room.wait()
                if session_id:  # stop reading while the sequence's queue is full, as Stream does
                    await self._engine.wait_for_space(owner, session_id)
        finally:
            stream.reading = False
            stream.finish_if_done()
