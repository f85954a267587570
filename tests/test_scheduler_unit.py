"""ModelScheduler on its own: batch composition, arrival order, same-T grouping, no batching
window, pool compaction. The runtime is a stand-in that records what each ORT call received."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rnnstream.server.core import FrameOutput, InvalidArgument, ModelSpec
from rnnstream.server.core._arrivals import Pacer
from rnnstream.server.core._loading import single_step_key
from rnnstream.server.core._runtime import load_model
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._session import Session
from rnnstream.server.core._work import ControlWork, FrameWork
from tests.conftest import MODELS

Arrays = list[npt.NDArray[Any]]


@pytest.fixture(scope="module")
def gru_spec() -> ModelSpec:
    return load_model("gru", MODELS / "gru", "cpu", 1).spec


class RecordingModel:
    """Stands in for OrtModel: each frame's x carries (session number, frame index) in its first
    two features; every run adds 1 to each state, so a state counts the frames applied to it."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.batches: list[list[tuple[int, int, int]]] = []  # (session, index, T) per frame

    def run(self, feeds: Mapping[str, npt.NDArray[Any]]) -> tuple[Arrays, Arrays]:
        x_spec = self.spec.inputs[0]
        x = np.moveaxis(feeds[x_spec.name], x_spec.batch_axis, 0)  # [B, T, F]
        steps = x.shape[1]
        self.batches.append([(int(f[0, 0]), int(f[0, 1]), steps) for f in x])
        outputs = []
        for out in self.spec.outputs:
            shape = [1 if d is None else d for d in out.shape]
            shape[out.batch_axis] = len(x)
            if out.time_axis is not None:
                shape[out.time_axis] = steps
            outputs.append(np.zeros(shape, out.dtype))
        states = [feeds[s.input_name] + 1 for s in self.spec.states]
        return outputs, states


class InlineExecutor(concurrent.futures.Executor):
    """Runs the call at once on the calling thread: batches finish without a thread hop."""

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        future.set_result(fn(*args, **kwargs))
        return future


class CountingExecutor(InlineExecutor):
    """An InlineExecutor that counts the batches handed to it."""

    def __init__(self) -> None:
        self.calls = 0

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        self.calls += 1
        return super().submit(fn, *args, **kwargs)


class Harness:
    def __init__(
        self,
        spec: ModelSpec,
        max_batch_size: int,
        model: type[RecordingModel] = RecordingModel,
        **options: float,
    ) -> None:
        self.model = model(spec)
        self.executor = CountingExecutor()
        self.scheduler = ModelScheduler(
            self.model,  # type: ignore[arg-type]
            max_batch_size=max_batch_size,
            executor=self.executor,
            **options,
        )
        self.sessions: list[Session] = []
        self.clock = itertools.count(1)  # arrival times: strictly increasing, no ties

    def open(self) -> Session:
        session = Session(f"s{len(self.sessions)}", "gru", "owner", ring_size=4)
        self.scheduler.attach(session)
        self.sessions.append(session)
        return session

    def frame(
        self, session: Session, index: int, steps: int = 1, nan: bool = False
    ) -> asyncio.Future[FrameOutput | None]:
        x = np.zeros((steps, 16), np.float32)
        x[0, 0], x[0, 1] = self.sessions.index(session), index
        if nan:
            x[-1, -1] = np.nan
        future: asyncio.Future[FrameOutput | None] = asyncio.get_running_loop().create_future()
        work = FrameWork(index, [x], (x.shape,), future, enqueued_at=float(next(self.clock)))
        self.scheduler.submit(session, work)
        return future

    def end(self, session: Session) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        work = ControlWork("end", future, enqueued_at=float(next(self.clock)))
        self.scheduler.submit(session, work)
        return future

    def state(self, session: Session) -> float:
        (h,) = self.scheduler.read_state(session)
        assert np.all(h == h.flat[0])
        return float(h.flat[0])


async def _settle(futures: list[asyncio.Future[Any]]) -> None:
    await asyncio.wait_for(asyncio.gather(*futures), 5)


