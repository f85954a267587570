"""Three replicas behind nginx sharing one Redis: a replica killed mid-run loses no session."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import redis

from rnnstream import AsyncClient
from rnnstream._mux import RetryPolicy
from rnnstream.server.stores import RedisStore
from tests.conftest import MODELS
from tests.services import NginxProxy, RedisServer, ServerProcess

SESSIONS = 50
FRAMES = 500
MODEL = "rnn_tanh"


def _reference(xs: np.ndarray) -> np.ndarray:
    """Uninterrupted full-sequence ORT run of every session, batched over sessions."""
    sess = ort.InferenceSession(str(MODELS / MODEL / "model.onnx"))
    feeds = {
        "x": np.ascontiguousarray(xs.transpose(1, 0, 2)),
        "initial_h": np.zeros((1, len(xs), 64), np.float32),
    }
    return sess.run(["y"], feeds)[0].transpose(1, 0, 2)


class Cluster:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.redis = RedisServer(tmp)
        self.flags = ("--state-store", self.redis.url, "--models", MODEL, "--session-ttl", "600")
        self.replicas = [self._replica(i) for i in range(3)]
        self.proxy = NginxProxy(tmp, [r.port for r in self.replicas])

    def _replica(self, i: int, port: int | None = None) -> ServerProcess:
        return ServerProcess(*self.flags, port=port, log=self.tmp / f"replica-{i}.log")

    def restart_all(self) -> None:
        for replica in self.replicas:
            replica.terminate()
        self.replicas = [self._replica(i, r.port) for i, r in enumerate(self.replicas)]

    def close(self) -> None:
        for replica in self.replicas:
            replica.kill()
        self.proxy.close()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(tmp_path)
    yield running
    running.close()


async def test_sessions_survive_a_killed_replica_and_a_full_restart(cluster: Cluster) -> None:
    rng = np.random.default_rng(21)
    xs = rng.standard_normal((SESSIONS, FRAMES + 1, 32)).astype(np.float32)
    expected = _reference(xs)
    retry = RetryPolicy(max_attempts=30, initial_backoff=0.02, max_backoff=0.5)
    answered = [0]
    async with AsyncClient(cluster.proxy.target, stream_per_session=True, retry=retry) as client:
        sessions = [await client.open(MODEL) for _ in range(SESSIONS)]

        async def run(i: int) -> np.ndarray:
            outs = []
            async for out in sessions[i].stream(xs[i, :FRAMES], inflight=4):
                outs.append(out["y"])
                answered[0] += 1
            return np.stack(outs)

        async def kill_midway() -> None:
            while answered[0] < SESSIONS * FRAMES // 2:
                await asyncio.sleep(0.01)
            cluster.replicas[1].kill()

        killer = asyncio.create_task(kill_midway())
        got = await asyncio.wait_for(asyncio.gather(*(run(i) for i in range(SESSIONS))), 300)
        await killer
        ids = [s.id for s in sessions]
        reconnects = sum(mux.reconnects for mux in client._own_muxes)
    assert cluster.replicas[1].process.returncode == -9
    assert reconnects > 0  # the killed replica's sessions reconnected through nginx
    restored = sum(
        (cluster.tmp / f"replica-{i}.log").read_text().count("restored from the state store")
        for i in (0, 2)
    )
    assert restored > 0  # and were taken over from Redis by the surviving replicas
    # Every session's outputs equal an uninterrupted run: nothing lost, nothing applied twice
    # (a frame applied twice would change every later output of its session).
    for i in range(SESSIONS):
        np.testing.assert_allclose(got[i], expected[i, :FRAMES], atol=1e-5)
    with redis.Redis(port=cluster.redis.port) as conn:
        stored = [int(conn.hget(RedisStore.key("anonymous", sid), "next") or -1) for sid in ids]
    assert stored == [FRAMES] * SESSIONS

    # All replicas restart together: every session resumes from Redis and steps on correctly.
    cluster.restart_all()
    async with AsyncClient(cluster.proxy.target, stream_per_session=True, retry=retry) as client:
        for i, sid in enumerate(ids):
            resumed = await client.open(MODEL, sid, resume=True)
            assert resumed.resumed and resumed.next_index == FRAMES
            out = await resumed.step(xs[i, FRAMES])
            np.testing.assert_allclose(out["y"], expected[i, FRAMES], atol=1e-5)
