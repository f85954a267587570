"""A client that cancels its calls while the server is still writing to it is an ordinary event:
a real server process logs no error and no traceback for it, and serves on. Raw stubs."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.server_process import ServerProcess
from tests.streaming import ort_full, x_tensor

MODEL = "gru"
X = np.zeros((4096, 16), np.float32)  # 2 MB of output per frame: writes wait for the client


async def _cancel_mid_response(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        call = stub.Stream()
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=MODEL)))
        sid = (await call.read()).opened.session_id
        for i in range(6):  # never read: the server's writes wait on flow control
            frame = pb.Frame(session_id=sid, frame_index=i, inputs=[x_tensor(X)])
            await call.write(pb.StreamRequest(frame=frame))
        await asyncio.sleep(0.3)
        call.cancel()
        infer = asyncio.ensure_future(
            stub.Infer(pb.InferRequest(model=MODEL, inputs=[x_tensor(X)]))
        )
        await asyncio.sleep(0.05)
        infer.cancel()
        stream = oip_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer()
        for _ in range(6):
            request = oip.ModelInferRequest(model_name=MODEL)
            request.inputs.add(name="x", datatype="FP32", shape=[1, *X.shape])
            request.raw_input_contents.append(X.tobytes())
            await stream.write(request)
        await asyncio.sleep(0.3)
        stream.cancel()


async def test_cancels_mid_response_log_no_error() -> None:
    server = ServerProcess("--models", MODEL)
    try:
        for _ in range(2):
            await asyncio.gather(*(_cancel_mid_response(server.target) for _ in range(4)))
        x = np.ones((3, 16), np.float32)
        async with grpc.aio.insecure_channel(server.target) as channel:
            reply = await pb_grpc.RnnstreamStub(channel).Infer(
                pb.InferRequest(model=MODEL, inputs=[x_tensor(x)]), timeout=30
            )
        assert reply.outputs[0].name == "y"
        y = np.frombuffer(reply.outputs[0].data, "<f4").reshape(3, 128)
        np.testing.assert_allclose(y, ort_full(MODEL, x), rtol=0, atol=1e-5)
    finally:
        server.close()
    noisy = [line for line in server.lines if " ERROR " in line or "Traceback" in line]
    assert noisy == [], "\n".join(server.lines)
