"""Errors repeat only a short piece of a client's string: a 20 kB session id or model name gets
the status it deserves (NOT_FOUND, INVALID_ARGUMENT), not a RESOURCE_EXHAUSTED from a status
message too long for gRPC's trailing metadata. Raw stubs of both APIs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request, x_tensor

LONG = "s" * 20_000
X = np.zeros((1, 16), np.float32)


def _refused(call: Callable[[], Any]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error = info.value
    assert len(error.details() or "") <= 2000
    return error


def test_long_client_strings_get_their_own_status(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        infer = oip_grpc.GRPCInferenceServiceStub(channel)
        for call, code in (
            (lambda: native.GetSession(pb.GetSessionRequest(session_id=LONG)), "NOT_FOUND"),
            (lambda: native.EndSession(pb.EndSessionRequest(session_id=LONG)), "NOT_FOUND"),
            (
                lambda: native.Infer(pb.InferRequest(model=LONG, inputs=[x_tensor(X)])),
                "NOT_FOUND",
            ),
            (
                lambda: native.Infer(pb.InferRequest(session_id=LONG, inputs=[x_tensor(X)])),
                "NOT_FOUND",
            ),
            (
                lambda: native.Infer(
                    pb.InferRequest(model="gru", inputs=[pb.Tensor(name=LONG, dtype=pb.FLOAT32)])
                ),
                "INVALID_ARGUMENT",
            ),
            (lambda: infer.ModelMetadata(oip.ModelMetadataRequest(name=LONG)), "NOT_FOUND"),
            (
                lambda: infer.ModelMetadata(oip.ModelMetadataRequest(name="gru", version=LONG)),
                "NOT_FOUND",
            ),
            (lambda: infer.ModelInfer(_oip(LONG)), "NOT_FOUND"),
            (lambda: infer.ModelInfer(_oip("gru", sequence=LONG)), "FAILED_PRECONDITION"),
            (lambda: infer.ModelInfer(_oip("gru", outputs=[LONG] * 50)), "INVALID_ARGUMENT"),
            (lambda: infer.ModelInfer(_oip("gru", input_name=LONG)), "INVALID_ARGUMENT"),
        ):
            error = _refused(call)
            assert error.code().name == code, (code, error.code(), (error.details() or "")[:200])
            assert "(20000 characters)" in (error.details() or "")


def _oip(
    model: str, sequence: str = "", outputs: list[str] | None = None, input_name: str = "x"
) -> oip.ModelInferRequest:
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=[1, 16])
    request.raw_input_contents.append(X.tobytes())
    if sequence:
        request.parameters["sequence_id"].string_param = sequence
    for name in outputs or ():
        request.outputs.add(name=name)
    return request


async def test_long_ids_in_band(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(models=("gru",))
    async with RawStream(running.target) as raw:
        error = await raw.error(frame_request(LONG, 0, x_tensor(X)))
        assert error.code == grpc.StatusCode.NOT_FOUND.value[0]
        assert len(error.message) <= 2000 and "(20000 characters)" in error.message
        resume = pb.OpenSession(model="gru", session_id=LONG, resume=True)
        error = await raw.error(pb.StreamRequest(open=resume))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert len(error.message) <= 2000
