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
    settings = Settings.from_args([], env={}, paths=False)
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
            "--max-message-bytes=8192",
        ],
        env={},
        paths=False,
    )
    assert settings.host == "0.0.0.0" and settings.port == 0
    assert settings.model_repository == Path("/srv/models")
    assert settings.models == ("gru", "lstm")
    assert settings.device == "cpu"
    assert settings.max_batch_size == 8 and isinstance(settings.max_batch_size, int)
    assert settings.session_ttl == 2.5 and settings.max_message_bytes == 8192


def _sample(field: dataclasses.Field[object]) -> tuple[str, object]:
    """A non-default value the field accepts, as env text and as the parsed value."""
    kind = str(field.type)
    rule = field.metadata["rule"]
    if rule.choices:
        choice = next(c for c in rule.choices if c != field.default)
        return choice, choice
    if rule.prefixes:
        return f"{rule.prefixes[0]}x", f"{rule.prefixes[0]}x"
    if kind == "int":
        value = max(7, int(rule.minimum or 0))
        value = value + 1 if value == field.default else value
        return str(value), value
    samples: dict[str, tuple[str, object]] = {
        "float": ("0.5", 0.5),
        "bool": ("true", True),
        "Path": ("/m", Path("/m")),
        "str": ("/x", "/x"),
    }
    if kind.startswith("tuple"):
        return "a,b", ("a", "b")
    if kind == "bool" and field.default is True:
        return "false", False
    return samples[kind]


def test_every_flag_has_a_variable() -> None:
    # --example-models excludes --model-repository: it gets its own check below.
    values = {
        f.name: _sample(f) for f in dataclasses.fields(Settings) if f.name != "example_models"
    }
    assert {"host", "port", "model_repository", "device", "max_batch_size"} <= set(values)
    values["model_control_mode"] = ("explicit", "explicit")  # --load-model needs explicit mode
    examples = Settings.from_args([], env={"RNNSTREAM_EXAMPLE_MODELS": "1"}, paths=False)
    assert examples.example_models and not Settings().example_models
    env = {f"RNNSTREAM_{name.upper()}": text for name, (text, _) in values.items()}
    settings = Settings.from_args([], env=env, paths=False)
    for name, (_, expected) in values.items():
        assert getattr(settings, name) == expected, name
        assert getattr(settings, name) != getattr(Settings(), name), name


def test_flag_beats_variable_and_environ_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSTREAM_PORT", "1234")
    monkeypatch.setenv("RNNSTREAM_SESSION_TTL", "7")
    settings = Settings.from_args(["--port", "4321"], paths=False)
    assert settings.port == 4321 and settings.session_ttl == 7.0


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("true", "1", "YES", "On")]
    + [(t, False) for t in ("false", "0", "no", "OFF")],
)
def test_booleans_take_the_usual_spellings(text: str, value: bool) -> None:
    env = {"RNNSTREAM_PACK_OUTPUTS": text, "RNNSTREAM_EVICT_IDLE_WHEN_FULL": text}
    settings = Settings.from_args([], env=env, paths=False)
    assert (settings.pack_outputs, settings.evict_idle_when_full) == (value, value)


MISSING = "/nonexistent/rnnstream"


