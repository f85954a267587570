"""Spill instead of expire, against a real Redis: an idle session leaves memory for the store and
its next frame, on any replica, brings it back exactly; the races around it."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis

from rnnstream import AsyncClient, RnnstreamError, SessionLost
from rnnstream.server.core import Engine
from rnnstream.server.stores import RedisStore
from tests import probe
from tests.conftest import RunningServer
from tests.services import RedisServer
from tests.streaming import RawStream, assert_matches_references, frame_request, sequence, x_tensor

MODEL = "gru"
Make = Callable[..., RunningServer]
Check = Callable[[], Awaitable[bool] | bool]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


def _spilling(make_server: Make, store: RedisServer, **overrides: Any) -> RunningServer:
    settings: dict[str, Any] = {"state_store": store.url, "spill_after": 0.2, "session_ttl": 60}
    return make_server(**{"models": (MODEL,), **settings, **overrides})


async def _until(
    check: Callable[[], Awaitable[bool] | bool], what: str, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done = check()
        if not isinstance(done, bool):
            done = await done
        if done:
            return
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def _held(server: RunningServer, session_id: str, owner: str = "anonymous") -> bool:
    return server.run(lambda: probe.held(server.engine, owner, session_id))


def _gone_from(server: RunningServer, session_id: str) -> Check:
    return lambda: not _held(server, session_id)


def _frames_run(server: RunningServer) -> int:
    engine: Engine = server.engine
    return server.run(lambda: engine.model_stats(MODEL).frames)


def _stored(store: RedisServer, session_id: str) -> dict[bytes, bytes]:
    with redis.Redis(port=store.port) as client:
        return client.hgetall(RedisStore.key("anonymous", session_id))  # type: ignore[return-value]


async def _never_left(x: np.ndarray, make_server: Make) -> np.ndarray:
    """The same frames through a server that keeps the session in memory throughout."""
    plain = make_server(models=(MODEL,))
    async with AsyncClient(plain.target, retry=None) as client:
        session = await client.open(MODEL)
        return np.stack([(await session.step(row))["y"] for row in x])


async def test_a_spilled_session_comes_back_exactly_on_either_replica(
    make_server: Make, store: RedisServer
) -> None:
    a = _spilling(make_server, store)
    b = _spilling(make_server, store)
    x = sequence(MODEL, 30, seed=191)
    ys: list[np.ndarray] = []
    restored: list[int] = []
    async with AsyncClient(a.target, retry=None) as client:
        session = await client.open(MODEL)
        session.on_restore = restored.append
        ys += [(await session.step(row))["y"] for row in x[:10]]
        await _until(lambda: not _held(a, session.id), "replica a spills the session")
        info = await client.get_session(session.id)
        assert (info.state, info.next_frame_index, info.memory_bytes) == ("spilled", 10, 0)
        assert info.store_bytes > 0 and info.principal == "anonymous"
        assert _stored(store, session.id)[b"next"] == b"10"

        # Replica b never saw it: its next frame, on b's stream and without an open, brings it
        # back from the store, and says so.
        async with RawStream(b.target) as raw:
            first = await raw.request(frame_request(session.id, 10, x_tensor(x[10:11])))
            assert first.output.restored and first.output.frame_index == 10
            ys.append(np.frombuffer(first.output.outputs[0].data, np.float32).copy())
            for i in range(11, 20):
                response = await raw.request(frame_request(session.id, i, x_tensor(x[i : i + 1])))
                assert not response.output.restored
                ys.append(np.frombuffer(response.output.outputs[0].data, np.float32).copy())
            await _until(lambda: not _held(b, session.id), "replica b spills it in turn")

        # Back on a, through the stream that opened it: the client only sees its outputs.
        for i in range(20, 30):
            ys.append((await (await session.send(x[i], index=i)))["y"])
        assert restored == [20]
        await session.end()
    y = np.stack(ys)
    assert_matches_references(MODEL, x, y)
    np.testing.assert_array_equal(y, await _never_left(x, make_server))
    assert _frames_run(a) + _frames_run(b) == 30  # nothing applied twice
    assert _stored(store, session.id) == {}  # ended: gone from the store too


async def test_a_frame_that_races_the_spill_wins(make_server: Make, store: RedisServer) -> None:
    server = _spilling(make_server, store, spill_after=0.3)
    x = sequence(MODEL, 10, seed=192)
    assert store.process is not None
    async with AsyncClient(server.target, retry=None) as client:
        session = await client.open(MODEL)
        restored: list[int] = []
        session.on_restore = restored.append
        ys = [(await session.step(row))["y"] for row in x[:5]]
        os.kill(store.process.pid, signal.SIGSTOP)  # the spill's write hangs...
        try:
            await _until(
                lambda: server.run(
                    lambda: probe.spill_in_flight(server.engine, "anonymous", session.id)
                ),
                "the spill is under way",
            )
            racing = await session.send(x[5])  # ...and a frame arrives meanwhile
        finally:
            os.kill(store.process.pid, signal.SIGCONT)
        ys.append((await racing)["y"])
        assert restored == []  # it ran on the session in memory: the frame won
        assert _stored(store, session.id)[b"next"] == b"6"  # and was stored as every step is
        for row in x[6:]:
            ys.append((await session.step(row))["y"])
        await session.end()
    assert_matches_references(MODEL, x, np.stack(ys))
    assert _frames_run(server) == 10


async def test_the_store_down_during_a_spill_keeps_the_session(
    make_server: Make, store: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    server = _spilling(make_server, store, spill_after=0.1)
    x = sequence(MODEL, 12, seed=193)
    assert store.process is not None
    async with AsyncClient(server.target, retry=None) as client:
        session = await client.open(MODEL)
        ys = [(await session.step(row))["y"] for row in x[:4]]
        os.kill(store.process.pid, signal.SIGSTOP)
        try:
            await _until(lambda: "could not spill" in caplog.text, "a spill fails", timeout=60)
            assert _held(server, session.id)  # still in memory, nothing lost
        finally:
            os.kill(store.process.pid, signal.SIGCONT)
        await _until(lambda: not _held(server, session.id), "it spills once the store is back")
        ys += [(await session.step(row))["y"] for row in x[4:8]]

        # The store loses everything (a restart without persistence): the session is not
        # spilled then, since the store would not hold it; it stays in memory and works on.
        await _until(lambda: not _held(server, session.id), "spilled again")
        ys.append((await session.step(x[8]))["y"])  # brought back: now the only copy is here
        caplog.clear()
        store.stop()
        store.start()
        await _until(lambda: "the store does not hold" in caplog.text, "a spill finds it missing")
        assert _held(server, session.id)
        ys += [(await session.step(row))["y"] for row in x[9:]]  # stored again from here on
        await _until(lambda: not _held(server, session.id), "it spills once stored again")
        info = await client.get_session(session.id)
        assert (info.state, info.next_frame_index) == ("spilled", 12)
    assert_matches_references(MODEL, x, np.stack(ys))


async def test_forecasts_and_spills(make_server: Make, store: RedisServer) -> None:
    model = "co2_forecaster"
    servers = [
        make_server(models=(model,)),
        _spilling(make_server, store, models=(model,), spill_after=0.05),
    ]
    results = []
    for server in servers:
        async with AsyncClient(server.target, retry=None) as client:
            session = await client.open(model)
            x = np.linspace(-1, 1, 20, dtype=np.float32).reshape(20, 1)
            outs = [(await session.step(row))["y"] for row in x[:10]]
            # A long forecast: the session is not spilled while it runs, whatever its idle time
            # says, and its committed state is what comes back.
            long = await session.forecast(4096, commit=True)
            if server is servers[1]:
                await _until(_gone_from(server, session.id), "spilled after the forecast")
            # A forecast that finds the session spilled brings it back first.
            short = await session.forecast(8, commit=True)
            outs += [(await session.step(row))["y"] for row in x[10:]]
            results.append((long["y"], short["y"], np.stack(outs)))
            await session.end()
    for kept, spilled in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(kept, spilled)


async def test_spilled_sessions_expire_from_the_store(
    make_server: Make, store: RedisServer
) -> None:
    server = _spilling(make_server, store, spill_after=0.1, store_ttl=0.5)
    async with AsyncClient(server.target, retry=None) as client:
        session = await client.open(MODEL)
        other = await client.open(MODEL)
        await session.step(sequence(MODEL, 1, seed=1)[0])
        await _until(lambda: not _held(server, session.id), "spilled")
        # Its stream is still attached: it hears of the expiry in-band, as before spilling.
        await _until(lambda: session.ended, "its stream hears it expired")
        with pytest.raises(SessionLost, match="expired"):
            await session.step(sequence(MODEL, 1, seed=2)[0])
        with pytest.raises(RnnstreamError, match=r"expired after 0\.6 s idle") as gone:
            await client.get_session(session.id)
        # A frame on a fresh stream, and a resume, are told the same.
        async with RawStream(server.target) as raw:
            error = await raw.error(frame_request(other.id, 0, x_tensor(np.zeros((1, 16), "f4"))))
        assert "expired after 0.6 s idle" in error.message
        with pytest.raises(SessionLost, match=r"expired after 0\.6 s idle"):
            await client.open(MODEL, other.id, resume=True)
    assert gone.value.code.name == "NOT_FOUND"
    with redis.Redis(port=store.port) as conn:
        left = conn.hgetall(RedisStore.key("anonymous", session.id))
    assert set(left) == {b"gone"}  # no state left, only the note that it expired


def test_spilling_needs_a_store() -> None:
    from rnnstream.server import Settings

    with pytest.raises(ValueError, match=r"--spill-after .*give --state-store"):
        Settings(spill_after=5)


async def test_a_frame_group_brings_its_spilled_sessions_back(
    make_server: Make, store: RedisServer
) -> None:
    server = _spilling(make_server, store)
    x = sequence(MODEL, 6, seed=194)
    async with AsyncClient(server.target, retry=None) as client:
        sessions = [await client.open(MODEL) for _ in range(4)]
        ys: dict[str, list[np.ndarray]] = {s.id: [] for s in sessions}
        for t in range(6):
            if t in (2, 4):  # every session spills before these steps
                for s in sessions:
                    await _until(_gone_from(server, s.id), "spilled")
            outs = await client.step_many({s: x[t] for s in sessions})
            for s in sessions:
                ys[s.id].append(outs[s]["y"])
    for s in sessions:
        assert_matches_references(MODEL, x, np.stack(ys[s.id]))


async def test_a_session_does_not_spill_while_its_forecast_runs(
    make_server: Make, store: RedisServer
) -> None:
    """The forecast is held up mid-way (its model's ORT thread kept busy) for many times
    --spill-after: sweeps pass and the session stays; once the forecast is answered it spills,
    and what comes back forecasts and steps exactly as a session that never left."""
    model = "co2_forecaster"
    x = np.linspace(-1, 1, 12, dtype=np.float32).reshape(12, 1)
    plain = make_server(models=(model,))
    spilling = _spilling(make_server, store, models=(model,), spill_after=0.05)
    results = []
    for server in (plain, spilling):
        async with AsyncClient(server.target, retry=None) as client:
            session = await client.open(model)
            outs = [(await session.step(row))["y"] for row in x[:6]]
            release = threading.Event()
            probe.block_ort(server.engine, release, model)
            try:
                forecast = asyncio.ensure_future(session.forecast(64, commit=True))
                await asyncio.sleep(1.0)  # twenty times --spill-after, a sweep every 0.05 s
                assert _held(server, session.id) and not forecast.done()
            finally:
                release.set()
            long = (await forecast)["y"]
            if server is spilling:
                await _until(_gone_from(server, session.id), "spilled once the forecast is done")
            short = (await session.forecast(8))["y"]  # brings it back first
            outs += [(await session.step(row))["y"] for row in x[6:]]
            results.append((long, short, np.stack(outs)))
            await session.end()
    for kept, spilled in zip(results[0], results[1], strict=True):
        np.testing.assert_array_equal(kept, spilled)
