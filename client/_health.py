"""gRPC health checking of a server (grpc.health.v1), the work of `rnnstream health`."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnstream._connection import Connection

__all__ = ["HealthResult", "check_health"]

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class HealthResult:
    """What one health check found: `ok` only when the service answered SERVING;
    `unreachable` when no answer came at all (refused, wrong TLS, timed out)."""

    ok: bool
    message: str
    unreachable: bool = False


def _channel(connection: Connection) -> grpc.Channel:
    credentials = connection.credentials()
    if credentials is None:
        return grpc.insecure_channel(connection.target)
    return grpc.secure_channel(connection.target, credentials, connection.channel_options())


def check_health(
    connection: Connection | str, service: str = "", timeout: float = 5.0
) -> HealthResult:
    """Ask the server for the status of `service` ("" is the whole server) within `timeout` s;
    `connection` is a plaintext HOST:PORT or a Connection."""
    if isinstance(connection, str):
        connection = Connection(connection)
    target = connection.target
    label = f"{target} service {service!r}" if service else f"{target}"
    metadata = list(connection.metadata)
    if connection.token:
        metadata.append(("authorization", f"Bearer {connection.token}"))
    with _channel(connection) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # wait_for_ready: a server still starting gets the whole timeout to come up.
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,
                metadata=metadata or None,
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return HealthResult(False, f"{label}: unknown service")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return HealthResult(False, f"{label}: no answer within {timeout:g} s", True)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return HealthResult(False, f"{label}: server has no gRPC health service")
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "error"
            unreachable = code == grpc.StatusCode.UNAVAILABLE
            return HealthResult(False, f"{label}: {name}: {detail}", unreachable)
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthResult(reply.status == SERVING, f"{label}: {status}")
