"""Batching benchmark: rnnstream against an echo server with the same stream handling, with
batching off and on, one frame per message; ONNX Runtime alone; memory of idle sessions.

One command (about 35 minutes on 2 cores; it first waits for a quiet machine):

    python bench/batching.py                                   # writes bench/results/batching.json
    python bench/batching.py --report-only bench/results/batching.json --write-docs

Each server runs as its own process; `rnnstream loadtest` drives it from other processes over
loopback with C lock-step sessions (closed loop, one frame in flight per session) over
min(C, 8) connections. Servers: `echo` (bench/echo_server.py: the same Stream handling and
message sizes on the same asyncio gRPC stack, no model: the floor of the stack), `off`
(rnnstream, --max-batch-size 1) and `on` (rnnstream, its defaults). Every (model, C, kind) cell
runs once per round, rounds repeat, tables show medians with min and max over rounds; ratios are
taken within a round, then their median, so slow drift on a shared machine hits both sides of a
ratio alike.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    bench_parser,
    finish,
    fmt,
    fmt_spread,
    load_line,
    machine,
    measure,
    ort_alone,
    reported_only,
    spread,
    start_server,
    wait_for_quiet,
)

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc

NAME = "batching"
# kind -> (server, label, load test flags); every kind but on_client sends one frame a message.
KINDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "echo": ("echo", "echo server", ("--no-pack-frames",)),
    "echo_single": (
        "echo",
        "echo server, outputs unpacked",
        ("--no-pack-frames", "--no-pack-outputs"),
    ),
    "off": ("off", "rnnstream, batching off", ("--no-pack-frames",)),
    "on_single": ("on", "rnnstream, outputs unpacked", ("--no-pack-frames", "--no-pack-outputs")),
    "on": ("on", "rnnstream", ("--no-pack-frames",)),
    "on_client": ("on", "rnnstream, Python client defaults (frames packed too)", ()),
}
ONE_SESSION_KINDS = ("echo", "off", "on")  # at C = 1 nothing is ever ready to pack
SERVERS = {
    "echo": ("echo", ()),
    "off": ("rnnstream", ("--max-batch-size", "1")),
    "on": ("rnnstream", ()),
}
# What each rnnstream row is compared with: the echo row with the same wire behaviour.
ECHO_OF = {"off": "echo", "on": "echo", "on_single": "echo_single", "on_client": "echo"}


def kinds_for(sessions: int) -> tuple[str, ...]:
    return ONE_SESSION_KINDS if sessions == 1 else tuple(KINDS)


def run_flags(kind: str, sessions: int, processes: int) -> list[str]:
    flags = ["--sessions", str(sessions), "--connections", str(min(sessions, 8))]
    flags += ["--processes", str(1 if sessions == 1 else min(processes, sessions))]
    return [*flags, "--inflight", "1", *KINDS[kind][2]]


# -- the summary ------------------------------------------------------------------------------
def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, C, kind): spreads over rounds, and per-round ratios to the comparable rows."""
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["model"], run["sessions_asked"], run["kind"]), []).append(run)

    def other(run: dict[str, Any], kind: str) -> dict[str, Any] | None:
        key = (run["model"], run["sessions_asked"], kind)
        return next((r for r in cells.get(key, []) if r["round"] == run["round"]), None)

    rows = []
    for (model, sessions, kind), group in cells.items():
        row: dict[str, Any] = {"model": model, "sessions": sessions, "kind": kind}
        for key in ("frames_per_s", "p50_ms", "p99_ms", "mean_batch", "cpu_us_per_frame"):
            row[key] = spread(g[key] for g in group)
        for key in ("connections", "requests_per_frame", "responses_per_frame"):
            row[key] = spread(g[key] for g in group)["median"]
        row["failed"] = sum(g["failed"] for g in group)
        ratios: dict[str, list[float]] = {"fps_vs_echo": [], "cpu_vs_echo": [], "p50_vs_echo": []}
        ratios["fps_vs_off"] = []
        for g in group:
            echo = other(g, ECHO_OF[kind]) if kind in ECHO_OF else None
            off = other(g, "off") if kind.startswith("on") else None
            if echo and echo["frames_per_s"] and g["frames_per_s"]:
                ratios["fps_vs_echo"].append(g["frames_per_s"] / echo["frames_per_s"])
            if echo and echo["cpu_us_per_frame"] and g["cpu_us_per_frame"]:
                ratios["cpu_vs_echo"].append(g["cpu_us_per_frame"] / echo["cpu_us_per_frame"])
            if echo and echo["p50_ms"] and g["p50_ms"] is not None:
                ratios["p50_vs_echo"].append(g["p50_ms"] / echo["p50_ms"])
            if off and off["frames_per_s"] and g["frames_per_s"]:
                ratios["fps_vs_off"].append(g["frames_per_s"] / off["frames_per_s"])
        for name, values in ratios.items():
            row[name] = spread(values)
        rows.append(row)
    order = {k: i for i, k in enumerate(KINDS)}
    rows.sort(key=lambda r: (r["model"], r["sessions"], order[r["kind"]]))
    return rows


