"""One rnnstream.v1 Stream call: reads ahead, hands each message to the engine, writes replies as
they become ready (each session's in order), and carries errors in-band."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server._metrics import Metrics
from rnnstream.server._settings import Settings
from rnnstream.server.core import (
    Ended,
    Engine,
    Holding,
    InvalidArgument,
    NamedArray,
    NotFound,
    ResourceExhausted,
)
from rnnstream.server.transport.grpc._group_reply import GroupAnswer, OutputLayout
from rnnstream.server.transport.grpc._native_messages import (
    emit_name,
    ended,
    flushed,
    forecasted,
    opened,
)
from rnnstream.server.transport.grpc._native_reply import FrameReply
from rnnstream.server.transport.grpc._outbox import Outbox
from rnnstream.server.transport.grpc._rate import keep_pace, stream_frames
from rnnstream.server.transport.grpc._status import BadRequest, as_rnnstream_error, stream_error

__all__ = ["SHUTDOWN", "StreamCall", "named_arrays"]

# Placed in a stream's outbox by a graceful shutdown: the call ends with UNAVAILABLE after it.
SHUTDOWN = object()


def named_arrays(tensors: Any) -> list[NamedArray]:
    return [(t.name, decode(t)) for t in tensors]


class StreamCall:
    """State of one Stream call."""

    def __init__(
        self,
        engine: Engine,
        owner: str,
        settings: Settings,
        metrics: Metrics,
        pack_outputs: bool = False,
    ) -> None:
        self.engine = engine
        self.owner = owner
        # What this stream holds of the memory budget: its frames in the engine, and answers
        # its client has not taken.
        self._budget = engine.budget
        self.holding = Holding()
        self.over = False  # the call has ended: answers still coming are dropped
        budget, holding = self._budget, self.holding

        def written(nbytes: int) -> None:  # no reference to the call: no cycle to collect
            budget.give(owner, nbytes, holding)

        # Holds responses, None (the call is over) and SHUTDOWN.
        self.outbox = Outbox(settings.max_message_bytes if pack_outputs else None, written)
        self.outstanding = 0
        self.reading = True
        self.opened: set[str] = set()
        self._pending_limit = settings.max_pending_frames
        self._max_sessions = settings.max_sessions_per_stream
        self._max_steps = settings.max_steps_per_frame
        self._bytes_in = metrics.bytes_received
        self._bytes_out = metrics.bytes_sent
        self._requests = metrics.stream_requests
        self._layouts: dict[str, OutputLayout] = {}  # model -> its outputs' names and batch axes

    # -- replies ---------------------------------------------------------------------------
    def _track(
        self,
        future: asyncio.Future[Any],
        respond: Callable[[Any], pb.StreamResponse | None],
        session_id: str,
        frame_index: int | None = None,
    ) -> None:
        self.outstanding += 1

        def done(f: asyncio.Future[Any]) -> None:
            self.outstanding -= 1
            if not f.cancelled():
                error = f.exception()
                if error is not None:
                    classified = as_rnnstream_error(error)  # logs an internal error once
                    self.outbox.put_nowait(stream_error(classified, session_id, frame_index))
                else:
                    response = respond(f.result())
                    if response is not None:
                        self._put(response, response.ByteSize())  # controls: rare, maybe big
            self.finish_if_done()

        future.add_done_callback(done)

    def finish_if_done(self) -> None:
        if not self.reading and self.outstanding == 0:
            self.outbox.put_nowait(None)

    def __call__(self, result: Ended) -> None:
        """The server ended a session this stream holds: tell the client in-band. The call is
        each session's end listener itself (no bound method per session, no cycle)."""
        self.opened.discard(result.session_id)
        self.outbox.put_nowait(pb.StreamResponse(ended=ended(result)))

    def detach(self) -> None:
        """The call is over: stop routing server-side session ends to it, and give back what
        its unsent answers held."""
        self.over = True
        held = self.outbox.drop_all()
        if held:
            self._budget.give(self.owner, held, self.holding)
        for session_id in self.opened:
            try:
                self.engine.detach(self.owner, session_id, self)
            except NotFound:  # ended meanwhile
                continue
        self.opened = set()  # the call may outlive this until the cycle collector frees it

    def shutdown(self, message: str) -> None:
        self.outbox.put_nowait(
            pb.StreamResponse(notice=pb.Notice(kind="shutdown", message=message))
        )
        self.outbox.put_nowait(SHUTDOWN)

    # -- requests --------------------------------------------------------------------------
    async def read(self, requests: AsyncIterator[pb.StreamRequest | BadRequest]) -> None:
        try:
            received = self._requests
            async for request in requests:
                received.value += 1
                if isinstance(request, pb.StreamRequest) and request.HasField("open"):
                    # Awaited before reading on: it may load the session from the state store,
                    # and the frames behind it need the session in place.
                    await self._open(request.open)
                    continue
                if isinstance(request, pb.StreamRequest) and request.HasField("open_many"):
                    await self._open_many(request.open_many)
                    continue
                await keep_pace(self.engine, self.owner, stream_frames(request, self._max_steps))
                for session_id in self.dispatch(request):
                    # Stop reading while this session's queue is full: flow control pushes back.
                    await self.engine.wait_for_space(self.owner, session_id)
                if self.outbox.qsize() >= self._pending_limit:
                    await self.outbox.wait_for_room(self._pending_limit)
                if not self._budget.has_room(self.owner, self.holding):
                    # The server, this principal or this stream holds its share of the memory
                    # budget (answers its client has not taken): read on once it is free.
                    await self._budget.wait_for_room(self.owner, self.holding)
        finally:
            self.reading = False
            self.finish_if_done()

    def dispatch(self, request: pb.StreamRequest | BadRequest) -> list[str]:
        """Hand one message to the engine; returns the sessions whose queue is now full."""
        if isinstance(request, BadRequest):
            self.outbox.put_nowait(stream_error(InvalidArgument(request.message)))
            return []
        kind = request.WhichOneof("kind")
        session_id = ""
        frame_index: int | None = None
        try:
            if kind == "frame":
                frame = request.frame
                session_id, frame_index = frame.session_id, frame.frame_index
                return self._frame(frame)
            if kind == "frame_group":
                return self._group(request.frame_group)
            if kind == "reset":
                reset = request.reset
                session_id = reset.session_id
                at = reset.frame_index if reset.HasField("frame_index") else None
                self._track(
                    self.engine.reset(self.owner, session_id, at),
                    lambda r: pb.StreamResponse(
                        reset=pb.SessionReset(
                            session_id=r.session_id, next_frame_index=r.next_index
                        )
                    ),
                    session_id,
                )
            elif kind == "end":
                session_id = request.end.session_id
                future = self.engine.end(self.owner, session_id)
                self.opened.discard(session_id)
                self._track(future, lambda r: pb.StreamResponse(ended=ended(r)), session_id)
            elif kind == "flush":
                session_id = request.flush.session_id
                self._track(
                    self.engine.flush(self.owner, session_id, request.flush.reset),
                    lambda r: pb.StreamResponse(flushed=flushed(r)),
                    session_id,
                )
            elif kind == "forecast":
                forecast = request.forecast
                session_id = forecast.session_id
                rollout = self.engine.forecast(
                    self.owner,
                    session_id,
                    forecast.steps,
                    forecast.commit,
                    named_arrays(forecast.inputs),
                )
                self._track(
                    rollout, lambda r: pb.StreamResponse(forecast=forecasted(r)), session_id
                )
            else:
                raise InvalidArgument(
                    "empty StreamRequest: set one of open, frame, frame_group, reset, end, "
                    "flush, forecast"
                )
        except Exception as exc:
            self.outbox.put_nowait(stream_error(exc, session_id, frame_index))
        return []

    def _frame(self, frame: pb.Frame) -> list[str]:
        session_id = frame.session_id
        arrays = []
        try:
            for tensor in frame.inputs:
                self._bytes_in.value += len(tensor.data)
                arrays.append((tensor.name, decode(tensor)))
        except Exception as exc:
            # Undecodable tensors never reach the engine, which counts every other frame.
            self.engine.refuse(self.owner, session_id, as_rnnstream_error(exc))
            raise
        reply = FrameReply(self, session_id, frame.frame_index)
        full = self.engine.submit(
            self.owner, session_id, frame.frame_index, arrays, reply, self.holding
        )
        self.outstanding += 1
        return [session_id] if full else []

    def _group(self, group: pb.FrameGroup) -> list[str]:
        """One frame for each of many sessions: answered by one GroupOutputs, whatever
        happens to each row."""
        ids, indices = group.session_ids, group.frame_indices
        reply = GroupAnswer(self, group.request_id, ids, indices, self._layout(group.model))
        self.outstanding += 1
        arrays = []
        try:
            for tensor in group.inputs:
                self._bytes_in.value += len(tensor.data)
                arrays.append((tensor.name, decode(tensor)))
        except Exception as exc:
            # Undecodable tensors never reach the engine, which counts every other row.
            self.engine.groups.refuse(group.model, len(ids), as_rnnstream_error(exc))
            reply.fail_all(exc)
            return []
        try:
            return self.engine.groups.submit(self.owner, group.model, ids, indices, arrays, reply)
        except Exception as exc:
            reply.fail_all(exc)
            return []

    def _layout(self, model: str) -> OutputLayout:
        layout = self._layouts.get(model)
        if layout is None:
            try:
                outputs = self.engine.model(model).spec.outputs
            except NotFound:
                return ()  # the group is refused: it answers no tensors
            layout = self._layouts[model] = tuple((t.name, t.batch_axis) for t in outputs)
        return layout

    def count_bytes_out(self, count: int) -> None:
        self._bytes_out.value += count

    def answer(self, response: pb.StreamResponse | None, nbytes: int = 0) -> None:
        """A frame's answer, called by the scheduler as soon as the frame is done: its
        `nbytes` are held until the writer has sent it."""
        self.outstanding -= 1
        if response is not None:
            self._put(response, nbytes)
        self.finish_if_done()

    def _put(self, response: pb.StreamResponse, nbytes: int) -> None:
        if self.over:  # nobody will write it
            return
        if nbytes:
            self._budget.take(self.owner, nbytes, self.holding)
        self.outbox.put_nowait(response, nbytes)

    async def _open(self, request: pb.OpenSession) -> None:
        try:
            await self._open_or_raise(request)
        except Exception as exc:
            self.outbox.put_nowait(stream_error(exc, request.session_id))

    async def _open_many(self, request: pb.OpenSessions) -> None:
        """Each session as its own open would be, one answer for all."""
        answer = pb.StreamResponse()
        many = answer.opened_many
        many.request_id = request.request_id
        for entry in request.sessions:
            result = many.results.add()
            try:
                result.opened.CopyFrom(await self._open_or_raise(entry, reply=False))
            except Exception as exc:
                result.error.CopyFrom(stream_error(exc, entry.session_id).error)
        self.outbox.put_nowait(answer)

    async def _open_or_raise(self, request: pb.OpenSession, reply: bool = True) -> pb.SessionOpened:
        cap = self._max_sessions
        if cap and request.session_id not in self.opened and len(self.opened) >= cap:
            raise ResourceExhausted(
                f"this stream already holds {cap} sessions (--max-sessions-per-stream); "
                "open another stream"
            )
        result = await self.engine.open(
            self.owner,
            request.session_id,
            request.model,
            emit_name(request.emit),
            resume_only=request.resume,
            on_end=self,
            version=request.model_version or None,
        )
        self.opened.add(result.session_id)
        message = opened(result)
        if reply:
            self.outbox.put_nowait(pb.StreamResponse(opened=message))
        return message
