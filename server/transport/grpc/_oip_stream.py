"""One ModelStreamInfer call's bookkeeping: read-ahead limit, per-sequence answer order."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.server.core import Holding, MemoryBudget
from rnnstream.server.transport.grpc._outbox import Outbox
from rnnstream.server.transport.grpc._status import as_rnnstream_error, clipped

__all__ = ["READ_AHEAD", "SHUTDOWN", "Stream", "chain", "consume", "error_response"]

READ_AHEAD = 4096  # requests one stream may have queued before it stops reading
# Placed in a stream's outbox by a graceful shutdown: the call ends with UNAVAILABLE after it.
SHUTDOWN = object()


def consume(future: asyncio.Future[Any]) -> None:
    """Controls answer nothing on their own; read their outcome so none goes unretrieved."""
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())


def chain(
    source: asyncio.Future[Any], build: Callable[[Any], oip.ModelInferResponse]
) -> asyncio.Future[oip.ModelInferResponse]:
    out: asyncio.Future[oip.ModelInferResponse] = asyncio.get_running_loop().create_future()

    def done(f: asyncio.Future[Any]) -> None:
        if out.done():
            return
        if f.cancelled():
            out.cancel()
        elif (exc := f.exception()) is not None:
            out.set_exception(exc)
        else:
            try:
                out.set_result(build(f.result()))
            except Exception as err:
                out.set_exception(err)

    source.add_done_callback(done)
    return out


class Stream:
    """One ModelStreamInfer call: responses to write, and the requests still being worked on."""

    def __init__(
        self, max_unsent: int = READ_AHEAD, budget: MemoryBudget | None = None, owner: str = ""
    ) -> None:
        # What it holds of the memory budget: its requests in the engine, and answers its
        # client has not taken.
        self.holding = Holding()
        self._budget = budget
        self._owner = owner
        self.over = False  # the call has ended: answers still coming are dropped
        self.outbox = Outbox(None, self._written)  # responses, then None when the call is over
        self.outstanding = 0
        self.reading = True
        self.room = asyncio.Event()
        self.room.set()
        self.max_unsent = max(1, max_unsent)
        self._last: dict[str, asyncio.Future[Any]] = {}  # newest unanswered future per sequence
        self.shutdown_message = ""

    def track(
        self,
        session_id: str,
        future: asyncio.Future[oip.ModelInferResponse],
        request: oip.ModelInferRequest,
    ) -> None:
        self._hold(session_id, future)

        def done(f: asyncio.Future[oip.ModelInferResponse]) -> None:
            if not f.cancelled() and not self.over:
                error = f.exception()
                if error:
                    self.outbox.put_nowait(error_response(request, error))
                else:
                    answer = f.result()
                    held = sum(len(raw) for raw in answer.raw_output_contents)
                    if held and self._budget is not None:
                        self._budget.take(self._owner, held, self.holding)
                    response = oip.ModelStreamInferResponse(infer_response=answer)
                    self.outbox.put_nowait(response, held)
            self._release(session_id, f)

        future.add_done_callback(done)

    def answer(self, session_id: str, response: oip.ModelStreamInferResponse) -> None:
        """Queue a response behind the ones its sequence still owes."""
        last = self._last.get(session_id) if session_id else None
        if last is None:
            self.outbox.put_nowait(response)
            return
        self._hold(session_id, last, replace=False)

        def after(_: asyncio.Future[Any]) -> None:
            self.outbox.put_nowait(response)
            self._release(session_id, None)

        last.add_done_callback(after)

    def _hold(self, session_id: str, future: asyncio.Future[Any], replace: bool = True) -> None:
        self.outstanding += 1
        if session_id and replace:
            self._last[session_id] = future
        if self.outstanding >= READ_AHEAD:
            self.room.clear()

    def _release(self, session_id: str, future: asyncio.Future[Any] | None) -> None:
        self.outstanding -= 1
        if future is not None and self._last.get(session_id) is future:
            del self._last[session_id]
        if self.outstanding < READ_AHEAD:
            self.room.set()
        self.finish_if_done()

    def _written(self, nbytes: int) -> None:
        if self._budget is not None:
            self._budget.give(self._owner, nbytes, self.holding)

    def close(self) -> None:
        """The call is over: give back what its unsent answers held."""
        self.over = True
        self._written(self.outbox.drop_all())

    def shutdown(self, message: str) -> None:
        self.shutdown_message = message
        self.outbox.put_nowait(SHUTDOWN)

    def finish_if_done(self) -> None:
        if not self.reading and self.outstanding == 0:
            self.outbox.put_nowait(None)


def error_response(
    request: oip.ModelInferRequest | None, exc: BaseException
) -> oip.ModelStreamInferResponse:
    response = oip.ModelStreamInferResponse(error_message=clipped(as_rnnstream_error(exc).message))
    if request is not None:
        response.infer_response.model_name = request.model_name
        response.infer_response.model_version = request.model_version
        response.infer_response.id = request.id
    return response