def _row(rows: list[dict[str, Any]], model: str, sessions: int, kind: str) -> dict[str, Any]:
    found = [r for r in rows if (r["model"], r["sessions"], r["kind"]) == (model, sessions, kind)]
    return found[0] if found else {}


def targets(rows: list[dict[str, Any]], mem: dict[str, Any] | None) -> list[dict[str, Any]]:
    def check(
        name: str, cell: Any, limit: float, at_least: bool, measure: str = "", sessions: int = 0
    ) -> dict[str, Any]:
        value = cell["median"] if isinstance(cell, dict) else cell
        met = value is not None and (value >= limit if at_least else value <= limit)
        return {
            "target": name,
            "measure": measure,
            "sessions": sessions,
            "value": value,
            "limit": limit,
            "met": met,
        }

    big = max((r["sessions"] for r in rows), default=0)
    out = []
    for model in sorted({r["model"] for r in rows}):
        for sessions in sorted({r["sessions"] for r in rows if r["sessions"] > 1}):
            for kind, words in (("on", "outputs packed"), ("on_single", "outputs unpacked")):
                cell = _row(rows, model, sessions, kind).get("cpu_vs_echo")
                name = (
                    f"{model} C={sessions}, one frame a message, {words}: server CPU per frame "
                    "/ echo's <= 1.15"
                )
                out.append(check(name, cell, 1.15, False, f"cpu_vs_echo_{kind}", sessions))
        out.append(
            check(
                f"{model} C=1: p50 / echo p50 <= 1.3",
                _row(rows, model, 1, "on").get("p50_vs_echo"),
                1.3,
                False,
                "p50_vs_echo",
                1,
            )
        )
        out.append(
            check(
                f"{model} C={big}: mean batch size >= 32",
                _row(rows, model, big, "on").get("mean_batch"),
                32,
                True,
            )
        )
        out.append(
            check(
                f"{model} C={big}: batching on / off frames/s >= 1.5",
                _row(rows, model, big, "on").get("fps_vs_off"),
                1.5,
                True,
            )
        )
    if mem is not None:
        out.append(
            check(
                f"{mem['sessions']:,} idle gru sessions: server RSS growth <= 300 MB",
                mem["total_mb"],
                300,
                False,
            )
        )
    return out


