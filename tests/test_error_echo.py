"""Errors a hostile client provokes, through raw stubs of both APIs: a 20 kB session id or model
name gets the status it deserves (NOT_FOUND, INVALID_ARGUMENT), not a RESOURCE_EXHAUSTED from a
status message too long for gRPC's trailing metadata; requests that make no sense are refused."""

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
from tests import probe
from tests.conftest import RunningServer
from tests.streaming import RawStream, frame_request, ort_full, x_tensor

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
            (lambda: infer.ModelInfer(_oip("gru", outputs=[LONG] * 50)), "INVALID_ARGUMENT"),
            (lambda: infer.ModelInfer(_oip("gru", input_name=LONG)), "INVALID_ARGUMENT"),
        ):
            error = _refused(call)
            assert error.code().name == code, (code, error.code(), (error.details() or "")[:200])
            assert "(20000 characters)" in (error.details() or "")
        # An id this long names no sequence: refused as such, without repeating it.
        error = _refused(lambda: infer.ModelInfer(_oip("gru", sequence=LONG)))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 128 printable characters" in (error.details() or "")


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


async def test_resume_without_an_id_and_a_reset_ahead_are_refused(
    make_server: Callable[..., RunningServer],
) -> None:
    """A resume must name its session (else it would open a new one); a reset numbered ahead of
    the session (2^64 - 1) is out of order like a frame would be, and changes nothing."""
    running = make_server(models=("gru",))
    x = np.random.default_rng(120).standard_normal((3, 16)).astype(np.float32)
    async with RawStream(running.target) as raw:
        error = await raw.error(pb.StreamRequest(open=pb.OpenSession(model="gru", resume=True)))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "resume needs the session_id" in error.message
        assert running.run(lambda: probe.session_count(running.engine)) == 0
        sid = (await raw.open("gru")).session_id
        await raw.frame(sid, 0, x[:1])
        ahead = pb.ResetSession(session_id=sid, frame_index=2**64 - 1)
        error = await raw.error(pb.StreamRequest(reset=ahead))
        assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
        assert "out of order" in error.message and "expects frame 1" in error.message
        y = [await raw.frame(sid, i, x[i : i + 1]) for i in (1, 2)]  # the state went on
        # A reset at the next index applies; one resent after it (an older index) does not.
        for _ in range(2):
            at = pb.ResetSession(session_id=sid, frame_index=3)
            assert (await raw.request(pb.StreamRequest(reset=at))).WhichOneof("kind") == "reset"
        again = await raw.frame(sid, 3, x[:1])
    np.testing.assert_allclose(np.concatenate(y), ort_full("gru", x)[1:], rtol=0, atol=1e-5)
    np.testing.assert_allclose(again, ort_full("gru", x[:1]), rtol=0, atol=1e-5)
