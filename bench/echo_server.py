"""Echo server: rnnstream's Stream protocol on the same asyncio gRPC stack and the same stream
handling as rnnstream-server (a reader task reading ahead, the handler yielding from the same
Outbox, outputs queued back to back packed into one FrameOutputs for streams that ask for it),
with no model behind it: every frame is answered at once with a precomputed tensor of the real
output size, every FrameGroup with a GroupOutputs of K rows. `rnnstream loadtest` drives it
unchanged, so its server CPU per message is the floor of the stack rnnstream is compared with.

Run: python bench/echo_server.py --model-repository models --port 50061
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, start_http_server

from rnnstream.proto.metadata import PACK_OUTPUTS_METADATA_KEY
from rnnstream.proto.tensor_codec import decode, encode_into
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from rnnstream.server._loop import run_event_loop
from rnnstream.server._metrics import LoopCounter, _LoopCounters
from rnnstream.server.core import ModelInfo, ModelSpec
from rnnstream.server.core._loading import discover_models
from rnnstream.server.core._runtime import load_model
from rnnstream.server.transport.grpc._native import model_info
from rnnstream.server.transport.grpc._outbox import Outbox

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # rnnstream-server's default


class EchoStream:
    """One Stream call, shaped as rnnstream's StreamCall: read() dispatches each message and
    puts its answer in the outbox at once; the servicer yields from the outbox."""

    def __init__(self, servicer: EchoServicer, pack: bool) -> None:
        self._servicer = servicer
        self.outbox = Outbox(MAX_MESSAGE_BYTES if pack else None)
        self.reading = True

    async def read(self, requests: AsyncIterator[pb.StreamRequest]) -> None:
        try:
            async for request in requests:
                self._servicer.requests.inc()
                response = self._servicer.reply(request)
                if response is not None:
                    self.outbox.put_nowait(response)
        finally:
            self.outbox.put_nowait(None)


class EchoServicer(pb_grpc.RnnstreamServicer):
    """Answers each message at once with a reply of the real size; keeps no state."""

    def __init__(
        self,
        specs: dict[str, ModelSpec],
        infos: dict[str, pb.ModelInfo],
        registry: CollectorRegistry,
    ) -> None:
        # Counted like the server counts them, so the benchmark reads both the same way.
        self._frames = Counter(
            "rnnstream_frames", "Frames answered", ["model", "status"], registry=registry
        )
        # Plain integers, as rnnstream-server keeps them (no lock per message).
        self.requests = LoopCounter("rnnstream_stream_requests", "Stream messages in")
        self.responses = LoopCounter("rnnstream_stream_responses", "Stream messages out")
        registry.register(_LoopCounters([self.requests, self.responses]))
        self._specs = specs
        self._infos = infos
        self._sessions: dict[str, str] = {}  # session id -> model
        self._outputs: dict[tuple[str, int, int], list[tuple[str, np.ndarray]]] = {}

    def _output(self, model: str, steps: int, rows: int) -> list[tuple[str, np.ndarray]]:
        """Zero outputs of the model for `rows` frames of `steps` time steps (rows 0: one frame
        without its batch axis)."""
        key = (model, steps, rows)
        if key not in self._outputs:
            arrays = []
            for out in self._specs[model].outputs:
                shape = [
                    steps if i == out.frame_time_axis else (d if d is not None else 1)
                    for i, d in enumerate(out.frame_shape)
                ]
                if rows:
                    shape.insert(out.batch_axis, rows)
                arrays.append((out.name, np.zeros(shape, out.dtype)))
            self._outputs[key] = arrays
        return self._outputs[key]

    def _steps(self, model: str, tensors: Any, batched: bool) -> int:
        for spec, tensor in zip(self._specs[model].inputs, tensors, strict=False):
            axis = spec.frame_time_axis
            if axis is not None and batched and axis >= spec.batch_axis:
                axis += 1
            if axis is not None and axis < len(tensor.shape):
                return int(tensor.shape[axis])
        return 1

    def reply(self, request: pb.StreamRequest) -> pb.StreamResponse | None:
        kind = request.WhichOneof("kind")
        if kind == "frame":
            frame = request.frame
            model = self._sessions.get(frame.session_id, "")
            if not model:
                return _unknown(frame.session_id, frame.frame_index)
            for tensor in frame.inputs:
                decode(tensor)  # as the server does: one frombuffer per tensor
            self._frames.labels(model, "OK").inc()
            response = pb.StreamResponse()
            output = response.output
            output.session_id = frame.session_id
            output.frame_index = frame.frame_index
            for name, array in self._output(model, self._steps(model, frame.inputs, False), 0):
                encode_into(output.outputs.add(), array, name)
            return response
        if kind == "frame_group":
            group = request.frame_group
            rows = len(group.session_ids)
            for tensor in group.inputs:
                decode(tensor)
            self._frames.labels(group.model, "OK").inc(rows)
            response = pb.StreamResponse()
            answer = response.group_outputs
            answer.request_id = group.request_id
            steps = self._steps(group.model, group.inputs, True)
            for name, array in self._output(group.model, steps, rows):
                encode_into(answer.outputs.add(), array, name)
            return response
        if kind == "open":
            session_id = request.open.session_id or secrets.token_hex(16)
            self._sessions[session_id] = request.open.model
            return pb.StreamResponse(
                opened=pb.SessionOpened(session_id=session_id, model=request.open.model)
            )
        if kind == "open_many":
            request_id = request.open_many.request_id
            answer = pb.SessionsOpened(request_id=request_id)
            for one in request.open_many.sessions:
                session_id = one.session_id or secrets.token_hex(16)
                self._sessions[session_id] = one.model
                answer.results.add().opened.CopyFrom(
                    pb.SessionOpened(session_id=session_id, model=one.model)
                )
            return pb.StreamResponse(opened_many=answer)
        if kind == "end":
            self._sessions.pop(request.end.session_id, None)
            return pb.StreamResponse(
                ended=pb.SessionEnded(session_id=request.end.session_id, reason="client")
            )
        return None

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        pack = any(
            key == PACK_OUTPUTS_METADATA_KEY and value == "1"
            for key, value in context.invocation_metadata() or ()
        )
        call = EchoStream(self, pack)
        reader = asyncio.get_running_loop().create_task(call.read(request_iterator))
        outbox = call.outbox
        try:
            while True:
                response = await outbox.get() if outbox.empty() else outbox.get_nowait()
                if response is None:
                    return
                assert isinstance(response, pb.StreamResponse)
                yield response
                self.responses.inc()
                outbox.wrote()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        if request.name not in self._infos:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return self._infos[request.name]

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=list(self._infos.values()))


def _unknown(session_id: str, index: int) -> pb.StreamResponse:
    return pb.StreamResponse(
        error=pb.StreamError(
            code=grpc.StatusCode.NOT_FOUND.value[0],
            message="unknown session",
            session_id=session_id,
            frame_index=index,
        )
    )


async def serve(
    repository: Path, models: list[str], host: str, port: int, metrics_port: int
) -> None:
    specs: dict[str, ModelSpec] = {}
    infos: dict[str, pb.ModelInfo] = {}
    for name, folder in discover_models(repository, models).items():
        model = load_model(name, folder, "cpu", 1)
        specs[name] = model.spec
        infos[name] = model_info(ModelInfo(model.spec, model.provider, 1))
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ]
    )
    registry = CollectorRegistry()
    if metrics_port:
        start_http_server(metrics_port, addr=host, registry=registry)
    servicer = EchoServicer(specs, infos, registry)
    pb_grpc.add_RnnstreamServicer_to_server(servicer, server)  # type: ignore[abstract]
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"echo server on {host}:{bound}", flush=True)
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    await stopped.wait()
    await server.stop(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model-repository", type=Path, default=Path("models"))
    parser.add_argument("--models", default="", help="comma-separated; empty: every model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50061)
    parser.add_argument("--metrics-port", type=int, default=0, help="0: no metrics endpoint")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    run_event_loop(serve(args.model_repository, models, args.host, args.port, args.metrics_port))
    sys.exit(0)


if __name__ == "__main__":
    main()
