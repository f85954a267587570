"""Forecasts within the limits: one whose answer would not fit in a message is refused before it
runs and changes nothing; the stream that asked goes on, with its other sessions. Raw stubs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import numpy as np
import pytest

from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request
from tests.test_sequence_patterns import ATOL, BatchFirst, co2_like

MODEL = "co2_forecaster"
LIMIT = 8192  # --max-message-bytes: 4 bytes per forecast step, (8192 - 1024) / 4 = 1792 steps


def _x(rows: np.ndarray) -> pb.Tensor:
    return encode(np.ascontiguousarray(rows, np.float32), "x")


async def test_a_forecast_too_large_to_answer_is_refused_before_it_runs(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(models=(MODEL,), max_message_bytes=LIMIT)
    ref = BatchFirst(MODEL)
    x = co2_like(6, seed=150)
    async with RawStream(running.target) as raw:
        a = (await raw.open(MODEL)).session_id
        b = (await raw.open(MODEL)).session_id
        got = {a: [], b: []}  # type: dict[str, list[np.ndarray]]
        for i in range(3):
            for sid in (a, b):
                response = await raw.request(frame_request(sid, i, _x(x[i : i + 1])))
                got[sid].append(decode(response.output.outputs[0]))
        big = pb.ForecastRequest(session_id=a, steps=4000, commit=True)
        error = await raw.error(pb.StreamRequest(forecast=big))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], error
        assert "--max-message-bytes" in error.message and "at most 1792" in error.message
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw.stub.Forecast(big)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # The largest that fits is answered, on the same stream.
        fits = pb.ForecastRequest(session_id=a, steps=1792)
        answer = await raw.request(pb.StreamRequest(forecast=fits))
        assert answer.WhichOneof("kind") == "forecast", answer
        assert decode(answer.forecast.outputs[0]).shape == (1792, 1)
        # Neither refusal moved the state, and both sessions on the stream go on.
        for i in range(3, 6):
            for sid in (a, b):
                response = await raw.request(frame_request(sid, i, _x(x[i : i + 1])))
                assert response.WhichOneof("kind") == "output", response
                got[sid].append(decode(response.output.outputs[0]))
    want = ref.run(x)[0]
    for sid in (a, b):
        np.testing.assert_allclose(np.concatenate(got[sid]), want, atol=ATOL)


async def test_other_sessions_frames_run_while_a_long_forecast_runs(
    make_server: Callable[..., RunningServer],
) -> None:
    """A 4096-step forecast runs a slice at a time between batches: another session's frames,
    sent one after another once the forecast is under way, are answered while it still runs
    (they waited for the whole rollout). Every batch runs in the ORT thread here, the one the
    forecast uses too."""
    running = make_server(models=(MODEL,))
    ref = BatchFirst(MODEL)
    x = co2_like(40, seed=151)
    async with RawStream(running.target) as raw:
        a = (await raw.open(MODEL)).session_id
        b = (await raw.open(MODEL)).session_id
        await raw.request(frame_request(a, 0, _x(x[:1])))
        forecast = asyncio.ensure_future(
            raw.stub.Forecast(pb.ForecastRequest(session_id=a, steps=4096))
        )

        def under_way() -> bool:
            return bool(probe.session(running.engine, "anonymous", a).in_flight)

        while not running.run(under_way):
            await asyncio.sleep(0.001)
        ys: list[np.ndarray] = []
        answered_during = 0
        while not forecast.done() and len(ys) < len(x):
            response = await raw.request(frame_request(b, len(ys), _x(x[len(ys) : len(ys) + 1])))
            ys.append(decode(response.output.outputs[0]))
            answered_during = len(ys) if not forecast.done() else len(ys) - 1
        rolled = await forecast
    assert answered_during >= 3, f"only {answered_during} frames answered during the forecast"
    assert decode(rolled.outputs[0]).shape == (4096, 1)
    np.testing.assert_allclose(np.concatenate(ys), ref.run(x[: len(ys)])[0], atol=ATOL)
