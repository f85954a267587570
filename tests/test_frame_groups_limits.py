"""FrameGroup rows under the server's other rules: the state store (one write per batch, resume on
another replica), per-principal rate limits (each row is a frame), metrics counting each frame."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.server_process import free_port
from tests.services import RedisServer
from tests.streaming import RawStream, assert_matches_references, sequence
from tests.tenants import Tenant
from tests.test_frame_groups import answer, group_request, rows_of

MODEL = "gru"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


def _script_calls(server: RedisServer) -> int:
    """Lua script calls the Redis server has run (each batch step is one)."""
    with redis.Redis(port=server.port) as client:
        stats = client.info("commandstats")
    return sum(
        int(v["calls"]) for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")
    )


async def test_groups_write_once_per_batch_and_resume_elsewhere(
    make_server: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    a = make_server(state_store=redis_server.url, models=(MODEL,), session_ttl=60)
    b = make_server(state_store=redis_server.url, models=(MODEL,), session_ttl=60)
    xs = np.stack([sequence(MODEL, 6, seed=60 + k) for k in range(8)])
    async with RawStream(a.target) as stream:
        ids = [(await stream.open(MODEL)).session_id for _ in range(8)]
        calls = _script_calls(redis_server)
        first = [
            rows_of(await answer(stream, group_request(t, MODEL, ids, [t] * 8, xs[:, t : t + 1])))
            for t in range(4)
        ]
        # Four groups of eight: four batches, four writes (not 32).
        assert _script_calls(redis_server) - calls == 4
        assert a.run(lambda: a.engine.model_stats(MODEL).batches) == 4
    async with RawStream(b.target) as stream:
        for session_id in ids:
            resume = pb.OpenSession(model=MODEL, session_id=session_id, resume=True)
            opened = await stream.request(pb.StreamRequest(open=resume))  # from the store
            assert opened.opened.resumed and opened.opened.next_frame_index == 4
        # Frame 3 resent to the new replica is answered from the stored ring.
        again = await answer(stream, group_request(9, MODEL, ids, [3] * 8, xs[:, 3:4]))
        assert not again.errors
        np.testing.assert_array_equal(rows_of(again), first[3])
        rest = [
            rows_of(await answer(stream, group_request(t, MODEL, ids, [t] * 8, xs[:, t : t + 1])))
            for t in range(4, 6)
        ]
    for k in range(8):
        y = np.concatenate([step[k] for step in first + rest])
        assert_matches_references(MODEL, xs[k], y)


async def test_each_row_counts_against_the_principals_rate(
    make_server: Callable[..., RunningServer],
) -> None:
    rate, burst, rows, groups = 40.0, 4.0, 8, 3
    metrics_port = free_port()
    running = make_server(
        auth_tokens=("bob=bob-token",),
        rate_limit_frames=rate,
        rate_limit_burst=burst,
        metrics_port=metrics_port,
        metrics_per_principal=True,
    )
    bob = Tenant(running.target, token="bob-token")
    xs = np.stack([sequence(MODEL, groups, seed=70 + k) for k in range(rows)])
    try:
        async with bob.stream() as stream:
            ids = [(await stream.open(MODEL, f"s{k}")).session_id for k in range(rows)]
            started = time.monotonic()
            for t in range(groups):
                request = group_request(t, MODEL, ids, [t] * rows, xs[:, t : t + 1])
                assert not (await answer(stream, request)).errors
            elapsed = time.monotonic() - started
    finally:
        await bob.close()
    # 24 frames at 40 a second after a burst of 4: the stream was read no faster than that.
    assert elapsed >= (rows * groups - burst) / rate
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert f'rnnstream_principal_frames_total{{principal="bob"}} {rows * groups:.1f}' in text


async def test_metrics_count_every_row(make_server: Callable[..., RunningServer]) -> None:
    port = free_port()
    running = make_server(models=(MODEL,), metrics_port=port)
    async with RawStream(running.target) as stream:
        ids = [(await stream.open(MODEL)).session_id for _ in range(5)]
        rows = np.stack([sequence(MODEL, 1, seed=k) for k in range(5)])
        request = group_request(1, MODEL, [*ids, "gone"], [0] * 6, np.concatenate([rows, rows[:1]]))
        outputs = await answer(stream, request)
        assert len(outputs.errors) == 1
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    label = (("model", MODEL),)
    assert samples[("rnnstream_frames_total", (("model", MODEL), ("status", "OK")))] == 5
    assert samples[("rnnstream_frames_total", (("model", MODEL), ("status", "NOT_FOUND")))] == 1
    # Each answered frame is one latency sample, though the five were answered together.
    assert samples[("rnnstream_frame_latency_seconds_count", label)] == 5
    buckets = [
        v
        for (name, labels), v in samples.items()
        if name == "rnnstream_frame_latency_seconds_bucket"
    ]
    assert max(buckets) == 5
    assert samples[("rnnstream_batch_size_sum", label)] == 5
    # Five opens and one group in, five opened and one GroupOutputs out: messages, not frames.
    assert samples[("rnnstream_stream_requests_total", ())] == 6
    assert samples[("rnnstream_stream_responses_total", ())] == 6
    assert running.run(lambda: probe.queued_frames(running.engine)) == 0