def report(result: dict[str, Any]) -> str:
    """The markdown the docs show, from a results file."""
    rows = summarize(result["runs"])
    goals = targets(rows, result["memory"])
    o = result["options"]
    lines = [
        f"Measured {result['date']} on {load_line(result)}; {o['rounds']} rounds of "
        f"{o['duration']:g} s (after {o['warmup']:g} s of warm-up) per cell, "
        f"{result['seconds'] / 60:.0f} minutes in all. Medians over the rounds, (min-max) beside "
        "them; ratios are taken within each round.",
        "",
        "| model | C | connections | server | frames/s (min-max) | vs echo | vs off | p50 ms "
        "| p99 ms | mean batch | server CPU µs/frame (min-max) | CPU vs echo | requests/frame "
        "| responses/frame |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        kind = r["kind"]
        vs_echo = fmt(r["fps_vs_echo"]["median"], 2) if kind in ECHO_OF else ""
        vs_off = fmt(r["fps_vs_off"]["median"], 2) if kind.startswith("on") else ""
        cpu_vs = fmt(r["cpu_vs_echo"]["median"], 2) if kind in ECHO_OF else ""
        batch = fmt(r["mean_batch"]["median"]) if not kind.startswith("echo") else "-"
        lines.append(
            f"| {r['model']} | {r['sessions']} | {fmt(r['connections'], 0)} | {KINDS[kind][1]} "
            f"| {fmt_spread(r['frames_per_s'], 0)} | {vs_echo} | {vs_off} "
            f"| {fmt(r['p50_ms']['median'], 2)} | {fmt(r['p99_ms']['median'], 2)} | {batch} "
            f"| {fmt_spread(r['cpu_us_per_frame'], 0)} | {cpu_vs} "
            f"| {fmt(r['requests_per_frame'], 2)} | {fmt(r['responses_per_frame'], 2)} |"
        )
    lines += ["", "ONNX Runtime alone, in the same run (one thread, T = 1):", ""]
    lines += ["| model | batch | µs per call | frames/s |", "| --- | ---: | ---: | ---: |"]
    for o_ in result["ort_alone"]:
        lines.append(
            f"| {o_['model']} | {o_['batch']} | {fmt(o_['us_per_call'], 0)} "
            f"| {fmt(o_['frames_per_s'], 0)} |"
        )
    mem = result["memory"]
    if mem is not None:
        lines += [
            "",
            f"Memory: {mem['opened']:,} idle gru sessions grew the server's RSS by "
            f"{mem['total_mb']:.0f} MB ({fmt(mem['bytes_per_session'], 0)} bytes per session; "
            f"{mem['rss_before_mb']:.0f} MB before, {mem['rss_after_mb']:.0f} MB after).",
        ]
    lines += ["", "| target | value (median) | met |", "| --- | ---: | --- |"]
    for g in goals:
        met = "not run" if g["value"] is None else "yes" if g["met"] else "NO"
        lines.append(f"| {g['target']} | {fmt(g['value'], 2)} | {met} |")
    return "\n".join(lines)


# -- memory -------------------------------------------------------------------------------------
async def _open_many(target: str, total: int, streams: int) -> int:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.RnnstreamStub(channel)

    async def one_stream(count: int) -> int:
        call = stub.Stream()
        request = pb.StreamRequest(open=pb.OpenSession(model="gru"))
        for _ in range(count):
            await call.write(request)
        opened = 0
        for _ in range(count):
            response = await call.read()
            opened += response.WhichOneof("kind") == "opened"
        await call.done_writing()
        return opened

    try:
        share = [total // streams + (i < total % streams) for i in range(streams)]
        return sum(await asyncio.gather(*(one_stream(n) for n in share)))
    finally:
        await channel.close()


def memory(sessions: int) -> dict[str, Any]:
    """Server RSS before and after opening `sessions` idle gru sessions over a few streams."""
    server = start_server("on", "rnnstream", "gru")
    try:
        time.sleep(0.5)
        before = server.rss_bytes()
        opened = asyncio.run(_open_many(server.target, sessions, streams=4))
        time.sleep(0.5)
        after = server.rss_bytes()
    finally:
        server.stop()
    grown = after - before
    return {
        "sessions": sessions,
        "opened": opened,
        "rss_before_mb": before / 1e6,
        "rss_after_mb": after / 1e6,
        "total_mb": grown / 1e6,
        "bytes_per_session": grown / opened if opened else None,
    }


def main() -> None:
    parser = bench_parser(__doc__, NAME)
    parser.add_argument("--models", default="gru,lstm")
    parser.add_argument("--sessions", default="1,64,512", help="C values, comma-separated")
    parser.add_argument("--memory-sessions", type=int, default=100_000, help="0 skips it")
    args = parser.parse_args()
    if reported_only(args, NAME, report) is not None:
        return
    started = time.monotonic()
    info = {
        "machine": machine(),
        "quiet_machine": wait_for_quiet(args.quiet_load, args.quiet_timeout),
    }
    print(f"{load_line(info)}", flush=True)
    models = [m for m in args.models.split(",") if m]
    counts = [int(c) for c in args.sessions.split(",")]
    ort = [row for m in models for row in ort_alone(m, [1, 64, 512], 2.0)]
    runs: list[dict[str, Any]] = []
    servers = {}
    try:
        for name, (kind, flags) in SERVERS.items():
            servers[name] = start_server(name, kind, ",".join(models), *flags)
        for round_ in range(args.rounds):
            for model in models:
                for sessions in counts:
                    for kind in kinds_for(sessions):
                        server = servers[KINDS[kind][0]]
                        flags = run_flags(kind, sessions, args.client_processes)
                        run = measure(server, model, args.duration, args.warmup, flags)
                        run.update(model=model, sessions_asked=sessions, kind=kind, round=round_)
                        runs.append(run)
                        print(
                            f"round {round_ + 1} {model} C={sessions} {kind}: "
                            f"{run['frames_per_s']:,.0f} frames/s, p50 {run['p50_ms']} ms, "
                            f"{fmt(run['cpu_us_per_frame'], 0)} µs/frame",
                            flush=True,
                        )
    finally:
        for server in servers.values():
            server.stop()
    mem = memory(args.memory_sessions) if args.memory_sessions else None
    finish(args, started, info, report, ort_alone=ort, memory=mem, runs=runs)


if __name__ == "__main__":
    main()
