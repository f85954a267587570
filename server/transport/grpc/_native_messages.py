"""Builders of rnnstream.v1 reply messages from core results (shared by unary and stream)."""

from __future__ import annotations

from rnnstream.proto.tensor_codec import encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.core import Engine, FlushResult, ForecastResult, FrameResult, InvalidArgument

__all__ = ["emit_name", "encode_outputs", "ended", "flushed", "forecasted"]

_EMIT_NAMES = {pb.EMIT_EVERY: "every", pb.EMIT_LAST: "last"}


def emit_name(value: int) -> str:
    try:
        return _EMIT_NAMES[pb.Emit.ValueType(value)]
    except KeyError:
        raise InvalidArgument(f"unknown emit mode {value}; use EMIT_EVERY or EMIT_LAST") from None


def encode_outputs(engine: Engine, model: str, result: FrameResult) -> list[pb.Tensor]:
    specs = engine.model_spec(model).outputs
    return [encode(a, t.name) for a, t in zip(result.outputs, specs, strict=True)]


def flushed(engine: Engine, model: str, session_id: str, result: FlushResult) -> pb.SessionFlushed:
    message = pb.SessionFlushed(
        session_id=session_id, next_frame_index=result.next_index, reset=result.reset
    )
    if result.last is not None:
        message.outputs.extend(encode_outputs(engine, model, result.last))
        if result.last.index >= 0:
            message.frame_index = result.last.index
    return message


def forecasted(
    engine: Engine, model: str, session_id: str, result: ForecastResult
) -> pb.ForecastResponse:
    specs = engine.model_spec(model).outputs
    return pb.ForecastResponse(
        session_id=session_id,
        outputs=[encode(a, t.name) for a, t in zip(result.outputs, specs, strict=True)],
        next_frame_index=result.next_index,
        committed=result.committed,
    )


def ended(
    engine: Engine, model: str, session_id: str, next_index: int, last: FrameResult | None
) -> pb.SessionEnded:
    """`last` is given for emit-last sessions: their final answer rides on the end."""
    message = pb.SessionEnded(session_id=session_id, reason="client", next_frame_index=next_index)
    if last is not None:
        message.last_outputs.extend(encode_outputs(engine, model, last))
        if last.index >= 0:
            message.last_frame_index = last.index
    return message
