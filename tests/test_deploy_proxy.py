"""The compose nginx config, run for real in front of three live servers, routes by session id."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client._routing import SESSION_ID_METADATA_KEY
from tests.conftest import REPO, RunningServer, test_settings

pytestmark = pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")

SESSIONS = [f"session-{i}" for i in range(24)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"nginx.conf no longer has {old!r}"
    return text.replace(old, new)


class Proxy:
    """nginx with deploy/compose/nginx.conf, its upstreams and listener moved onto 127.0.0.1."""

    def __init__(self, tmp: Path, upstream_ports: list[int]) -> None:
        conf = (REPO / "deploy" / "compose" / "nginx.conf").read_text()
        ports = iter(upstream_ports)
        conf = re.sub(r"rnnstream-\d+:50051", lambda _: f"127.0.0.1:{next(ports)}", conf)
        self.port = _free_port()
        conf = _swap(conf, "listen 8080 http2;", f"listen 127.0.0.1:{self.port} http2;")
        self.log = tmp / "access.log"
        conf = _swap(conf, "access_log /dev/stdout grpc;", f"access_log {self.log} grpc;")
        conf = _swap(conf, "error_log stderr warn;", f"error_log {tmp / 'error.log'} warn;")
        conf = _swap(conf, "worker_processes auto;", "worker_processes 1;")
        (tmp / "nginx.conf").write_text(conf)
        self.process = subprocess.Popen(
            ["nginx", "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log"),
             "-g", f"daemon off; pid {tmp / 'nginx.pid'};"],
        )  # fmt: skip
        self.target = f"127.0.0.1:{self.port}"
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
        self.process.terminate()
        self.process.wait(10)


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
    ups = {up for s, up in proxy.routes()[start:] if s == session}
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
