"""The compose nginx config, run for real in front of three live servers, routes by session id."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rnnstream._routing import SESSION_ID_METADATA_KEY
from tests.conftest import RunningServer, test_settings
from tests.services import NginxProxy

SESSIONS = [f"session-{i}" for i in range(24)]


class Proxy(NginxProxy):
    """nginx with deploy/compose/nginx.conf, plus a health stub and its routing log."""

    def __init__(self, tmp: Path, upstream_ports: list[int]) -> None:
        super().__init__(tmp, upstream_ports)
        self.channel = grpc.insecure_channel(self.target)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def check(self, session: str | None) -> int:
        metadata = [] if session is None else [(SESSION_ID_METADATA_KEY, session)]
        reply = self.health.Check(
            health_pb2.HealthCheckRequest(), metadata=metadata, timeout=10, wait_for_ready=True
        )
        status: int = reply.status
        return status

    def routes(self) -> list[tuple[str, str]]:
        """(session, upstream that answered) per logged call, in order."""
        found = re.findall(r"session=(\S+) upstream=(.+?) time=", self.log.read_text())
        # After a retry nginx lists every upstream tried; the last one answered.
        return [(session, upstream.split(",")[-1].strip()) for session, upstream in found]

    def close(self) -> None:
        self.channel.close()
        super().close()


@pytest.fixture
def replicas(make_server: Callable[..., RunningServer]) -> Iterator[list[RunningServer]]:
    # The third one is stopped by a test, so it is not left to make_server's teardown.
    first = [make_server(models=("rnn_tanh",)) for _ in range(2)]
    last = RunningServer(test_settings(models=("rnn_tanh",)))
    yield [*first, last]
    if last.loop.is_running():
        last.stop()


@pytest.fixture
def proxy(tmp_path: Path, replicas: list[RunningServer]) -> Iterator[Proxy]:
    running = Proxy(tmp_path, [r.port for r in replicas])
    yield running
    running.close()


def _upstream_of(proxy: Proxy, session: str, start: int) -> str:
    # nginx writes a call's log line after the response has left: the client can read its
    # answer before the line is there.
    deadline = time.monotonic() + 10
    while not (ups := {up for s, up in proxy.routes()[start:] if s == session}):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert len(ups) == 1, f"{session} went to {ups}"
    return ups.pop()


def test_same_session_id_always_reaches_the_same_replica(
    proxy: Proxy, replicas: list[RunningServer]
) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    for _ in range(3):
        for session in SESSIONS:
            assert proxy.check(session) == serving
    placement = {session: _upstream_of(proxy, session, 0) for session in SESSIONS}
    # Different ids spread over the replicas.
    assert set(placement.values()) == {f"127.0.0.1:{r.port}" for r in replicas}
    # Calls without the header are spread round-robin instead of piling onto one replica.
    start = len(proxy.routes())
    for _ in range(6):
        assert proxy.check(None) == serving
    assert len({up for _, up in proxy.routes()[start:]}) > 1


def test_losing_a_replica_moves_only_its_sessions(
    proxy: Proxy, replicas: list[RunningServer]
) -> None:
    for session in SESSIONS:
        proxy.check(session)
    before = {session: _upstream_of(proxy, session, 0) for session in SESSIONS}
    lost = f"127.0.0.1:{replicas[2].port}"
    assert lost in before.values()
    replicas[2].stop()
    start = len(proxy.routes())
    for session in SESSIONS:
        assert proxy.check(session) == health_pb2.HealthCheckResponse.SERVING
    after = {session: _upstream_of(proxy, session, start) for session in SESSIONS}
    for session in SESSIONS:
        if before[session] == lost:
            assert after[session] != lost
        else:
            assert after[session] == before[session], session
    # Still sticky on the new replica.
    start = len(proxy.routes())
    moved = [s for s in SESSIONS if before[s] == lost]
    for session in moved:
        proxy.check(session)
    assert {s: _upstream_of(proxy, s, start) for s in moved} == {s: after[s] for s in moved}
