"""One logical Stream shared by many sessions; reconnects and resumes them after connection loss."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from rnnstream._errors import RnnstreamError, SessionLost
from rnnstream._group import GroupCall, PendingFrame, Queued, Settles, pack_frames
from rnnstream._info import ModelInfo
from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = ["Connect", "MuxedSession", "RetryPolicy", "StreamCall", "StreamMux"]

# Loop turns the first of the frames queued together waits, at most, for the others (each turn
# that brings none ends it).
_GATHER_TURNS = 8
# Statuses after which the stream is re-established and the sessions resumed.
RETRYABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
)


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff; `max_attempts` reconnects in a row without any progress."""

    max_attempts: int = 8
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        ceiling = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return random.uniform(ceiling / 2, ceiling)  # jitter spreads reconnect storms


class StreamCall(Protocol):
    """One Stream call, as the mux uses it (grpc.aio's StreamStreamCall is one)."""

    async def write(self, request: pb.StreamRequest) -> None: ...

    async def done_writing(self) -> None: ...

    def cancel(self) -> bool: ...

    def __aiter__(self) -> AsyncIterator[pb.StreamResponse]: ...


# Starts a new Stream call to the server; called once per (re)connection.
Connect = Callable[[], StreamCall]


class MuxedSession(Protocol):
    """What the mux tells a session it carries (each session's own waiters implement it)."""

    def resume_request(self) -> pb.OpenSession:
        """The OpenSession that resumes this session on a new call."""
        ...

    def unanswered(self) -> list[pb.StreamRequest]:
        """Requests sent and not yet answered, in send order: resent after a resume."""
        ...

    def on_output(self, output: pb.FrameOutput) -> None: ...

    def on_frame_error(self, index: int, error: RnnstreamError) -> None: ...

    def on_control(self, next_index: int) -> None:
        """A reset (or the client's own end) was applied; `next_index` numbers the next frame."""
        ...

    def on_reply(self, reply: pb.SessionFlushed | pb.ForecastResponse) -> None: ...

    def on_control_error(self, error: RnnstreamError) -> None: ...

    def on_ended(self, ended: pb.SessionEnded) -> None: ...

    def on_lost(self, error: SessionLost) -> None:
        """The server no longer holds the session: fail what waits and refuse what follows."""
        ...

    def on_failed(self, error: RnnstreamError) -> None:
        """The stream failed for good: fail everything that waits."""
        ...