async def test_one_frame_per_session_per_batch_in_arrival_order(gru_spec: ModelSpec) -> None:
    h = Harness(gru_spec, max_batch_size=2)
    a, b, c = h.open(), h.open(), h.open()
    # Queued before the scheduler runs, in this arrival order.
    plan = [(a, 0), (a, 1), (b, 0), (c, 0), (b, 1), (c, 1), (a, 2)]
    futures = [h.frame(s, i) for s, i in plan]
    h.scheduler.start()
    try:
        await _settle(futures)
    finally:
        await h.scheduler.stop()
    # The oldest waiting frame leads; a session's next frame waits for the next call.
    assert [sorted(batch) for batch in h.model.batches] == [
        [(0, 0, 1), (1, 0, 1)],
        [(0, 1, 1), (2, 0, 1)],
        [(1, 1, 1), (2, 1, 1)],
        [(0, 2, 1)],
    ]
    assert [f.result().index for f in futures] == [i for _, i in plan]
    assert [h.state(s) for s in (a, b, c)] == [3.0, 2.0, 2.0]
    assert h.scheduler.stats.frames == len(plan) and h.scheduler.stats.batches == 4


async def test_batch_of_one_runs_frames_in_global_arrival_order(gru_spec: ModelSpec) -> None:
    h = Harness(gru_spec, max_batch_size=1)
    sessions = [h.open() for _ in range(4)]
    rng = np.random.default_rng(5)
    order = [int(k) for k in rng.permutation([k for k in range(4) for _ in range(5)])]
    sent = [0] * 4
    plan = []
    for k in order:
        plan.append((k, sent[k]))
        sent[k] += 1
    futures = [h.frame(sessions[k], i) for k, i in plan]
    h.scheduler.start()
    try:
        await _settle(futures)
    finally:
        await h.scheduler.stop()
    assert [(s, i) for ((s, i, _),) in h.model.batches] == plan


async def test_frames_batch_only_with_frames_of_the_same_t(gru_spec: ModelSpec) -> None:
    h = Harness(gru_spec, max_batch_size=8)
    sessions = [h.open() for _ in range(6)]
    steps = [1, 3, 1, 3, 2, 1]
    futures = [h.frame(s, 0, t) for s, t in zip(sessions, steps, strict=True)]
    futures += [h.frame(s, 1, 1) for s in sessions]
    h.scheduler.start()
    try:
        await _settle(futures)
    finally:
        await h.scheduler.stop()
    for batch in h.model.batches:
        assert len({t for _, _, t in batch}) == 1, batch
        assert len({s for s, _, _ in batch}) == len(batch), batch
    first = h.model.batches[0]
    # The oldest frame (T = 1) leads the first call, which takes every waiting T = 1 head.
    assert sorted(first) == [(0, 0, 1), (2, 0, 1), (5, 0, 1)]
    per_session = [[i for b in h.model.batches for s, i, _ in b if s == k] for k in range(6)]
    assert per_session == [[0, 1]] * 6
    assert [h.state(s) for s in sessions] == [2.0] * 6


async def test_a_lone_frame_runs_without_waiting(gru_spec: ModelSpec) -> None:
    h = Harness(gru_spec, max_batch_size=64)
    session = h.open()
    h.scheduler.start()
    try:
        for _ in range(3):
            await asyncio.sleep(0)  # the scheduler is idle, waiting for work
        assert h.model.batches == []
        future = h.frame(session, 0)
        # Only loop iterations pass, no timer: a batching window would never fire here.
        for _ in range(10):
            if future.done():
                break
            await asyncio.sleep(0)
        assert future.done() and future.result().index == 0
        assert h.model.batches == [[(0, 0, 1)]]
    finally:
        await h.scheduler.stop()


