"""Server settings from flags and RNNSTREAM_* variables, and the device choice at start-up."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from rnnstream import AsyncClient
from rnnstream.server import Settings
from tests.conftest import MODELS, RunningServer
from tests.streaming import ort_full, sequence

BIN = Path(sys.executable).parent
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_defaults() -> None:
    settings = Settings.from_args([], env={})
    assert settings == Settings()
    assert (settings.host, settings.port, settings.device) == ("127.0.0.1", 50051, "auto")
    assert settings.models == () and settings.model_repository == Path("models")


def test_flags() -> None:
    settings = Settings.from_args(
        [
            "--host=0.0.0.0",
            "--port=0",
            "--model-repository=/srv/models",
            "--models=gru, lstm,,",
            "--device=cpu",
            "--max-batch-size=8",
            "--session-ttl=2.5",
            "--max-message-bytes=1024",
        ],
        env={},
    )
    assert settings.host == "0.0.0.0" and settings.port == 0
    assert settings.model_repository == Path("/srv/models")
    assert settings.models == ("gru", "lstm")
    assert settings.device == "cpu"
    assert settings.max_batch_size == 8 and isinstance(settings.max_batch_size, int)
    assert settings.session_ttl == 2.5 and settings.max_message_bytes == 1024


def _sample(field: dataclasses.Field[object]) -> tuple[str, object]:
    """A non-default value for the field, as env text and as the parsed value."""
    kind = str(field.type)
    if "choices" in field.metadata:
        choice = next(c for c in field.metadata["choices"] if c != field.default)
        return choice, choice
    samples: dict[str, tuple[str, object]] = {
        "int": ("7", 7),
        "float": ("0.5", 0.5),
        "bool": ("true", True),
        "Path": ("/m", Path("/m")),
        "str": (
            "DEBUG" if field.name == "log_level" else "/x",
            "DEBUG" if field.name == "log_level" else "/x",
        ),
    }
    if kind.startswith("tuple"):
        return "a,b", ("a", "b")
    if kind == "bool" and field.default is True:
        return "false", False
    return samples[kind]


def test_every_flag_has_a_variable() -> None:
    values = {f.name: _sample(f) for f in dataclasses.fields(Settings)}
    assert {"host", "port", "model_repository", "device", "max_batch_size"} <= set(values)
    env = {f"RNNSTREAM_{name.upper()}": text for name, (text, _) in values.items()}
    settings = Settings.from_args([], env=env)
    for name, (_, expected) in values.items():
        assert getattr(settings, name) == expected, name
        assert getattr(settings, name) != getattr(Settings(), name), name


def test_flag_beats_variable_and_environ_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSTREAM_PORT", "1234")
    monkeypatch.setenv("RNNSTREAM_SESSION_TTL", "7")
    settings = Settings.from_args(["--port", "4321"])
    assert settings.port == 4321 and settings.session_ttl == 7.0


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--port", "abc"], {}, ("--port", "invalid int value: 'abc'")),
        (["--device", "gpu"], {}, ("--device", "invalid choice: 'gpu'")),
        ([], {"RNNSTREAM_PORT": "abc"}, ("RNNSTREAM_PORT='abc' is not a valid int",)),
        ([], {"RNNSTREAM_SESSION_TTL": "soon"}, ("RNNSTREAM_SESSION_TTL='soon'", "float")),
        ([], {"RNNSTREAM_DEVICE": "gpu"}, ("RNNSTREAM_DEVICE='gpu'", "auto, cpu, cuda")),
    ],
)
def test_bad_values_are_refused(
    argv: list[str], env: dict[str, str], words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        Settings.from_args(argv, env=env)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, (word, err)


def _server_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime offers CUDA, so --device cuda may start")
def test_device_cuda_without_cuda_fails_at_start_up() -> None:
    result = subprocess.run(
        [str(BIN / "rnnstream-server"), "--device", "cuda", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_server_env(),
        cwd=MODELS.parent,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "rnnstream-server: --device cuda" in result.stderr
    assert "pip install 'rnnstream[cuda]'" in result.stderr
    assert "onnxruntime-gpu" in result.stderr and "--device cpu" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_model_fails_at_start_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "rnnstream-server"), "--port", "0", "--models", "gru,nope"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_server_env(), "RNNSTREAM_MODEL_REPOSITORY": str(MODELS)},
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "models ['nope'] not found" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime's CUDAExecutionProvider")
async def test_session_on_cuda_matches_cpu(make_server: Callable[..., RunningServer]) -> None:
    running = make_server(device="cuda", models=("gru",))
    x = sequence("gru", 20, seed=70)
    async with AsyncClient(running.target) as client:
        info = await client.get_model("gru")
        assert info.execution_provider == "CUDAExecutionProvider"
        session = await client.open("gru")
        ys = [(await session.step(row))["y"] for row in x]
    # GPU kernels round differently from the CPU's; 1e-4 still catches any state mix-up.
    np.testing.assert_allclose(np.stack(ys), ort_full("gru", x), rtol=0, atol=1e-4)
