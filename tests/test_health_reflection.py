"""gRPC health per service (Kubernetes probes) and server reflection (what grpcurl relies on)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from rnnstream.proto.tensor_codec import decode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from tests.conftest import RunningServer
from tests.streaming import ort_full, sequence

SERVICES = ("", "rnnstream.v1.Rnnstream", "inference.GRPCInferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_reports_serving(server: RunningServer, service: str) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == SERVING
        # Watch (what some probes use) starts with the current status.
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert next(watch).status == SERVING
        watch.cancel()


def test_unknown_service_is_not_found(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def _reflect(
    channel: grpc.Channel, requests: list[reflection_pb2.ServerReflectionRequest]
) -> list[reflection_pb2.ServerReflectionResponse]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    return list(stub.ServerReflectionInfo(iter(requests), timeout=10))


def _pool_for(channel: grpc.Channel, symbol: str) -> descriptor_pool.DescriptorPool:
    """A descriptor pool built only from what reflection sends, dependencies first."""
    (reply,) = _reflect(
        channel, [reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)]
    )
    assert reply.WhichOneof("message_response") == "file_descriptor_response", reply
    files = {}
    for raw in reply.file_descriptor_response.file_descriptor_proto:
        proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[proto.name] = proto
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        if name not in files:  # fetch a dependency the server did not send with the file
            (dep,) = _reflect(
                channel, [reflection_pb2.ServerReflectionRequest(file_by_filename=name)]
            )
            for raw in dep.file_descriptor_response.file_descriptor_proto:
                proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
                files[proto.name] = proto
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in list(files):
        add(name)
    return pool


def test_reflection_lists_every_service(server: RunningServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        (reply,) = _reflect(channel, [reflection_pb2.ServerReflectionRequest(list_services="")])
    names = {s.name for s in reply.list_services_response.service}
    assert {
        "rnnstream.v1.Rnnstream",
        "inference.GRPCInferenceService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


@pytest.mark.parametrize(
    ("service", "methods"),
    [
        (
            "rnnstream.v1.Rnnstream",
            {"Stream", "Infer", "ListModels", "GetModel", "GetSession", "EndSession", "Forecast"},
        ),
        ("inference.GRPCInferenceService", {"ModelInfer", "ModelStreamInfer", "ServerLive"}),
    ],
)
def test_reflection_describes_every_rpc(
    server: RunningServer, service: str, methods: set[str]
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        pool = _pool_for(channel, service)
    described = pool.FindServiceByName(service)
    assert methods <= {m.name for m in described.methods}


def test_reflection_alone_is_enough_to_call_infer(server: RunningServer) -> None:
    """Like grpcurl: no generated code, only descriptors fetched from the server."""
    with grpc.insecure_channel(server.target) as channel:
        pool = _pool_for(channel, "rnnstream.v1.Rnnstream")
        method = pool.FindServiceByName("rnnstream.v1.Rnnstream").FindMethodByName("Infer")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        x = sequence("gru", 5, seed=41)
        request = request_class(model="gru")
        tensor = request.inputs.add()
        tensor.name = "x"
        tensor.dtype = (
            pool.FindEnumTypeByName("rnnstream.v1.DataType").values_by_name["FLOAT32"].number
        )
        tensor.shape.extend(x.shape)
        tensor.data = x.tobytes()
        infer = channel.unary_unary(
            f"/rnnstream.v1.Rnnstream/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        reply = infer(request, timeout=10)
    # The dynamic message's bytes are the generated message's bytes: decode with our codec.
    (y,) = pb.InferResponse.FromString(reply.SerializeToString()).outputs
    np.testing.assert_allclose(decode(y), ort_full("gru", x), rtol=0, atol=1e-5)
