"""Redis state store against in-memory state, gru at C=512, in the same run (issue target: at most
25% fewer frames/s). Run: python bench/redis_store.py [--seconds 8] [--runs 3] [--json PATH]."""

from __future__ import annotations

import argparse
import json
import os
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

from rnnstream.loadtest import LoadtestOptions, run_loadtest  # noqa: E402


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
    args = [sys.executable, "-m", "rnnstream.server", "--port", str(port), "--models", "gru"]
    args += ["--metrics-port", "0", "--log-level", "WARNING", "--max-sessions-per-stream", "1024"]
    if store:
        args += ["--state-store", store]
    process = subprocess.Popen(args, cwd=REPO)
    wait_listening(port)
    time.sleep(1.0)  # models load after the port opens
    return process


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(store: str, sessions: int, seconds: float, processes: int) -> tuple[float, float]:
    """(frames/s, server CPU µs per answered frame, warm-up included in neither)."""
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
        cpu_before = cpu_seconds(server.pid)
        report = run_loadtest(options)
        cpu = cpu_seconds(server.pid) - cpu_before
        if report.frames_failed or report.errors:
            raise RuntimeError(f"run had failures: {report.failed} {report.errors}")
        # CPU over the whole run (opens and warm-up too) per measured frame: an upper bound.
        return report.frames_per_second, cpu * 1e6 / max(1, report.answered)
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
        cpu: dict[str, list[float]] = {"memory": [], "redis": []}
        try:
            for _ in range(args.runs):  # alternate, so drift on a shared machine hits both
                for name, store in (("memory", ""), ("redis", url)):
                    fps, us = measure(store, args.sessions, args.seconds, args.processes)
                    results[name].append(fps)
                    cpu[name].append(us)
        finally:
            redis.terminate()
            redis.wait(10)
    memory = statistics.median(results["memory"])
    stored = statistics.median(results["redis"])
    ratio = stored / memory
    print(f"| state store | frames/s (median of {args.runs}) | runs | server CPU µs/frame |")
    print("|---|---:|---|---:|")
    for name, label in (("memory", "in-memory"), ("redis", "redis")):
        runs = ", ".join(f"{v:,.0f}" for v in results[name])
        median = statistics.median(results[name])
        print(f"| {label} | {median:,.0f} | {runs} | {statistics.median(cpu[name]):.0f} |")
    verdict = "met" if ratio >= 0.75 else "NOT met"
    print(f"\nredis / in-memory = {ratio:.2f} (target >= 0.75: {verdict}); C={args.sessions}, gru")
    cpu_ratio = statistics.median(cpu["redis"]) / statistics.median(cpu["memory"])
    print(f"server CPU per frame, redis / in-memory = {cpu_ratio:.2f}")
    if args.json:
        summary = {"frames_per_s": results, "cpu_us_per_frame": cpu, "ratio": ratio}
        args.json.write_text(json.dumps(summary | {"cpu_ratio": cpu_ratio}, indent=2))


if __name__ == "__main__":
    main()