class StreamMux:
    """Routes each response to its session; on a broken stream, reconnects with backoff, resumes
    every session (OpenSession with resume) and resends what was not yet answered, in order. The
    server applies each frame index once and answers resent ones from its output ring.

    With `pack_frames`, frames that several sessions queue in the same turn of the event loop
    (a batch's answers wake them together) travel as one FrameGroup per model; a lone frame
    still goes out alone, at once."""

    def __init__(
        self, connect: Connect, retry: RetryPolicy | None, pack_frames: bool = True
    ) -> None:
        self._connect = connect
        self._retry = retry
        self._sessions: dict[str, MuxedSession] = {}
        # Sessions whose resume is on the wire, and sessions waiting for one after the server
        # said UNAVAILABLE about them (their later frames' refusals are expected).
        self._resuming: set[str] = set()
        self._recovering: set[str] = set()
        self._call: StreamCall | None = None
        self._connected = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._open_lock = asyncio.Lock()
        self._opening: asyncio.Future[pb.SessionOpened] | None = None
        self._opening_id = ""
        self.failure: RnnstreamError | None = None
        self.reconnects = 0
        self.pack_frames = pack_frames
        self._outgoing: list[Queued] = []  # frames queued this turn, written together
        self._groups: dict[int, GroupCall] = {}  # FrameGroups on the wire, by request id
        self._opens: dict[int, asyncio.Future[pb.SessionsOpened]] = {}  # OpenSessions, likewise
        # OpenSessions answers read while their request's write was still being awaited
        self._early_opens: dict[int, pb.SessionsOpened] = {}
        self._writing_opens: set[int] = set()  # OpenSessions whose write is being awaited
        self._request_ids = itertools.count(1)
        self.groups_sent = 0  # FrameGroup messages written
        self._closing = False
        self._task = asyncio.get_running_loop().create_task(self._run())

    def register(self, session_id: str, session: MuxedSession) -> None:
        """Route `session_id`'s answers to `session` and resume it after every reconnect."""
        self._sessions[session_id] = session

    def forget(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    # -- sending ---------------------------------------------------------------------------
    async def send(self, request: pb.StreamRequest) -> None:
        """Write now, or after the reconnect under way (the request is resent on resume)."""
        await self._write(request)

    async def send_frame(self, model: ModelInfo, frame: PendingFrame, waiters: Settles) -> None:
        """Write a session's frame, with the frames other sessions queue in this turn."""
        if not self.pack_frames:
            await self._write(frame.request())
            return
        self._outgoing.append((model, frame, waiters))
        if len(self._outgoing) > 1:
            return  # the sender of the first frame queued writes this one with it
        if len(self._sessions) > 1:
            await self._gather()
        await self._write(None)

    async def _gather(self) -> None:
        """Let the other sessions woken with this one queue their frames: loop turns while
        frames keep coming (answers wake their waiters over a few turns), a few at most."""
        for _ in range(_GATHER_TURNS):
            queued = len(self._outgoing)
            await asyncio.sleep(0)
            if len(self._outgoing) == queued:
                return

    async def send_group(self, group: GroupCall) -> None:
        """Write an explicit FrameGroup (its rows wait in their sessions already)."""
        await self._write(group)

    def _messages(self, item: pb.StreamRequest | GroupCall | None) -> list[pb.StreamRequest]:
        """The frames queued so far, then `item`: every write goes out in the order queued."""
        queued, self._outgoing = self._outgoing, []
        messages = pack_frames(queued) if queued else []
        if item is not None:
            messages.append(item)
        out = []
        for message in messages:
            if isinstance(message, GroupCall):
                message.request_id = next(self._request_ids)
                self._groups[message.request_id] = message
                self.groups_sent += 1
                message = message.request()
            out.append(message)
        return out

    async def _write(self, item: pb.StreamRequest | GroupCall | None) -> None:
        while True:
            if self.failure is not None:
                raise self.failure
            await self._connected.wait()
            call = self._call
            try:
                async with self._write_lock:
                    if call is not self._call or call is None:
                        continue
                    for message in self._messages(item):
                        await call.write(message)
                return
            except (grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                if self._retry is None:
                    raise RnnstreamError(grpc.StatusCode.UNAVAILABLE, "stream broke") from None
                # The reader notices the broken call and reconnects; the session resends.
                return

    async def open(self, request: pb.OpenSession) -> pb.SessionOpened:
        # Opens go one at a time: the reply to an open carries no request id.
        async with self._open_lock:
            self._opening = asyncio.get_running_loop().create_future()
            self._opening_id = request.session_id
            try:
                await self.send(pb.StreamRequest(open=request))
                return await self._opening
            finally:
                self._opening = None

    async def open_many(self, request: pb.OpenSessions) -> pb.SessionsOpened:
        """Many opens in one message; its answer has one result per session, in order."""
        request.request_id = next(self._request_ids)
        answer: asyncio.Future[pb.SessionsOpened] = asyncio.get_running_loop().create_future()
        self._writing_opens.add(request.request_id)
        try:
            await self.send(pb.StreamRequest(open_many=request))
            self._writing_opens.discard(request.request_id)
            # The reader may have taken the answer while the write was awaited.
            early = self._early_opens.pop(request.request_id, None)
            if early is not None:
                return early
            self._opens[request.request_id] = answer
            return await answer
        finally:
            # Cancelled: an answer that comes later has nobody to go to and is not kept.
            self._writing_opens.discard(request.request_id)
            self._opens.pop(request.request_id, None)
            self._early_opens.pop(request.request_id, None)

    # -- the connection loop -------------------------------------------------------------
    async def _run(self) -> None:
        attempt = 0
        while True:
            self._call = self._connect()
            progressed = False
            try:
                await self._resume_all()
                self._connected.set()
                async for response in self._call:
                    # Only answered work counts as progress: a resume that is refused again
                    # and again (say the server's state store is down) spends the budget.
                    progressed = progressed or response.WhichOneof("kind") not in (
                        "opened",
                        "error",
                    )
                    self._route(response)
                error = RnnstreamError(grpc.StatusCode.UNAVAILABLE, "stream closed by the server")
            except grpc.aio.AioRpcError as exc:
                error = RnnstreamError(exc.code(), exc.details() or "stream failed")
            except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
                error = RnnstreamError(grpc.StatusCode.UNAVAILABLE, f"stream broke: {exc}")
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling() == 0 and not self._closing:
                    # Not this task being cancelled: reconnect() cancelled the call.
                    error = RnnstreamError(grpc.StatusCode.UNAVAILABLE, "reconnecting")
                else:
                    error = RnnstreamError(grpc.StatusCode.CANCELLED, "client closed the stream")
                    self._closing = True
            except Exception as exc:  # a bug in routing must fail the waiters, not strand them
                error = RnnstreamError(grpc.StatusCode.INTERNAL, f"stream reader failed: {exc!r}")
                self._call.cancel()
                self._closing = True
            self._connected.clear()
            if self._closing or self._retry is None or error.code not in RETRYABLE:
                break
            attempt = 1 if progressed else attempt + 1
            if attempt > self._retry.max_attempts:
                error = SessionLost(
                    error.code,
                    f"gave up after {self._retry.max_attempts} reconnects: {error.message}",
                )
                break
            self.reconnects += 1
            try:
                await asyncio.sleep(self._retry.backoff(attempt))
            except asyncio.CancelledError:
                error = RnnstreamError(grpc.StatusCode.CANCELLED, "client closed the stream")
                break
        self._fail(error)

    async def _resume_all(self) -> None:
        """Re-open every session on the new call and resend its unanswered requests in order."""
        call = self._call
        assert call is not None
        # Holding the write lock: grpc allows one write at a time on a call.
        async with self._write_lock:
            # Frames queued or grouped before are among the sessions' unanswered requests: they
            # are resent below, one by one.
            self._outgoing.clear()
            self._groups.clear()
            self._early_opens.clear()
            self._fail_opens(RnnstreamError(grpc.StatusCode.UNAVAILABLE, "stream reconnected"))
            for session_id, session in list(self._sessions.items()):
                self._resuming.add(session_id)
                await call.write(pb.StreamRequest(open=session.resume_request()))
                for request in session.unanswered():
                    await call.write(request)

    def reconnect(self) -> None:
        """Drop the current call; the loop reconnects and resumes (after in-band UNAVAILABLE)."""
        if self._call is not None:
            self._call.cancel()

    def _fail_opens(self, error: RnnstreamError) -> None:
        """OpenSessions whose answer the broken stream took with it: whether they opened is
        unknown (new sessions the server made are never used and expire)."""
        for answer in self._opens.values():
            if not answer.done():
                answer.set_exception(error)

    def _fail(self, error: RnnstreamError) -> None:
        self.failure = error
        self._connected.set()  # wake senders so they see the failure
        self._fail_opens(error)
        if self._opening is not None and not self._opening.done():
            self._opening.set_exception(error)
        for session in list(self._sessions.values()):
            session.on_failed(error)

    # -- routing ---------------------------------------------------------------------------
    def _route(self, response: pb.StreamResponse) -> None:
        kind = response.WhichOneof("kind")
        if kind == "output":
            self._route_output(response.output)
        elif kind == "outputs":
            for output in response.outputs.outputs:
                self._route_output(output)
        elif kind == "group_outputs":
            self._route_group(response.group_outputs)
        elif kind == "opened":
            opened = response.opened
            if opened.session_id in self._sessions and opened.session_id in self._resuming:
                self._resuming.discard(opened.session_id)
                self._recovering.discard(opened.session_id)
            elif self._opening is not None and not self._opening.done():
                self._opening.set_result(opened)
        elif kind == "opened_many":
            many = response.opened_many
            answer = self._opens.get(many.request_id)
            if answer is None:
                if many.request_id in self._writing_opens:
                    self._early_opens[many.request_id] = many
            elif not answer.done():
                answer.set_result(many)
        elif kind == "error":
            self._route_error(response.error)
        elif kind == "reset":
            session = self._sessions.get(response.reset.session_id)
            if session is not None:
                session.on_control(response.reset.next_frame_index)
        elif kind in ("flushed", "forecast"):
            reply = response.flushed if kind == "flushed" else response.forecast
            session = self._sessions.get(reply.session_id)
            if session is not None:
                session.on_reply(reply)
        elif kind == "ended":
            ended = response.ended
            session = self._sessions.pop(ended.session_id, None)
            self._resuming.discard(ended.session_id)
            self._recovering.discard(ended.session_id)
            if session is not None:
                session.on_ended(ended)

    def _route_group(self, answer: pb.GroupOutputs) -> None:
        """A FrameGroup's answer: each failed row's error goes to its session as an in-band
        error would (an UNAVAILABLE one resumes and resends it), the other rows' outputs to
        their waiters."""
        group = self._groups.pop(answer.request_id, None)
        failed: set[int] = set()
        for error in answer.errors:
            row = group.row_of(error.session_id) if group is not None else None
            if row is not None:
                failed.add(row)
            self._route_error(error)
        if group is not None:
            group.answered(answer, failed)

    def _route_output(self, output: pb.FrameOutput) -> None:
        session = self._sessions.get(output.session_id)
        if session is not None:
            session.on_output(output)

    def _route_error(self, error: pb.StreamError) -> None:
        index = error.frame_index if error.HasField("frame_index") else None
        exc = RnnstreamError.from_number(error.code, error.message, error.session_id, index)
        session = self._sessions.get(error.session_id)
        opening = self._opening is not None and not self._opening.done()
        if opening and index is None and error.session_id == self._opening_id:
            assert self._opening is not None
            self._opening.set_exception(exc)  # the open (or resume by id) was refused
            return
        if session is None:
            # A frame's error, even for a session this stream no longer knows, never fails an
            # open that happens to be in flight.
            if index is None and self._opening is not None and not self._opening.done():
                self._opening.set_exception(exc)
            return
        session_id = error.session_id
        if session_id in self._resuming and index is None:
            # The resume itself was refused: the server no longer holds this session.
            self._sessions.pop(session_id, None)
            self._resuming.discard(session_id)
            self._recovering.discard(session_id)
            # Marked lost, not just failed: the stream no longer routes its answers, so a later
            # call would wait forever; it raises this instead.
            session.on_lost(
                SessionLost(exc.code, f"cannot resume: {exc.message}", session_id=session_id)
            )
            return
        if session_id in self._recovering and index is not None:
            return  # a later frame refused because an earlier one was: it is resent on resume
        if exc.code == grpc.StatusCode.UNAVAILABLE and self._retry is not None:
            # E.g. the server is draining or its state store is down: resume once reachable.
            self._recovering.add(session_id)
            self.reconnect()
            return
        if index is not None:
            session.on_frame_error(index, exc)
        else:
            session.on_control_error(exc)

    async def close(self) -> None:
        self._closing = True
        call = self._call
        if call is not None and self.failure is None:
            with contextlib.suppress(Exception):
                async with self._write_lock:
                    await call.done_writing()
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if call is not None:
            call.cancel()
