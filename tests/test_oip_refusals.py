"""Open Inference Protocol requests a hostile client sends: values out of an input's range and
shapes no array can have are INVALID_ARGUMENT, never a silent wrap-around or an INTERNAL with a
traceback. Raw inference.GRPCInferenceService stubs on a live server."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from tests.conftest import RunningServer


def _integer_model(folder: Path) -> None:
    """y = float(a) + float(b), a INT8 and b UINT8 [batch, time, 1]; the state sums y."""
    inputs = [
        helper.make_tensor_value_info("a", TensorProto.INT8, ["batch", "time", 1]),
        helper.make_tensor_value_info("b", TensorProto.UINT8, ["batch", "time", 1]),
        helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 1]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "time", 1]),
        helper.make_tensor_value_info("hn", TensorProto.FLOAT, ["batch", 1]),
    ]
    nodes = [
        helper.make_node("Cast", ["a"], ["af"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["af", "bf"], ["y"]),
        helper.make_node("ReduceSum", ["y", "axes"], ["total"], keepdims=0),
        helper.make_node("Add", ["h0", "total"], ["hn"]),
    ]
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    graph = helper.make_graph(nodes, "ints", inputs, outputs, initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    (folder / "config.toml").write_text('[[states]]\ninput = "h0"\noutput = "hn"\nbatch_axis = 0\n')


def _typed(a: list[int], b: list[int]) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="ints")
    request.inputs.add(name="a", datatype="INT8", shape=[1, len(a), 1])
    request.inputs[0].contents.int_contents.extend(a)
    request.inputs.add(name="b", datatype="UINT8", shape=[1, len(b), 1])
    request.inputs[1].contents.uint_contents.extend(b)
    return request


@pytest.fixture
def ints_server(tmp_path: Path, make_server: Callable[..., RunningServer]) -> RunningServer:
    _integer_model(tmp_path / "ints")
    running: RunningServer = make_server(model_repository=tmp_path)
    return running


def test_typed_integers_out_of_range_are_refused(ints_server: RunningServer) -> None:
    with grpc.insecure_channel(ints_server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        good = stub.ModelInfer(_typed([-128, 127, 5], [0, 255, 7]), timeout=30)
        y = np.frombuffer(good.raw_output_contents[0], "<f4")
        np.testing.assert_array_equal(y, [-128.0, 382.0, 12.0])
        for a, b, named in (
            ([1000], [0], "holds 1000 in contents.int_contents, out of range for INT8"),
            ([-129], [0], "holds -129 in contents.int_contents, out of range for INT8"),
            ([0], [300], "holds 300 in contents.uint_contents, out of range for UINT8"),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(_typed(a, b), timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert named in (refused.value.details() or "")


def _shaped(shape: list[int], raw: bytes) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name="gru")
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    request.raw_input_contents.append(raw)
    return request


def test_shapes_no_array_can_have_are_invalid_argument_without_a_traceback(
    server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    hostile = [
        (_shaped([0, 2**62, 2**62], b""), "unusable shape"),
        (_shaped([1] * 65, b"\0" * 4), "65 dimensions; at most 32"),
        (_shaped([1] * 40, b"\0" * 4), "40 dimensions; at most 32"),
    ]
    typed = oip.ModelInferRequest(model_name="gru")
    typed.inputs.add(name="x", datatype="FP32", shape=[0, 2**62, 2**62])
    hostile.append((typed, "unusable shape"))
    with caplog.at_level(logging.INFO), grpc.insecure_channel(server.target) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(25):
            for request, named in hostile:
                with pytest.raises(grpc.RpcError) as refused:
                    stub.ModelInfer(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (
                    refused.value.details()
                )
                assert named in (refused.value.details() or "")
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
