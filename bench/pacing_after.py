"""The server with its pacing knobs removed against the same server with them, on the workloads
of bench/pacing.py (open-loop Poisson arrivals at 50 % and 90 % of capacity, 64 and 512
sessions, one frame a message) and one closed-loop session: both servers up at once, in the
same rounds. The server with the knobs is rnnstream as it was just before they were removed
(`--before`, found in git by default), run from an exported tree with its defaults.

    python bench/pacing_after.py          # about 10 minutes; bench/results/pacing_after.json
    python bench/pacing_after.py --report-only bench/results/pacing_after.json --write-docs
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_parser,
    export_revision,
    finish,
    fmt,
    fmt_spread,
    histogram,
    load_line,
    machine,
    reported_only,
    spread,
    start_server,
    wait_for_quiet,
)
from pacing import (
    MODEL,
    base_flags,
    before_removal,
    measure_capacity,
    measure_workload,
    open_loop_flags,
    open_loop_workloads,
    rev_parse,
)

NAME = "pacing_after"
CONFIGS = {"before": "with the knobs (defaults)", "now": "knobs removed"}
KEYS = ("frames_per_s", "p50_ms", "p99_ms", "mean_batch", "cpu_us_per_frame")


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for workload in result["workloads"]:
        for config in CONFIGS:
            group = [
                r
                for r in result["runs"]
                if (r["sessions_asked"], r["load"], r["config"])
                == (workload["sessions"], workload["load"], config)
            ]
            if not group:
                continue
            row: dict[str, Any] = {**workload, "config": config}
            for key in KEYS:
                row[key] = spread(g[key] for g in group)
            row["connections"] = spread(g["connections"] for g in group)["median"]
            row["failed"] = sum(g["failed"] for g in group)
            rows.append(row)
    return rows


RATIO_KEYS = ("p50_ms", "p99_ms", "cpu_us_per_frame")


def removed_vs_kept(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each workload's row without the knobs, with its medians over the row with them (None
    where either is missing)."""
    out = []
    for now in (r for r in rows if r["config"] == "now"):
        before = next(
            (
                r
                for r in rows
                if r["config"] == "before"
                and (r["sessions"], r["load"]) == (now["sessions"], now["load"])
            ),
            None,
        )
        if before is None:
            continue
        ratio: dict[str, Any] = {}
        for key in RATIO_KEYS:
            a, b = now[key]["median"], before[key]["median"]
            ratio[key] = a / b if a is not None and b else None
        out.append((now, ratio))
    return out


def report(result: dict[str, Any]) -> str:
    rows = summarize(result)
    o = result["options"]
    caps = ", ".join(
        f"{c['sessions']} sessions {c['frames_per_s']:,.0f} frames/s" for c in result["capacity"]
    )
    lines = [
        f"Measured {result['date']} on {load_line(result)}; gru, one frame a message, "
        f"{o['rounds']} rounds "
        f"of {o['duration']:g} s (after {o['warmup']:g} s of warm-up) per row. With the knobs: "
        f"rnnstream at {result['before'][:10]}. Capacity (closed loop, knobs removed): {caps}. "
        "Load `closed` is one lock-step session. Medians over the rounds, (min-max) beside them.",
        "",
        "| sessions | connections | load | offered frames/s | server | frames/s (min-max) "
        "| p50 ms (min-max) | p99 ms (min-max) | mean batch | server CPU µs/frame (min-max) |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        load = "closed" if r["load"] is None else f"{r['load']:.0%}"
        lines.append(
            f"| {r['sessions']} | {fmt(r['connections'], 0)} | {load} | {fmt(r['rate'], 0)} "
            f"| {CONFIGS[r['config']]} | {fmt_spread(r['frames_per_s'], 0)} "
            f"| {fmt_spread(r['p50_ms'], 2)} | {fmt_spread(r['p99_ms'], 2)} "
            f"| {fmt(r['mean_batch']['median'])} | {fmt_spread(r['cpu_us_per_frame'], 0)} |"
        )
    lines += [
        "",
        "Knobs removed / with the knobs (ratios of medians; below 1 is better for latency and "
        "CPU):",
        "",
        "| sessions | load | p50 | p99 | server CPU per frame |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for now, ratio in removed_vs_kept(rows):
        cells = [fmt(ratio[key], 2) if ratio[key] is not None else "-" for key in RATIO_KEYS]
        load = "closed" if now["load"] is None else f"{now['load']:.0%}"
        lines.append(f"| {now['sessions']} | {load} | {' | '.join(cells)} |")
    gathers = result.get("gather_buckets")
    if gathers:
        total = gathers["+Inf"]
        within = next((v for k, v in gathers.items() if float(k) == 1e-3), 0.0)
        over = total - next((v for k, v in gathers.items() if float(k) == 2e-3), total)
        lines += [
            "",
            f"The gathering before each batch of the server without the knobs, over the whole "
            f"run (rnnstream_batch_gather_seconds): {total:,.0f} batches, {within / total:.2%} "
            f"within 1 ms, {over:,.0f} over 2 ms (the bound is checked between loop turns, so a "
            "long turn can carry a gathering past 1 ms).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, NAME, quiet_timeout=600.0)
    parser.add_argument("--before", help="git revision of the server with the knobs")
    parser.add_argument("--sessions", default="64,512")
    parser.add_argument("--loads", default="0.5,0.9")
    parser.add_argument("--capacity-runs", type=int, default=3)
    args = parser.parse_args()
    if reported_only(args, NAME, report) is not None:
        return
    before = rev_parse(args.before) if args.before else before_removal()
    started = time.monotonic()
    info = {
        "machine": machine(),
        "quiet_machine": wait_for_quiet(args.quiet_load, args.quiet_timeout),
    }
    print(load_line(info), f"; with the knobs: {before}", flush=True)
    counts = [int(c) for c in args.sessions.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    servers = {}
    runs: list[dict[str, Any]] = []
    capacity = []
    with tempfile.TemporaryDirectory() as folder:
        try:
            old = export_revision(before, Path(folder))
            servers["before"] = start_server("before", "rnnstream", MODEL, pythonpath=old)
            servers["now"] = start_server("now", "rnnstream", MODEL)
            capacity = measure_capacity(servers["now"], counts, args)
            workloads = open_loop_workloads(capacity, loads)
            workloads.insert(0, {"sessions": 1, "load": None, "rate": None})
            for round_ in range(args.rounds):
                for workload in workloads:
                    if workload["load"] is None:
                        flags = [*base_flags(1, 1), "--inflight", "1"]
                    else:
                        flags = open_loop_flags(
                            workload["sessions"], args.client_processes, workload["rate"]
                        )
                    runs += measure_workload(servers, workload, flags, args, round_)
            gathers = histogram(servers["now"].metrics_port, "rnnstream_batch_gather_seconds")
        finally:
            for server in servers.values():
                server.stop()
    finish(
        args, started, info, report,
        gather_buckets=gathers, before=before, capacity=capacity, workloads=workloads, runs=runs,
    )  # fmt: skip


if __name__ == "__main__":
    main()
