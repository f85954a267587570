"""What a request costs against its principal's frame rate, and how a stream keeps to it."""

from __future__ import annotations

import asyncio

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.core import Engine

__all__ = ["forecast_frames", "keep_pace", "oip_frames", "stream_frames"]


def forecast_frames(steps: int, max_steps: int) -> int:
    """A forecast runs one frame per step; one that asks for more than the server allows is
    refused, so it is charged no more than that."""
    return min(max(1, steps), max(1, max_steps))


def stream_frames(request: pb.StreamRequest | object, max_steps: int) -> int:
    """Frames one Stream message brings: a frame 1, a frame group one per session, a forecast
    its steps, anything else 0."""
    if not isinstance(request, pb.StreamRequest):
        return 0
    kind = request.WhichOneof("kind")
    if kind == "frame":
        return 1
    if kind == "frame_group":
        return len(request.frame_group.session_ids)
    if kind == "forecast":
        return forecast_frames(request.forecast.steps, max_steps)
    return 0


def oip_frames(request: oip.ModelInferRequest) -> int:
    """Frames of an Open Inference Protocol request: its batch size (the first dimension)."""
    for tensor in request.inputs:
        if tensor.shape:
            return max(1, tensor.shape[0])
    return 1


async def keep_pace(engine: Engine, principal: str, frames: int) -> None:
    """Count `frames` against the principal's rate and wait, reading nothing, while it is over:
    HTTP/2 flow control then slows the client instead of an error stopping it."""
    if frames:
        wait = engine.limits.pace(principal, frames)
        if wait > 0:
            await asyncio.sleep(wait)
