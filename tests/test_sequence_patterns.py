"""The three sequence patterns served live: per-frame outputs, emit-last with flush, Forecast."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from rnnstream import Client, RnnstreamError
from rnnstream.proto.tensor_codec import decode, encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import MODELS, RunningServer

F32 = npt.NDArray[np.float32]
ATOL = 1e-5


class BatchFirst:
    """Reference runs of a shipped batch-first model (x, h0 -> out, hn) straight on ORT."""

    def __init__(self, name: str) -> None:
        self.session = ort.InferenceSession(str(MODELS / name / "model.onnx"))
        self.out = self.session.get_outputs()[0].name
        self.hidden = int(self.session.get_inputs()[1].shape[2])

    def zero(self) -> F32:
        return np.zeros((1, 1, self.hidden), np.float32)

    def run(self, x: F32, h: F32 | None = None) -> tuple[F32, F32]:
        """x: [T, features] of one session; returns outputs [T, ...] and the new state."""
        y, hn = self.session.run(
            [self.out, "hn"], {"x": x[None], "h0": self.zero() if h is None else h}
        )
        return y[0], hn

    def rollout(self, first: F32, h: F32, steps: int) -> tuple[F32, F32]:
        """Feed each output back as the next input, one step per call."""
        outs, current = [], first
        for _ in range(steps):
            y, h = self.run(current[None], h)
            outs.append(y[0])
            current = y[0]
        return np.stack(outs), h


def wave(period: float, steps: int, seed: int) -> F32:
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    x = np.sin(2 * np.pi * t / period + rng.uniform(0, 6)) + rng.normal(0, 0.2, steps)
    return x[:, None].astype(np.float32)


def co2_like(steps: int, seed: int = 0) -> F32:
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    x = 340 + 0.03 * t + 3 * np.sin(2 * np.pi * t / 52.18) + rng.normal(0, 0.3, steps)
    return x[:, None].astype(np.float32)


# -- sequence to sequence -------------------------------------------------------------------
def test_emit_every_answers_each_frame_and_flush_repeats_the_last(server: RunningServer) -> None:
    ref = BatchFirst("seq_classifier")
    x = wave(7.0, 25, seed=1)
    with Client(server.target) as client:
        session = client.open("seq_classifier")
        assert session.flush() == {}  # nothing applied yet
        outs = np.stack([o["logits"] for o in session.stream(x, inflight=4)])
        flushed = session.flush()
        session.end()
    want, _ = ref.run(x)
    np.testing.assert_allclose(outs, want, atol=ATOL)
    np.testing.assert_allclose(flushed["logits"], want[-1:], atol=ATOL)


# -- sequence to vector ---------------------------------------------------------------------
def test_emit_last_sends_nothing_per_frame_and_flush_answers_the_last(
    server: RunningServer,
) -> None:
    """Raw stream: after the open, the only answer to 30 frames and a flush is the flush."""
    ref = BatchFirst("seq_classifier")
    x = wave(12.0, 30, seed=2)

    def requests() -> Any:
        yield pb.StreamRequest(
            open=pb.OpenSession(
                model="seq_classifier", session_id="emit-last-raw", emit=pb.EMIT_LAST
            )
        )
        for i in range(len(x)):
            frame = pb.Frame(
                session_id="emit-last-raw", frame_index=i, inputs=[encode(x[i : i + 1], "x")]
            )
            yield pb.StreamRequest(frame=frame)
        yield pb.StreamRequest(flush=pb.FlushSession(session_id="emit-last-raw"))
        yield pb.StreamRequest(end=pb.EndSessionRequest(session_id="emit-last-raw"))

    with grpc.insecure_channel(server.target) as channel:
        responses = list(pb_grpc.RnnstreamStub(channel).Stream(requests(), timeout=30))
    kinds = [r.WhichOneof("kind") for r in responses]
    assert kinds == ["opened", "flushed", "ended"]
    flushed = responses[1].flushed
    assert flushed.frame_index == len(x) - 1 and flushed.next_frame_index == len(x)
    want, _ = ref.run(x)
    np.testing.assert_allclose(decode(flushed.outputs[0]), want[-1:], atol=ATOL)
    # The end of an emit-last session carries the last output too.
    ended = responses[2].ended
    assert ended.last_frame_index == len(x) - 1
    np.testing.assert_allclose(decode(ended.last_outputs[0]), want[-1:], atol=ATOL)


def test_emit_last_classifies_sequences_with_flush_and_reset(server: RunningServer) -> None:
    ref = BatchFirst("seq_classifier")
    periods = (4.0, 20.0, 7.0)
    with Client(server.target) as client:
        session = client.open("seq_classifier", emit="last")
        assert session.emit == "last"
        answers = []
        for n, period in enumerate(periods):
            x = wave(period, 40, seed=10 + n)
            for _ in session.stream(x, inflight=16):
                pass
            answers.append((x, session.flush(reset=True)["logits"]))
        last_x = wave(12.0, 33, seed=20)
        for row in last_x:
            session.step(row)
        session.end()
        final = session.last_outputs
    for (x, logits), period in zip(answers, periods, strict=True):
        want, _ = ref.run(x)  # each sequence from the initial state: the flush reset it
        np.testing.assert_allclose(logits, want[-1:], atol=ATOL)
        assert int(np.argmax(logits[-1])) == [4.0, 7.0, 12.0, 20.0].index(period)
    assert final is not None
    np.testing.assert_allclose(final["logits"], ref.run(last_x)[0][-1:], atol=ATOL)


def test_emit_last_frame_error_is_raised_by_the_next_flush(server: RunningServer) -> None:
    with Client(server.target) as client:
        session = client.open("seq_classifier", emit="last")
        session.step(np.zeros((1, 1), np.float32))
        session.step(np.zeros((1, 3), np.float32))  # wrong feature size: refused in-band
        with pytest.raises(RnnstreamError) as info:
            session.flush()
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "'x'" in info.value.message
        # The refused frame left the session usable; the errors were consumed by that flush.
        assert session.flush()["logits"].shape == (1, 4)
        session.end()


def test_resume_must_keep_the_emit_mode(server: RunningServer) -> None:
    with Client(server.target) as client:
        client.open("seq_classifier", session_id="emit-resume", emit="last")
        with pytest.raises(RnnstreamError) as info:
            client.open("seq_classifier", session_id="emit-resume")
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "emit 'last'" in info.value.message
        resumed = client.open("seq_classifier", session_id="emit-resume", emit="last")
        assert resumed.resumed
        x = wave(20.0, 12, seed=30)
        for row in x:
            resumed.step(row)
        resumed.flush()  # all frames applied before the unary end below
        ended = client.end_session("emit-resume")
    # The unary EndSession of an emit-last session carries the last output as well.
    assert ended.last_frame_index == len(x) - 1
    want, _ = BatchFirst("seq_classifier").run(x)
    np.testing.assert_allclose(ended.last_outputs["logits"], want[-1:], atol=ATOL)


# -- vector to sequence ---------------------------------------------------------------------
def test_forecast_rolls_forward_without_changing_the_session(server: RunningServer) -> None:
    ref = BatchFirst("co2_forecaster")
    history, later = co2_like(60), co2_like(70, seed=1)[60:]
    with Client(server.target) as client:
        session = client.open("co2_forecaster")
        for out in session.stream(history, inflight=8):
            last = out["y"]
        forecast = session.forecast(12)
        again = session.forecast(12)
        info = client.get_session(session.id)
        after = np.stack([session.step(row)["y"] for row in later])
        session.end()
    y_hist, h = ref.run(history)
    want, _ = ref.rollout(y_hist[-1], h, 12)
    assert forecast["y"].shape == (12, 1)
    np.testing.assert_allclose(forecast["y"], want, atol=ATOL)
    np.testing.assert_allclose(again["y"], want, atol=ATOL)
    np.testing.assert_allclose(last, y_hist[-1], atol=ATOL)
    assert info.next_frame_index == 60
    # Frames after the forecasts continue from the state the history left.
    np.testing.assert_allclose(after, ref.run(later, h)[0], atol=ATOL)


def test_forecast_commit_moves_the_state(server: RunningServer) -> None:
    ref = BatchFirst("co2_forecaster")
    history, later = co2_like(40, seed=3), co2_like(5, seed=4)
    with Client(server.target) as client:
        session = client.open("co2_forecaster")
        for _ in session.stream(history):
            pass
        committed = session.forecast(6, commit=True)
        chained = session.forecast(3)
        after = np.stack([session.step(row)["y"] for row in later])
        assert session.next_index == 40 + 5  # commit leaves frame numbering alone
        session.end()
    y_hist, h = ref.run(history)
    want, h_after = ref.rollout(y_hist[-1], h, 6)
    np.testing.assert_allclose(committed["y"], want, atol=ATOL)
    chain_want, _ = ref.rollout(want[-1], h_after, 3)
    np.testing.assert_allclose(chained["y"], chain_want, atol=ATOL)
    np.testing.assert_allclose(after, ref.run(later, h_after)[0], atol=ATOL)


def test_forecast_runs_in_order_with_frames_in_flight(server: RunningServer) -> None:
    """Frames sent without waiting, then a forecast: it sees every frame sent before it."""
    import asyncio

    from rnnstream import AsyncClient

    ref = BatchFirst("co2_forecaster")
    history = co2_like(50, seed=5)

    async def go() -> dict[str, F32]:
        async with AsyncClient(server.target) as client:
            session = await client.open("co2_forecaster")
            pending = [await session.send(row) for row in history]
            forecast = await session.forecast(4)
            await asyncio.gather(*pending)
            await session.end()
            return forecast

    forecast = asyncio.run(go())
    y_hist, h = ref.run(history)
    np.testing.assert_allclose(forecast["y"], ref.rollout(y_hist[-1], h, 4)[0], atol=ATOL)


def test_forecast_from_a_given_first_input_and_over_the_unary_rpc(server: RunningServer) -> None:
    ref = BatchFirst("co2_forecaster")
    history = co2_like(20, seed=6)
    with Client(server.target) as client:
        session = client.open("co2_forecaster")
        for _ in session.stream(history):
            pass
        seeded = session.forecast(5, first=np.array([350.0], np.float32))
        with grpc.insecure_channel(server.target) as channel:
            reply = pb_grpc.RnnstreamStub(channel).Forecast(
                pb.ForecastRequest(session_id=session.id, steps=5), timeout=10
            )
        session.end()
    _, h = ref.run(history)
    y_hist, _ = ref.run(history)
    np.testing.assert_allclose(
        seeded["y"], ref.rollout(np.array([350.0], np.float32), h, 5)[0], atol=ATOL
    )
    assert not reply.committed and reply.next_frame_index == 20
    np.testing.assert_allclose(
        decode(reply.outputs[0]), ref.rollout(y_hist[-1], h, 5)[0], atol=ATOL
    )


def test_forecast_refusals(server: RunningServer) -> None:
    with Client(server.target) as client:
        classifier = client.open("seq_classifier")
        classifier.step(np.zeros((1, 1), np.float32))
        with pytest.raises(RnnstreamError) as info:
            classifier.forecast(3)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "does not map onto its input" in info.value.message
        classifier.end()

        fresh = client.open("co2_forecaster")
        with pytest.raises(RnnstreamError) as info:
            fresh.forecast(3)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "applied no frame" in info.value.message
        with pytest.raises(RnnstreamError) as info:
            fresh.forecast(0, first=np.array([340.0], np.float32))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(RnnstreamError) as info:
            fresh.forecast(2, first=np.ones((3, 1), np.float32))
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "one time step" in info.value.message
        # The refusals left the session as it was: numbering and outputs start from scratch.
        ref = BatchFirst("co2_forecaster")
        x = co2_like(3, seed=7)
        got = np.stack([fresh.step(row)["y"] for row in x])
        np.testing.assert_allclose(got, ref.run(x)[0], atol=ATOL)
        fresh.end()


def _amplifier(folder: Path) -> None:
    """x, h0 -> y = x * 1e30 + h, hn = h + 1: a model whose rollout overflows in two steps."""
    vec = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", "time", 1])
        for n in ("x", "y")
    ]
    state = [
        onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, "batch", 1])
        for n in ("h0", "hn")
    ]
    nodes = [
        onnx.helper.make_node("Constant", [], ["gain"], value_float=1e30),
        onnx.helper.make_node("Constant", [], ["one"], value_float=1.0),
        onnx.helper.make_node("Mul", ["x", "gain"], ["scaled"]),
        onnx.helper.make_node("Transpose", ["h0"], ["h_bt"], perm=[1, 0, 2]),
        onnx.helper.make_node("Add", ["scaled", "h_bt"], ["y"]),
        onnx.helper.make_node("Add", ["h0", "one"], ["hn"]),
    ]
    graph = onnx.helper.make_graph(nodes, "amplifier", [vec[0], state[0]], [vec[1], state[1]])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir()
    onnx.save(model, str(folder / "model.onnx"))


def test_forecast_divergence_is_refused_and_leaves_the_state(
    make_server: Any, tmp_path: Path
) -> None:
    """A rollout that overflows to infinity fails cleanly, and its commit is never applied."""
    _amplifier(tmp_path / "amplifier")
    running = make_server(model_repository=tmp_path)
    with Client(running.target) as client:
        session = client.open("amplifier")
        assert session.step(np.array([1.0], np.float32))["y"][0] == pytest.approx(1e30)
        with pytest.raises(RnnstreamError) as info:
            session.forecast(3, commit=True)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "step 2" in info.value.message and "NaN or infinity" in info.value.message
        # State h was 1 after the first frame; a commit of the failed rollout would have moved it.
        y = session.step(np.array([0.0], np.float32))["y"]
        session.end()
    assert y[0] == pytest.approx(1.0)
