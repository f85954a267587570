"""Batching across sessions, against real servers: outputs equal per-frame references with
batching on and off, frames are applied exactly once and in order, a cancelled stream or a
failing model disturbs nobody else."""

from __future__ import annotations

import asyncio
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import pytest

from rnnstream import AsyncClient, RnnstreamError
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import MODELS, RunningServer
from tests.streaming import (
    ATOL,
    FEATURES,
    HIDDEN,
    RawStream,
    frame_request,
    numpy_reference,
    ort_session,
    x_tensor,
)

F32 = npt.NDArray[np.float32]
OWNER = "anonymous"
# Batched and unbatched runs against one-frame-at-a-time ORT runs of the same graph.
PER_FRAME_ATOL = 1e-6


class PerFrame:
    """The references of one session: ORT run one frame at a time with batch 1, carrying the
    state between calls, and the float64 numpy cells (tests/reference.py)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.ort = ort_session(model)
        self.state_in = [i.name for i in self.ort.get_inputs() if i.name != "x"]
        self.state_out = [o.name for o in self.ort.get_outputs() if o.name != "y"]
        self.numpy = numpy_reference(model)
        self.reset()

    def reset(self) -> None:
        self.state = [np.zeros((1, 1, HIDDEN[self.model]), np.float32) for _ in self.state_in]
        self.numpy_state = self.numpy.initial_state()

    def step(self, x: F32) -> tuple[F32, F32]:
        feeds: dict[str, Any] = dict(zip(self.state_in, self.state, strict=True))
        feeds["x"] = x[:, None, :]
        y, *self.state = self.ort.run(["y", *self.state_out], feeds)
        y_numpy, self.numpy_state = self.numpy.run(x, self.numpy_state)
        return y[:, 0], y_numpy


def _check(got: F32, expected: tuple[F32, F32]) -> None:
    np.testing.assert_allclose(got, expected[0], rtol=0, atol=PER_FRAME_ATOL)
    np.testing.assert_allclose(got, expected[1], rtol=0, atol=ATOL)


def _frame(rng: random.Random, model: str, steps: int) -> F32:
    seed = rng.randrange(2**32)
    return np.random.default_rng(seed).standard_normal((steps, FEATURES[model])).astype(np.float32)


@pytest.mark.parametrize("max_batch_size", [1, 256])
async def test_outputs_equal_per_frame_references_under_churn(
    make_server: Callable[..., RunningServer], max_batch_size: int
) -> None:
    running = make_server(max_batch_size=max_batch_size, models=("gru", "lstm"))
    clients = [AsyncClient(running.target) for _ in range(3)]
    sent: dict[str, int] = {}  # frames each session sent (and must have applied once)
    still_open: list[str] = []

    async def script(k: int) -> None:
        rng = random.Random(1000 + k)
        model = ("gru", "lstm")[k % 2]
        await asyncio.sleep(rng.random() * 0.05)  # sessions open while others are running
        session = await clients[k % 3].open(model)
        reference = PerFrame(model)
        window: list[tuple[asyncio.Future[dict[str, Any]], tuple[F32, F32]]] = []
        frames = rng.randint(6, 14)
        for step in range(frames):
            if step and rng.random() < 0.1:
                await session.reset()  # applies after the frames sent before it
                reference.reset()
            x = _frame(rng, model, rng.choice((1, 1, 1, 2)))
            expected = reference.step(x)
            window.append((await session.send(x), expected))
            if len(window) > rng.randint(1, 4):
                future, expected = window.pop(0)
                _check((await future)["y"], expected)
            if rng.random() < 0.3:
                await asyncio.sleep(0)
        for future, expected in window:
            _check((await future)["y"], expected)
        sent[session.id] = frames
        if rng.random() < 0.5:
            await session.end()  # ends while other sessions are still streaming
        else:
            still_open.append(session.id)

    try:
        await asyncio.wait_for(asyncio.gather(*(script(k) for k in range(24))), 60)
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    def server_side() -> tuple[list[int], int, set[int]]:
        engine = running.engine
        indices = [probe.session(engine, OWNER, s).next_index for s in still_open]
        stats = [engine.model_stats(name) for name in engine.model_names()]
        sizes = {size for s in stats for size in s.by_size}
        return indices, sum(s.frames for s in stats), sizes

    indices, applied, sizes = running.run(server_side)
    assert indices == [sent[s] for s in still_open]
    assert applied == sum(sent.values())  # nothing dropped, nothing applied twice
    if max_batch_size == 1:
        assert sizes == {1}
    else:
        assert max(sizes) > 1  # the sessions really were batched together


async def test_cancelled_stream_with_frames_in_a_batch_disturbs_no_one(
    make_server: Callable[..., RunningServer],
) -> None:
    # Every batch runs in the executor thread, so the cancel can land while one is running
    # (a batch run on the event loop is over before the call can go away).
    running = make_server(models=("gru",))
    rng = random.Random(7)
    doomed = RawStream(running.target)
    doomed_ids = [(await doomed.open("gru")).session_id for _ in range(32)]
    doomed_frames: dict[str, list[F32]] = {s: [] for s in doomed_ids}
    async with AsyncClient(running.target) as client:
        survivors = [await client.open("gru") for _ in range(8)]
        references = [PerFrame("gru") for _ in survivors]

        async def survive(k: int) -> None:
            for _ in range(30):
                x = _frame(rng, "gru", 1)
                expected = references[k].step(x)
                _check((await survivors[k].step(x))["y"], expected)

        running_survivors = asyncio.gather(*(survive(k) for k in range(len(survivors))))
        # Flood the doomed stream, then cancel it as soon as its first answer shows frames are
        # being batched: the rest are queued or in a batch when the call goes away.
        for index in range(4):
            for session_id in doomed_ids:
                x = _frame(rng, "gru", 1)
                doomed_frames[session_id].append(x)
                await doomed.call.write(frame_request(session_id, index, x_tensor(x)))
        first = await doomed.call.read()
        assert first.WhichOneof("kind") == "output"
        doomed.call.cancel()
        await doomed.channel.close()
        await asyncio.wait_for(running_survivors, 60)
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(running.engine.drain(10), running.loop)
        )

        # The doomed sessions live on with consistent states: resumed, each continues from the
        # frames the server applied, and its next output matches the reference for them.
        for session_id in doomed_ids:
            resumed = await client.open("gru", session_id, resume=True)
            applied = resumed.next_index
            assert 0 <= applied <= 4
            reference = PerFrame("gru")
            for x in doomed_frames[session_id][:applied]:
                reference.step(x)
            x = _frame(rng, "gru", 1)
            _check((await resumed.step(x))["y"], reference.step(x))
            await resumed.end()


def _fragile_model(folder: Path) -> None:
    """gru's graph with Squeeze/Unsqueeze on the time axis in front: ORT fails any frame of
    T != 1 at run time, while loading and T = 1 frames work exactly as gru."""
    model = onnx.load(str(MODELS / "gru" / "model.onnx"))
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["x_checked" if name == "x" else name for name in node.input]
    axes = onnx.helper.make_tensor("time_axis", onnx.TensorProto.INT64, [1], [0])
    graph.initializer.append(axes)
    checks = [
        onnx.helper.make_node("Squeeze", ["x", "time_axis"], ["x_squeezed"]),
        onnx.helper.make_node("Unsqueeze", ["x_squeezed", "time_axis"], ["x_checked"]),
    ]
    for i, node in enumerate(checks):
        graph.node.insert(i, node)
    onnx.checker.check_model(model)
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))


async def test_failing_model_fails_only_its_own_frames_in_band(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    shutil.copytree(MODELS / "gru", repository / "gru")
    _fragile_model(repository / "fragile")
    running = make_server(model_repository=repository)
    rng = random.Random(11)
    async with AsyncClient(running.target) as client:
        healthy = [await client.open("gru") for _ in range(6)]
        fragile = [await client.open("fragile") for _ in range(6)]
        healthy_refs = [PerFrame("gru") for _ in healthy]
        fragile_refs = [PerFrame("gru") for _ in fragile]

        async def run_healthy(k: int) -> None:
            for _ in range(20):
                x = _frame(rng, "gru", rng.choice((1, 2)))
                expected = healthy_refs[k].step(x)
                _check((await healthy[k].step(x))["y"], expected)

        async def run_fragile(k: int) -> int:
            failures = 0
            for index in range(10):
                bad = _frame(rng, "gru", 2)
                with pytest.raises(RnnstreamError) as caught:
                    await (await fragile[k].send(bad, index))
                assert caught.value.code == grpc.StatusCode.INTERNAL
                assert "fragile" in caught.value.message
                assert caught.value.frame_index == index
                failures += 1
                # The failed frame left the state as it was: its index is sent again.
                x = _frame(rng, "gru", 1)
                expected = fragile_refs[k].step(x)
                _check((await (await fragile[k].send(x, index)))["y"], expected)
            return failures

        results = await asyncio.wait_for(
            asyncio.gather(
                *(run_healthy(k) for k in range(len(healthy))),
                *(run_fragile(k) for k in range(len(fragile))),
            ),
            60,
        )
    assert results[len(healthy) :] == [10] * len(fragile)

    def stats() -> tuple[int, int, int, int]:
        engine = running.engine
        gru, bad = engine.model_stats("gru"), engine.model_stats("fragile")
        return gru.failed_frames, gru.frames, bad.failed_frames, bad.frames

    assert running.run(stats) == (0, 6 * 20, 6 * 10, 6 * 10)


async def test_failed_frame_is_answered_in_band_on_the_raw_stream(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repository = tmp_path / "models"
    repository.mkdir()
    _fragile_model(repository / "fragile")
    running = make_server(model_repository=repository)
    async with RawStream(running.target) as stream:
        session_id = (await stream.open("fragile")).session_id
        x = np.zeros((2, FEATURES["gru"]), np.float32)
        error = await stream.error(frame_request(session_id, 0, x_tensor(x)))
        assert error.code == grpc.StatusCode.INTERNAL.value[0]
        assert error.session_id == session_id and error.frame_index == 0
        y = await stream.frame(session_id, 0, x[:1])  # same index: nothing was applied
        reference = PerFrame("gru")
        _check(y, reference.step(x[:1]))
        response = await stream.request(
            pb.StreamRequest(end=pb.EndSessionRequest(session_id=session_id))
        )
        assert response.WhichOneof("kind") == "ended"
        assert response.ended.next_frame_index == 1
