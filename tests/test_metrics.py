"""Prometheus /metrics on --metrics-port: every family, its labels, and values that add up."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rnnstream import AsyncClient, RnnstreamError, SessionLost
from tests import probe
from tests.conftest import RunningServer
from tests.ports import reserved_port
from tests.streaming import FEATURES, HIDDEN, RawStream, frame_request, sequence, x_tensor

MODEL = "gru"


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_endpoint_counts_everything(
    make_server: Callable[..., RunningServer],
) -> None:
    port = reserved_port()
    running = make_server(
        metrics_port=port, session_ttl=3, max_sessions=3, evict_idle_when_full=True
    )
    assert running.server.metrics_port == port
    f, h = FEATURES[MODEL], HIDDEN[MODEL]
    before = await asyncio.to_thread(_scrape, port)
    # Every family is exported from the start.
    names = {name for name, _ in before}
    for family in (
        "rnnstream_bytes_received_total",
        "rnnstream_bytes_sent_total",
        "rnnstream_active_sessions",
        "rnnstream_queue_depth",
        "rnnstream_frame_latency_seconds_count",
        "rnnstream_ort_run_seconds_count",
        "rnnstream_batch_size_count",
    ):
        assert any(n == family for n in names), family
    async with AsyncClient(running.target) as client:
        first = await client.open(MODEL)
        x = sequence(MODEL, 7, seed=60)
        await first.step(x[:3])  # one frame of T=3
        for row in x[3:]:
            await first.step(row)  # four frames of T=1
        # A refused frame: NaN.
        bad = x[:1].copy()
        bad[0, 0] = np.nan
        with pytest.raises(RnnstreamError) as info:
            await first.step(bad)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        # A stateless Infer of T=2 counts as a frame too.
        await client.infer(MODEL, x[:2])
        mid = await asyncio.to_thread(_scrape, port)
        assert _value(mid, "rnnstream_active_sessions", model=MODEL) == 1
        assert _value(mid, "rnnstream_sessions_opened_total", model=MODEL) == 1
        # Fill the cap (3), then one more open evicts the longest-idle session: `first`.
        others = [await client.open(MODEL) for _ in range(2)]
        await others[0].step(x[0])
        await others[1].step(x[0])
        newest = await client.open(MODEL)
        with pytest.raises(SessionLost, match="evicted"):
            await first.step(x[0])
        await others[0].end()
        # `others[1]` and `newest` expire after 3 s idle.
        deadline = asyncio.get_running_loop().time() + 20
        while running.run(lambda: probe.session_count(running.engine)) and (
            asyncio.get_running_loop().time() < deadline
        ):
            await asyncio.sleep(0.1)
        assert newest is not None
    after = await asyncio.to_thread(_scrape, port)
    ok = _value(after, "rnnstream_frames_total", model=MODEL, status="OK")
    # 5 frames of `first`, 1 Infer, 1 each for the two others.
    assert ok == 8
    assert _value(after, "rnnstream_frames_total", model=MODEL, status="INVALID_ARGUMENT") == 1
    # Tensor bytes: float32 inputs of every frame received (the NaN one included) and outputs.
    steps_in = 7 + 1 + 2 + 2
    steps_out = 7 + 2 + 2
    assert _value(after, "rnnstream_bytes_received_total") == steps_in * f * 4
    assert _value(after, "rnnstream_bytes_sent_total") == steps_out * h * 4
    assert _value(after, "rnnstream_sessions_opened_total", model=MODEL) == 4
    assert _value(after, "rnnstream_sessions_ended_total", model=MODEL, reason="evicted") == 1
    assert _value(after, "rnnstream_sessions_ended_total", model=MODEL, reason="client") == 1
    assert _value(after, "rnnstream_sessions_ended_total", model=MODEL, reason="expired") == 2
    assert _value(after, "rnnstream_active_sessions", model=MODEL) == 0
    assert _value(after, "rnnstream_queue_depth", model=MODEL) == 0
    stats = running.run(lambda: running.engine.model_stats(MODEL))
    assert stats.frames == 8
    # Histograms: one latency per applied frame, one ORT time and batch size per batch.
    assert _value(after, "rnnstream_frame_latency_seconds_count", model=MODEL) == 8
    assert _value(after, "rnnstream_ort_run_seconds_count", model=MODEL) == stats.batches
    assert _value(after, "rnnstream_batch_size_count", model=MODEL) == stats.batches
    assert _value(after, "rnnstream_batch_size_sum", model=MODEL) == stats.frames
    assert _value(after, "rnnstream_ort_run_seconds_sum", model=MODEL) > 0
    buckets = [
        v
        for (name, labels), v in after.items()
        if name == "rnnstream_frame_latency_seconds_bucket" and ("model", MODEL) in labels
    ]
    assert max(buckets) == 8  # the +Inf bucket holds every frame


async def test_queue_depth_shows_waiting_frames(make_server: Callable[..., RunningServer]) -> None:
    port = reserved_port()
    # Every batch goes to the executor (no inline runs), and its one ORT thread is occupied:
    # frames that arrive now wait in the scheduler's queue.
    running = make_server(metrics_port=port, models=(MODEL,), max_batch_size=4)
    release = threading.Event()
    probe.block_ort(running.engine, release)
    try:
        async with RawStream(running.target) as raw:
            opened = [await raw.open(MODEL) for _ in range(6)]
            x = sequence(MODEL, 3, seed=61)
            for i in range(3):
                for o in opened:
                    await raw.call.write(frame_request(o.session_id, i, x_tensor(x[i : i + 1])))

            def depth() -> float:
                return _value(_scrape(port), "rnnstream_queue_depth", model=MODEL)

            # Only the first batch (at most 4 frames, one per session) left the queue.
            deadline = asyncio.get_running_loop().time() + 5
            while (waiting := await asyncio.to_thread(depth)) < 18 - 4:
                assert asyncio.get_running_loop().time() < deadline, waiting
                await asyncio.sleep(0.02)
            assert waiting <= 17
            release.set()
            for _ in range(18):
                assert (await raw.call.read()).WhichOneof("kind") == "output"
    finally:
        release.set()
    assert await asyncio.to_thread(depth) == 0


def test_metrics_off_by_default_in_tests(server: RunningServer) -> None:
    # metrics_port=0 turns the endpoint off: nothing bound.
    assert server.server.metrics_port == 0
