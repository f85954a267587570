"""The committed rnnstream.proto code is what proto/generate.py makes from the .proto today."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "proto" / "rnnstream" / "proto"
PATTERNS = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "*_pb2_grpc.pyi")


def _dev_pins() -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {}
    for requirement in project["optional-dependencies"]["dev"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", requirement.strip())
        if match:
            pins[match.group(1)] = match.group(2)
    return pins


def _generated(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for pattern in PATTERNS
        for path in sorted(root.rglob(pattern))
    }


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pins = _dev_pins()
    assert {"grpcio-tools", "mypy-protobuf"} <= set(pins), pins
    pins = {name: pins[name] for name in ("grpcio-tools", "mypy-protobuf")}
    installed = {name: metadata.version(name) for name in pins}
    if installed != pins:
        pytest.skip(f"generator versions {installed} differ from pyproject's dev pins {pins}")
    result = subprocess.run(
        [sys.executable, str(REPO / "proto" / "generate.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    fresh = _generated(tmp_path / "rnnstream" / "proto")
    committed = _generated(PACKAGE)
    assert sorted(fresh) == sorted(committed)
    assert len(committed) == 4 * len(list(PACKAGE.glob("**/*.proto")))  # pb2, grpc, and stubs
    stale = [name for name in committed if fresh[name] != committed[name]]
    assert not stale, f"regenerate with `python proto/generate.py`: {stale} are stale"
