"""bench/echo_server.py answers everything the load tester sends (sessions opened many a
message, single frames, frame groups, ends): a message it ignored left the benchmark's load
test waiting for ever."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO


def _common() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_common", REPO / "bench" / "_common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_common"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "flags",
    [
        ("--sessions", "16", "--sessions-per-message", "8", "--connections", "1"),
        ("--sessions", "4", "--no-pack-frames", "--connections", "2"),
    ],
)
def test_the_load_tester_runs_against_the_echo_server(flags: tuple[str, ...]) -> None:
    common = _common()
    server = common.start_server("echo", "echo", "gru")
    try:
        run = common.measure(server, "gru", 0.5, 0.2, flags)
    finally:
        server.stop()
    assert run["failed"] == 0 and not run["problems"], run
    assert run["answered"] > 0 and run["frames_per_s"] > 0