async def test_pool_grows_and_compacts_under_churn(gru_spec: ModelSpec) -> None:
    h = Harness(gru_spec, max_batch_size=64)
    pool = h.scheduler.pool
    h.scheduler.start()
    try:
        sessions = [h.open() for _ in range(300)]
        assert pool.capacity >= 300 and pool.live == 300
        await _settle([h.frame(s, 0) for s in sessions])
        keep = sessions[::25]  # 12 survivors spread over the slots, some high ones among them
        await _settle([h.frame(s, 1) for s in keep])
        grown = pool.capacity
        await _settle([h.end(s) for s in sessions if s not in keep])
        for _ in range(5):
            await asyncio.sleep(0)  # idle: the scheduler compacts between batches
        assert pool.live == len(keep)
        assert pool.capacity < grown
        slots = [s.slot for s in keep]
        assert len(set(slots)) == len(keep) and max(slots) < pool.capacity
        # Moved states stay with their sessions and keep counting from where they were.
        assert [h.state(s) for s in keep] == [2.0] * len(keep)
        await _settle([h.frame(s, 2) for s in keep])
        assert [h.state(s) for s in keep] == [3.0] * len(keep)
        newcomers = [h.open() for _ in range(40)]
        assert [h.state(s) for s in newcomers] == [0.0] * 40
        assert len({s.slot for s in keep + newcomers}) == len(keep) + 40
    finally:
        await h.scheduler.stop()


def test_single_step_key_needs_every_axis_but_time(gru_spec: ModelSpec) -> None:
    assert single_step_key(gru_spec) == ((1, 16),)
    (x,) = gru_spec.inputs
    open_features = dataclasses.replace(x, shape=(*x.shape[:-1], None))
    assert single_step_key(dataclasses.replace(gru_spec, inputs=(open_features,))) is None


async def _turns(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def test_a_nan_frame_is_refused_and_the_rest_of_its_batch_runs(gru_spec: ModelSpec) -> None:
    h = Harness(gru_spec, max_batch_size=8)
    a, b, c = h.open(), h.open(), h.open()
    good_a, bad_b, good_c = h.frame(a, 0), h.frame(b, 0, nan=True), h.frame(c, 0)
    h.scheduler.start()
    try:
        await asyncio.wait_for(asyncio.wait([good_a, bad_b, good_c]), 5)
        # The refused index stays free: the session takes a clean frame 0 afterwards.
        retry = h.frame(b, 0)
        await _settle([retry])
    finally:
        await h.scheduler.stop()
    assert good_a.result().index == 0 and good_c.result().index == 0
    error = bad_b.exception()
    assert isinstance(error, InvalidArgument)
    assert "input 'x' contains NaN or infinity" in error.message
    assert error.session_id == b.id and error.frame_index == 0
    # The NaN frame never reached the model; b was stepped once, by the clean retry.
    assert sorted(h.model.batches[0]) == [(0, 0, 1), (2, 0, 1)]
    assert h.model.batches[1] == [(1, 0, 1)]
    assert [h.state(s) for s in (a, b, c)] == [1.0, 1.0, 1.0]


class _Arriving:
    """A scheduler's queue as the pacer sees it, with a frame arriving on every look."""

    max_batch_size = 64

    def __init__(self, sessions: int, arriving: bool) -> None:
        self.submitted = 0
        self.looks = 0
        self._sessions = sessions
        self._arriving = arriving

    def ready_count(self) -> int:
        self.looks += 1
        if self._arriving:
            self.submitted += 1
        return 1

    def session_count(self) -> int:
        return self._sessions


async def test_gathering_never_waits_for_frames_that_are_not_arriving() -> None:
    lone = _Arriving(sessions=1, arriving=False)
    await Pacer(lone).gather_arrivals()
    assert lone.looks == 1  # every session of the model is ready: no loop turn at all
    quiet = _Arriving(sessions=5, arriving=False)
    await Pacer(quiet).gather_arrivals()
    assert quiet.looks == 2  # two turns bring nothing: the batch starts


async def test_gathering_is_bounded_while_frames_keep_arriving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    busy = _Arriving(sessions=1000, arriving=True)
    pacer = Pacer(busy)
    await pacer.gather_arrivals()
    assert busy.looks <= 64  # turns, at most, whatever keeps coming
    assert pacer.longest_wait > 0
    monkeypatch.setattr("rnnstream.server.core._arrivals.MAX_GATHER_SECONDS", 0.0)
    capped = _Arriving(sessions=1000, arriving=True)
    await Pacer(capped).gather_arrivals()
    assert capped.looks == 1  # the time bound ends it after the first turn
