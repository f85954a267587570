"""Session states on the execution device (--state-pool device): the wrapped graph that gathers
and scatters them, run here on the CPU provider (the path a GPU takes, without a GPU), against
the host pool and the references; writes that wait for a step; growth and compaction."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from rnnstream import AsyncClient, Client
from rnnstream.server.core._device_pool import DeviceStatePool, state_pool
from rnnstream.server.core._runtime import load_model
from rnnstream.server.core._state_pool import StatePool
from tests.conftest import MODELS, RunningServer
from tests.services import RedisServer
from tests.streaming import assert_matches_references, sequence


def _pools(model: str) -> tuple[object, DeviceStatePool, StatePool]:
    loaded = load_model(model, MODELS / model, "cpu", 1)
    device = state_pool(loaded, "device")
    assert isinstance(device, DeviceStatePool)
    return loaded, device, StatePool(loaded.spec.states)


@pytest.mark.parametrize("model", ["gru", "lstm"])
def test_device_steps_equal_host_steps(model: str) -> None:
    loaded, device, host = _pools(model)
    spec = loaded.spec  # type: ignore[attr-defined]
    rng = np.random.default_rng(5)
    slots = [(device.allocate(), host.allocate()) for _ in range(100)]  # grows past 64
    assert [d for d, _ in slots] == [h for _, h in slots]
    for _ in range(12):
        chosen = np.sort(rng.choice(100, size=rng.integers(1, 40), replace=False))
        index = np.asarray([slots[i][0] for i in chosen], np.intp)
        x = rng.standard_normal((1, len(index), spec.inputs[0].frame_shape[-1])).astype(np.float32)
        feeds = {spec.inputs[0].name: x}
        for state, array in zip(spec.states, host.gather(index), strict=True):
            feeds[state.input_name] = array
        want, states = loaded.run(feeds)  # type: ignore[attr-defined]
        host.scatter(index, states)
        device.begin_step()
        done = device.step({spec.inputs[0].name: x}, index, host_states=True)
        device.finish_step(done)
        np.testing.assert_allclose(done.outputs[0], want[0], rtol=0, atol=1e-6)
        for got, expected in zip(done.new_states or [], states, strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    for d, h in slots:
        for got, expected in zip(device.read(d), host.read(h), strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_writes_during_a_step_wait_for_it_and_growth_too() -> None:
    loaded, device, _ = _pools("gru")
    spec = loaded.spec  # type: ignore[attr-defined]
    first = [device.allocate() for _ in range(64)]
    assert device.capacity == 64
    device.begin_step()  # as if a batch ran in the executor now
    marked = np.full(spec.states[0].initial.shape, 7.0, np.float32)
    device.write(first[5], [marked])
    grown = [device.allocate() for _ in range(10)]  # past capacity while the step runs
    np.testing.assert_array_equal(device.read(first[5])[0], marked)  # answered from what waits
    x = np.ones((1, 2, 16), np.float32)
    done = device.step({"x": x}, np.asarray(first[:2], np.intp), host_states=False)
    device.finish_step(done)
    assert device.capacity == 128
    np.testing.assert_array_equal(device.read(first[5])[0], marked)  # applied after the step
    for slot in grown:
        np.testing.assert_array_equal(device.read(slot)[0], spec.states[0].initial)
    assert device.read(first[0])[0].any()  # the step's own rows changed


def test_compaction_keeps_every_live_slot() -> None:
    _, device, _ = _pools("gru")
    slots = [device.allocate() for _ in range(200)]
    for slot in slots:
        device.write(slot, [np.full((1, 128), slot, np.float32)])
    for slot in slots[:180]:
        device.release(slot)
    moved: dict[int, int] = {}
    assert device.compact(lambda old, new: moved.__setitem__(old, new))
    assert device.capacity == 128
    for slot in slots[180:]:
        where = moved.get(slot, slot)
        np.testing.assert_array_equal(device.read(where)[0], np.full((1, 128), slot))


def test_auto_keeps_states_on_the_host_without_a_gpu() -> None:
    loaded = load_model("gru", MODELS / "gru", "cpu", 1)
    assert type(state_pool(loaded, "auto")) is StatePool


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


async def test_a_server_with_states_on_the_device(
    make_server: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    """Single frames, groups, a reset and a state store, through a server keeping its states
    on the device; another server (host states) resumes the sessions from the store."""
    a = make_server(
        models=("gru", "lstm"), state_pool="device", state_store=redis_server.url, session_ttl=60
    )
    b = make_server(models=("gru", "lstm"), state_store=redis_server.url, session_ttl=60)
    pools = a.run(lambda: [type(s.scheduler.pool) for s in a.engine._models.all_served()])
    assert pools == [DeviceStatePool, DeviceStatePool]
    for model in ("gru", "lstm"):
        xs = [sequence(model, 8, seed=130 + k) for k in range(6)]
        async with AsyncClient(a.target) as client:
            sessions = [await client.open(model) for _ in xs]
            got: list[list[np.ndarray]] = [[] for _ in xs]
            for t in range(3):  # groups
                answered = await client.step_many(
                    {s: x[t] for s, x in zip(sessions, xs, strict=True)}
                )
                for k, session in enumerate(sessions):
                    got[k].append(answered[session]["y"])
            for k, session in enumerate(sessions):  # single frames
                for t in range(3, 5):
                    got[k].append((await session.step(xs[k][t]))["y"])
            await sessions[0].reset()
            again = (await sessions[0].step(xs[0][0]))["y"]
            assert_matches_references(model, xs[0][:1], again[None])
        async with AsyncClient(b.target) as client:
            for k in range(1, len(xs)):
                resumed = await client.open(model, sessions[k].id, resume=True)
                assert resumed.next_index == 5
                for t in range(5, 8):
                    got[k].append((await resumed.step(xs[k][t]))["y"])
                assert_matches_references(model, xs[k], np.stack(got[k]))


def test_forecasts_read_and_commit_states_on_the_device(
    make_server: Callable[..., RunningServer],
) -> None:
    host = make_server(models=("co2_forecaster",))
    device = make_server(models=("co2_forecaster",), state_pool="device")
    x = np.linspace(-1, 1, 24, dtype=np.float32).reshape(24, 1)
    answers = []
    for running in (host, device):
        with Client(running.target) as client, client.open("co2_forecaster") as session:
            session.step(x[:12])
            first = session.forecast(6, commit=True)["y"]
            after = session.step(x[12:])["y"]
            answers.append((first, after))
    for got, want in zip(answers[1], answers[0], strict=True):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
