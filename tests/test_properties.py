"""Property-based: random interleavings of valid and invalid messages over many sessions and
streams (garbage bytes, huge and negative shapes, NaN and infinities, out-of-range indices,
abrupt cancellations). The server stays up, every valid session's outputs equal the numpy
reference, and nothing leaks: sessions and state-pool slots return to zero once all end."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer, test_settings
from tests.streaming import FEATURES, HIDDEN, numpy_full

T = TypeVar("T")
MODELS = ("gru", "rnn_tanh")
MAX_STEPS = 8
ATOL = 1e-5
# Together over 2,000 examples in every run. The default hypothesis profile ("fixed",
# tests/conftest.py) derandomizes them, so every run tries the same ones; .ci/run also runs
# the "random" profile with a fresh seed, which it prints.
STREAM_EXAMPLES = 1500
UNARY_EXAMPLES = 600
BAD_FRAMES = (
    "nan",
    "inf",
    "wrong_features",
    "float64",
    "huge_shape",
    "negative_shape",
    "truncated",
    "zero_steps",
    "too_many_steps",
    "max_index",  # what frame index -1 becomes on the wire: 2**64 - 1
    "future_index",
    "unknown_input",
    "unknown_session",
)
BAD_MESSAGES = ("garbage", "empty", "unknown_model")


class Driver:
    """A client event loop on its own thread, with one channel reused by every example."""

    def __init__(self, target: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.channel: grpc.aio.Channel = self.run(self._channel(target))
        identity = None  # requests travel as raw bytes, so garbage can too
        self.stream = self.channel.stream_stream(
            "/rnnstream.v1.Rnnstream/Stream",
            request_serializer=identity,
            response_deserializer=pb.StreamResponse.FromString,
        )
        self.infer = self.channel.unary_unary(
            "/rnnstream.v1.Rnnstream/Infer",
            request_serializer=identity,
            response_deserializer=pb.InferResponse.FromString,
        )
        self.end = self.channel.unary_unary(
            "/rnnstream.v1.Rnnstream/EndSession",
            request_serializer=pb.EndSessionRequest.SerializeToString,
            response_deserializer=pb.SessionEnded.FromString,
        )

    @staticmethod
    async def _channel(target: str) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(target)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.channel.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def running() -> Iterator[RunningServer]:
    server = RunningServer(test_settings(models=MODELS, max_steps_per_frame=MAX_STEPS))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def driver(running: RunningServer) -> Iterator[Driver]:
    d = Driver(running.target)
    yield d
    d.close()


# -- strategies ----------------------------------------------------------------------------------
frame_op = st.tuples(st.just("frame"), st.integers(0, 2), st.integers(1, 3), st.integers(0, 2**16))
bad_frame_op = st.tuples(st.just("bad"), st.integers(0, 2), st.sampled_from(BAD_FRAMES))
bad_message_op = st.tuples(
    st.just("message"), st.sampled_from(BAD_MESSAGES), st.binary(max_size=48)
)
reset_op = st.tuples(st.just("reset"), st.integers(0, 2))
replay_op = st.tuples(st.just("replay"), st.integers(0, 2))
stream_program = st.fixed_dictionaries(
    {
        "models": st.lists(st.sampled_from(MODELS), min_size=1, max_size=3),
        "ops": st.lists(
            st.one_of(frame_op, frame_op, bad_frame_op, bad_message_op, reset_op, replay_op),
            max_size=14,
        ),
        # Cancel the call abruptly after this many messages (None: end it properly).
        "cancel_at": st.one_of(st.none(), st.none(), st.integers(0, 14)),
    }
)
unary_op = st.one_of(
    st.tuples(st.just("infer"), st.sampled_from(MODELS), st.integers(1, 3), st.integers(0, 2**16)),
    st.tuples(st.just("bad_infer"), st.sampled_from(MODELS), st.sampled_from(BAD_FRAMES[:9])),
    st.tuples(st.just("garbage"), st.binary(max_size=48)),
    st.tuples(st.just("cancelled"), st.sampled_from(MODELS), st.integers(1, 3)),
)


# -- messages ------------------------------------------------------------------------------------
def _x(model: str, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, FEATURES[model])).astype(np.float32)


def _bad_tensor(model: str, kind: str) -> pb.Tensor:
    f = FEATURES[model]
    x = _x(model, 2, 1)
    if kind == "nan":
        x[1, 3] = np.nan
    elif kind == "inf":
        x[0, 0] = -np.inf
    elif kind == "wrong_features":
        return encode(np.zeros((2, f + 1), np.float32), "x")
    elif kind == "float64":
        return encode(x.astype(np.float64), "x")
    elif kind == "huge_shape":
        return pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[2**40, 2**40, f], data=x.tobytes())
    elif kind == "negative_shape":
        return pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[-2, f], data=x.tobytes())
    elif kind == "truncated":
        return pb.Tensor(name="x", dtype=pb.FLOAT32, shape=[2, f], data=x.tobytes()[:-4])
    elif kind == "zero_steps":
        return encode(np.zeros((0, f), np.float32), "x")
    elif kind == "too_many_steps":
        return encode(_x(model, MAX_STEPS + 1, 2), "x")
    elif kind == "unknown_input":
        return encode(x, "z")
    return encode(x, "x")


@dataclass
class Sess:
    sid: str
    model: str
    next_index: int = 0
    # Valid frames in order, each with the segment (reset count) it belongs to.
    frames: list[tuple[int, int, np.ndarray]] = field(default_factory=list)
    segment: int = 0
    replays: list[int] = field(default_factory=list)


@dataclass
class Plan:
    messages: list[bytes]
    sessions: list[Sess]
    errors: int = 0
    resets: int = 0


def _frame(sid: str, index: int, tensor: pb.Tensor) -> bytes:
    frame = pb.Frame(session_id=sid, frame_index=index, inputs=[tensor])
    return pb.StreamRequest(frame=frame).SerializeToString()


def _plan(program: dict[str, Any]) -> Plan:
    tag = uuid.uuid4().hex[:12]
    sessions = [Sess(f"p-{tag}-{k}", model) for k, model in enumerate(program["models"])]
    plan = Plan([], sessions)
    for s in sessions:
        opening = pb.OpenSession(model=s.model, session_id=s.sid)
        plan.messages.append(pb.StreamRequest(open=opening).SerializeToString())
    for op in program["ops"]:
        kind = op[0]
        if kind == "message":
            _, what, data = op
            plan.errors += 1
            if what == "garbage":
                plan.messages.append(data)
            elif what == "empty":
                plan.messages.append(b"")
            else:
                bad = pb.OpenSession(model="no-such-model")
                plan.messages.append(pb.StreamRequest(open=bad).SerializeToString())
            continue
        s = sessions[op[1] % len(sessions)]
        if kind == "frame":
            x = _x(s.model, op[2], op[3])
            plan.messages.append(_frame(s.sid, s.next_index, encode(x, "x")))
            s.frames.append((s.next_index, s.segment, x))
            s.next_index += 1
        elif kind == "bad":
            plan.errors += 1
            what = op[2]
            index = {"max_index": 2**64 - 1, "future_index": s.next_index + 5}.get(
                what, s.next_index
            )
            sid = f"gone-{tag}" if what == "unknown_session" else s.sid
            plan.messages.append(_frame(sid, index, _bad_tensor(s.model, what)))
        elif kind == "reset":
            reset = pb.ResetSession(session_id=s.sid, frame_index=s.next_index)
            plan.messages.append(pb.StreamRequest(reset=reset).SerializeToString())
            s.segment += 1
            plan.resets += 1
        elif kind == "replay" and s.next_index > 0:
            # An already-applied index: answered again from the output ring, not reapplied.
            index = s.next_index - 1
            x = next(x for i, _, x in s.frames if i == index)
            plan.messages.append(_frame(s.sid, index, encode(x, "x")))
            s.replays.append(index)
    for s in sessions:
        end = pb.EndSessionRequest(session_id=s.sid)
        plan.messages.append(pb.StreamRequest(end=end).SerializeToString())
    return plan


def _expected(s: Sess) -> dict[int, np.ndarray]:
    """Each valid frame's output from the numpy reference, segment by segment."""
    out: dict[int, np.ndarray] = {}
    for segment in sorted({seg for _, seg, _ in s.frames}):
        frames = [(i, x) for i, seg, x in s.frames if seg == segment]
        y = numpy_full(s.model, np.concatenate([x for _, x in frames]))
        at = 0
        for i, x in frames:
            out[i] = y[at : at + len(x)]
            at += len(x)
    return out


