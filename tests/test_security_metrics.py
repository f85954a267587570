"""/metrics behind --metrics-token, 404 for every other path, and no metrics open to the network
while the API needs credentials."""

from __future__ import annotations

import http.client
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from rnnstream import AsyncClient
from rnnstream.server import Settings
from rnnstream.server._metrics_http import check_metrics_exposure, metrics_token
from tests.conftest import MODELS, RunningServer, test_settings
from tests.server_process import free_port
from tests.startup import assert_refused, run_server

METRICS_TOKEN = "scrape-secret"


def _get(
    port: int, path: str, token: str | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        connection.request(method, path, headers=headers)
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        connection.close()


async def test_metrics_token(make_server: Callable[..., RunningServer]) -> None:
    # Before: /metrics (per-model session counts) answered anyone, on any path.
    running = make_server(
        metrics_port=free_port(), metrics_token=METRICS_TOKEN, auth_tokens=("alice=a-token",)
    )
    async with AsyncClient(running.target, token="a-token") as client:
        session = await client.open("gru")
        port = running.server.metrics_port
        for token in (None, "wrong", "", METRICS_TOKEN[:-1], "a-token"):
            status, headers, body = _get(port, "/metrics", token)
            assert status == 401, token
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert b"rnnstream_" not in body
        status, headers, body = _get(port, "/metrics", METRICS_TOKEN)
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert b'rnnstream_active_sessions{model="gru"} 1.0' in body
        status, _, body = _get(port, "/metrics", METRICS_TOKEN, method="HEAD")
        assert status == 200 and body == b""
        await session.end()


async def test_other_paths_are_not_found(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(metrics_port=free_port())
    port = running.server.metrics_port
    for path in ("/", "/favicon.ico", "/metrics/", "/metricsx", "/x/metrics", "/../metrics"):
        status, headers, body = _get(port, path)
        assert status == 404, path
        assert b"rnnstream_" not in body
    status, headers, body = _get(port, "/metrics?name[]=rnnstream_active_sessions")
    assert status == 200 and b"rnnstream_active_sessions" in body
    # No banner naming the Python version.
    assert headers["Server"] == "rnnstream"
    status, _, _ = _get(port, "/metrics", method="POST")
    assert status == 501


def test_metrics_beyond_loopback_need_a_token_when_the_api_does(tmp_path: Path) -> None:
    token_file = tmp_path / "metrics-token"
    token_file.write_text(METRICS_TOKEN + "\n")
    assert metrics_token(test_settings(metrics_token_file=str(token_file))) == METRICS_TOKEN
    secured = test_settings(metrics_port=9400, auth_tokens=("alice=a-token",))
    check_metrics_exposure(secured)  # 127.0.0.1: fine
    for host in ("0.0.0.0", "10.1.2.3", "::", "metrics.internal"):
        with pytest.raises(ValueError, match=re.escape(f"open to anyone reaching {host}:9400")):
            check_metrics_exposure(replace(secured, metrics_host=host))
        check_metrics_exposure(replace(secured, metrics_host=host, metrics_token="t"))
        check_metrics_exposure(replace(secured, metrics_host=host, metrics_port=0))
        # An API without credentials has nothing for the metrics to give away.
        check_metrics_exposure(replace(secured, metrics_host=host, auth_tokens=()))
    check_metrics_exposure(replace(secured, metrics_host="::", metrics_token_file=str(token_file)))
    with pytest.raises(ValueError, match="not both"):
        metrics_token(replace(secured, metrics_token="t", metrics_token_file=str(token_file)))
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="the file is empty"):
        check_metrics_exposure(replace(secured, metrics_token_file=str(token_file)))
    with pytest.raises(ValueError, match=re.escape("anyone reaching 0.0.0.0:9400")):
        check_metrics_exposure(
            replace(secured, auth_tokens=(), tls_client_ca="ca.pem", host="0.0.0.0")
        )
    assert Settings.from_args(["--metrics-host", "::1"]).metrics_host == "::1"


def test_server_refuses_open_metrics_with_a_secured_api() -> None:
    flags = ["--model-repository", str(MODELS), "--models", "gru", "--port", "0"]
    flags += ["--metrics-port", str(free_port()), "--metrics-host", "0.0.0.0"]
    result = run_server(*flags, env={"RNNSTREAM_AUTH_TOKENS": "alice=a-token"})
    line = assert_refused(result, "metrics would be open to anyone reaching 0.0.0.0:")
    assert "--metrics-token" in line
