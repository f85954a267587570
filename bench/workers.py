"""`--workers N`: N server processes on one port against one, gru, closed loop, one frame a
message, in the same rounds.

    python bench/workers.py                      # about 4 minutes; bench/results/workers.json
    python bench/workers.py --report-only bench/results/workers.json --write-docs

The load generator runs on the same machine: with as many workers as cores, the workers and the
load generator share the cores, so the ratio says as much about the machine as about the server.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_parser,
    finish,
    fmt,
    fmt_spread,
    load_line,
    machine,
    measure,
    reported_only,
    spread,
    start_server,
    wait_for_quiet,
)

NAME = "workers"
MODEL = "gru"


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    runs, rows = result["runs"], []
    for workers in result["options"]["workers"]:
        group = [r for r in runs if r["workers"] == workers]
        ratios = []
        for g in group:
            one = [r for r in runs if (r["workers"], r["round"]) == (1, g["round"])]
            if one and one[0]["frames_per_s"]:
                ratios.append(g["frames_per_s"] / one[0]["frames_per_s"])
        rows.append(
            {
                "workers": workers,
                "connections": spread(g["connections"] for g in group)["median"],
                "frames_per_s": spread(g["frames_per_s"] for g in group),
                "p99_ms": spread(g["p99_ms"] for g in group),
                "cpu_us_per_frame": spread(g["cpu_us_per_frame"] for g in group),
                "vs_one": spread(ratios),
            }
        )
    return rows


def report(result: dict[str, Any]) -> str:
    o = result["options"]
    lines = [
        f"Measured {result['date']} on {load_line(result)}; gru, {o['sessions']} closed-loop "
        f"sessions, one frame a message, {o['client_processes']} load-generator processes on the "
        f"same machine; {o['rounds']} rounds of {o['duration']:g} s. Medians, (min-max) beside.",
        "",
        "| workers | connections | frames/s (min-max) | vs 1 worker | target (0.8 N) "
        "| p99 ms | server CPU µs/frame |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in summarize(result):
        n = r["workers"]
        met = r["vs_one"]["median"] is not None and r["vs_one"]["median"] >= 0.8 * n
        target = "" if n == 1 else f"{0.8 * n:.1f}: {'met' if met else 'NOT met'}"
        lines.append(
            f"| {n} | {fmt(r['connections'], 0)} | {fmt_spread(r['frames_per_s'], 0)} "
            f"| {fmt(r['vs_one']['median'], 2)} | {target} | {fmt(r['p99_ms']['median'], 2)} "
            f"| {fmt(r['cpu_us_per_frame']['median'], 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, NAME)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--sessions", type=int, default=512)
    args = parser.parse_args()
    if reported_only(args, NAME, report) is not None:
        return
    counts = [int(w) for w in args.workers.split(",")]
    started = time.monotonic()
    info = {
        "machine": machine(),
        "quiet_machine": wait_for_quiet(args.quiet_load, args.quiet_timeout),
    }
    print(load_line(info), flush=True)
    servers = {
        n: start_server(f"{n} workers", "rnnstream", MODEL, "--workers", str(n)) for n in counts
    }
    flags = ["--sessions", str(args.sessions), "--connections", "8", "--inflight", "1"]
    flags += ["--processes", str(args.client_processes), "--no-pack-frames"]
    runs: list[dict[str, Any]] = []
    try:
        for round_ in range(args.rounds):
            for n, server in servers.items():
                ports = [server.metrics_port + i for i in range(n)]  # worker i: metrics port + i
                run = measure(server, MODEL, args.duration, args.warmup, flags, ports)
                run.update(workers=n, round=round_)
                runs.append(run)
                print(
                    f"round {round_ + 1}, {n} workers: {run['frames_per_s']:,.0f} frames/s",
                    flush=True,
                )
    finally:
        for server in servers.values():
            server.stop()
    finish(args, started, info, report, options={"workers": counts}, runs=runs)


if __name__ == "__main__":
    main()
