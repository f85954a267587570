"""Streamed outputs equal the numpy cell equations and a full-sequence ORT run, within 1e-5."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import pytest

from rnnstream import AsyncClient, Client
from tests.conftest import RunningServer
from tests.streaming import (
    HIDDEN,
    MODEL_NAMES,
    assert_matches_references,
    numpy_full,
    ort_full,
    sequence,
)

STEPS = 24


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_frame_by_frame(server: RunningServer, model: str) -> None:
    x = sequence(model, STEPS, seed=100)
    with Client(server.target) as client:
        session = client.open(model)
        ys = [session.step(row)["y"] for row in x]
        session.end()
    assert all(y.shape == (HIDDEN[model],) for y in ys)
    assert_matches_references(model, x, np.stack(ys))


@pytest.mark.parametrize("model", MODEL_NAMES)
@pytest.mark.parametrize("chunks", [(4,) * 6, (1, 5, 2, 9, 7)])
def test_chunks_of_t(server: RunningServer, model: str, chunks: tuple[int, ...]) -> None:
    x = sequence(model, sum(chunks), seed=101)
    pieces = np.split(x, np.cumsum(chunks)[:-1])
    with Client(server.target) as client:
        session = client.open(model)
        outs = [out["y"] for out in session.stream(pieces, inflight=3)]
        session.end()
    assert [o.shape for o in outs] == [(len(p), HIDDEN[model]) for p in pieces]
    assert_matches_references(model, x, np.concatenate(outs))


def test_references_disagree_with_wrong_state() -> None:
    """The comparison can fail: a sequence run from a different state is far outside 1e-5."""
    x = sequence("gru", STEPS, seed=102)
    shifted = np.concatenate([sequence("gru", 1, seed=103), x])
    assert np.abs(ort_full("gru", shifted)[1:] - numpy_full("gru", x)).max() > 1e-3


def _plan(n_sessions: int, steps: int, seed: int) -> list[int]:
    """A random interleaving: session i appears `steps` times, in shuffled order."""
    order = [i for i in range(n_sessions) for _ in range(steps)]
    random.Random(seed).shuffle(order)
    return order


async def test_fifty_sessions_interleaved_on_one_stream(server: RunningServer) -> None:
    n, steps = 50, 12
    models = [MODEL_NAMES[i % len(MODEL_NAMES)] for i in range(n)]
    xs = [sequence(m, steps, seed=200 + i) for i, m in enumerate(models)]
    async with AsyncClient(server.target) as client:
        sessions = [await client.open(m) for m in models]
        assert len({s.id for s in sessions}) == n
        futures: list[list[asyncio.Future[dict[str, np.ndarray]]]] = [[] for _ in range(n)]
        sent = [0] * n
        for i in _plan(n, steps, seed=1):
            futures[i].append(await sessions[i].send(xs[i][sent[i]]))
            sent[i] += 1
        outs = [[(await f)["y"] for f in fs] for fs in futures]
        for s in sessions:
            await s.end()
    for model, x, ys in zip(models, xs, outs, strict=True):
        assert_matches_references(model, x, np.stack(ys))


async def test_fifty_sessions_on_separate_streams(server: RunningServer) -> None:
    n, steps = 50, 10
    models = [MODEL_NAMES[(i * 3) % len(MODEL_NAMES)] for i in range(n)]
    xs = [sequence(m, steps, seed=300 + i) for i, m in enumerate(models)]
    clients = [AsyncClient(server.target) for _ in range(n)]
    try:
        sessions = await asyncio.gather(*(c.open(m) for c, m in zip(clients, models, strict=True)))
        futures: list[list[asyncio.Future[dict[str, np.ndarray]]]] = [[] for _ in range(n)]
        sent = [0] * n
        rng = random.Random(3)
        for i in _plan(n, steps, seed=2):
            if sent[i] == steps:
                continue
            # Chunks of random T keep the scheduler from batching everything alike.
            t = min(rng.choice((1, 2)), steps - sent[i])
            futures[i].append(await sessions[i].send(xs[i][sent[i] : sent[i] + t]))
            sent[i] += t
        outs = [np.concatenate([(await f)["y"] for f in fs]) for fs in futures]
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    assert sent == [steps] * n
    for model, x, ys in zip(models, xs, outs, strict=True):
        assert_matches_references(model, x, ys)
