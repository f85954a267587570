"""rnnstream.v1 reply messages built from the engine's results (shared by unary and stream)."""

from __future__ import annotations

from rnnstream.proto.tensor_codec import encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.core import (
    Emit,
    Ended,
    Flushed,
    Forecasted,
    FrameOutput,
    InvalidArgument,
    Opened,
    SessionInfo,
)

__all__ = [
    "emit_name",
    "encode_outputs",
    "ended",
    "flushed",
    "forecasted",
    "opened",
    "session_info",
    "state_name",
]

_EMIT_NAMES: dict[int, Emit] = {pb.EMIT_EVERY: "every", pb.EMIT_LAST: "last"}
_STATES = {
    "active": pb.SESSION_ACTIVE,
    "idle": pb.SESSION_IDLE,
    "spilled": pb.SESSION_SPILLED,
}
_STATE_NAMES: dict[int, str] = {int(number): name for name, number in _STATES.items()}


def state_name(value: int) -> str:
    """A SessionState filter as the core names it ('' for unspecified)."""
    if value == pb.SESSION_STATE_UNSPECIFIED:
        return ""
    try:
        return _STATE_NAMES[value]
    except KeyError:
        raise InvalidArgument(f"unknown session state {value}") from None


def session_info(info: SessionInfo) -> pb.SessionInfo:
    return pb.SessionInfo(
        session_id=info.session_id,
        model=info.model,
        next_frame_index=info.next_index,
        pending_frames=info.pending_frames,
        idle_seconds=info.idle_seconds,
        expires_in_seconds=info.expires_in,
        model_version=info.version,
        principal=info.principal,
        state=_STATES[info.state],
        memory_bytes=info.memory_bytes,
        store_bytes=info.store_bytes,
    )


def emit_name(value: int) -> Emit:
    try:
        return _EMIT_NAMES[value]
    except KeyError:
        raise InvalidArgument(f"unknown emit mode {value}; use EMIT_EVERY or EMIT_LAST") from None


def encode_outputs(output: FrameOutput) -> list[pb.Tensor]:
    return [encode(a, name) for a, name in zip(output.outputs, output.names, strict=True)]


def opened(result: Opened) -> pb.SessionOpened:
    return pb.SessionOpened(
        session_id=result.session_id,
        model=result.model,
        next_frame_index=result.next_index,
        resumed=result.resumed,
        model_version=result.version,
    )


def flushed(result: Flushed) -> pb.SessionFlushed:
    message = pb.SessionFlushed(
        session_id=result.session_id, next_frame_index=result.next_index, reset=result.reset
    )
    if result.last is not None:
        message.outputs.extend(encode_outputs(result.last))
        if result.last.index >= 0:
            message.frame_index = result.last.index
    return message


def forecasted(result: Forecasted) -> pb.ForecastResponse:
    return pb.ForecastResponse(
        session_id=result.session_id,
        outputs=[encode(a, name) for a, name in zip(result.outputs, result.names, strict=True)],
        next_frame_index=result.next_index,
        committed=result.committed,
    )


def ended(result: Ended) -> pb.SessionEnded:
    """An emit-last session's end carries its last output."""
    message = pb.SessionEnded(
        session_id=result.session_id,
        reason=result.reason,
        next_frame_index=result.next_index,
        message=result.message,
    )
    if result.last is not None:
        message.last_outputs.extend(encode_outputs(result.last))
        if result.last.index >= 0:
            message.last_frame_index = result.last.index
    return message
