"""Every RPC of both APIs needs credentials; only health, reflection and (by a flag) readiness
answer without, as an outside caller finds with raw stubs and with tritonclient."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests import probe
from tests.conftest import RunningServer, missing_dependency
from tests.tenants import TRITON_PYTHON, call_status, drive_tritonclient, every_method, method_path

TOKENS = ("alice=alice-secret-token", "bob=bob-secret-token")
ALICE = (("authorization", "Bearer alice-secret-token"),)
NO_CREDENTIALS: tuple[tuple[str, str], ...] = ()
WRONG = (("authorization", "Bearer guessed"),)
READINESS = {
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
}


async def _open_services_answer(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest(service="rnnstream.v1.Rnnstream"))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
    await reflect.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = (await reflect.read()).list_services_response.service
    assert "inference.GRPCInferenceService" in {s.name for s in listed}
    await reflect.done_writing()


async def test_every_rpc_needs_credentials(make_server: Callable[..., RunningServer]) -> None:
    # Before the interceptor, ServerLive, ServerReady, ServerMetadata (the version) and
    # ModelReady (whether a model exists) answered without a token.
    running = make_server(auth_tokens=TOKENS)
    async with grpc.aio.insecure_channel(running.target) as channel:
        for method in every_method():
            for label, metadata in (("no token", NO_CREDENTIALS), ("wrong token", WRONG)):
                code, details = await call_status(channel, method, metadata)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (method_path(method), label)
                assert "bearer token" in details
            # With the token the call gets past authentication (to its own answer or error).
            code, _ = await call_status(channel, method, ALICE)
            assert code != grpc.StatusCode.UNAUTHENTICATED, method_path(method)
        await _open_services_answer(channel)
    assert running.run(lambda: probe.session_count(running.engine)) == 0


async def test_readiness_without_auth_opens_only_readiness(
    make_server: Callable[..., RunningServer],
) -> None:
    running = make_server(auth_tokens=TOKENS, readiness_without_auth=True)
    async with grpc.aio.insecure_channel(running.target) as channel:
        for method in every_method():
            code, _ = await call_status(channel, method, NO_CREDENTIALS)
            if method_path(method) in READINESS:
                assert code == grpc.StatusCode.OK, method_path(method)
            else:
                assert code == grpc.StatusCode.UNAUTHENTICATED, method_path(method)
        await _open_services_answer(channel)


async def test_tritonclient_needs_a_token(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    if not TRITON_PYTHON.exists():
        missing_dependency("tritonclient venv missing: run `bash bench/perf_analyzer_setup.sh`")
    running = make_server(auth_tokens=TOKENS)
    calls = [
        {"call": "is_server_live"},
        {"call": "is_server_ready"},
        {"call": "get_server_metadata"},
        {"call": "is_model_ready", "model": "gru"},
        {"call": "is_model_ready", "model": "no-such-model"},
    ]
    clients = {"anonymous": {}, "alice": {"token": "alice-secret-token"}}
    steps = [{**c, "client": who} for who in clients for c in calls]
    results = drive_tritonclient(tmp_path, running.target, clients, steps)
    anonymous, alice = results[: len(calls)], results[len(calls) :]
    for call, result in zip(calls, anonymous, strict=True):
        assert not result["ok"] and result["status"] == "StatusCode.UNAUTHENTICATED", call
    assert [r["ok"] for r in alice] == [True] * len(calls)
    values = [r["value"] for r in alice]
    assert values[:2] == [True, True] and values[3:] == [True, False]
    assert values[2]["name"] == "rnnstream"


@pytest.mark.parametrize("readiness_without_auth", [False, True])
async def test_without_tokens_everything_answers(
    make_server: Callable[..., RunningServer], readiness_without_auth: bool
) -> None:
    # No tokens and no client certificates: one anonymous principal, nothing refused.
    running = make_server(readiness_without_auth=readiness_without_auth)
    async with grpc.aio.insecure_channel(running.target) as channel:
        for method in every_method():
            code, _ = await call_status(channel, method, NO_CREDENTIALS)
            assert code != grpc.StatusCode.UNAUTHENTICATED, method_path(method)
