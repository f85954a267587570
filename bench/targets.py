"""The targets of the streaming-throughput work in one table, read from the committed results of
bench/many.py, batching.py, workers.py, pacing.py, pacing_after.py and gpu.py (unmeasured where
a results file is missing), written into docs/performance.md between its bench:targets markers.

    python bench/targets.py --report-only --write-docs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batching
import gpu
import many
import pacing
import pacing_after
import workers
from _common import PERFORMANCE_MD, RESULTS, fmt, write_docs_section

from rnnstream.server.core._arrivals import MAX_GATHER_SECONDS

NAME = "targets"
# Results whose runs must each last 10 s or more, 5 rounds or more.
TIMED = ("many", "batching", "workers", "pacing", "pacing_after")


def _load(name: str, folder: Path) -> dict[str, Any] | None:
    path = folder / f"{name}.json"
    return dict(json.loads(path.read_text())) if path.exists() else None


def _met(flag: bool) -> str:
    return "yes" if flag else "no"


def _many_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    goals = many.targets(many.summarize(result))
    rows = [
        (
            f"{g['model']}, 512 sessions a message on one connection: >= 0.25x ORT alone at "
            "batch 512",
            f"{fmt(g['value'], 3)}x",
            _met(g["met"]),
        )
        for g in goals
        if g["measure"] == "vs_ort"
    ]
    tenfold = [g for g in goals if g["measure"] == "vs_single"]
    if tenfold:
        rows.append(
            (
                "512 sessions a message: >= 10x one frame a message (each model)",
                ", ".join(f"{fmt(g['value'], 1)}x" for g in tenfold),
                _met(all(g["met"] for g in tenfold)),
            )
        )
    return rows


def _batching_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    goals = batching.targets(batching.summarize(result["runs"]), result.get("memory"))
    unpacked = [g for g in goals if g["measure"] == "cpu_vs_echo_on_single"]
    rows = []
    if unpacked:
        rows.append(
            (
                "one frame a message: server CPU per message <= 1.15x the read-ahead echo server's,"
                " like for like (outputs unpacked)",
                ", ".join(f"{fmt(g['value'], 2)}x (C={g['sessions']})" for g in unpacked),
                _met(all(g["met"] for g in unpacked)),
            )
        )
    for g in goals:
        if g["measure"] == "p50_vs_echo":
            value = "not run" if g["value"] is None else f"{fmt(g['value'], 2)}x"
            rows.append(
                (g["target"], value, "unmeasured" if g["value"] is None else _met(g["met"]))
            )
    return rows


def _workers_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    cores = result["machine"].get("cores")
    for row in workers.summarize(result):
        n = row["workers"]
        if n == 1:
            continue
        ratio = row["vs_one"]["median"]
        met = ratio is not None and ratio >= 0.8 * n
        where = f" on {cores} cores shared with the load generator" if cores else ""
        rows.append(
            (
                "`--workers N` >= 0.8 N x one worker (load generator on cores of its own)",
                f"{n} workers: {fmt(ratio, 2)}x one worker{where}",
                _met(met) + ("" if met else " (needs 2N + 2 cores)"),
            )
        )
    return rows


def _pacing_rows(
    knobs: dict[str, Any] | None, after: dict[str, Any] | None
) -> list[tuple[str, str, str]]:
    rows = []
    if knobs is not None:
        decided = pacing.decisions(pacing.verdicts(pacing.summarize(knobs)))
        removed = [k for k, d in decided.items() if d == "remove"]
        measured = f"{len(removed)} of {len(decided)} removed by that rule"
        if after is not None:
            ratios = pacing_after.removed_vs_kept(pacing_after.summarize(after))
            higher = sum(1 for _, r in ratios if r["p50_ms"] is not None and r["p50_ms"] > 1)
            measured += f"; without them p50 is higher on {higher} of {len(ratios)} workloads"
        rows.append(
            (
                "pacing knobs: keep one only where it wins on a workload it was not tuned on",
                measured,
                "done (at a latency cost)" if after is not None else "done",
            )
        )
    if after is not None and after.get("gather_buckets"):
        buckets = after["gather_buckets"]
        total = buckets["+Inf"]
        over = total - next((v for k, v in buckets.items() if float(k) == 2e-3), total)
        rows.append(
            (
                "worst-case added wait documented, ModelConfig reports it",
                f"{MAX_GATHER_SECONDS * 1e3:g} ms bound plus the loop turn under way "
                f"({over / total:.1%} of gatherings over 2 ms); ModelConfig says "
                f"{MAX_GATHER_SECONDS * 1e6:.0f} µs",
                "documented",
            )
        )
    return rows


def _gpu_rows(result: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    name = (
        "GPU: lstm hidden 1024 at batch 1,024 on CUDA >= 10x the CPU provider; server >= 0.5x "
        "ORT alone on the GPU"
    )
    if result is None or not result.get("cuda"):
        return [(name, "no GPU has run bench/gpu.py", "unmeasured")]
    goals = gpu.targets(result)
    return [(g["target"], f"{fmt(g['value'], 2)}x", _met(g["met"])) for g in goals]


def report(folder: Path = RESULTS) -> str:
    found = {name: _load(name, folder) for name in (*TIMED, "gpu")}
    rows: list[tuple[str, str, str]] = []
    if found["many"] is not None:
        rows += _many_rows(found["many"])
    if found["batching"] is not None:
        rows += _batching_rows(found["batching"])
    if found["workers"] is not None:
        rows += _workers_rows(found["workers"])
    rows += _pacing_rows(found["pacing"], found["pacing_after"])
    timed = [r for name, r in found.items() if name in TIMED and r is not None]
    long_enough = all(r["options"]["duration"] >= 10 and r["options"]["rounds"] >= 5 for r in timed)
    shortest = min(r["options"]["duration"] for r in timed)
    fewest = min(r["options"]["rounds"] for r in timed)
    rows.append(
        (
            "runs >= 10 s, 5 rounds, spread and connections in every table",
            f"{len(timed)} results files, every run {shortest:g} s or more, {fewest} rounds or "
            "more",
            _met(long_enough),
        )
    )
    rows += _gpu_rows(found["gpu"])
    lines = [
        "Generated from the results committed under bench/results/ "
        "(`python bench/targets.py --report-only --write-docs`); each figure is the median of its "
        "benchmark's rounds, explained under its table below.",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {target} | {measured} | {met} |" for target, measured, met in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--report-only", action="store_true", help="(the only mode: it runs nothing)"
    )
    parser.add_argument("--write-docs", action="store_true", help="update docs/performance.md")
    args = parser.parse_args()
    table = report()
    print(table)
    if args.write_docs:
        write_docs_section(PERFORMANCE_MD, NAME, table)


if __name__ == "__main__":
    main()
