"""Open Inference Protocol sequences as engine sessions: a request's sequence controls
(sequence_id, sequence_start, sequence_end) and the one rule they follow.

Once a request's model is known and its sequence is live (found here or in the state store,
or started by the request), its sequence_start and sequence_end take effect whether or not the
rest of the request is accepted: a refused request with sequence_end still ends its sequence,
one with sequence_start still starts it over. A request whose controls cannot be read, or that
continues a sequence no replica holds, changes nothing.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.server.core import (
    Engine,
    FailedPrecondition,
    InvalidArgument,
    ModelInfo,
    NotFound,
    SessionInfo,
    quoted,
)
from rnnstream.server.transport.grpc._oip_stream import consume

__all__ = ["SequenceControls", "controls_of", "enter", "leave", "sequence_key", "session_id_for"]


def session_id_for(sequence_id: int | str) -> str:
    """The engine session that carries an OIP sequence (uint64 and string ids alike)."""
    return f"oip-{sequence_id}"


@dataclass(frozen=True)
class SequenceControls:
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


def controls_of(request: oip.ModelInferRequest) -> SequenceControls:
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
    return SequenceControls(session_id, start, end)


def sequence_key(request: oip.ModelInferRequest) -> str:
    """Best-effort sequence of a request that failed, to answer it in that sequence's order."""
    try:
        return controls_of(request).session_id
    except Exception:
        return ""


def _shown(session_id: str) -> str:
    return quoted(session_id.removeprefix("oip-"))


def _live(engine: Engine, owner: str, session_id: str) -> SessionInfo | None:
    try:
        return engine.session(owner, session_id)
    except NotFound:
        return None


async def enter(
    engine: Engine, owner: str, name: str, version: int | None, controls: SequenceControls
) -> ModelInfo:
    """The model version the request's sequence runs on, live once this returns: started
    (opened, or a live one reset), or continued, here or from the state store when another
    replica held it. `version` None: the sequence's own (a new one: the newest)."""
    sid = controls.session_id
    live = _live(engine, owner, sid)
    # An unknown model or version is named first; a live sequence keeps its own version, even
    # one being unloaded.
    named = engine.model(name, live.version if live and version is None else version)
    if live is None and not controls.start:
        try:
            await engine.open(owner, sid, name, resume_only=True)
        except NotFound as exc:
            raise FailedPrecondition(
                f"sequence {_shown(sid)} is not active ({exc.message}): its first request must "
                "set sequence_start=true",
                session_id=sid,
            ) from None
        live = engine.session(owner, sid)
    if live is None:
        opened = await engine.open(owner, sid, name, version=named.version)
        if opened.resumed:  # loaded from the state store: it starts over all the same
            consume(engine.reset(owner, sid))
        return engine.model(name, opened.version)
    if live.model != name or (version is not None and live.version != version):
        raise InvalidArgument(
            f"sequence {_shown(sid)} runs model {live.model!r} version {live.version}, not "
            f"{quoted(name)} version {named.version}",
            session_id=sid,
        )
    if controls.start:
        # A new sequence on a live id starts from the initial state, after what was queued.
        consume(engine.reset(owner, sid))
    return engine.model(name, live.version)


def leave(engine: Engine, owner: str, controls: SequenceControls) -> None:
    """After the request's frame is queued, or refused: sequence_end ends the sequence once
    everything queued before it is answered."""
    if not controls.end:
        return
    with contextlib.suppress(NotFound):  # ended meanwhile
        consume(engine.end(owner, controls.session_id))
