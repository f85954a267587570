"""What tenants and attackers do from outside: every RPC by raw stubs, OIP sequences by raw
stubs and through tritonclient, each caller with its own credentials."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import REPO
from tests.streaming import RawStream

Metadata = tuple[tuple[str, str], ...]
TRITON_PYTHON = REPO / ".venv-triton" / "bin" / "python"
TRITON_TENANTS = Path(__file__).with_name("oip_triton_tenants.py")

SERVICES: tuple[ServiceDescriptor, ...] = (
    pb.DESCRIPTOR.services_by_name["Rnnstream"],
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"],
)


def every_method() -> list[MethodDescriptor]:
    """Every RPC of both APIs, from the protocol's own descriptors: a new RPC is in by itself."""
    return [method for service in SERVICES for method in service.methods]


def method_path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


async def call_status(
    channel: grpc.aio.Channel, method: MethodDescriptor, metadata: Metadata
) -> tuple[grpc.StatusCode, str]:
    """Call `method` with an empty request (a stream: with none) and return its status."""
    request = message_factory.GetMessageClass(method.input_type)()
    reply = message_factory.GetMessageClass(method.output_type)
    codec: dict[str, Any] = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": reply.FromString,
    }
    path = method_path(method)
    if method.client_streaming and method.server_streaming:
        stream = channel.stream_stream(path, **codec)(metadata=metadata, timeout=5)
        try:
            await stream.done_writing()
            async for _ in stream:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return await stream.code(), await stream.details() or ""
    try:
        await channel.unary_unary(path, **codec)(request, metadata=metadata, timeout=5)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def oip_request(
    model: str, x: npt.NDArray[np.float32], sequence_id: int, *, start: bool = False
) -> oip.ModelInferRequest:
    """A one-frame request of an OIP sequence, as perf_analyzer sends it (batch of one)."""
    request = oip.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[1, *x.shape])
    request.raw_input_contents.append(np.ascontiguousarray(x, np.float32).tobytes())
    request.parameters["sequence_id"].uint64_param = sequence_id
    if start:
        request.parameters["sequence_start"].bool_param = True
    return request


def end_request(model: str, x: npt.NDArray[np.float32], sequence_id: int) -> oip.ModelInferRequest:
    request = oip_request(model, x, sequence_id)
    request.parameters["sequence_end"].bool_param = True
    return request


def oip_output(response: oip.ModelInferResponse) -> npt.NDArray[np.float32]:
    return np.frombuffer(response.raw_output_contents[0], np.float32)


def drive_tritonclient(
    tmp_path: Path, target: str, clients: dict[str, dict[str, Any]], steps: Sequence[Any]
) -> list[dict[str, Any]]:
    """Run the steps through tritonclient in .venv-triton; one result per step."""
    plan = tmp_path / "tenants-plan.json"
    out = tmp_path / "tenants-out.json"
    plan.write_text(json.dumps({"target": target, "clients": clients, "steps": list(steps)}))
    done = subprocess.run(
        [str(TRITON_PYTHON), str(TRITON_TENANTS), str(plan), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results: list[dict[str, Any]] = json.loads(out.read_text())
    return results


class Tenant:
    """One caller with its own credentials (a client certificate, a token, or both), talking to
    the server through raw stubs of both APIs."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.credentials = credentials
        self.metadata: Metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = (
            grpc.aio.insecure_channel(target)
            if credentials is None
            else grpc.aio.secure_channel(target, credentials)
        )
        self.native = pb_grpc.RnnstreamStub(self.channel)
        self.oip = oip_grpc.GRPCInferenceServiceStub(self.channel)

    def stream(self) -> RawStream:
        return RawStream(self.target, self.metadata, self.credentials)

    async def oip_infer(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        response: oip.ModelInferResponse = await self.oip.ModelInfer(
            request, metadata=self.metadata, timeout=10
        )
        return response

    async def oip_refusal(self, request: oip.ModelInferRequest) -> tuple[grpc.StatusCode, str]:
        try:
            await self.oip_infer(request)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        raise AssertionError(f"{request.parameters} was answered")

    async def unary_refusal(self, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
        try:
            await getattr(self.native, rpc)(request, metadata=self.metadata, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        raise AssertionError(f"{rpc}({request}) was answered")

    async def close(self) -> None:
        await self.channel.close()
