"""The built wheel: one top-level package, every module of the mapped folders, and it runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from rnnstream import Client, __version__
from tests.conftest import MODELS, REPO
from tests.streaming import assert_matches_references, sequence

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def _run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(a) for a in argv], capture_output=True, text=True, timeout=300, check=False, **kwargs
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of what the build reads, so no build/ folder is reused."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("client", "server", "proto", "models"):
        shutil.copytree(
            REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    out = tmp_path_factory.mktemp("dist")
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
        "-w", out, source,
    )  # fmt: skip
    assert built.returncode == 0, built.stdout + built.stderr
    (path,) = out.glob("rnnstream-*.whl")
    return path


def _expected_modules() -> set[str]:
    """Every module file the mapped folders hold, named by where the wheel puts it."""
    expected: set[str] = set()
    for package, folder in PACKAGE_DIRS.items():
        root = REPO / folder
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).parts
            # A subfolder mapped on its own (client/loadtest is rnnstream.loadtest) is counted
            # under its own name; only server/ and proto/ nest inside client's package.
            expected.add("/".join([*package.split("."), *parts]))
    return expected


def test_one_top_level_package_with_every_module(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {name.split("/")[0] for name in names}
    assert tops == {"rnnstream", f"rnnstream-{__version__}.dist-info"}
    modules = {name for name in names if name.endswith(".py")}
    assert modules == _expected_modules()
    # Not shipped: tests, benchmarks, the model scripts, the generator.
    assert not any(
        part in ("tests", "bench", "models") for name in names for part in name.split("/")[:-1]
    )
    assert "rnnstream/proto/generate.py" not in names
    # The example models' serving files, and not their build scripts or training data.
    shipped = ("model.onnx", "config.toml", "MODEL_CARD.md")
    examples = {
        f"rnnstream/server/examples/{path.relative_to(MODELS).as_posix()}"
        for path in MODELS.glob("*/*")
        if path.name in shipped
    }
    assert {n for n in names if n.startswith("rnnstream/server/examples/")} == examples
    assert "rnnstream/server/examples/co2_forecaster/config.toml" in examples
    for data in ("rnnstream/py.typed", "rnnstream/proto/v1/rnnstream.proto"):
        assert data in names
    assert any(name.endswith("_pb2.pyi") for name in names)


@pytest.fixture(scope="module")
def bare_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment holding the wheel and nothing else (no dependencies)."""
    venv = tmp_path_factory.mktemp("venv")
    made = _run(sys.executable, "-m", "venv", "--without-pip", venv)
    assert made.returncode == 0, made.stderr
    installed = _run(
        sys.executable, "-m", "pip", "--python", venv / "bin" / "python",
        "install", "-q", "--no-deps", "--no-index", wheel,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return venv


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("RNNSTREAM_", "PYTHON"))}


def test_without_dependencies_the_commands_say_what_to_install(bare_venv: Path) -> None:
    bin_dir = bare_venv / "bin"
    version = _run(bin_dir / "rnnstream", "--version", env=_clean_env(), cwd=bare_venv)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"rnnstream {__version__}"
    imported = _run(
        bin_dir / "python", "-c", "import rnnstream; print(rnnstream.__version__)",
        env=_clean_env(), cwd=bare_venv,
    )  # fmt: skip
    assert imported.stdout.strip() == __version__, imported.stderr
    server = _run(bin_dir / "rnnstream-server", env=_clean_env(), cwd=bare_venv)
    assert server.returncode == 2
    assert server.stderr.strip().splitlines() == [
        "rnnstream-server: the server needs onnxruntime, grpcio-reflection, prometheus-client, "
        "starlette, uvicorn: pip install 'rnnstream[cpu]' (or 'rnnstream[cuda]' for NVIDIA GPUs)"
    ]
    server_version = _run(
        bin_dir / "rnnstream-server", "--version", env=_clean_env(), cwd=bare_venv
    )
    assert (server_version.returncode, server_version.stdout.strip()) == (
        0,
        f"rnnstream-server {__version__}",
    ), server_version.stderr


@pytest.fixture(scope="module")
def wheel_venv(bare_venv: Path) -> Iterator[Path]:
    """The bare environment with this environment's dependencies visible behind the wheel."""
    code = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = Path(_run(bare_venv / "bin" / "python", "-c", code).stdout.strip())
    paths = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    pth = site / "zz-dependencies.pth"
    pth.write_text("".join(f"{p}\n" for p in sorted(paths)))
    yield bare_venv
    pth.unlink()


def test_the_installed_wheel_imports_and_checks_a_model(wheel_venv: Path) -> None:
    python = wheel_venv / "bin" / "python"
    where = _run(
        python, "-c", "import rnnstream, rnnstream.server, rnnstream.loadtest, rnnstream.proto.v1;"
        "print(rnnstream.__file__); print(rnnstream.server.__file__)",
        env=_clean_env(), cwd=wheel_venv,
    )  # fmt: skip
    assert where.returncode == 0, where.stderr
    for line in where.stdout.splitlines():
        assert Path(line).is_relative_to(wheel_venv), line  # the wheel's copy, not the checkout
    checked = _run(
        wheel_venv / "bin" / "rnnstream-server", "--check-model", MODELS / "gru",
        env=_clean_env(), cwd=wheel_venv,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "initial_h" in checked.stdout


def test_the_editable_install_serves_this_checkout() -> None:
    import rnnstream
    import rnnstream.server

    assert Path(rnnstream.__file__).parent == REPO / "client"
    assert Path(rnnstream.server.__file__).parent == REPO / "server"


def test_the_installed_wheel_serves_its_example_models(wheel_venv: Path, tmp_path: Path) -> None:
    """pip install 'rnnstream[cpu]' && rnnstream-server --example-models, from a folder without
    models/: the server answers."""
    port_file = tmp_path / "port"
    server = subprocess.Popen(
        [wheel_venv / "bin" / "rnnstream-server", "--example-models", "--port", "0",
         "--port-file", port_file, "--metrics-port", "0", "--log-level", "WARNING"],
        env=_clean_env(), cwd=tmp_path, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            assert server.poll() is None and time.monotonic() < deadline, "it did not start"
            time.sleep(0.05)
        target = f"127.0.0.1:{port_file.read_text().strip()}"
        x = sequence("gru", 5, seed=501)
        with Client(target) as client:
            assert "co2_forecaster" in [m.name for m in client.list_models()]
            with client.open("gru") as session:
                ys = [session.step(row)["y"] for row in x]
    finally:
        server.terminate()
        _, stderr = server.communicate(timeout=30)
    assert server.returncode == 0, stderr
    assert_matches_references("gru", x, np.stack(ys))
