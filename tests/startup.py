"""rnnstream-server run as a user runs it, for the tests of what stops it at start-up: exit
status 2, one line naming the problem, no traceback and no teardown noise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

SERVER = str(Path(sys.executable).parent / "rnnstream-server")
NOISE = ("Traceback", "Event loop is closed", "Exception ignored", "Task was destroyed")


def server_env() -> dict[str, str]:
    """The test's environment without its RNNSTREAM_* variables."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}


def run_server(
    *flags: str, env: dict[str, str] | None = None, cwd: Path = REPO, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """The command with `flags` on 127.0.0.1, run to its exit; `env` over the test's environment
    without its RNNSTREAM_* variables. A server that starts instead runs into `timeout`."""
    return subprocess.run(
        [SERVER, "--host", "127.0.0.1", "--log-level", "WARNING", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**server_env(), **(env or {})},
        cwd=cwd,
        check=False,
    )


def assert_refused(result: subprocess.CompletedProcess[str], words: str) -> str:
    """Exit status 2 and `words` in the one error line, no noise around it; the line."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("rnnstream-server: ")]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not [n for n in NOISE if n in result.stderr], result.stderr
    return lines[0]
