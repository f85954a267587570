"""`rnnstream-server` run as a real process on 127.0.0.1, for signals, exit codes and log lines."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rnnstream._health import check_health
from tests.conftest import MODELS, REPO
from tests.ports import reserved_port

# A port for a server the test starts itself (metrics, HTTP, a command line): tests/ports.py.
free_port = reserved_port


class ServerProcess:
    """Starts the server on a port it picks itself (--port 0), learns that port from the file the
    server writes once it serves (--port-file), collects its stderr lines on a thread."""

    def __init__(
        self,
        *flags: str,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        repository: Path | None = MODELS,
    ) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="rnnstream-server-")
        port_file = Path(self._folder.name) / "port"
        command = [
            *(sys.executable, "-m", "rnnstream.server", "--host", "127.0.0.1", "--port", "0"),
            *("--port-file", str(port_file), "--metrics-port", "0"),
            *(("--model-repository", str(repository)) if repository is not None else ()),
            *flags,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # When the process exited, seen by a thread waiting on it (not by the test, which may be
        # busy with something else when it happens).
        self.exited_at = float("inf")
        self._waiter = threading.Thread(target=self._wait_for_exit, daemon=True)
        self._waiter.start()
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError("the server did not start; stderr:\n" + "\n".join(self.lines))
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        self.target = f"127.0.0.1:{self.port}"
        ready = check_health(self.target, timeout=60)
        if not ready.ok:
            self.close()
            raise AssertionError(f"{ready.message}; stderr:\n" + "\n".join(self.lines))

    def _wait_for_exit(self) -> None:
        self.process.wait()
        self.exited_at = time.monotonic()

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
        self._waiter.join(5)
        self._reader.join(5)
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()
        self._folder.cleanup()
