"""gRPC health checking of a server (grpc.health.v1), the work of `rnnstream health`."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["HealthResult", "check_health"]

SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class HealthResult:
    """What one health check found: `ok` only when the service answered SERVING."""

    ok: bool
    message: str


def check_health(target: str, service: str = "", timeout: float = 5.0) -> HealthResult:
    """Ask `target` for the status of `service` ("" is the whole server) within `timeout` s."""
    label = f"{target} service {service!r}" if service else f"{target}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            # wait_for_ready: a server still starting gets the whole timeout to come up.
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout,
                wait_for_ready=True,
            )
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code == grpc.StatusCode.NOT_FOUND:
                return HealthResult(False, f"{label}: unknown service")
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return HealthResult(False, f"{label}: no answer within {timeout:g} s")
            if code == grpc.StatusCode.UNIMPLEMENTED:
                return HealthResult(False, f"{label}: server has no gRPC health service")
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            name = code.name if code is not None else "error"
            return HealthResult(False, f"{label}: {name}: {detail}")
    status: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return HealthResult(reply.status == SERVING, f"{label}: {status}")
