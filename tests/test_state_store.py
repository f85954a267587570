"""Session state in a real Redis: stored every step, resumed by another server, outages survived."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import redis

from rnnstream import AsyncClient, RnnstreamError
from rnnstream._mux import RetryPolicy
from rnnstream.server.stores import RedisStore
from tests import probe
from tests.conftest import RunningServer
from tests.services import RedisServer
from tests.streaming import assert_matches_references, sequence


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


def _hash(server: RedisServer, owner: str, session_id: str) -> dict[bytes, bytes]:
    with redis.Redis(port=server.port) as client:
        return client.hgetall(RedisStore.key(owner, session_id))  # type: ignore[return-value]


async def test_every_step_is_stored_and_another_server_resumes(
    make_server, redis_server: RedisServer
) -> None:
    a: RunningServer = make_server(state_store=redis_server.url, models=("gru",), session_ttl=60)
    b: RunningServer = make_server(state_store=redis_server.url, models=("gru",), session_ttl=60)
    x = sequence("gru", 40, seed=5)
    async with AsyncClient(a.target, retry=None) as client:
        session = await client.open("gru")
        stored = _hash(redis_server, "anonymous", session.id)
        assert int(stored[b"next"]) == 0 and stored[b"model"] == b"gru"  # stored before use
        first = [(await session.step(row))["y"] for row in x[:20]]
        stored = _hash(redis_server, "anonymous", session.id)
        assert int(stored[b"next"]) == 20
        # The state of frame 19 as stored equals the numpy reference's hidden state.
        state = np.frombuffer(stored[b"state"], dtype="<f4")
        np.testing.assert_allclose(state, first[-1], atol=1e-5)
    async with AsyncClient(b.target, retry=None) as client:
        resumed = await client.open("gru", session.id, resume=True)
        assert resumed.resumed and resumed.next_index == 20
        # A frame resent after the move is answered from the stored ring, not applied again.
        replayed = await (await resumed.send(x[19], index=19))
        np.testing.assert_array_equal(replayed["y"], first[19])
        rest = [(await resumed.step(row))["y"] for row in x[20:]]
        await resumed.end()
    assert_matches_references("gru", x, np.stack(first + rest))
    assert _hash(redis_server, "anonymous", session.id) == {}  # ended: deleted
    # The replayed frame was not run again.
    assert b.run(lambda: b.engine.model_stats("gru").frames) == 20


async def test_keys_expire_with_the_idle_ttl(make_server, redis_server: RedisServer) -> None:
    server = make_server(state_store=redis_server.url, models=("rnn_tanh",), session_ttl=30)
    async with AsyncClient(server.target) as client:
        session = await client.open("rnn_tanh")
        await session.step(sequence("rnn_tanh", 1, seed=1)[0])
    with redis.Redis(port=redis_server.port) as conn:
        ttl_ms = conn.pttl(RedisStore.key("anonymous", session.id))
    assert 25_000 < ttl_ms <= 30_000


async def test_outage_gives_unavailable_in_band_and_leaves_state_untouched(
    make_server, redis_server: RedisServer
) -> None:
    server = make_server(state_store=redis_server.url, models=("gru",), session_ttl=60)
    x = sequence("gru", 12, seed=9)
    async with AsyncClient(server.target, retry=None) as client:
        session = await client.open("gru")
        ys = [(await session.step(row))["y"] for row in x[:6]]
        redis_server.stop()
        with pytest.raises(RnnstreamError) as info:
            await session.step(x[6])
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "state store unreachable" in info.value.message
        assert server.run(lambda: probe.next_indices(server.engine)) == {session.id: 6}
        redis_server.start()  # back, empty: the next step stores the whole state again
        session.next_index = 6
        ys += [(await session.step(row))["y"] for row in x[6:]]
        assert int(_hash(redis_server, "anonymous", session.id)[b"next"]) == 12
    assert_matches_references("gru", x, np.stack(ys))


async def test_client_waits_out_an_outage_without_losing_frames(
    make_server, redis_server: RedisServer
) -> None:
    server = make_server(state_store=redis_server.url, models=("gru",), session_ttl=60)
    x = sequence("gru", 30, seed=11)
    retry = RetryPolicy(max_attempts=40, initial_backoff=0.02, max_backoff=0.2)
    async with AsyncClient(server.target, retry=retry) as client:
        session = await client.open("gru")
        ys = [(await session.step(row))["y"] for row in x[:10]]
        redis_server.stop()

        async def back_later() -> None:
            await asyncio.sleep(0.6)
            redis_server.start()

        blip = asyncio.create_task(back_later())
        ys += [out["y"] async for out in session.stream(x[10:], inflight=4)]
        await blip
    assert_matches_references("gru", x, np.stack(ys))
    # Each frame applied once.
    assert server.run(lambda: server.engine.model_stats("gru").frames) == len(x)
    refused = server.server.metrics.frames.labels("gru", "UNAVAILABLE")._value.get()
    assert refused > 0  # the outage was felt, and waited out
