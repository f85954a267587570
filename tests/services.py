"""Real redis-server, nginx and rnnstream-server processes on 127.0.0.1, stopped by their PID."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import MODELS, REPO, missing_dependency
from tests.ports import reserved_port

free_port = reserved_port  # held for the whole run: a restarted server finds its port free


def _need(binary: str) -> str:
    path = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None
    )
    if path is None:
        missing_dependency(f"{binary} is not installed (apt-get install; .ci/run does)")
    assert path is not None
    return path


def _wait_for_port(
    port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port}")


class RedisServer:
    """redis-server without persistence; stop() and start() again keep the same port."""

    def __init__(self, tmp: Path) -> None:
        self.binary = _need("redis-server")
        self.dir = tmp
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_port(self.port, self.process, "redis-server")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


class NginxProxy:
    """nginx running deploy/compose/nginx.conf, with its upstreams and listener on 127.0.0.1."""

    def __init__(self, tmp: Path, upstream_ports: list[int]) -> None:
        binary = _need("nginx")
        conf = (REPO / "deploy" / "compose" / "nginx.conf").read_text()
        ports = iter(upstream_ports)
        conf = re.sub(r"rnnstream-\d+:50051", lambda _: f"127.0.0.1:{next(ports)}", conf)
        self.port = free_port()
        conf = _swap(conf, "listen 8080 http2;", f"listen 127.0.0.1:{self.port} http2;")
        self.log = tmp / "access.log"
        conf = _swap(conf, "access_log /dev/stdout grpc;", f"access_log {self.log} grpc;")
        conf = _swap(conf, "error_log stderr warn;", f"error_log {tmp / 'error.log'} warn;")
        conf = _swap(conf, "worker_processes auto;", "worker_processes 1;")
        (tmp / "nginx.conf").write_text(conf)
        self.process = subprocess.Popen(
            [binary, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-e", str(tmp / "error.log"),
             "-g", f"daemon off; pid {tmp / 'nginx.pid'};"],
        )  # fmt: skip
        _wait_for_port(self.port, self.process, "nginx")
        self.target = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        os.kill(self.process.pid, signal.SIGTERM)
        self.process.wait(10)


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"nginx.conf no longer has {old!r}"
    return text.replace(old, new)


class ServerProcess:
    """rnnstream-server as its own process (so it can be killed with SIGKILL)."""

    def __init__(self, *flags: str, port: int | None = None, log: Path | None = None) -> None:
        self.port = port or free_port()
        self.target = f"127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "rnnstream.server",
            "--port",
            str(self.port),
            "--host",
            "127.0.0.1",
        ]
        args += ["--model-repository", str(MODELS), "--metrics-port", "0", *flags]
        self._log: Any = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(args, stdout=self._log, stderr=self._log, cwd=REPO)
        self.wait_serving()

    def wait_serving(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"rnnstream-server exited with {self.process.returncode}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"rnnstream-server on {self.target} did not become SERVING")

    def kill(self) -> None:
        self._stop(signal.SIGKILL)

    def terminate(self) -> None:
        self._stop(signal.SIGTERM)

    def _stop(self, sig: signal.Signals) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            self.process.wait(30)
        if self._log is not subprocess.DEVNULL:
            self._log.close()