# -- running one example -------------------------------------------------------------------------
async def _run_stream(driver: Driver, program: dict[str, Any]) -> None:
    plan = _plan(program)
    call = driver.stream()
    cancel_at = program["cancel_at"]
    if cancel_at is not None and cancel_at < len(plan.messages):
        for message in plan.messages[:cancel_at]:
            await call.write(message)
            await asyncio.sleep(0)
        call.cancel()
        # Its sessions outlive the call (they wait for a resume): end them by id.
        for s in plan.sessions:
            try:
                await driver.end(pb.EndSessionRequest(session_id=s.sid), timeout=10)
            except grpc.aio.AioRpcError as exc:
                # Not opened yet when the call was cancelled, or ended by the call already.
                assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return
    for message in plan.messages:
        await call.write(message)
        await asyncio.sleep(0)  # let other streams interleave
    await call.done_writing()
    kinds: Counter[str] = Counter()
    outputs: dict[tuple[str, int], list[np.ndarray]] = {}
    ended: dict[str, int] = {}
    async for response in call:
        kind = response.WhichOneof("kind")
        kinds[kind] += 1
        if kind == "output":
            o = response.output
            outputs.setdefault((o.session_id, o.frame_index), []).append(decode(o.outputs[0]))
        elif kind == "ended":
            ended[response.ended.session_id] = response.ended.next_frame_index
    assert kinds["error"] == plan.errors
    assert kinds["reset"] == plan.resets
    assert kinds["opened"] == len(plan.sessions)
    expected_outputs = {}
    hidden = {s.sid: HIDDEN[s.model] for s in plan.sessions}
    for s in plan.sessions:
        assert ended[s.sid] == s.next_index
        for index, y in _expected(s).items():
            expected_outputs[(s.sid, index)] = [y] * (1 + s.replays.count(index))
    assert outputs.keys() == expected_outputs.keys()
    for key, ys in expected_outputs.items():
        got = outputs[key]
        assert len(got) == len(ys), key
        for g, y in zip(got, ys, strict=True):
            assert g.shape == (len(y), hidden[key[0]])
            np.testing.assert_allclose(g, y, rtol=0, atol=ATOL)


