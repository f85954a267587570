"""The unary API: Infer (stateless and on a session), models, sessions."""

from __future__ import annotations

import asyncio
import inspect

import grpc
import numpy as np
import pytest

from rnnstream import (
    AsyncClient,
    Client,
    ModelInfo,
    RnnstreamError,
    SessionEnded,
    SessionInfo,
    TensorInfo,
)
from rnnstream.proto.tensor_codec import encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests import probe
from tests.conftest import MODELS, RunningServer
from tests.streaming import (
    FEATURES,
    HIDDEN,
    MODEL_NAMES,
    assert_matches_references,
    ort_full,
    sequence,
)


@pytest.mark.parametrize("model", MODEL_NAMES)
async def test_stateless_infer(server: RunningServer, model: str) -> None:
    x = sequence(model, 20, seed=60)
    async with AsyncClient(server.target) as client:
        first = await client.infer(model, x)
        # Stateless: a second call starts from the initial state again.
        again = await client.infer(model, x)
    assert_matches_references(model, x, first["y"])
    # Not bit for bit: a batch of another size may take another ORT kernel, which rounds
    # differently; a second call that carried state over would be off by far more.
    np.testing.assert_allclose(first["y"], again["y"], rtol=0, atol=1e-6)


async def test_stateless_infer_keeps_nothing(server: RunningServer) -> None:
    def live() -> int:
        return probe.live_slots(server.engine)

    before = server.run(live)
    async with AsyncClient(server.target) as client:
        await client.infer("gru", sequence("gru", 3, seed=61))
        with pytest.raises(RnnstreamError):
            await client.infer("gru", np.zeros((3, 5), np.float32))
        # The scratch session's slot is freed by the scheduler right after the call.
        for _ in range(100):
            if server.run(live) == before:
                break
            await asyncio.sleep(0.01)
    assert server.run(live) == before


async def test_infer_continues_a_named_session(server: RunningServer) -> None:
    x = sequence("lstm", 12, seed=62)
    async with AsyncClient(server.target) as client:
        session = await client.open("lstm", "infer-session")
        streamed = await session.step(x[:4])
        # Without frame_index: the session's next frame.
        unary = await client.infer("lstm", x[4:8], session_id="infer-session")
        # With frame_index: that exact frame; the same index again is answered, not reapplied.
        indexed = await client.infer("lstm", x[8:], session_id="infer-session", frame_index=2)
        resent = await client.infer("lstm", x[8:], session_id="infer-session", frame_index=2)
        np.testing.assert_array_equal(indexed["y"], resent["y"])
        info = await client.get_session("infer-session")
        assert info.model == "lstm" and info.next_frame_index == 3
        with pytest.raises(RnnstreamError) as exc:
            await client.infer("lstm", x[:1], session_id="infer-session", frame_index=9)
        assert exc.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "frame 9 is out of order" in exc.value.message
        ended = await client.end_session("infer-session")
        assert ended.session_id == "infer-session" and ended.next_frame_index == 3
    ys = np.concatenate([streamed["y"], unary["y"], indexed["y"]])
    assert_matches_references("lstm", x, ys)


async def test_infer_response_names_session_and_index(server: RunningServer) -> None:
    x = sequence("gru", 3, seed=63)
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        stateless = await stub.Infer(pb.InferRequest(model="gru", inputs=[encode(x, "x")]))
        assert stateless.session_id == "" and stateless.frame_index == 0
        async with AsyncClient(server.target) as client:
            session = await client.open("gru")
            # The model may be left out when a session is named.
            response = await stub.Infer(
                pb.InferRequest(session_id=session.id, inputs=[encode(x, "x")])
            )
            assert response.session_id == session.id and response.frame_index == 0
            assert [t.name for t in response.outputs] == ["y"]
            assert list(response.outputs[0].shape) == [3, 128]
            await session.end()
    np.testing.assert_allclose(
        np.frombuffer(response.outputs[0].data, np.float32).reshape(3, 128),
        ort_full("gru", x),
        rtol=0,
        atol=1e-5,
    )


