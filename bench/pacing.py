"""The pacing knobs on a workload none of them was tuned on: open-loop Poisson arrivals at 50 %
and 90 % of capacity, 64 and 512 sessions, one frame a message. Each knob is turned off alone
(`--gather-us 0`, `--busy-poll-us 0`, `--inline-run-us 0`: no batch on the event loop, so no
timing runs decide it) against the defaults, all servers up at once, in the same rounds.

This evaluation removed the three knobs. The servers it runs are rnnstream as it was just
before that (`--revision`, found in git by default), exported from git and run with
PYTHONPATH; bench/pacing_after.py compares that server with the one without the knobs.

    python bench/pacing.py                       # about 30 minutes; bench/results/pacing.json
    python bench/pacing.py --report-only bench/results/pacing.json --write-docs

Capacity is the defaults' closed-loop frames/s with the same sessions and connections (the
median of a few runs at the start); latency is the load test's, from each frame's due time
(queueing in the client included, so a server that falls behind shows it).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    bench_parser,
    export_revision,
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

NAME = "pacing"
MODEL = "gru"
# config -> (label, server flags)
CONFIGS: dict[str, tuple[str, tuple[str, ...]]] = {
    "defaults": ("defaults", ()),
    "no_gather": ("--gather-us 0", ("--gather-us", "0")),
    "no_poll": ("--busy-poll-us 0", ("--busy-poll-us", "0")),
    "no_inline": ("--inline-run-us 0", ("--inline-run-us", "0")),
}
KNOBS = {"no_gather": "--gather-us", "no_poll": "--busy-poll-us", "no_inline": "--inline-run-us"}
# A knob wins a workload when, with it on, the median p99 is this much lower than with it off
# and the median p50 no more than this much higher; it loses where either is this much worse.
MARGIN = 0.10


def before_removal() -> str:
    """The commit just before the one that removed --inline-run-us from the server."""
    removal = subprocess.run(
        ["git", "log", "-1", "--format=%H", "-S", "inline_run_us", "--", "server/"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if not removal:
        raise SystemExit("no commit removed --inline-run-us: give the revision")
    return rev_parse(f"{removal}~1")


def rev_parse(revision: str) -> str:
    out = subprocess.run(
        ["git", "rev-parse", revision], cwd=REPO, check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def base_flags(sessions: int, processes: int) -> list[str]:
    flags = ["--sessions", str(sessions), "--connections", str(min(sessions, 8))]
    return [*flags, "--processes", str(min(processes, sessions)), "--no-pack-frames"]


def open_loop_flags(sessions: int, processes: int, rate: float) -> list[str]:
    return [*base_flags(sessions, processes), "--rate", f"{rate:.0f}", "--arrivals", "poisson"]


def summarize(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    runs = result["runs"]
    for workload in result["workloads"]:
        for config in CONFIGS:
            group = [
                r
                for r in runs
                if (r["sessions_asked"], r["load"], r["config"])
                == (workload["sessions"], workload["load"], config)
            ]
            if not group:
                continue
            row: dict[str, Any] = {**workload, "config": config}
            for key in ("frames_per_s", "p50_ms", "p99_ms", "mean_batch", "cpu_us_per_frame"):
                row[key] = spread(g[key] for g in group)
            row["connections"] = spread(g["connections"] for g in group)["median"]
            row["failed"] = sum(g["failed"] for g in group)
            rows.append(row)
    return rows


def verdicts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per knob and workload: on (defaults) / off medians of p50 and p99, and who wins."""
    out = []
    for config, knob in KNOBS.items():
        for on in (r for r in rows if r["config"] == "defaults"):
            off = next(
                (
                    r
                    for r in rows
                    if r["config"] == config
                    and (r["sessions"], r["load"]) == (on["sessions"], on["load"])
                ),
                None,
            )
            if off is None or not off["p99_ms"]["median"] or not off["p50_ms"]["median"]:
                continue
            p50 = on["p50_ms"]["median"] / off["p50_ms"]["median"]
            p99 = on["p99_ms"]["median"] / off["p99_ms"]["median"]
            if p99 <= 1 - MARGIN and p50 <= 1 + MARGIN:
                verdict = "wins"
            elif p99 >= 1 + MARGIN or p50 >= 1 + MARGIN:
                verdict = "loses"
            else:
                verdict = "no difference"
            out.append(
                {
                    "knob": knob,
                    "sessions": on["sessions"],
                    "load": on["load"],
                    "p50_on_off": p50,
                    "p99_on_off": p99,
                    "verdict": verdict,
                }
            )
    return out


def decisions(found: list[dict[str, Any]]) -> dict[str, str]:
    """Keep a knob only where it wins on one of these workloads and loses on none."""
    out = {}
    for knob in KNOBS.values():
        mine = [v["verdict"] for v in found if v["knob"] == knob]
        keep = "wins" in mine and "loses" not in mine
        out[knob] = "keep" if keep else "remove"
    return out


def measure_capacity(server: Any, counts: list[int], args: Any) -> list[dict[str, Any]]:
    """Closed-loop frames/s at each session count (the median of --capacity-runs runs)."""
    capacity = []
    for sessions in counts:
        flags = [*base_flags(sessions, args.client_processes), "--inflight", "1"]
        values = [
            measure(server, MODEL, args.duration, args.warmup, flags)["frames_per_s"]
            for _ in range(args.capacity_runs)
        ]
        capacity.append(
            {"sessions": sessions, "frames_per_s": statistics.median(values), "runs": values}
        )
        print(f"capacity at {sessions} sessions: {values}", flush=True)
    return capacity