async def _run_unary(driver: Driver, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "garbage":
        try:
            await driver.infer(op[1], timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
        return
    model = op[1]
    if kind == "bad_infer":
        request = pb.InferRequest(model=model, inputs=[_bad_tensor(model, op[2])])
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await driver.infer(request.SerializeToString(), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return
    x = _x(model, op[2], op[3] if kind == "infer" else 5)
    request = pb.InferRequest(model=model, inputs=[encode(x, "x")]).SerializeToString()
    if kind == "cancelled":
        call = driver.infer(request, timeout=10)
        await asyncio.sleep(0)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call  # a cancelled call; the server must simply drop its frame
        return
    reply = await driver.infer(request, timeout=10)
    np.testing.assert_allclose(decode(reply.outputs[0]), numpy_full(model, x), rtol=0, atol=ATOL)


def _settled(running: RunningServer) -> tuple[int, int, int]:
    engine = running.engine
    return (
        probe.session_count(engine),
        probe.live_slots(engine),
        probe.queued_frames(engine),
    )


def _assert_nothing_leaks(running: RunningServer) -> None:
    # Stateless Infer frees its scratch slot just after answering: allow it a moment.
    deadline = time.monotonic() + 3
    while (state := running.run(lambda: _settled(running))) != (0, 0, 0):
        assert time.monotonic() < deadline, f"left behind (sessions, slots, frames): {state}"
        time.sleep(0.005)


COMMON = dict(
    # A failure is reported as found, unshrunk: shrinking re-runs examples that each wait out
    # the leak check's deadline, past any sensible test time.
    phases=(Phase.explicit, Phase.generate),
    report_multiple_bugs=False,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@settings(max_examples=STREAM_EXAMPLES, **COMMON)
@given(programs=st.lists(stream_program, min_size=1, max_size=3))
def test_streams_of_valid_and_invalid_messages(
    running: RunningServer, driver: Driver, programs: list[dict[str, Any]]
) -> None:
    async def example() -> None:
        await asyncio.gather(*(_run_stream(driver, p) for p in programs))

    driver.run(example())
    _assert_nothing_leaks(running)


@settings(max_examples=UNARY_EXAMPLES, **COMMON)
@given(ops=st.lists(unary_op, min_size=1, max_size=6))
def test_unary_calls_of_valid_and_invalid_requests(
    running: RunningServer, driver: Driver, ops: list[tuple[Any, ...]]
) -> None:
    async def example() -> None:
        await asyncio.gather(*(_run_unary(driver, op) for op in ops))

    driver.run(example())
    _assert_nothing_leaks(running)
