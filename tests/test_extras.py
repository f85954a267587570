"""Features whose extra is not installed say so in one line, before any work starts.

Each check runs in a fresh interpreter where the extra's module is blocked
(`sys.modules[name] = None` makes importing it fail, as if it were not installed).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from rnnstream._extras import EXTRAS, MissingExtra
from tests.conftest import MODELS, REPO
from tests.ports import reserved_port


def _closed_port() -> str:
    return f"127.0.0.1:{reserved_port()}"  # bound, never listening: a connect is refused


def _without(modules: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    blocked = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    return subprocess.run(
        [sys.executable, "-c", f"import sys\n{blocked}{code}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
        check=False,
    )


def _cli(*argv: str) -> str:
    return f"from rnnstream._cli import main\nsys.exit(main({list(argv)!r}))\n"


def test_loadtest_without_its_extra() -> None:
    # A closed port: had the command got as far as connecting, it would say so instead.
    result = _without(("rich",), _cli("loadtest", "--target", _closed_port(), "--model", "gru"))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "rnnstream: rnnstream loadtest needs rich: pip install 'rnnstream[loadtest]'"
    )


def test_plot_without_matplotlib_fails_before_the_run() -> None:
    argv = ("loadtest", "--target", _closed_port(), "--model", "gru", "--plot", "p.png")
    result = _without(("matplotlib",), _cli(*argv))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "rnnstream: --plot needs matplotlib: pip install 'rnnstream[plot]'"
    )


def test_verify_without_onnxruntime_fails_before_the_run() -> None:
    argv = (
        "loadtest", "--target", _closed_port(), "--model", "gru",
        "--verify", "--verify-model", str(MODELS / "gru" / "model.onnx"),
    )  # fmt: skip
    result = _without(("onnxruntime",), _cli(*argv))
    assert result.returncode == 2
    assert "rnnstream: --verify needs onnxruntime: pip install 'rnnstream[cpu]'" in result.stderr


def test_the_load_testers_python_api_without_its_extra() -> None:
    code = (
        "from rnnstream.loadtest import LoadtestOptions\n"  # needs nothing
        "try:\n"
        "    from rnnstream.loadtest import run_loadtest\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    result = _without(("hdrh",), code)
    assert result.stdout.strip() == (
        "MissingExtra rnnstream.loadtest needs hdrhistogram: pip install 'rnnstream[loadtest]'"
    ), result.stderr


def test_state_store_without_redis_is_one_line_at_startup() -> None:
    argv = [
        "rnnstream-server", "--state-store", "redis://127.0.0.1:1/0", "--port", "0",
        "--metrics-port", "0", "--models", "rnn_tanh", "--model-repository", str(MODELS),
    ]  # fmt: skip
    code = f"sys.argv = {argv!r}\nfrom rnnstream._server_command import main\nmain()\n"
    result = _without(("redis",), code)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "rnnstream-server: --state-store redis://127.0.0.1:1/0 needs redis: "
        "pip install 'rnnstream[redis]'"
    )
    assert "Traceback" not in result.stderr


def test_missing_extra_is_an_import_error() -> None:
    assert issubclass(MissingExtra, ImportError)


@pytest.mark.parametrize("feature", sorted(EXTRAS))
def test_checked_modules_match_the_extras_in_pyproject(feature: str) -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    extra = EXTRAS[feature]

    def names(requirements: list[str]) -> set[str]:
        return {req.split("[")[0].split(">")[0].split("=")[0].strip() for req in requirements}

    distributions = set(extra.modules.values())
    if feature in ("server", "verify"):
        # Both server extras provide every module the check looks for; onnxruntime comes as
        # onnxruntime (cpu) or onnxruntime-gpu (cuda).
        for name in ("cpu", "cuda"):
            provided = names(extras[name]) | ({"onnxruntime"} if name == "cuda" else set())
            assert distributions <= provided, name
        assert "'rnnstream[cpu]'" in extra.install and "'rnnstream[cuda]'" in extra.install
    else:
        assert names(extras[extra.name]) == distributions
        assert extra.install == f"pip install 'rnnstream[{extra.name}]'"


def test_both_onnx_runtimes_installed_is_warned_about(tmp_path: Path) -> None:
    # A second ONNX Runtime distribution, as pip would record it, beside the installed one.
    for name in ("onnxruntime", "onnxruntime_gpu"):
        info = tmp_path / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    result = subprocess.run(
        [sys.executable, "-c", "from rnnstream._server_command import main; main()", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "warning: both onnxruntime and onnxruntime-gpu are installed" in result.stderr
