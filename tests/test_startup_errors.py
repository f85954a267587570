"""What a user meets when rnnstream-server cannot start: one line naming the thing, exit status 2,
no traceback and no teardown noise. Each test runs the real command and reads its stderr."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests.conftest import MODELS
from tests.startup import NOISE, SERVER, assert_refused, run_server, server_env


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_grpc_port_in_use(taken_port: int, tmp_path: Path) -> None:
    flags = ["--model-repository", str(MODELS), "--models", "gru", "--port", str(taken_port)]
    result = run_server(*flags, "--metrics-port", "0", cwd=tmp_path)
    assert_refused(result, f"cannot listen for gRPC on 127.0.0.1:{taken_port}: the port is in use")
    assert "--port (RNNSTREAM_PORT)" in result.stderr


def test_metrics_port_in_use(taken_port: int, tmp_path: Path) -> None:
    """A second server on a host with the default metrics port meets this."""
    flags = ["--model-repository", str(MODELS), "--models", "gru", "--port", "0"]
    result = run_server(*flags, "--metrics-port", str(taken_port), cwd=tmp_path)
    assert_refused(result, f"cannot serve metrics on 127.0.0.1:{taken_port}: the port is in use")
    assert "--metrics-port (RNNSTREAM_METRICS_PORT), or 0" in result.stderr


def _repository(tmp_path: Path, bad: bytes | None) -> Path:
    """gru from the shipped models, and `bad` as models/bad/model.onnx."""
    repository = tmp_path / "models"
    shutil.copytree(MODELS / "gru", repository / "gru")
    if bad is not None:
        (repository / "bad").mkdir()
        (repository / "bad" / "model.onnx").write_bytes(bad)
    return repository


TRUNCATED = (MODELS / "gru" / "model.onnx").read_bytes()[:300]


def test_a_corrupt_model_refuses_the_start_by_default(tmp_path: Path) -> None:
    repository = _repository(tmp_path, TRUNCATED)
    result = run_server(
        "--model-repository", str(repository), "--port", "0", "--metrics-port", "0", cwd=tmp_path
    )
    assert_refused(result, f"ONNX Runtime cannot load {repository / 'bad' / 'model.onnx'}")
    assert "--bad-models skip" in result.stderr


def test_every_model_bad_refuses_even_when_skipping(tmp_path: Path) -> None:
    repository = tmp_path / "models"
    (repository / "bad").mkdir(parents=True)
    (repository / "bad" / "model.onnx").write_bytes(b"not a model")
    flags = ["--model-repository", str(repository), "--port", "0", "--metrics-port", "0"]
    result = run_server(*flags, "--bad-models", "skip", cwd=tmp_path)
    assert_refused(result, f"no model under {repository} could be loaded")
    assert "skipping model bad: model 'bad': ONNX Runtime cannot load" in result.stderr


def test_a_corrupt_model_is_skipped_on_request(tmp_path: Path) -> None:
    repository = _repository(tmp_path, TRUNCATED)
    port_file = tmp_path / "port"
    flags = ["--host", "127.0.0.1", "--port", "0", "--port-file", str(port_file)]
    flags += ["--metrics-port", "0", "--model-repository", str(repository), "--bad-models", "skip"]
    process = subprocess.Popen(
        [SERVER, *flags], stderr=subprocess.PIPE, text=True, env=server_env(), cwd=tmp_path
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert process.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        with grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}") as channel:
            listed = pb_grpc.RnnstreamStub(channel).ListModels(pb.ListModelsRequest(), timeout=10)
        assert [m.name for m in listed.models] == ["gru"]
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    bad = repository / "bad" / "model.onnx"
    assert f"skipping model bad: model 'bad': ONNX Runtime cannot load {bad}" in stderr
    assert not [n for n in NOISE if n in stderr], stderr
