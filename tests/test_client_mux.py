"""The client's stream mux without a server: reconnect, resume and resend over scripted calls.

The mux takes a `connect` function that starts a Stream call; here each call is a FakeCall whose
answers the test writes by hand and which the test can break the way gRPC breaks a call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from rnnstream import ModelInfo, RetryPolicy, RnnstreamError, SessionLost, TensorInfo
from rnnstream._mux import StreamMux
from rnnstream._session import AsyncSession
from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb

MODEL = ModelInfo(
    name="echo",
    inputs=(TensorInfo("x", "float32", (-1, -1, 2), batch_axis=1, time_axis=0),),
    outputs=(TensorInfo("y", "float32", (-1, -1, 2), batch_axis=1, time_axis=0),),
    states=(),
    execution_provider="CPUExecutionProvider",
    max_batch_size=8,
)
FAST = RetryPolicy(max_attempts=3, initial_backoff=0.001, max_backoff=0.002)
_END = object()


class FakeCall:
    """One Stream call: records what the client writes; yields what the test answers."""

    def __init__(self) -> None:
        self.written: list[pb.StreamRequest] = []
        self._answers: asyncio.Queue[object] = asyncio.Queue()
        self.wrote = asyncio.Event()

    async def write(self, request: pb.StreamRequest) -> None:
        self.written.append(request)
        self.wrote.set()

    async def done_writing(self) -> None:
        self._answers.put_nowait(_END)

    def cancel(self) -> bool:
        self._answers.put_nowait(asyncio.CancelledError())
        return True

    def answer(self, response: pb.StreamResponse) -> None:
        self._answers.put_nowait(response)

    def fail(self, code: grpc.StatusCode, details: str) -> None:
        """What gRPC raises from a call whose connection broke."""
        self._answers.put_nowait(
            grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)
        )

    async def __aiter__(self) -> AsyncIterator[pb.StreamResponse]:
        while True:
            item = await self._answers.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, pb.StreamResponse)
            yield item

    def kinds(self) -> list[str]:
        return [str(r.WhichOneof("kind")) for r in self.written]


class Calls:
    """The `connect` function handed to the mux: every call it started, newest last."""

    def __init__(self) -> None:
        self.started: list[FakeCall] = []
        self._new = asyncio.Event()

    def __call__(self) -> FakeCall:
        call = FakeCall()
        self.started.append(call)
        self._new.set()
        return call

    async def next(self, count: int) -> FakeCall:
        """The call numbered `count` (1 = the first), once the mux has started it."""
        while len(self.started) < count:
            self._new.clear()
            await asyncio.wait_for(self._new.wait(), 5)
        return self.started[count - 1]


async def _written(call: FakeCall, count: int) -> list[pb.StreamRequest]:
    while len(call.written) < count:
        call.wrote.clear()
        await asyncio.wait_for(call.wrote.wait(), 5)
    return call.written


def _x(value: float) -> np.ndarray:
    return np.full(2, value, np.float32)


def _output(session_id: str, index: int, value: float) -> pb.StreamResponse:
    y = encode(np.full((1, 2), value, np.float32), "y")
    return pb.StreamResponse(
        output=pb.FrameOutput(session_id=session_id, frame_index=index, outputs=[y])
    )


def _opened(session_id: str, next_index: int = 0, resumed: bool = False) -> pb.StreamResponse:
    opened = pb.SessionOpened(
        session_id=session_id, model="echo", next_frame_index=next_index, resumed=resumed
    )
    return pb.StreamResponse(opened=opened)


async def _open(calls: Calls, mux: StreamMux, session_id: str = "s1") -> AsyncSession:
    first = await calls.next(1)
    opening = asyncio.ensure_future(mux.open(pb.OpenSession(model="echo", session_id=session_id)))
    await _written(first, len(first.written) + 1)
    first.answer(_opened(session_id))
    return AsyncSession(mux, MODEL, await opening)


async def test_a_broken_call_is_resumed_and_the_unanswered_frames_resent_in_order() -> None:
    calls = Calls()
    mux = StreamMux(calls, FAST)
    session = await _open(calls, mux)
    first = calls.started[0]
    futures = [await session.send(_x(i)) for i in range(3)]
    await _written(first, 4)  # the open and three frames
    first.answer(_output("s1", 0, 10.0))
    assert (await futures[0])["y"].tolist() == [10.0, 10.0]
    first.fail(grpc.StatusCode.UNAVAILABLE, "connection reset")

    second = await calls.next(2)
    written = await _written(second, 3)
    assert second.kinds() == ["open", "frame", "frame"]
    resume = written[0].open
    assert (resume.session_id, resume.model, resume.resume) == ("s1", "echo", True)
    assert [r.frame.frame_index for r in written[1:]] == [1, 2]
    assert [decode(r.frame.inputs[0]).ravel()[0] for r in written[1:]] == [1.0, 2.0]
    second.answer(_opened("s1", next_index=1, resumed=True))
    second.answer(_output("s1", 1, 11.0))
    second.answer(_output("s1", 2, 12.0))
    assert [(await f)["y"][0] for f in futures[1:]] == [11.0, 12.0]
    assert mux.reconnects == 1
    # New frames go on the new call, numbered on.
    later = await session.send(_x(3))
    assert (await _written(second, 4))[-1].frame.frame_index == 3
    second.answer(_output("s1", 3, 13.0))
    assert (await later)["y"][0] == 13.0
    await mux.close()


async def test_controls_are_resent_in_their_place_among_frames() -> None:
    calls = Calls()
    mux = StreamMux(calls, FAST)
    session = await _open(calls, mux)
    first = calls.started[0]
    frame = await session.send(_x(1))
    flushing = asyncio.ensure_future(session.flush())
    await _written(first, 3)
    last = await session.send(_x(2))
    await _written(first, 4)
    first.fail(grpc.StatusCode.UNAVAILABLE, "gone")
    second = await calls.next(2)
    await _written(second, 4)
    assert second.kinds() == ["open", "frame", "flush", "frame"]
    second.answer(_opened("s1", resumed=True))
    second.answer(_output("s1", 0, 1.0))
    flushed = pb.SessionFlushed(session_id="s1", frame_index=0, next_frame_index=1)
    flushed.outputs.append(encode(np.full((1, 2), 1.0, np.float32), "y"))
    second.answer(pb.StreamResponse(flushed=flushed))
    second.answer(_output("s1", 1, 2.0))
    assert (await frame)["y"][0] == 1.0
    assert (await flushing)["y"].ravel().tolist() == [1.0, 1.0]
    assert (await last)["y"][0] == 2.0
    await mux.close()


async def test_a_refused_resume_loses_the_session() -> None:
    calls = Calls()
    mux = StreamMux(calls, FAST)
    session = await _open(calls, mux)
    pending = await session.send(_x(1))
    calls.started[0].fail(grpc.StatusCode.UNAVAILABLE, "replica gone")
    second = await calls.next(2)
    await _written(second, 2)
    refusal = pb.StreamError(
        session_id="s1", code=grpc.StatusCode.NOT_FOUND.value[0], message="session expired"
    )
    second.answer(pb.StreamResponse(error=refusal))
    with pytest.raises(SessionLost, match="cannot resume: session expired"):
        await pending
    assert session.ended
    with pytest.raises(SessionLost, match="cannot resume"):
        await session.send(_x(2))
    await mux.close()


async def test_reconnects_without_progress_give_up_after_the_policy() -> None:
    calls = Calls()
    mux = StreamMux(calls, RetryPolicy(max_attempts=2, initial_backoff=0.001, max_backoff=0.002))
    session = await _open(calls, mux)
    pending = await session.send(_x(1))
    for number in (1, 2, 3):  # the first call and both retries break before any answer
        call = await calls.next(number)
        await _written(call, 2)
        call.fail(grpc.StatusCode.UNAVAILABLE, "connection refused")
    with pytest.raises(SessionLost, match="gave up after 2 reconnects: connection refused"):
        await pending
    assert mux.reconnects == 2 and len(calls.started) == 3
    with pytest.raises(SessionLost):
        await session.send(_x(2))
    await mux.close()


async def test_in_band_unavailable_reconnects_and_later_refusals_wait_for_the_resume() -> None:
    """A draining server refuses frames in-band with UNAVAILABLE: the mux drops the call and
    resends on a new one; refusals of the frames behind the first are not errors."""
    calls = Calls()
    mux = StreamMux(calls, FAST)
    session = await _open(calls, mux)
    first = calls.started[0]
    futures = [await session.send(_x(i)) for i in range(2)]
    await _written(first, 3)
    for index in (0, 1):
        error = pb.StreamError(
            session_id="s1",
            frame_index=index,
            code=grpc.StatusCode.UNAVAILABLE.value[0],
            message="server is shutting down",
        )
        first.answer(pb.StreamResponse(error=error))
    second = await calls.next(2)
    await _written(second, 3)
    assert second.kinds() == ["open", "frame", "frame"]
    second.answer(_opened("s1", resumed=True))
    second.answer(_output("s1", 0, 5.0))
    second.answer(_output("s1", 1, 6.0))
    assert [(await f)["y"][0] for f in futures] == [5.0, 6.0]
    await mux.close()


async def test_without_retry_a_broken_call_fails_what_waits() -> None:
    calls = Calls()
    mux = StreamMux(calls, None)
    session = await _open(calls, mux)
    pending = await session.send(_x(1))
    calls.started[0].fail(grpc.StatusCode.UNAVAILABLE, "connection reset")
    with pytest.raises(RnnstreamError, match="connection reset") as caught:
        await pending
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(calls.started) == 1
    await mux.close()
