"""`rnnstream-server` run as a real process on 127.0.0.1, for signals, exit codes and log lines."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from rnnstream._health import check_health
from tests.conftest import MODELS, REPO


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class ServerProcess:
    """Starts the server, collects its stderr lines on a thread, waits until it serves."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        command = [
            sys.executable,
            "-m",
            "rnnstream.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--model-repository",
            str(MODELS),
            "--metrics-port",
            "0",
            *flags,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.target = f"127.0.0.1:{self.port}"
        ready = check_health(self.target, timeout=60)
        if not ready.ok:
            self.close()
            raise AssertionError(f"{ready.message}; stderr:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if pattern.search(line):
                    return line
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(
            f"no line matching {pattern.pattern!r}; got:\n" + "\n".join(self.lines)
        )

    def signal(self, sig: signal.Signals) -> float:
        """Send `sig`; returns when it was sent (time.monotonic)."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        return sent

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
