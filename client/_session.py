"""A session of the asyncio client, and the waiters through which its stream answers it."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import grpc

from rnnstream._errors import RnnstreamError, SessionLost
from rnnstream._frames import (
    EMIT,
    FrameInput,
    Outputs,
    decode_outputs,
    encode_frame,
    frame_arrays,
)
from rnnstream._group import GroupCall, GroupRow, PendingFrame, RowEntry
from rnnstream._info import ModelInfo
from rnnstream._mux import StreamMux
from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = ["AsyncSession"]


class AsyncSession:
    """A session on the server: `step` one frame, or `stream` many with several in flight.

    `async with` ends it on the way out (unless it has ended already).
    """

    def __init__(
        self,
        mux: StreamMux,
        model: ModelInfo,
        opened: pb.SessionOpened,
        emit: str = "every",
    ) -> None:
        self._mux = mux
        self.model = model
        self.id = opened.session_id
        self.resumed = opened.resumed
        self.next_index = opened.next_frame_index
        # "last": frames get no answer; flush() (or end()) returns the last frame's outputs.
        self.emit = emit
        self.ended = False
        self.last_outputs: Outputs | None = None  # set by end() of an emit-last session
        # Called with a frame's index, before its outputs resolve, when the server brought the
        # session back from its state store to apply it (it had been spilled while idle).
        self.on_restore: Callable[[int], None] | None = None
        self._waiters = _Waiters(self)
        mux.register(self.id, self._waiters)

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.ended:
            await self.end()

    async def send(self, frame: FrameInput, index: int | None = None) -> asyncio.Future[Outputs]:
        """Send one frame now; the returned future resolves with its outputs."""
        self._waiters.check_open()
        arrays, squeeze = frame_arrays(self.model, frame)
        if index is None:
            index = self.next_index
        self.next_index = max(self.next_index, index + 1)
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        pending = PendingFrame(self.id, index, arrays, squeeze, future)
        if self.emit == "last":
            # No answer will come: the frame counts as done once sent; errors wait for flush.
            await self._mux.send(pending.request())
            future.set_result({})
            return future
        self._waiters.add_frame(pending)
        try:
            # Frames of other sessions queued in the same turn may travel with it (FrameGroup).
            await self._mux.send_frame(self.model, pending, self._waiters)
        except BaseException:
            self._waiters.drop_frame(index)
            raise
        return future

    async def step(self, frame: FrameInput) -> Outputs:
        return await (await self.send(frame))

    def _group_index(self) -> int:
        """The index this session's row of a FrameGroup takes."""
        self._waiters.check_open()
        if self.emit != "every":
            raise ValueError(
                f"session {self.id} emits only on flush and end: send its frames with send()"
            )
        index = self.next_index
        self.next_index += 1
        return index

    async def _send_group(self, group: GroupCall, sessions: list[AsyncSession]) -> None:
        """Write `group` (this session's stream carries it), its rows waiting in `sessions`."""
        group.waiters = [s._waiters for s in sessions]
        for row, (session, index) in enumerate(zip(sessions, group.indices, strict=True)):
            session._waiters.add_frame(GroupRow(group, row, index))
        try:
            await self._mux.send_group(group)
        except BaseException:
            for session, index in zip(sessions, group.indices, strict=True):
                session._waiters.drop_frame(index)
            raise

    async def stream(
        self, frames: Iterable[FrameInput], inflight: int = 8
    ) -> AsyncIterator[Outputs]:
        """Yield each frame's outputs in order, keeping up to `inflight` frames on the wire."""
        window: deque[asyncio.Future[Outputs]] = deque()
        for frame in frames:
            if len(window) >= max(1, inflight):
                yield await window.popleft()
            window.append(await self.send(frame))
        while window:
            yield await window.popleft()

    async def _control(self, request: pb.StreamRequest) -> Any:
        self._waiters.check_open()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.add_control(request, future)
        await self._mux.send(request)
        return await future

    async def reset(self) -> int:
        """Back to the initial state; returns the next frame index (numbering goes on)."""
        reset = pb.ResetSession(session_id=self.id, frame_index=self.next_index)
        next_index: int = await self._control(pb.StreamRequest(reset=reset))
        return next_index

    async def end(self) -> int:
        """Free the session on the server after its queued frames; returns frames applied.

        For an emit-last session the last frame's outputs land in `last_outputs`.
        """
        end = pb.EndSessionRequest(session_id=self.id)
        next_index: int = await self._control(pb.StreamRequest(end=end))
        return next_index

    async def flush(self, reset: bool = False) -> Outputs:
        """Outputs of the last frame applied, once every frame sent before is applied.

        Empty when no frame was applied since the open or the last reset. With `reset`, the
        state then goes back to its initial value for the next sequence. On an emit-last
        session, raises the first error of a frame sent since the previous flush.
        """
        request = pb.FlushSession(session_id=self.id, reset=reset)
        flushed: pb.SessionFlushed = await self._control(pb.StreamRequest(flush=request))
        self._waiters.raise_frame_error()
        return decode_outputs(self.model, flushed.outputs)

    async def forecast(
        self, steps: int, commit: bool = False, first: FrameInput | None = None
    ) -> Outputs:
        """Roll the session `steps` steps ahead, each output fed back as the next input.

        Step 1's input is `first` when given, else the session's last output. Each returned
        array holds the `steps` outputs along its time axis. The session is unchanged unless
        `commit`: then its state moves to after the last step.
        """
        request = pb.ForecastRequest(session_id=self.id, steps=steps, commit=commit)
        if first is not None:
            request.inputs.extend(encode_frame(self.model, first)[0])
        reply: pb.ForecastResponse = await self._control(pb.StreamRequest(forecast=request))
        return decode_outputs(self.model, reply.outputs)