def _check_model_info(info: ModelInfo, model: str) -> None:
    # Plain dataclasses, not protobuf messages: dtypes by numpy's name, shapes as tuples.
    assert isinstance(info, ModelInfo)
    features, hidden = FEATURES[model], HIDDEN[model]
    assert info.name == model
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.max_batch_size == 256
    (x,) = info.inputs
    assert x == TensorInfo("x", "float32", (-1, -1, features), batch_axis=1, time_axis=0)
    (y,) = info.outputs
    assert y == TensorInfo("y", "float32", (-1, -1, hidden), batch_axis=1, time_axis=0)
    pairs = [("initial_h", "Y_h")] + ([("initial_c", "Y_c")] if model == "lstm" else [])
    assert [(s.input_name, s.output_name) for s in info.states] == pairs
    for state in info.states:
        assert (state.dtype, state.shape, state.batch_axis) == ("float32", (1, -1, hidden), 1)


async def test_list_and_get_models(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        models = await client.list_models()
        shipped = sorted(p.parent.name for p in MODELS.glob("*/model.onnx"))
        assert [m.name for m in models] == shipped
        for info in models:
            if info.name in MODEL_NAMES:
                _check_model_info(info, info.name)
            assert await client.get_model(info.name) == info
        with pytest.raises(RnnstreamError) as exc:
            await client.get_model("nope")
    assert exc.value.code == grpc.StatusCode.NOT_FOUND
    assert "unknown model 'nope'" in exc.value.message


async def test_get_and_end_session(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        session = await client.open("rnn_tanh")
        await session.step(sequence("rnn_tanh", 5, seed=64))
        info = await client.get_session(session.id)
        assert isinstance(info, SessionInfo)
        assert info.session_id == session.id and info.model == "rnn_tanh"
        assert info.next_frame_index == 1 and info.pending_frames == 0
        assert info.idle_seconds >= 0
        assert info.expires_in_seconds == 0  # expiry is off on this server
        ended = await client.end_session(session.id)
        assert ended == SessionEnded(session.id, "client", 1)
        for call in (client.get_session, client.end_session):
            with pytest.raises(RnnstreamError) as exc:
                await call(session.id)
            assert exc.value.code == grpc.StatusCode.NOT_FOUND
            assert f"unknown session {session.id!r}" in exc.value.message
        # The stream that held the session learns its frames are refused.
        with pytest.raises(RnnstreamError) as exc:
            await session.step(sequence("rnn_tanh", 1, seed=65))
        assert exc.value.code == grpc.StatusCode.NOT_FOUND


async def test_session_ids(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        generated = await client.open("gru")
        assert len(generated.id) == 32 and int(generated.id, 16) >= 0
        with pytest.raises(RnnstreamError) as exc:
            await client.open("gru", "x" * 129)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 128 printable characters" in exc.value.message
        await generated.end()


def test_blocking_session_ends_with_its_block(server: RunningServer) -> None:
    with Client(server.target) as client:
        with client.open("gru") as session:
            session.step(sequence("gru", 1, seed=66)[0])
        assert session.ended
        with pytest.raises(RnnstreamError) as exc:
            client.get_session(session.id)
        assert exc.value.code == grpc.StatusCode.NOT_FOUND
        # An error inside the block still ends the session, and is not swallowed.
        with pytest.raises(ZeroDivisionError), client.open("gru") as failing:
            failing.step(sequence("gru", 1, seed=67)[0])
            _ = 1 / 0
        assert failing.ended
        with pytest.raises(RnnstreamError):
            client.get_session(failing.id)


async def test_async_session_ends_with_its_block(server: RunningServer) -> None:
    async with AsyncClient(server.target) as client:
        async with await client.open("gru") as session:
            await session.step(sequence("gru", 1, seed=68)[0])
        assert session.ended
        with pytest.raises(RnnstreamError):
            await client.get_session(session.id)


def test_blocking_client_forecasts_by_session_id(server: RunningServer) -> None:
    weeks = np.linspace(370.0, 372.0, 12, dtype=np.float32)
    with Client(server.target) as client, client.open("co2_forecaster") as session:
        for value in weeks:
            session.step(np.array([value], np.float32))
        by_id = client.forecast("co2_forecaster", session.id, 4)
        on_stream = session.forecast(4)
        assert by_id["y"].shape == (4, 1)
        np.testing.assert_array_equal(by_id["y"], on_stream["y"])


def test_blocking_client_takes_the_async_clients_keywords() -> None:
    blocking = inspect.signature(Client.__init__).parameters
    asynchronous = inspect.signature(AsyncClient.__init__).parameters
    assert [(p.name, p.kind, p.default) for p in blocking.values()] == [
        (p.name, p.kind, p.default) for p in asynchronous.values()
    ]
    with pytest.raises(TypeError, match="stream_per_sesion"):
        Client("127.0.0.1:1", stream_per_sesion=True)  # type: ignore[call-arg]
