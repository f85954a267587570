"""Session state in Redis against in-memory state: gru, 512 closed-loop sessions, one frame a
message, both servers up at once and alternated in the same rounds (target: Redis keeps at
least 0.75x the in-memory frames/s).

    python bench/redis_store.py                   # about 4 minutes; bench/results/redis_store.json
    python bench/redis_store.py --report-only bench/results/redis_store.json --write-docs
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_parser,
    finish,
    fmt,
    fmt_spread,
    free_port,
    load_line,
    machine,
    measure,
    reported_only,
    spread,
    start_server,
    wait_for_quiet,
)

NAME = "redis_store"
MODEL = "gru"
LABELS = {"memory": "in-memory", "redis": "redis"}


def report(result: dict[str, Any]) -> str:
    o, runs = result["options"], result["runs"]
    lines = [
        f"Measured {result['date']} on {load_line(result)}; gru, {o['sessions']} closed-loop "
        f"sessions over 8 connections, one frame a message, {o['rounds']} rounds of "
        f"{o['duration']:g} s. Medians, (min-max) beside them.",
        "",
        "| state store | connections | frames/s (min-max) | p99 ms | server CPU µs/frame |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for store, label in LABELS.items():
        mine = [r for r in runs if r["store"] == store]
        lines.append(
            f"| {label} | {fmt(spread(r['connections'] for r in mine)['median'], 0)} "
            f"| {fmt_spread(spread(r['frames_per_s'] for r in mine), 0)} "
            f"| {fmt(spread(r['p99_ms'] for r in mine)['median'], 2)} "
            f"| {fmt(spread(r['cpu_us_per_frame'] for r in mine)['median'], 0)} |"
        )
    ratios = []
    for r in (r for r in runs if r["store"] == "redis"):
        memory = [m for m in runs if (m["store"], m["round"]) == ("memory", r["round"])]
        if memory and memory[0]["frames_per_s"]:
            ratios.append(r["frames_per_s"] / memory[0]["frames_per_s"])
    ratio = spread(ratios)["median"]
    met = ratio is not None and ratio >= 0.75
    lines += [
        "",
        "| target | value (median) | met |",
        "| --- | ---: | --- |",
        f"| redis / in-memory frames/s >= 0.75 | {fmt(ratio, 2)} | {'yes' if met else 'NO'} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, NAME)
    parser.add_argument("--sessions", type=int, default=512)
    args = parser.parse_args()
    if reported_only(args, NAME, report) is not None:
        return
    started = time.monotonic()
    info = {
        "machine": machine(),
        "quiet_machine": wait_for_quiet(args.quiet_load, args.quiet_timeout),
    }
    print(load_line(info), flush=True)
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        redis_port = free_port()
        redis = subprocess.Popen(
            [redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"redis://127.0.0.1:{redis_port}/0"
        servers = {}
        try:
            servers["memory"] = start_server("memory", "rnnstream", MODEL)
            servers["redis"] = start_server("redis", "rnnstream", MODEL, "--state-store", url)
            flags = ["--sessions", str(args.sessions), "--connections", "8", "--inflight", "1"]
            flags += ["--processes", str(args.client_processes), "--no-pack-frames"]
            for round_ in range(args.rounds):
                for store, server in servers.items():
                    run = measure(server, MODEL, args.duration, args.warmup, flags)
                    run.update(store=store, round=round_)
                    runs.append(run)
                    print(
                        f"round {round_ + 1} {store}: {run['frames_per_s']:,.0f} frames/s",
                        flush=True,
                    )
        finally:
            for server in servers.values():
                server.stop()
            redis.terminate()
            redis.wait(10)
    finish(args, started, info, report, runs=runs)


if __name__ == "__main__":
    main()
