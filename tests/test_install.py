"""What `pip install` resolves for each install of rnnstream, and the bounds it rests on.

The resolutions ask the configured package index (`pip install --dry-run --report`, nothing is
downloaded but metadata) and skip, saying so, where no index answers.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import REPO

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
GENERATED = sorted((REPO / "proto" / "rnnstream" / "proto").rglob("*_pb2*.py"))
ORT = {"onnxruntime", "onnxruntime-gpu"}


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower()


def _lower_bound(requirement_name: str) -> tuple[int, ...]:
    (requirement,) = [r for r in PROJECT["dependencies"] if _name(r) == requirement_name]
    match = re.search(r">=([\d.]+)", requirement)
    assert match, requirement
    return tuple(int(part) for part in match[1].split("."))


def test_protobuf_lower_bound_is_what_the_generated_code_checks_for() -> None:
    # Each _pb2.py refuses a protobuf runtime older than the protoc that generated it.
    versions = set()
    for path in GENERATED:
        match = re.search(
            r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
            r"\s*(\d+),\s*(\d+),\s*(\d+),",
            path.read_text(),
        )
        if match:
            versions.add(tuple(int(g) for g in match.groups()))
    assert len(versions) == 1, versions
    assert _lower_bound("protobuf") == versions.pop()


def test_grpcio_lower_bound_is_what_the_generated_stubs_check_for() -> None:
    versions = {
        match[1]
        for path in GENERATED
        if (match := re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'", path.read_text()))
    }
    assert len(versions) == 1, versions
    assert _lower_bound("grpcio") == tuple(int(p) for p in versions.pop().split("."))


def test_base_install_connects_and_the_server_is_an_extra() -> None:
    base = {_name(r) for r in PROJECT["dependencies"]}
    assert base == {"grpcio", "grpcio-health-checking", "protobuf", "numpy"}
    extras = PROJECT["optional-dependencies"]
    assert {_name(r) for r in extras["cpu"]} & ORT == {"onnxruntime"}
    assert {_name(r) for r in extras["cuda"]} & ORT == {"onnxruntime-gpu"}
    # grpcio-tools only regenerates the protocol code; torch is an opt-in extra of its own.
    for name, requirements in extras.items():
        names = {_name(r) for r in requirements}
        assert ("grpcio-tools" in names) == (name == "dev"), name
        assert ("torch" in names) == (name in ("torch", "train")), name


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What pip reads to resolve the project, copied so no build output lands in the checkout."""
    copy = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, copy / name)
    for folder in ("client", "server", "proto"):
        shutil.copytree(REPO / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


_UNREACHABLE = (
    "NewConnectionError",
    "Max retries exceeded",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "No matching distribution found",
    "Could not find a version",
)


@pytest.fixture(scope="module")
def resolved(source: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The distributions `pip install` would install from scratch, for each install."""
    reports = tmp_path_factory.mktemp("reports")
    installs = {"base": "", "cpu": "[cpu]", "cuda": "[cuda]", "dev": "[dev]"}

    def resolve(label: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                "--no-build-isolation", "--quiet", "--report", str(reports / f"{label}.json"),
                f"{source}{installs[label]}",
            ],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip

    with ThreadPoolExecutor(len(installs)) as pool:
        results = dict(zip(installs, pool.map(resolve, installs), strict=True))
    out: dict[str, set[str]] = {}
    for label, result in results.items():
        if result.returncode != 0:
            if any(sign in result.stderr for sign in _UNREACHABLE):
                last = result.stderr.strip().splitlines()[-1]
                pytest.skip(f"no package index reachable to resolve against: {last}")
            pytest.fail(f"pip could not resolve {label}: {result.stderr}")
        report = json.loads((reports / f"{label}.json").read_text())
        # Names as PEP 503 normalizes them (prometheus_client is prometheus-client).
        out[label] = {
            re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower() for item in report["install"]
        }
    return out


def test_base_install_has_no_server_and_no_tools(resolved: dict[str, set[str]]) -> None:
    base = resolved["base"]
    assert {"rnnstream", "grpcio", "grpcio-health-checking", "protobuf", "numpy"} <= base
    for absent in (*ORT, "grpcio-tools", "grpcio-reflection", "rich", "redis", "torch"):
        assert absent not in base, absent


def test_cpu_install_has_the_cpu_runtime_only(resolved: dict[str, set[str]]) -> None:
    cpu = resolved["cpu"]
    assert cpu & ORT == {"onnxruntime"}
    assert {"grpcio-reflection", "prometheus-client"} <= cpu
    assert not any(name.startswith("nvidia-") for name in cpu)
    assert "grpcio-tools" not in cpu


def test_cuda_install_has_exactly_one_runtime_and_its_cuda_libraries(
    resolved: dict[str, set[str]],
) -> None:
    cuda = resolved["cuda"]
    # onnxruntime and onnxruntime-gpu both install the `onnxruntime` package: only the GPU build.
    assert cuda & ORT == {"onnxruntime-gpu"}
    assert any(name.startswith("nvidia-cudnn") for name in cuda)
    assert any(name.startswith("nvidia-cuda-runtime") for name in cuda)
    assert "grpcio-tools" not in cuda


def test_dev_install_has_the_tools_but_not_torch(resolved: dict[str, set[str]]) -> None:
    dev = resolved["dev"]
    assert dev & ORT == {"onnxruntime"}
    assert {"grpcio-tools", "redis", "rich", "hdrhistogram", "matplotlib", "pytest"} <= dev
    assert "torch" not in dev and not any(name.startswith("nvidia-") for name in dev)