class _Waiters:
    """A session's unanswered requests and their futures; the stream mux answers them here
    (this class is the session's side of the mux's MuxedSession protocol)."""

    def __init__(self, session: AsyncSession) -> None:
        self._session = session
        self._frames: dict[int, RowEntry] = {}
        self._controls: deque[tuple[pb.StreamRequest, asyncio.Future[Any]]] = deque()
        # Every unanswered request in send order: resent after a reconnect (a frame that went
        # out in a FrameGroup is resent alone).
        self._order: dict[object, pb.StreamRequest | RowEntry] = {}
        self._ended_error: RnnstreamError | None = None  # what later calls raise once ended
        self._frame_errors: list[RnnstreamError] = []  # emit-last frame errors, raised by flush

    # -- the session's side ----------------------------------------------------------------
    def check_open(self) -> None:
        # The stream forgets an ended session, so the server's answer to anything sent for it
        # could reach no one: the call would wait forever. Refuse it here instead.
        if self._session.ended:
            raise self._ended_error or RnnstreamError(
                grpc.StatusCode.NOT_FOUND, "session ended", session_id=self._session.id
            )

    def add_frame(self, entry: RowEntry) -> None:
        self._frames[entry.index] = entry
        self._order[("frame", entry.index)] = entry

    def drop_frame(self, index: int) -> None:
        self._frames.pop(index, None)
        self._order.pop(("frame", index), None)

    def settle(self, index: int) -> RowEntry | None:
        """The frame's answer came (in a GroupOutputs): it no longer waits."""
        self._order.pop(("frame", index), None)
        return self._frames.pop(index, None)

    def add_control(self, request: pb.StreamRequest, future: asyncio.Future[Any]) -> None:
        self._controls.append((request, future))
        self._order[("control", id(future))] = request

    def raise_frame_error(self) -> None:
        if self._frame_errors:
            error, self._frame_errors = self._frame_errors[0], []
            raise error

    # -- the mux's side (MuxedSession) -----------------------------------------------------
    def resume_request(self) -> pb.OpenSession:
        session = self._session
        return pb.OpenSession(
            model=session.model.name, session_id=session.id, resume=True, emit=EMIT[session.emit]
        )

    def unanswered(self) -> list[pb.StreamRequest]:
        return [r if isinstance(r, pb.StreamRequest) else r.request() for r in self._order.values()]

    def on_output(self, output: pb.FrameOutput) -> None:
        entry = self._frames.pop(output.frame_index, None)
        self._order.pop(("frame", output.frame_index), None)
        if entry is None:
            return
        try:
            outputs = decode_outputs(self._session.model, output.outputs, entry.squeeze)
        except ValueError as exc:
            # A bad tensor fails its frame only; raised here it would kill the stream's reader.
            entry.fail(
                RnnstreamError(
                    grpc.StatusCode.INTERNAL,
                    f"undecodable output: {exc}",
                    session_id=self._session.id,
                    frame_index=output.frame_index,
                )
            )
            return
        if output.restored and self._session.on_restore is not None:
            self._session.on_restore(output.frame_index)
        entry.resolve(outputs)

    def on_frame_error(self, index: int, error: RnnstreamError) -> None:
        session = self._session
        if error.code == grpc.StatusCode.INVALID_ARGUMENT:
            # The server refused the frame before queueing it, so its index is still the next.
            session.next_index = min(session.next_index, index)
        entry = self._frames.pop(index, None)
        self._order.pop(("frame", index), None)
        if entry is not None:
            entry.fail(error)
        elif session.emit == "last":
            self._frame_errors.append(error)

    def _pop_control(self) -> tuple[pb.StreamRequest, asyncio.Future[Any]] | None:
        if not self._controls:
            return None
        request, future = self._controls.popleft()
        self._order.pop(("control", id(future)), None)
        return request, future

    def on_reply(self, reply: pb.SessionFlushed | pb.ForecastResponse) -> None:
        entry = self._pop_control()
        if entry is not None and not entry[1].done():
            entry[1].set_result(reply)

    def on_control(self, next_index: int) -> None:
        entry = self._pop_control()
        if entry is not None and not entry[1].done():
            entry[1].set_result(next_index)

    def on_control_error(self, error: RnnstreamError) -> None:
        entry = self._pop_control()
        if entry is not None and not entry[1].done():
            entry[1].set_exception(error)

    def on_ended(self, ended: pb.SessionEnded) -> None:
        session = self._session
        session.ended = True
        if session.emit == "last":
            session.last_outputs = decode_outputs(session.model, ended.last_outputs)
        if ended.reason == "client":
            self.on_control(ended.next_frame_index)
            error: RnnstreamError = RnnstreamError(
                grpc.StatusCode.NOT_FOUND, "session ended", session_id=session.id
            )
        else:
            error = SessionLost(
                grpc.StatusCode.NOT_FOUND,
                f"the server ended the session ({ended.reason}); it cannot be resumed",
                session_id=session.id,
            )
        # Later calls say why too: "expired" or "evicted", not just "ended".
        self._ended_error = error
        self.on_failed(error)

    def on_lost(self, error: SessionLost) -> None:
        self._session.ended = True
        self._ended_error = error
        self.on_failed(error)

    def on_failed(self, error: RnnstreamError) -> None:
        frames = list(self._frames.values())
        self._frames.clear()
        for frame in frames:
            frame.fail(error)
        while (entry := self._pop_control()) is not None:
            if not entry[1].done():
                entry[1].set_exception(error)
        self._order.clear()
