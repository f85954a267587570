"""The `rnnstream` command against secured servers: TLS, mutual TLS, bearer tokens, metadata,
and errors that say what is wrong (TLS mismatch, refused connection), as a user runs it."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.certificates import Certificates
from tests.conftest import REPO, RunningServer, test_settings
from tests.ports import reserved_port
from tests.streaming import assert_matches_references, sequence

CLI = Path(sys.executable).with_name("rnnstream")
TOKEN = "s3cret-token"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    return {**env, **extra}


def _run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLI), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env if env is not None else _env(),
        check=False,
    )


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(certs: Certificates) -> Iterator[RunningServer]:
    """TLS with bearer tokens."""
    running = RunningServer(
        test_settings(
            models=("gru",),
            tls_cert=str(certs.server_cert),
            tls_key=str(certs.server_key),
            auth_tokens=(f"alice={TOKEN}",),
        )
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def mtls_server(certs: Certificates) -> Iterator[RunningServer]:
    running = RunningServer(
        test_settings(
            models=("gru",),
            tls_cert=str(certs.server_cert),
            tls_key=str(certs.server_key),
            tls_client_ca=str(certs.ca),
        )
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def plain_server() -> Iterator[RunningServer]:
    running = RunningServer(test_settings(models=("gru",)))
    yield running
    running.stop()


def test_models_stream_and_health_over_tls_with_a_token(
    tls_server: RunningServer, certs: Certificates, tmp_path: Path
) -> None:
    tls = ("--target", tls_server.target, "--tls-ca", certs.ca)
    models = _run("models", *tls, "--token", TOKEN, "--json")
    assert models.returncode == 0, models.stderr
    assert [m["name"] for m in json.loads(models.stdout)] == ["gru"]
    # The token from the environment, as a script would pass it.
    x = sequence("gru", 6, seed=90)
    np.save(tmp_path / "x.npy", x)
    streamed = _run(
        "stream", *tls, "--model", "gru", "--input", tmp_path / "x.npy",
        "--output", tmp_path / "y.npy", env=_env(RNNSTREAM_TOKEN=TOKEN),
    )  # fmt: skip
    assert streamed.returncode == 0, streamed.stderr
    assert_matches_references("gru", x, np.load(tmp_path / "y.npy"))
    health = _run("health", *tls)
    assert health.returncode == 0 and "SERVING" in health.stdout, health.stderr


def test_metadata_is_sent_with_every_call(tls_server: RunningServer, certs: Certificates) -> None:
    tls = ("--target", tls_server.target, "--tls-ca", certs.ca)
    # The bearer token given as raw metadata reaches the server's authentication.
    ok = _run("models", *tls, "-H", f"authorization: Bearer {TOKEN}")
    assert ok.returncode == 0, ok.stderr
    wrong = _run("models", *tls, "-H", "authorization=Bearer nope")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr
    bad = _run("models", *tls, "-H", "no-separator")
    assert bad.returncode == 2
    assert bad.stderr.strip() == "rnnstream: -H 'no-separator': expected KEY=VALUE or 'KEY: VALUE'"


def test_a_missing_token_is_unauthenticated(tls_server: RunningServer, certs: Certificates) -> None:
    result = _run("models", "--target", tls_server.target, "--tls-ca", certs.ca)
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr and "Traceback" not in result.stderr


def test_loadtest_over_tls_with_a_token(tls_server: RunningServer, certs: Certificates) -> None:
    result = _run(
        "loadtest", "--target", tls_server.target, "--tls-ca", certs.ca, "--token", TOKEN,
        "--model", "gru", "--sessions", "2", "--frames-per-session", "3", "--no-progress",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"frames answered\s*│\s*6\b", result.stdout), result.stdout


def test_plaintext_client_against_tls_says_tls(tls_server: RunningServer) -> None:
    hint = "speaks TLS and this client does not: pass --tls-ca"
    models = _run("models", "--target", tls_server.target)
    assert models.returncode == 1
    assert models.stderr.strip() == (
        f"rnnstream: {tls_server.target} {hint} CA.pem (or --tls for a publicly trusted "
        "certificate)"
    )
    health = _run("health", "--target", tls_server.target, "--timeout", "1")
    assert health.returncode == 1 and hint in health.stderr
    loadtest = _run(
        "loadtest", "--target", tls_server.target, "--model", "gru", "--frames-per-session", "1"
    )
    assert loadtest.returncode == 2 and hint in loadtest.stderr, loadtest.stderr


def test_tls_client_against_plaintext_says_so(
    plain_server: RunningServer, certs: Certificates
) -> None:
    result = _run("models", "--target", plain_server.target, "--tls-ca", certs.ca)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"rnnstream: TLS handshake with {plain_server.target} failed: the server does not speak TLS"
    )


def test_mutual_tls(mtls_server: RunningServer, certs: Certificates) -> None:
    tls = ("--target", mtls_server.target, "--tls-ca", certs.ca)
    without = _run("models", *tls)
    assert without.returncode == 1
    assert "asks for a client certificate (mutual TLS): pass --tls-cert" in without.stderr
    with_cert = _run("models", *tls, "--tls-cert", certs.client_cert, "--tls-key", certs.client_key)
    assert with_cert.returncode == 0, with_cert.stderr
    half = _run("models", *tls, "--tls-cert", certs.client_cert)
    assert half.returncode == 2 and "--tls-cert and --tls-key go together" in half.stderr


def test_a_certificate_for_another_name(tmp_path: Path) -> None:
    named = Certificates(tmp_path, server_names=("rnnstream.example",))
    running = RunningServer(
        test_settings(
            models=("gru",), tls_cert=str(named.server_cert), tls_key=str(named.server_key)
        )
    )
    try:
        tls = ("--target", running.target, "--tls-ca", named.ca)
        wrong = _run("models", *tls)
        assert wrong.returncode == 1
        assert "certificate does not name 127.0.0.1: pass --tls-server-name" in wrong.stderr
        right = _run("models", *tls, "--tls-server-name", "rnnstream.example")
        assert right.returncode == 0, right.stderr
        # The container's health check finds that name in the server's own certificate.
        server_env = _env(
            RNNSTREAM_TLS_CERT=str(named.server_cert), RNNSTREAM_TLS_KEY=str(named.server_key)
        )
        health = _run("health", "--target", running.target, env=server_env)
        assert health.returncode == 0, health.stderr
    finally:
        running.stop()


def test_refused_connection_says_refused() -> None:
    target = f"127.0.0.1:{reserved_port()}"  # bound, never listening: a connect is refused
    result = _run("models", "--target", target)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"rnnstream: connection refused by {target}: is the server running on that port?"
    )


def _docker_healthcheck() -> list[str]:
    dockerfile = (REPO / "Dockerfile").read_text()
    match = re.search(r"^HEALTHCHECK .*?\bCMD (.+?)(?: \|\| exit 1)?$", dockerfile, re.M | re.S)
    assert match
    return shlex.split(match[1])


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
def test_the_docker_healthcheck_speaks_the_servers_tls(
    tls_server: RunningServer, mtls_server: RunningServer, certs: Certificates, mutual: bool
) -> None:
    """The image's HEALTHCHECK command, with the environment the server itself runs with."""
    running = mtls_server if mutual else tls_server
    env = _env(
        RNNSTREAM_PORT=str(running.port),
        RNNSTREAM_TLS_CERT=str(certs.server_cert),
        RNNSTREAM_TLS_KEY=str(certs.server_key),
        **({"RNNSTREAM_TLS_CLIENT_CA": str(certs.ca)} if mutual else {}),
    )
    argv = [
        arg.replace("${RNNSTREAM_PORT}", env["RNNSTREAM_PORT"]) for arg in _docker_healthcheck()
    ]
    assert argv[0] == "rnnstream"
    result = _run(*argv[1:], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"127.0.0.1:{running.port}: SERVING"
