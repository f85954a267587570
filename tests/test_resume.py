"""Exactly-once frames across dropped connections: the client resumes and resends by itself."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import onnxruntime as ort
import pytest

from rnnstream import AsyncClient, SessionLost
from rnnstream._mux import RetryPolicy
from tests import probe
from tests.conftest import MODELS, RunningServer
from tests.faults import FaultyProxy

SESSIONS = 20
FRAMES = 500


def _reference(model: str, xs: np.ndarray) -> np.ndarray:
    """Full-sequence ORT run of each session's frames, batched over sessions."""
    sess = ort.InferenceSession(str(MODELS / model / "model.onnx"))
    hidden = sess.get_inputs()[1].shape[2]
    feeds = {
        "x": np.ascontiguousarray(xs.transpose(1, 0, 2)),
        "initial_h": np.zeros((1, len(xs), hidden), np.float32),
    }
    return sess.run(["y"], feeds)[0].transpose(1, 0, 2)


async def test_outputs_survive_100_dropped_connections(make_server) -> None:
    server: RunningServer = make_server(output_ring=256)
    proxy = FaultyProxy(server.port)
    rng = np.random.default_rng(7)
    xs = rng.standard_normal((SESSIONS, FRAMES, 32)).astype(np.float32)
    expected = _reference("rnn_tanh", xs)
    retry = RetryPolicy(max_attempts=50, initial_backoff=0.005, max_backoff=0.05)
    done = asyncio.Event()

    answered = [0]

    async def saboteur() -> None:
        # Cut at random points of the stream: after a random number of newly answered frames.
        chooser = random.Random(3)
        while not done.is_set():
            target = answered[0] + chooser.randint(5, 80)
            while answered[0] < target and not done.is_set():
                await asyncio.sleep(0.002)
            await asyncio.sleep(chooser.uniform(0, 0.01))
            await asyncio.to_thread(proxy.drop)

    try:
        async with AsyncClient(f"127.0.0.1:{proxy.port}", retry=retry) as client:
            sessions = [await client.open("rnn_tanh") for _ in range(SESSIONS)]
            chaos = asyncio.create_task(saboteur())

            async def run(i: int) -> np.ndarray:
                outs = []
                async for out in sessions[i].stream(xs[i], inflight=8):
                    outs.append(out["y"])
                    answered[0] += 1
                return np.stack(outs)

            got = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(SESSIONS))), 240)
            done.set()
            await chaos
            reconnects = client._mux.reconnects if client._mux else 0
    finally:
        proxy.close()
    assert proxy.drops >= 100, f"only {proxy.drops} connections were cut"
    assert reconnects >= 100
    for i in range(SESSIONS):
        np.testing.assert_allclose(got[i], expected[i], atol=1e-5)
    # Each frame index applied exactly once: the server's applied-frame counters add up.
    assert server.run(lambda: server.engine.model_stats("rnn_tanh").frames) == SESSIONS * FRAMES
    applied = server.run(lambda: probe.next_indices(server.engine))
    assert [applied[s.id] for s in sessions] == [FRAMES] * SESSIONS


async def test_resume_of_expired_session_says_so(make_server) -> None:
    server: RunningServer = make_server(session_ttl=0.2)
    async with AsyncClient(server.target) as client:
        session = await client.open("gru")
        await session.step(np.zeros(16, np.float32))
        await asyncio.sleep(0.8)
        with pytest.raises(SessionLost, match="expired"):
            await client.open("gru", session.id, resume=True)
