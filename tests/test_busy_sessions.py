"""A session with work under way is never evicted nor expired: the server ends only sessions
that are truly idle. (Each test fails if the registry's busy check is taken out: no other test
did.) Raw stubs; the one ORT thread is held busy so a frame stays in flight."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import grpc
import numpy as np

from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

MODEL = "gru"


async def _until(check: Callable[[], bool]) -> None:
    while not check():
        await asyncio.sleep(0.005)


async def test_eviction_never_takes_a_busy_session(
    make_server: Callable[..., RunningServer],
) -> None:
    """At the cap, with one session's frame running and another's queued behind it, an open is
    refused: neither is idle. Once they are answered, an open evicts the longest-idle one."""
    running = make_server(models=(MODEL,), max_sessions=2, evict_idle_when_full=True)
    x = sequence(MODEL, 2, seed=170)
    release = threading.Event()
    probe.block_ort(running.engine, release)
    try:
        async with RawStream(running.target) as raw:
            first = (await raw.open(MODEL)).session_id
            second = (await raw.open(MODEL)).session_id
            await raw.call.write(frame_request(first, 0, x_tensor(x[:1])))
            await _until(
                lambda: running.run(
                    lambda: bool(probe.session(running.engine, "anonymous", first).in_flight)
                )
            )
            await raw.call.write(frame_request(second, 0, x_tensor(x[:1])))
            await _until(lambda: running.run(lambda: probe.queued_frames(running.engine)) == 1)
            refused = await raw.error(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
            assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], refused
            release.set()
            answers = [await raw.call.read() for _ in range(2)]
            assert {a.output.session_id for a in answers} == {first, second}
            for answer in answers:
                y = decode(answer.output.outputs[0])
                np.testing.assert_allclose(y, ort_full(MODEL, x[:1]), rtol=0, atol=1e-5)
            # Both idle now: an open evicts one (the stream hears of it) and is served.
            await raw.call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
            replies = [await raw.call.read() for _ in range(2)]
            assert sorted(r.WhichOneof("kind") for r in replies) == ["ended", "opened"]
            ended = next(r.ended for r in replies if r.WhichOneof("kind") == "ended")
            assert ended.reason == "evicted" and ended.session_id in (first, second)
    finally:
        release.set()


async def test_expiry_never_ends_a_session_with_a_frame_in_flight(
    make_server: Callable[..., RunningServer],
) -> None:
    """A frame that runs longer than the idle TTL keeps its session: it is answered, and the
    session goes on from the state it left."""
    ttl = 0.3
    running = make_server(models=(MODEL,), session_ttl=ttl)
    x = sequence(MODEL, 2, seed=171)
    release = threading.Event()
    probe.block_ort(running.engine, release)
    try:
        async with RawStream(running.target) as raw:
            sid = (await raw.open(MODEL)).session_id
            await raw.call.write(frame_request(sid, 0, x_tensor(x[:1])))
            await asyncio.sleep(ttl * 5)  # several expiry sweeps pass while it runs
            assert running.run(lambda: probe.session_count(running.engine)) == 1
            release.set()
            first = await raw.call.read()
            assert first.WhichOneof("kind") == "output", first
            second = await raw.frame(sid, 1, x[1:2])
        y = np.concatenate([decode(first.output.outputs[0]), second])
        np.testing.assert_allclose(y, ort_full(MODEL, x), rtol=0, atol=1e-5)
    finally:
        release.set()
