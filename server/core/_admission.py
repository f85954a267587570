"""The door of the session queues: the checks every frame passes before it is queued, in one
place, and the count of the ones it refuses."""

from __future__ import annotations

from collections.abc import Sequence

from rnnstream.server.core._errors import InvalidArgument, RnnstreamError, Unavailable
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._session import Session
from rnnstream.server.core._validation import NamedArray
from rnnstream.server.core._work import AUTO_INDEX, FrameReply, FrameWork

__all__ = ["SHUTTING_DOWN", "FrameDoor"]

SHUTTING_DOWN = "server is shutting down; resume the session on another replica"


class FrameDoor:
    """Checks a frame (the server accepts frames, its index, its tensors against the model)
    and queues it on its session's scheduler, or raises."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models
        self.accepting = True  # False once shutting down

    def queue(
        self,
        session: Session,
        index: int | None,
        tensors: Sequence[NamedArray],
        reply: FrameReply,
        emit: bool,
    ) -> None:
        # Every frame is counted once: here if refused, else by the scheduler that answers it.
        copy = self._models.served(session.instance)
        try:
            if not self.accepting:
                raise Unavailable(SHUTTING_DOWN, session_id=session.id, frame_index=index)
            if index is not None and index < 0:
                raise InvalidArgument(f"frame index {index} is negative", session_id=session.id)
            try:
                arrays, key = copy.validator.validate(tensors)
            except InvalidArgument as exc:
                exc.session_id, exc.frame_index = session.id, index
                raise
        except RnnstreamError as exc:
            copy.scheduler.count(exc.code.name)
            raise
        work = FrameWork(AUTO_INDEX if index is None else index, arrays, key, reply, emit)
        copy.scheduler.submit(session, work)
