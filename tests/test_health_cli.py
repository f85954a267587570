"""`rnnstream health` against live servers: exit codes and messages for each health state."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
from grpc_health.v1 import health_pb2

from rnnstream._cli import main
from tests.conftest import REPO, RunningServer
from tests.ports import reserved_port

NATIVE = "rnnstream.v1.Rnnstream"


@pytest.mark.parametrize("service", ["", NATIVE])
def test_serving_exits_zero(
    server: RunningServer, service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--target", server.target, "--service", service]) == 0
    out = capsys.readouterr().out
    assert "SERVING" in out and server.target in out


def test_not_serving_exits_one(
    make_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    running = make_server(models=("rnn_tanh",))
    running.call(running.server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
    assert main(["health", "--target", running.target]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    # The native service's own entry is untouched, so checking it by name still passes.
    assert main(["health", "--target", running.target, "--service", NATIVE]) == 0


def test_graceful_shutdown_reports_not_serving(
    make_server: Callable[..., RunningServer], capsys: pytest.CaptureFixture[str]
) -> None:
    running = make_server(models=("rnn_tanh",))
    # What a server does first on SIGTERM: every service turns NOT_SERVING.
    running.call(running.server.health.enter_graceful_shutdown())
    assert main(["health", "--target", running.target, "--service", NATIVE]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_unknown_service_exits_one(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["health", "--target", server.target, "--service", "no.such.Service"]) == 1
    err = capsys.readouterr().err
    assert "unknown service" in err and "no.such.Service" in err


def test_nothing_listening_exits_one(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{reserved_port()}"
    assert main(["health", "--target", target, "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"connection refused by {target}: is the server running on that port?"


def test_bad_timeout_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["health", "--timeout", "0"]) == 2
    assert capsys.readouterr().err.strip() == "rnnstream: --timeout must be positive"


def test_console_command_exit_codes(server: RunningServer) -> None:
    # The container HEALTHCHECK runs the installed command; check its process exit status.
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "rnnstream", "health", "--target", server.target, *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    ok = run()
    assert ok.returncode == 0, ok.stderr
    bad = run("--service", "no.such.Service")
    assert bad.returncode == 1 and "unknown service" in bad.stderr
