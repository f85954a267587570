"""No stream stalls for good: several streams feeding one session all go on once it has room.
Driven by raw rnnstream.v1 streams."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import numpy as np
import pytest

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request, ort_full, sequence, x_tensor

MODEL = "gru"
FRAMES_PER_STREAM = 12


@pytest.mark.parametrize("streams", [2, 8])
async def test_streams_feeding_one_session_all_go_on(
    make_server: Callable[..., RunningServer], streams: int
) -> None:
    """Every stream that stopped reading because the shared session's queue was full is woken
    when it has room: each gets an answer to every frame it wrote, and a new session opened on
    it afterwards is served."""
    limit = 2
    running = make_server(models=(MODEL,), max_pending_frames=limit)
    x = sequence(MODEL, 1, seed=110)
    release = threading.Event()
    probe.block_ort(running.engine, release)  # frames pile up in the session's queue
    raws = [RawStream(running.target) for _ in range(streams)]
    try:
        sid = (await raws[0].open(MODEL)).session_id
        for raw in raws[1:]:
            again = await raw.request(
                pb.StreamRequest(open=pb.OpenSession(model=MODEL, session_id=sid))
            )
            assert again.opened.resumed
        for n, raw in enumerate(raws):
            for i in range(FRAMES_PER_STREAM):  # indices collide: what matters is an answer
                await raw.call.write(frame_request(sid, n * FRAMES_PER_STREAM + i, x_tensor(x)))

        def queue_full() -> bool:
            return bool(probe.session(running.engine, "anonymous", sid).frames_queued >= limit)

        while not running.run(queue_full):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the streams read on until each finds the queue full
        release.set()

        async def answers(raw: RawStream) -> list[str]:
            return [(await raw.call.read()).WhichOneof("kind") for _ in range(FRAMES_PER_STREAM)]

        kinds = await asyncio.wait_for(asyncio.gather(*(answers(r) for r in raws)), 30)
        assert all(set(k) <= {"output", "error"} for k in kinds), kinds
        for raw in raws:
            fresh = (await raw.open(MODEL)).session_id
            y = await asyncio.wait_for(raw.frame(fresh, 0, x), 30)
            np.testing.assert_allclose(y, ort_full(MODEL, x), rtol=0, atol=1e-5)
    finally:
        release.set()
        for raw in raws:
            await raw.__aexit__()
