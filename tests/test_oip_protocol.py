"""Open Inference Protocol edge cases through rnnstream's own stubs, on a live server."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import MODELS, RunningServer
from tests.reference import load_reference

ATOL = 1e-5


def _request(
    model: str, x: np.ndarray, sequence_id: int = 0, **flags: bool
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(np.ascontiguousarray(x, dtype="<f4").tobytes())
    if sequence_id:
        request.parameters["sequence_id"].uint64_param = sequence_id
    for name, value in flags.items():
        request.parameters[name].bool_param = value
    return request


def _y(response: oip.ModelInferResponse) -> np.ndarray:
    shape = list(response.outputs[0].shape)
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(shape)


def test_stream_answers_garbage_in_band_and_carries_on(server: RunningServer) -> None:
    x = np.random.default_rng(3).standard_normal((1, 16)).astype(np.float32)
    start = _request("gru", x, 4001, sequence_start=True, sequence_end=True)
    with grpc.insecure_channel(server.target) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=lambda b: b,
            response_deserializer=oip.ModelStreamInferResponse.FromString,
        )
        responses = list(call(iter([b"\xff\xff\xff", start.SerializeToString()]), timeout=30))
    assert len(responses) == 2
    assert "not a valid inference.ModelInferRequest" in responses[0].error_message
    assert responses[1].error_message == ""
    ref = load_reference(MODELS / "gru/model.onnx")
    np.testing.assert_allclose(
        _y(responses[1].infer_response), ref.run(x, ref.initial_state())[0], atol=ATOL
    )


def test_stateless_batch_and_sequence_batch_rules(server: RunningServer) -> None:
    x = np.random.default_rng(4).standard_normal((3, 16)).astype(np.float32)
    ref = load_reference(MODELS / "gru/model.onnx")
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        y = _y(stub.ModelInfer(_request("gru", x), timeout=30))
        # No sequence_id: each batch item is one step from the initial state.
        expected = np.concatenate([ref.run(x[i : i + 1], ref.initial_state())[0] for i in range(3)])
        np.testing.assert_allclose(y, expected, atol=ATOL)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request("gru", x, 4002, sequence_start=True), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "batch size 1" in (err.value.details() or "")
        bad = _request("gru", x[:1])
        bad.raw_input_contents.append(b"extra")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(bad, timeout=30)
        assert "raw_input_contents" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request("gru", x[:1], 0, sequence_end=True), timeout=30)
        assert "sequence_id" in (err.value.details() or "")


def test_sequence_is_an_ordinary_session(server: RunningServer) -> None:
    x = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    with grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        native = pb_grpc.RnnstreamStub(channel)
        stub.ModelInfer(_request("gru", x[:1], 4003, sequence_start=True), timeout=30)
        stub.ModelInfer(_request("gru", x[1:], 4003), timeout=30)
        info = native.GetSession(pb.GetSessionRequest(session_id="oip-4003"), timeout=30)
        assert info.model == "gru" and info.next_frame_index == 2
        native.EndSession(pb.EndSessionRequest(session_id="oip-4003"), timeout=30)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(_request("gru", x[:1], 4003), timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "sequence_start" in (err.value.details() or "")
