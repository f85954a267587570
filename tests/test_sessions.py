"""Session lifecycle: isolation, reset, resume and resend, idle expiry and the session cap."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from rnnstream import AsyncClient, RnnstreamError
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import (
    MODEL_NAMES,
    RawStream,
    assert_matches_references,
    ort_full,
    sequence,
)


async def test_state_never_leaks_into_a_reused_slot(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        first = await client.open("lstm")
        for row in sequence("lstm", 8, seed=1):
            await first.step(row)
        await first.end()
        # The freed slot is handed to the next session, which must start from the zero state.
        x = sequence("lstm", 8, seed=2)
        second = await client.open("lstm")
        ys = [(await second.step(row))["y"] for row in x]
        await second.end()
    assert_matches_references("lstm", x, np.stack(ys))


async def test_states_survive_pool_growth_and_compaction(server: RunningServer) -> None:
    """150 sessions outgrow the initial pool; ending most shrinks it; survivors keep their state."""
    n, keep = 150, (0, 7, 70, 149)
    xs = [sequence("rnn_tanh", 6, seed=400 + i) for i in range(n)]
    async with AsyncClient(server.target) as client:
        sessions = [await client.open("rnn_tanh") for _ in range(n)]
        first = await asyncio.gather(*(s.step(x[:3]) for s, x in zip(sessions, xs, strict=True)))
        grown = server.run(lambda: probe.pool_capacity(server.engine, "rnn_tanh"))
        assert grown >= n
        await asyncio.gather(*(s.end() for i, s in enumerate(sessions) if i not in keep))
        # The scheduler compacts the pool while idle, moving survivors to low slots.
        deadline = time.monotonic() + 5
        while server.run(lambda: probe.pool_capacity(server.engine, "rnn_tanh")) == grown:
            assert time.monotonic() < deadline, "the state pool never shrank"
            await asyncio.sleep(0.02)
        # New sessions take freed slots; they must not disturb the survivors.
        newcomers = [await client.open("rnn_tanh") for _ in range(3)]
        await asyncio.gather(*(s.step(xs[0][:2]) for s in newcomers))
        rest = await asyncio.gather(*(sessions[i].step(xs[i][3:]) for i in keep))
    for i, out in zip(keep, rest, strict=True):
        assert_matches_references("rnn_tanh", xs[i], np.concatenate([first[i]["y"], out["y"]]))


@pytest.mark.parametrize("model", MODEL_NAMES)
async def test_reset_returns_to_the_initial_state(server: RunningServer, model: str) -> None:
    x = sequence(model, 10, seed=5)
    async with AsyncClient(server.target) as client:
        session = await client.open(model)
        await session.step(sequence(model, 7, seed=6))
        next_index = await session.reset()
        assert next_index == 1  # numbering goes on across a reset
        ys = [(await session.step(row))["y"] for row in x]
        info = await client.get_session(session.id)
        assert info.next_frame_index == 1 + len(x)
        await session.end()
    assert_matches_references(model, x, np.stack(ys))


async def test_resume_on_a_new_stream_and_resend(server: RunningServer) -> None:
    x = sequence("gru", 12, seed=7)
    expected = ort_full("gru", x)
    async with AsyncClient(server.target) as client:
        session = await client.open("gru", "resume-me")
        assert not session.resumed
        before = [(await session.step(row))["y"] for row in x[:5]]
    async with RawStream(server.target) as raw:
        opened = await raw.open("gru", "resume-me")
        assert opened.resumed and opened.next_frame_index == 5
        # A frame resent after a reconnect is answered from the ring, not applied twice.
        np.testing.assert_array_equal(await raw.frame("resume-me", 4, x[4:5]), before[4][None])
        after = [(await raw.frame("resume-me", i, x[i : i + 1]))[0] for i in range(5, 12)]
    np.testing.assert_allclose(np.stack(before + after), expected, rtol=0, atol=1e-5)
    async with AsyncClient(server.target) as client:
        ended = await client.end_session("resume-me")
        assert ended.next_frame_index == 12


async def test_resume_checks_the_model(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        await client.open("gru", "model-bound")
        with pytest.raises(RnnstreamError) as info:
            await client.open("lstm", "model-bound")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "runs model 'gru', not 'lstm'" in info.value.message
        await client.end_session("model-bound")


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


async def test_idle_sessions_expire(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(session_ttl=0.3)
    async with AsyncClient(running.target) as client:
        idle = await client.open("rnn_relu")
        busy = await client.open("rnn_relu")
        info = await client.get_session(idle.id)
        assert 0 < info.expires_in_seconds <= 0.3
        x = sequence("rnn_relu", 12, seed=8)
        ys = []
        # Keep one session active past several TTLs; the other goes idle.
        for row in x:
            ys.append((await busy.step(row))["y"])
            await asyncio.sleep(0.06)
        with pytest.raises(RnnstreamError) as exc:
            await client.get_session(idle.id)
        assert exc.value.code == grpc.StatusCode.NOT_FOUND
        assert "expired" in exc.value.message
        assert_matches_references("rnn_relu", x, np.stack(ys))
        with pytest.raises(RnnstreamError) as exc:
            await idle.step(x[0])
        assert exc.value.code == grpc.StatusCode.NOT_FOUND
        assert "expired" in exc.value.message
        assert running.run(lambda: probe.session_count(running.engine)) == 1
        await busy.end()


async def test_session_cap(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(max_sessions=3)
    async with AsyncClient(running.target) as client:
        sessions = [await client.open("gru") for _ in range(3)]
        with pytest.raises(RnnstreamError) as exc:
            await client.open("gru")
        assert exc.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "session limit reached (3 open)" in exc.value.message
        assert "--max-sessions" in exc.value.message
        # Resuming an open session is not a new one; stateless Infer needs no session.
        resumed = await client.open("gru", sessions[0].id)
        assert resumed.resumed
        x = sequence("gru", 4, seed=9)
        out = await client.infer("gru", x)
        np.testing.assert_allclose(out["y"], ort_full("gru", x), rtol=0, atol=1e-5)
        # Ending one makes room again.
        await sessions[1].end()
        extra = await client.open("gru")
        ys = [(await extra.step(row))["y"] for row in x]
        assert_matches_references("gru", x, np.stack(ys))
