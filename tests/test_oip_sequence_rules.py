"""Open Inference Protocol sequences: one rule for sequence_start / sequence_end on a refused
request, and fail-over through the state store as on the native API. Raw OIP stubs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from tests.conftest import RunningServer, test_settings
from tests.services import RedisServer
from tests.streaming import ort_full, sequence

MODEL = "gru"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    running = RedisServer(tmp_path)
    yield running
    running.stop()


def _request(x: np.ndarray, sequence_id: int, **flags: bool) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    request.raw_input_contents.append(np.ascontiguousarray(x, "<f4").tobytes())
    request.parameters["sequence_id"].uint64_param = sequence_id
    for name, value in flags.items():
        request.parameters[name].bool_param = value
    return request


def _y(response: oip.ModelInferResponse) -> np.ndarray:
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(-1, 128)


def _undecodable(request: oip.ModelInferRequest) -> oip.ModelInferRequest:
    request.raw_input_contents[0] = request.raw_input_contents[0][:-1]
    return request


def _wrong_width(x: np.ndarray, sequence_id: int, **flags: bool) -> oip.ModelInferRequest:
    return _request(np.concatenate([x, x], axis=-1), sequence_id, **flags)


def _poisoned(x: np.ndarray, sequence_id: int, **flags: bool) -> oip.ModelInferRequest:
    bad = x.copy()
    bad[0, 0] = np.nan
    return _request(bad, sequence_id, **flags)


@pytest.mark.parametrize("refusal", [_undecodable, _wrong_width, _poisoned])
def test_controls_of_a_refused_request_take_effect(
    server: RunningServer, refusal: Callable[..., oip.ModelInferRequest]
) -> None:
    """A refused request's sequence_end ends its sequence and its sequence_start starts it
    over, whether it was refused decoding (bytes), checking (shape) or running (NaN)."""
    x = sequence(MODEL, 3, seed=160)
    number = 6100 + [_undecodable, _wrong_width, _poisoned].index(refusal)
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        stub.ModelInfer(_request(x[:1], number, sequence_start=True), timeout=30)
        stub.ModelInfer(_request(x[1:2], number), timeout=30)
        # sequence_start on a refused request: the live sequence starts over all the same.
        bad = (
            refusal(_request(x[2:3], number, sequence_start=True))
            if refusal is _undecodable
            else refusal(x[2:3], number, sequence_start=True)
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(bad, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        y = _y(stub.ModelInfer(_request(x[:1], number), timeout=30))
        np.testing.assert_allclose(y, ort_full(MODEL, x[:1]), rtol=0, atol=1e-5)
        # sequence_end on a refused request: the sequence is over.
        bad = (
            refusal(_request(x[1:2], number, sequence_end=True))
            if refusal is _undecodable
            else refusal(x[1:2], number, sequence_end=True)
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(bad, timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as gone:
            stub.ModelInfer(_request(x[1:2], number), timeout=30)
        assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "is not active" in (gone.value.details() or "")


def test_a_sequence_goes_on_after_its_replica_restarts(
    make_server: Callable[..., RunningServer], redis_server: RedisServer
) -> None:
    """Sequence 9 is continued (no sequence_start) on a replica that never held it: its state
    comes from Redis, as a native resume's does, and its end deletes it there."""
    first = RunningServer(
        test_settings(models=(MODEL,), state_store=redis_server.url, session_ttl=60)
    )
    x = sequence(MODEL, 6, seed=161)
    ys = []
    with grpc.insecure_channel(first.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        ys.append(_y(stub.ModelInfer(_request(x[:1], 9, sequence_start=True), timeout=30)))
        ys += [_y(stub.ModelInfer(_request(x[i : i + 1], 9), timeout=30)) for i in (1, 2)]
    first.stop()
    second = make_server(models=(MODEL,), state_store=redis_server.url, session_ttl=60)
    with grpc.insecure_channel(second.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        ys += [_y(stub.ModelInfer(_request(x[i : i + 1], 9), timeout=30)) for i in (3, 4)]
        ys.append(_y(stub.ModelInfer(_request(x[5:6], 9, sequence_end=True), timeout=30)))
        with pytest.raises(grpc.RpcError) as gone:
            stub.ModelInfer(_request(x[:1], 9), timeout=30)
        assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    np.testing.assert_allclose(np.concatenate(ys), ort_full(MODEL, x), rtol=0, atol=1e-5)
