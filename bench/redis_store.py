"""Redis state store against in-memory state, gru at C=512, in the same run (issue target: at most
25% fewer frames/s). Run: python bench/redis_store.py [--seconds 8] [--runs 3] [--json PATH]."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from client._loadtest import LoadtestOptions, run_loadtest  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def start_server(port: int, store: str) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "server", "--port", str(port), "--models", "gru"]
    args += ["--metrics-port", "0", "--log-level", "WARNING", "--max-sessions-per-stream", "1024"]
    if store:
        args += ["--state-store", store]
    process = subprocess.Popen(args, cwd=REPO)
    wait_listening(port)
    time.sleep(1.0)  # models load after the port opens
    return process


def measure(store: str, sessions: int, seconds: float, processes: int) -> float:
    port = free_port()
    server = start_server(port, store)
    try:
        options = LoadtestOptions(
            model="gru",
            target=f"127.0.0.1:{port}",
            sessions=sessions,
            duration=seconds,
            warmup=2.0,
            processes=processes,
            connections=processes,
            progress=False,
        )
        report = run_loadtest(options)
        if report.frames_failed or report.errors:
            raise RuntimeError(f"run had failures: {report.failed} {report.errors}")
        return report.frames_per_second
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        redis = subprocess.Popen(
            [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_listening(redis_port)
        url = f"redis://127.0.0.1:{redis_port}/0"
        results: dict[str, list[float]] = {"memory": [], "redis": []}
        try:
            for _ in range(args.runs):  # alternate, so drift on a shared machine hits both
                results["memory"].append(measure("", args.sessions, args.seconds, args.processes))
                results["redis"].append(measure(url, args.sessions, args.seconds, args.processes))
        finally:
            redis.terminate()
            redis.wait(10)
    memory = statistics.median(results["memory"])
    stored = statistics.median(results["redis"])
    ratio = stored / memory
    print(f"| state store | frames/s (median of {args.runs}) | runs |")
    print("|---|---|---|")
    print(f"| in-memory | {memory:,.0f} | {', '.join(f'{v:,.0f}' for v in results['memory'])} |")
    print(f"| redis | {stored:,.0f} | {', '.join(f'{v:,.0f}' for v in results['redis'])} |")
    verdict = "met" if ratio >= 0.75 else "NOT met"
    print(f"\nredis / in-memory = {ratio:.2f} (target >= 0.75: {verdict}); C={args.sessions}, gru")
    if args.json:
        args.json.write_text(json.dumps({"runs": results, "ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
