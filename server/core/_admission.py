"""The door of the session queues: the checks every frame passes before it is queued, in one
place, the count of the ones it refuses, and the memory each one draws from the budget."""

from __future__ import annotations

from collections.abc import Sequence

from rnnstream.server.core._budget import Holding, MemoryBudget
from rnnstream.server.core._errors import InvalidArgument, RnnstreamError, Unavailable
from rnnstream.server.core._loading import Served
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._results import FrameOutput
from rnnstream.server.core._session import Session
from rnnstream.server.core._validation import NamedArray
from rnnstream.server.core._work import AUTO_INDEX, FrameReply, FrameWork

__all__ = ["SHUTTING_DOWN", "FrameDoor"]

SHUTTING_DOWN = "server is shutting down; resume the session on another replica"
# Room in an answer for everything besides its tensor bytes (names, shapes, ids).
_MESSAGE_OVERHEAD = 1024


class _Charged:
    """A frame's reply that gives its bytes back to the budget once the frame is answered, or
    its caller stopped waiting (every path that drops a frame asks done() first)."""

    __slots__ = ("_budget", "_cost", "_holding", "_owner", "_reply")

    def __init__(
        self,
        reply: FrameReply,
        budget: MemoryBudget,
        owner: str,
        cost: int,
        holding: Holding | None,
    ) -> None:
        self._reply = reply
        self._budget = budget
        self._owner = owner
        self._cost = cost
        self._holding = holding

    def _give_back(self) -> None:
        if self._cost:
            self._budget.give(self._owner, self._cost, self._holding)
            self._cost = 0

    def done(self) -> bool:
        if self._reply.done():
            self._give_back()
            return True
        return False

    def set_result(self, result: FrameOutput | None, /) -> None:
        self._give_back()
        self._reply.set_result(result)

    def set_exception(self, exception: BaseException, /) -> None:
        self._give_back()
        self._reply.set_exception(exception)


class FrameDoor:
    """Checks a frame (the server accepts frames, its index, its tensors against the model),
    draws its bytes from the budget and queues it on its session's scheduler, or raises.

    With a `holding` (a stream) the frame is taken whatever the budget holds: the stream stops
    reading until it has room again. Without one (a unary call) a frame that does not fit is
    refused with RESOURCE_EXHAUSTED."""

    def __init__(self, models: ModelRegistry, budget: MemoryBudget, max_message_bytes: int) -> None:
        self._models = models
        self._budget = budget
        self._max_message_bytes = max_message_bytes
        self.accepting = True  # False once shutting down

    def check_batch(
        self, copy: Served, items: Sequence[Sequence[NamedArray]], owner: str, claims: bool
    ) -> None:
        """A stateless batch: its size, its whole answer's size and (`claims`: a unary call)
        whether the budget holds all of it. The items themselves are checked as they queue."""
        limit = copy.serving.max_batch_size
        if len(items) > limit:
            raise InvalidArgument(
                f"the request's batch of {len(items)} is over model {copy.name!r}'s "
                f"max_batch_size of {limit}; split it"
            )
        try:
            _, _, cost = copy.validator.validate(items[0]) if items else ([], (), 0)
        except InvalidArgument:
            return  # refused as the items queue, naming the problem
        answer = (cost - sum(a.nbytes for _, a in items[0])) * len(items)
        if answer + _MESSAGE_OVERHEAD > self._max_message_bytes:
            raise InvalidArgument(
                f"the request's outputs would take {answer} bytes, over the server's message "
                f"limit of {self._max_message_bytes} bytes (--max-message-bytes); send a "
                "smaller batch"
            )
        if claims:
            self._budget.check(owner, cost * len(items))

    def queue(
        self,
        session: Session,
        index: int | None,
        tensors: Sequence[NamedArray],
        reply: FrameReply,
        emit: bool,
        holding: Holding | None = None,
    ) -> None:
        # Every frame is counted once: here if refused, else by the scheduler that answers it.
        copy = self._models.served(session.instance)
        try:
            if not self.accepting:
                raise Unavailable(SHUTTING_DOWN, session_id=session.id, frame_index=index)
            if index is not None and index < 0:
                raise InvalidArgument(f"frame index {index} is negative", session_id=session.id)
            try:
                arrays, key, cost = copy.validator.validate(tensors)
            except InvalidArgument as exc:
                exc.session_id, exc.frame_index = session.id, index
                raise
            if holding is None:
                self._budget.claim(session.owner, cost)
        except RnnstreamError as exc:
            copy.scheduler.count(exc.code.name)
            raise
        if holding is not None:
            self._budget.take(session.owner, cost, holding)
        charged = _Charged(reply, self._budget, session.owner, cost, holding)
        at = AUTO_INDEX if index is None else index
        copy.scheduler.submit(session, FrameWork(at, arrays, key, charged, emit, cost=cost))
