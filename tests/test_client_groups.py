"""The client sends frames of many sessions in one message: explicitly (step_many) and by itself
when several sessions of a stream have frames ready; exactly once across dropped connections."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from rnnstream import AsyncClient, AsyncSession, Client, FrameGroupError
from rnnstream._group import GroupCall, PendingFrame, pack_frames
from rnnstream._info import ModelInfo, TensorInfo
from rnnstream._mux import RetryPolicy
from tests import probe
from tests.conftest import RunningServer
from tests.faults import FaultyProxy
from tests.streaming import assert_matches_references, sequence

MODEL = "gru"


def test_step_many_equals_the_references(server: RunningServer) -> None:
    xs = [sequence(MODEL, 5, seed=90 + k) for k in range(6)]
    with Client(server.target) as client:
        sessions = [client.open(MODEL) for _ in xs]
        got: list[list[np.ndarray]] = [[] for _ in xs]
        for t in range(5):
            answered = client.step_many({s: x[t] for s, x in zip(sessions, xs, strict=True)})
            assert list(answered) == sessions
            for k, session in enumerate(sessions):
                assert answered[session]["y"].shape == (128,)  # a step given without T: no T
                got[k].append(answered[session]["y"])
        groups = client._inner._mux.groups_sent if client._inner._mux else 0
    assert groups == 5  # one message per step, not one per session
    for k, x in enumerate(xs):
        assert_matches_references(MODEL, x, np.stack(got[k]))


async def test_step_many_with_steps_and_two_models(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        gru = [await client.open("gru") for _ in range(3)]
        lstm = [await client.open("lstm") for _ in range(2)]
        xg = [sequence("gru", 4, seed=k) for k in range(3)]
        xl = [sequence("lstm", 4, seed=10 + k) for k in range(2)]
        frames = {s: x[:3] for s, x in zip(gru, xg, strict=True)}  # T = 3
        frames |= {s: x[:3] for s, x in zip(lstm, xl, strict=True)}
        first = await client.step_many(frames)
        frames = {s: x[3:] for s, x in zip(gru, xg, strict=True)}
        frames |= {s: x[3:] for s, x in zip(lstm, xl, strict=True)}
        second = await client.step_many(frames)
    for session, x in [*zip(gru, xg, strict=True), *zip(lstm, xl, strict=True)]:
        y = np.concatenate([first[session]["y"], second[session]["y"]])
        assert_matches_references(session.model.name, x, y)


async def test_one_failed_frame_leaves_the_others_applied(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        a, b, c = [await client.open(MODEL) for _ in range(3)]
        await client.end_session(b.id)  # b is gone, though its client object does not know
        xs = {s: sequence(MODEL, 1, seed=k)[0] for k, s in enumerate((a, b, c))}
        with pytest.raises(FrameGroupError) as info:
            await client.step_many(xs)
        assert set(info.value.outputs) == {a, c}
        assert info.value.errors[b].code == grpc.StatusCode.NOT_FOUND
        for session in (a, c):
            y = info.value.outputs[session]["y"]
            assert_matches_references(MODEL, xs[session][None], y[None])
        with pytest.raises(ValueError, match="differ in shape"):
            await client.step_many({a: np.zeros(16, np.float32), c: np.zeros((2, 16), np.float32)})
        assert (a.next_index, c.next_index) == (1, 1)  # refused before sending: no index taken


async def test_frames_ready_together_travel_in_one_message(server: RunningServer) -> None:
    xs = [sequence(MODEL, 20, seed=100 + k) for k in range(16)]
    for pack in (True, False):
        async with AsyncClient(server.target, pack_frames=pack) as client:
            sessions = [await client.open(MODEL) for _ in xs]

            async def run(session: AsyncSession, x: np.ndarray) -> np.ndarray:
                return np.stack([o["y"] async for o in session.stream(x, inflight=1)])

            got = await asyncio.gather(*(run(s, x) for s, x in zip(sessions, xs, strict=True)))
            groups = client._mux.groups_sent if client._mux else 0
        for x, y in zip(xs, got, strict=True):
            assert_matches_references(MODEL, x, y)
        # Each batch's answers wake every session at once: their next frames go out together.
        assert (groups > 0) == pack, (pack, groups)


async def test_groups_survive_dropped_connections(make_server) -> None:
    """step_many across 40 cuts: groups on the wire when a connection drops are resent (frame
    by frame) after the resume, applied once, and every output equals the reference."""
    server: RunningServer = make_server(models=(MODEL,), output_ring=64)
    proxy = FaultyProxy(server.port)
    sessions_count, steps = 12, 120
    xs = np.stack([sequence(MODEL, steps, seed=110 + k) for k in range(sessions_count)])
    retry = RetryPolicy(max_attempts=50, initial_backoff=0.005, max_backoff=0.05)
    try:
        async with AsyncClient(f"127.0.0.1:{proxy.port}", retry=retry) as client:
            sessions = [await client.open(MODEL) for _ in range(sessions_count)]
            got = []
            for t in range(steps):
                if t % 3 == 1:
                    await asyncio.to_thread(proxy.drop)
                answered = await client.step_many({s: xs[k, t] for k, s in enumerate(sessions)})
                got.append([answered[s]["y"] for s in sessions])
            reconnects = client._mux.reconnects if client._mux else 0
    finally:
        proxy.close()
    assert reconnects >= 30
    for k in range(sessions_count):
        assert_matches_references(MODEL, xs[k], np.stack([row[k] for row in got]))
    applied = server.run(lambda: probe.next_indices(server.engine))
    assert [applied[s.id] for s in sessions] == [steps] * sessions_count
    assert server.run(lambda: server.engine.model_stats(MODEL).frames) == sessions_count * steps


async def test_packing_never_puts_a_sessions_frame_before_its_earlier_one() -> None:
    """Frames queued in one turn: x0 (T=1), a0 (T=2), a1 (T=1). a1 fits x0's message by its
    shape, but that message goes out before a0's: it must take a later one."""
    info = ModelInfo("gru", (TensorInfo("x", "float32", (-1, -1, 16), 1, 0),), (), (), "cpu", 8)
    loop = asyncio.get_running_loop()

    def frame(session: str, index: int, steps: int) -> PendingFrame:
        arrays = [("x", np.zeros((steps, 16), np.float32))]
        return PendingFrame(session, index, arrays, False, loop.create_future())

    queued = [frame("x", 0, 1), frame("a", 0, 2), frame("a", 1, 1), frame("b", 0, 2)]
    messages = pack_frames([(info, f, None) for f in queued])  # type: ignore[misc]
    order = []
    for message in messages:
        if isinstance(message, GroupCall):
            order.append(list(zip(message.session_ids, message.indices, strict=True)))
        else:
            order.append([(message.frame.session_id, message.frame.frame_index)])
    assert order == [[("x", 0)], [("a", 0), ("b", 0)], [("a", 1)]]


def test_step_stacked_sends_and_answers_arrays(server: RunningServer) -> None:
    xs = np.stack([sequence(MODEL, 4, seed=120 + k) for k in range(5)])  # [K, T, F]
    with Client(server.target) as client:
        sessions = [client.open(MODEL) for _ in range(5)]
        first = client.step_stacked(sessions, xs[:, 0])  # [K, F]: one step, no time axis
        assert first["y"].shape == (5, 128)
        rest = client.step_stacked(sessions, {"x": xs[:, 1:]})  # [K, T=3, F]
        assert rest["y"].shape == (5, 3, 128)
        for k in range(5):
            y = np.concatenate([first["y"][k][None], rest["y"][k]])
            assert_matches_references(MODEL, xs[k], y)
        client.end_session(sessions[2].id)
        with pytest.raises(FrameGroupError) as info:
            client.step_stacked(sessions, xs[:, 0])
        assert list(info.value.errors) == [sessions[2]]
        assert not info.value.outputs["y"][2].any() and info.value.outputs["y"][0].any()
        with pytest.raises(ValueError, match="first axis"):
            client.step_stacked(sessions, xs[:3, 0])