def open_loop_workloads(capacity: list[dict[str, Any]], loads: list[float]) -> list[dict[str, Any]]:
    """Poisson arrivals at each share of each capacity."""
    return [
        {"sessions": c["sessions"], "load": load, "rate": load * c["frames_per_s"]}
        for c in capacity
        for load in loads
    ]


def measure_workload(
    servers: dict[str, Any], workload: dict[str, Any], flags: list[str], args: Any, round_: int
) -> list[dict[str, Any]]:
    """One round of a workload on each server of the comparison, in turn; a line printed each."""
    runs = []
    for config, server in servers.items():
        run = measure(server, MODEL, args.duration, args.warmup, flags)
        run.update(
            sessions_asked=workload["sessions"], load=workload["load"], config=config, round=round_
        )
        runs.append(run)
        load = "closed" if workload["load"] is None else f"{workload['load']:.0%}"
        print(
            f"round {round_ + 1} {workload['sessions']} sessions {load} {config}: p50 "
            f"{run['p50_ms']} p99 {run['p99_ms']} ms, {run['frames_per_s']:,.0f} frames/s, "
            f"{run['cpu_us_per_frame']} µs/frame",
            flush=True,
        )
    return runs


def report(result: dict[str, Any]) -> str:
    rows = summarize(result)
    found = verdicts(rows)
    o = result["options"]
    caps = ", ".join(
        f"{c['sessions']} sessions {c['frames_per_s']:,.0f} frames/s" for c in result["capacity"]
    )
    lines = [
        f"Measured {result['date']} on {load_line(result)}; gru, one frame a message, "
        f"{o['rounds']} rounds of {o['duration']:g} s (after {o['warmup']:g} s of warm-up) per "
        f"row. Capacity (closed loop, defaults): {caps}. Medians over the rounds, (min-max) "
        "beside them.",
        "",
        "| sessions | connections | load | offered frames/s | server | frames/s (min-max) "
        "| p50 ms (min-max) | p99 ms (min-max) | mean batch | server CPU µs/frame |",
        "| ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['sessions']} | {fmt(r['connections'], 0)} | {r['load']:.0%} "
            f"| {fmt(r['rate'], 0)} "
            f"| {CONFIGS[r['config']][0]} | {fmt_spread(r['frames_per_s'], 0)} "
            f"| {fmt_spread(r['p50_ms'], 2)} | {fmt_spread(r['p99_ms'], 2)} "
            f"| {fmt(r['mean_batch']['median'])} | {fmt(r['cpu_us_per_frame']['median'], 0)} |"
        )
    lines += [
        "",
        "Each knob with its default against turned off, per workload (ratios of medians; a knob "
        f"wins where its p99 is at least {MARGIN:.0%} lower with its p50 no more than "
        f"{MARGIN:.0%} higher, and loses where either is {MARGIN:.0%} higher):",
        "",
        "| knob | sessions | load | p50 on / off | p99 on / off | verdict |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in found:
        lines.append(
            f"| `{v['knob']}` | {v['sessions']} | {v['load']:.0%} | {fmt(v['p50_on_off'], 2)} "
            f"| {fmt(v['p99_on_off'], 2)} | {v['verdict']} |"
        )
    lines += ["", "| knob | decision |", "| --- | --- |"]
    for knob, decision in decisions(found).items():
        lines.append(f"| `{knob}` | {decision} |")
    return "\n".join(lines)


def main() -> None:
    parser = bench_parser(__doc__, NAME)
    parser.add_argument("--revision", help="git revision of the server with the knobs")
    parser.add_argument("--sessions", default="64,512")
    parser.add_argument("--loads", default="0.5,0.9")
    parser.add_argument("--capacity-runs", type=int, default=3)
    args = parser.parse_args()
    if reported_only(args, NAME, report) is not None:
        return
    revision = rev_parse(args.revision) if args.revision else before_removal()
    started = time.monotonic()
    info = {
        "machine": machine(),
        "quiet_machine": wait_for_quiet(args.quiet_load, args.quiet_timeout),
    }
    print(load_line(info), flush=True)
    counts = [int(c) for c in args.sessions.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    servers = {}
    runs: list[dict[str, Any]] = []
    capacity = []
    folder = tempfile.TemporaryDirectory()
    try:
        old = export_revision(revision, Path(folder.name))
        for config, (_, flags) in CONFIGS.items():
            servers[config] = start_server(config, "rnnstream", MODEL, *flags, pythonpath=old)
        capacity = measure_capacity(servers["defaults"], counts, args)
        workloads = open_loop_workloads(capacity, loads)
        for round_ in range(args.rounds):
            for workload in workloads:
                flags = open_loop_flags(
                    workload["sessions"], args.client_processes, workload["rate"]
                )
                runs += measure_workload(servers, workload, flags, args, round_)
    finally:
        for server in servers.values():
            server.stop()
        folder.cleanup()
    finish(
        args, started, info, report,
        revision=revision, capacity=capacity, workloads=workloads, runs=runs,
    )  # fmt: skip


if __name__ == "__main__":
    main()