@pytest.mark.parametrize(
    ("argv", "env", "words"),
    [
        (["--port", "abc"], {}, ("--port (RNNSTREAM_PORT): 'abc' is not an integer",)),
        (["--port", "70000"], {}, ("--port (RNNSTREAM_PORT): 70000 must be at most 65535",)),
        (["--device", "gpu"], {}, ("--device (RNNSTREAM_DEVICE): 'gpu' is not one of auto",)),
        (["--max-batch-size", "-3"], {}, ("--max-batch-size (RNNSTREAM_MAX_BATCH_SIZE): -3",)),
        (["--session-ttl", "-1"], {}, ("--session-ttl (RNNSTREAM_SESSION_TTL): -1",)),
        (["--session-ttl", "nan"], {}, ("--session-ttl", "'nan' is not a finite number")),
        (["--workers", "0"], {}, ("--workers (RNNSTREAM_WORKERS): 0 must be at least 1",)),
        (["--keepalive-time", "0"], {}, ("--keepalive-time", "0 must be more than 0")),
        (["--max-message-bytes", "100"], {}, ("--max-message-bytes", "at least 4096")),
        (["--log-level", "chatty"], {}, ("--log-level", "'CHATTY' is not one of DEBUG")),
        (["--state-store", "http://x"], {}, ("--state-store", "must start with redis://")),
        (["--model-repository", MISSING], {}, ("--model-repository", "does not exist")),
        (["--tls-cert", MISSING], {}, ("--tls-cert (RNNSTREAM_TLS_CERT)", "does not exist")),
        (["--model-repository", __file__], {}, ("--model-repository", "is not a folder")),
        (["--metrics-port", "65535", "--workers", "2"], {}, ("--metrics-port", "past port")),
        (["--bogus"], {}, ("unrecognized arguments: --bogus",)),
        (["--load-model", "gru"], {}, ("--load-model", "with --model-control-mode explicit")),
        ([], {"RNNSTREAM_PORT": "abc"}, ("RNNSTREAM_PORT (--port): 'abc' is not an integer",)),
        ([], {"RNNSTREAM_SESSION_TTL": "soon"}, ("RNNSTREAM_SESSION_TTL", "not a number")),
        ([], {"RNNSTREAM_DEVICE": "gpu"}, ("RNNSTREAM_DEVICE (--device)", "auto, cpu, cuda")),
        ([], {"RNNSTREAM_PACK_OUTPUTS": "ture"}, ("RNNSTREAM_PACK_OUTPUTS", "not a boolean")),
        ([], {"RNNSTREAM_MAX_PENDING_FRAMES": "0"}, ("RNNSTREAM_MAX_PENDING_FRAMES", "at least")),
        ([], {"RNNSTREAM_AUTH_TOKENS_FILE": MISSING}, ("RNNSTREAM_AUTH_TOKENS_FILE", "exist")),
    ],
)
def test_bad_values_are_refused_in_one_line(
    argv: list[str], env: dict[str, str], words: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        Settings.from_args(["--model-repository", str(MODELS), *argv], env=env)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("rnnstream-server: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err, (word, err)


def test_settings_made_in_code_keep_the_rules() -> None:
    with pytest.raises(ValueError, match=r"--max-batch-size \(RNNSTREAM_MAX_BATCH_SIZE\): 0"):
        Settings(max_batch_size=0)
    with pytest.raises(ValueError, match="is not one of auto, cpu, cuda"):
        dataclasses.replace(Settings(), device="gpu")


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


def _run_server(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "rnnstream-server"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**_server_env(), **(env or {})},
        cwd=MODELS.parent,
        check=False,
    )


def test_a_refused_setting_stops_the_real_command_in_one_line() -> None:
    flag = _run_server("--max-batch-size", "-3")
    variable = _run_server(env={"RNNSTREAM_PACK_OUTPUTS": "ture"})
    assert (flag.returncode, variable.returncode) == (2, 2)
    assert flag.stderr == (
        "rnnstream-server: --max-batch-size (RNNSTREAM_MAX_BATCH_SIZE): -3 must be at least 1\n"
    )
    assert variable.stderr.startswith("rnnstream-server: RNNSTREAM_PACK_OUTPUTS (--pack-outputs): ")
    assert variable.stderr.count("\n") == 1


def test_help_lists_check_model_and_shows_defaults_as_typed() -> None:
    result = _run_server("--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "--check-model PATH" in text and "--version" in text
    assert "PosixPath" not in text and "()" not in text and "''" not in text
    assert "[default: models; env RNNSTREAM_MODEL_REPOSITORY]" in text
    assert "[default: 256; at least 1; env RNNSTREAM_MAX_BATCH_SIZE]" in text
    assert "--pack-outputs, --no-pack-outputs" in text and "[default: on;" in text


def test_help_lists_the_settings_by_topic() -> None:
    out = _run_server("--help").stdout
    titles = [line[:-1] for line in out.splitlines() if line and not line[0].isspace()]
    topics = titles[titles.index("Serving: where the server listens and how its processes run") :]
    assert [title.split(":")[0] for title in topics] == [
        "Serving",
        "Models",
        "Batching",
        "Sessions",
        "Limits",
        "State store",
        "Security",
        "Metrics and logs",
    ]
    serving = out[out.index(topics[0]) : out.index(topics[1])]
    assert "--port PORT" in serving and "--max-batch-size" not in serving


def test_version() -> None:
    import rnnstream

    result = _run_server("--version")
    assert (result.returncode, result.stdout) == (0, f"rnnstream-server {rnnstream.__version__}\n")
