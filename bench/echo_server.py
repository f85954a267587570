"""Echo server: rnnstream's Stream protocol on the same asyncio gRPC stack, with no model behind it.

It answers `open` with `opened`, every `frame` with an `output` holding a precomputed tensor of
the real model's output shape and size (always one message per frame: answering at once, it never
holds two outputs to pack), and `end` with `ended`; GetModel answers with the real
model's ModelInfo (read from the ONNX file the way the server reads it). `rnnstream loadtest`
drives it unchanged, so its frames/s and latency are the transport ceiling rnnstream is compared
with. Run: python bench/echo_server.py --model-repository models --port 50061
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

from rnnstream.proto.tensor_codec import encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from rnnstream.server._loop import run_event_loop
from rnnstream.server.core import ModelInfo, ModelSpec
from rnnstream.server.core._loading import discover_models
from rnnstream.server.core._runtime import load_model
from rnnstream.server.transport.grpc._native import model_info


class EchoServicer(pb_grpc.RnnstreamServicer):
    """Answers each message at once with a reply of the real size; keeps no state."""

    def __init__(
        self, specs: dict[str, ModelSpec], infos: dict[str, pb.ModelInfo], frames: Counter
    ) -> None:
        # Counted like the server counts them, so the benchmark reads both the same way.
        self._frames = frames
        self._specs = specs
        self._infos = infos
        self._sessions: dict[str, str] = {}  # session id -> model
        self._outputs: dict[tuple[str, int], list[pb.Tensor]] = {}

    def _output(self, model: str, steps: int) -> list[pb.Tensor]:
        """Zero tensors shaped like the model's outputs for a frame of `steps` time steps."""
        key = (model, steps)
        if key not in self._outputs:
            tensors = []
            for out in self._specs[model].outputs:
                shape = [
                    steps if i == out.frame_time_axis else (d if d is not None else 1)
                    for i, d in enumerate(out.frame_shape)
                ]
                tensors.append(encode(np.zeros(shape, out.dtype), out.name))
            self._outputs[key] = tensors
        return self._outputs[key]

    def _steps(self, model: str, frame: pb.Frame) -> int:
        for spec, tensor in zip(self._specs[model].inputs, frame.inputs, strict=False):
            axis = spec.frame_time_axis
            if axis is not None and axis < len(tensor.shape):
                return int(tensor.shape[axis])
        return 1

    def _reply(self, request: pb.StreamRequest) -> pb.StreamResponse | None:
        kind = request.WhichOneof("kind")
        if kind == "frame":
            frame = request.frame
            model = self._sessions.get(frame.session_id, "")
            if not model:
                return pb.StreamResponse(
                    error=pb.StreamError(
                        code=grpc.StatusCode.NOT_FOUND.value[0],
                        message="unknown session",
                        session_id=frame.session_id,
                        frame_index=frame.frame_index,
                    )
                )
            self._frames.labels(model, "OK").inc()
            return pb.StreamResponse(
                output=pb.FrameOutput(
                    session_id=frame.session_id,
                    frame_index=frame.frame_index,
                    outputs=self._output(model, self._steps(model, frame)),
                )
            )
        if kind == "open":
            session_id = request.open.session_id or secrets.token_hex(16)
            self._sessions[session_id] = request.open.model
            return pb.StreamResponse(
                opened=pb.SessionOpened(session_id=session_id, model=request.open.model)
            )
        if kind == "end":
            self._sessions.pop(request.end.session_id, None)
            return pb.StreamResponse(
                ended=pb.SessionEnded(session_id=request.end.session_id, reason="client")
            )
        return None

    async def Stream(
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: Any
    ) -> AsyncIterator[pb.StreamResponse]:
        async for request in request_iterator:
            response = self._reply(request)
            if response is not None:
                yield response

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.ModelInfo:
        if request.name not in self._infos:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.name!r}")
        return self._infos[request.name]

    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=list(self._infos.values()))


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
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ]
    )
    registry = CollectorRegistry()
    frames = Counter("rnnstream_frames", "Frames answered", ["model", "status"], registry=registry)
    if metrics_port:
        start_http_server(metrics_port, addr=host, registry=registry)
    pb_grpc.add_RnnstreamServicer_to_server(EchoServicer(specs, infos, frames), server)  # type: ignore[abstract]
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
