"""The tables of bench/fleet.py, rendered from its results file, and the block of
docs/performance.md they fill (tests/test_bench_fleet.py checks the two agree)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["DOC", "docs_block", "report_tables", "targets", "write_docs"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "performance.md"
BEGIN = "<!-- bench:fleet (generated: python bench/fleet.py --report-only) -->"
END = "<!-- /bench:fleet -->"

MAX_BEYOND_STATE = 1536  # bytes an idle session may cost beyond its state
MAX_GROWTH = 1.5e9  # bytes of RSS growth for the million idle sessions (decimal GB)
MIN_OPEN_RATE = 20_000.0  # sessions opened a second
MAX_RESTORE_EXTRA_MS = 2.0  # restored frames' p99 above in-memory frames' p99
MAX_SPILLED_RATIO = 1.10  # RSS after the spilled sessions left, over RSS before they opened


def _spread(values: list[float], fmt: Callable[[float], str]) -> str:
    """The median, and the range over runs when there were several."""
    median = statistics.median(values)
    if len(values) < 2:
        return fmt(median)
    return f"{fmt(median)} ({fmt(min(values))} to {fmt(max(values))}, {len(values)} runs)"


def _restore_extra(run: dict[str, Any]) -> float:
    return float(run["cold"]["restored_ms"]["p99"] - run["hot"]["in_memory_ms"]["p99"])


def targets(result: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured with its spread, met) for each of the issue's targets; a target is met
    only when every run met it."""
    idle, restore, spilled = result["idle"], result["restore"], result["spilled"]
    rows: list[tuple[str, str, bool]] = []
    count = idle[0]["sessions"]
    beyond = [r["bytes_per_session"] - r["state_bytes_per_session"] for r in idle]
    rows.append(
        (
            f"an idle session costs at most {MAX_BEYOND_STATE:,} bytes beyond its state",
            _spread(beyond, lambda v: f"{v:,.0f} bytes"),
            max(beyond) <= MAX_BEYOND_STATE,
        )
    )
    growth = [float(r["rss_growth_bytes"]) for r in idle]
    rows.append(
        (
            f"{count:,} idle gru sessions within {MAX_GROWTH / 1e9:g} GB of RSS growth",
            _spread(growth, lambda v: f"{v / 1e9:.2f} GB"),
            max(growth) <= MAX_GROWTH and count >= 1_000_000,
        )
    )
    rates = [float(r["sessions_per_s"]) for r in idle]
    rows.append(
        (
            f"opened at >= {MIN_OPEN_RATE:,.0f} sessions/s over {idle[0]['streams']} streams",
            _spread(rates, lambda v: f"{v:,.0f}/s"),
            min(rates) >= MIN_OPEN_RATE,
        )
    )
    extra = [_restore_extra(r) for r in restore]
    cold = [float(r["cold"]["restored_ms"]["p99"]) for r in restore]
    hot = [float(r["hot"]["in_memory_ms"]["p99"]) for r in restore]
    rows.append(
        (
            f"first frame after a spill: p99 at most {MAX_RESTORE_EXTRA_MS:g} ms above a frame "
            "in memory (same run, local Redis)",
            _spread(extra, lambda v: f"{v:+.2f} ms")
            + f" (p99 restored {statistics.median(cold):.2f} ms, in memory "
            f"{statistics.median(hot):.2f} ms)",
            max(extra) <= MAX_RESTORE_EXTRA_MS,
        )
    )
    ratio = [float(r["after_over_before"]) for r in spilled]
    rows.append(
        (
            f"{spilled[0]['sessions']:,} spilled sessions leave RSS within "
            f"{MAX_SPILLED_RATIO - 1:.0%} of before they opened",
            _spread(ratio, lambda v: f"{v - 1:+.1%}"),
            max(ratio) <= MAX_SPILLED_RATIO,
        )
    )
    return rows


def _ms(values: dict[str, float | None], key: str) -> str:
    value = values.get(key)
    return "-" if value is None else f"{value:.2f}"


def report_tables(result: dict[str, Any]) -> str:
    """Markdown: the targets, then each run's figures."""
    machine = result["machine"]
    lines = [
        f"Measured {result['started']} on {machine['cpu']} ({machine['cores']} cores), Python "
        f"{machine['python']}; load average {result['load_before'][0]:.2f} before, "
        f"{result['load_after'][0]:.2f} after. Medians, with the range over the runs.",
        "",
        "| target | measured | |",
        "| --- | --- | --- |",
    ]
    for target, measured, met in targets(result):
        lines.append(f"| {target} | {measured} | {'met' if met else '**missed**'} |")
    lines += [
        "",
        "Idle sessions (one server each run; RSS from outside, after a sweep):",
        "",
        "| run | sessions | streams | opened in | sessions/s | server CPU | RSS before | "
        "RSS after | bytes/session | beyond the 512-byte state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(result["idle"], 1):
        lines.append(
            f"| {i} | {r['sessions']:,} | {r['streams']} | {r['seconds']:.1f} s | "
            f"{r['sessions_per_s']:,.0f} | {r['server_cpu_s']:.1f} s | "
            f"{r['rss_before_bytes'] / 2**20:,.0f} MiB | {r['rss_after_bytes'] / 2**20:,.0f} MiB | "
            f"{r['bytes_per_session']:,.0f} | "
            f"{r['bytes_per_session'] - r['state_bytes_per_session']:,.0f} |"
        )
    lines += [
        "",
        "Frames on sessions in memory and frames that bring a spilled session back (two load "
        "tests at once on one server, `--spill-after "
        f"{result['restore'][0]['spill_after_s']:g}`, local Redis, `--verify` on; latency in "
        "ms from each frame's due time):",
        "",
        "| run | frames | p50 | p99 | p99.9 | max | verified | mismatched |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(result["restore"], 1):
        for name, side, key in (
            (f"in memory ({r['hot']['sessions']} sessions)", r["hot"], "in_memory_ms"),
            (f"restored ({r['cold']['sessions']} sessions)", r["cold"], "restored_ms"),
        ):
            restored = side["restores"]
            frames = side["frames"] - restored if key == "in_memory_ms" else restored
            lat = side[key]
            lines.append(
                f"| {i}: {name} | {frames:,} | {_ms(lat, 'p50')} | {_ms(lat, 'p99')} | "
                f"{_ms(lat, 'p99.9')} | {_ms(lat, 'max')} | {side['verified']:,} | "
                f"{side['mismatched']} |"
            )
    lines += [
        "",
        "Spilled sessions (opened, their streams closed, all spilled; RSS from outside):",
        "",
        "| run | sessions | RSS before | RSS opened | RSS after spilling | after / before | "
        "in memory after | Redis bytes/session |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for i, r in enumerate(result["spilled"], 1):
        lines.append(
            f"| {i} | {r['sessions']:,} | {r['rss_before_bytes'] / 2**20:,.0f} MiB | "
            f"{r['rss_opened_bytes'] / 2**20:,.0f} MiB | {r['rss_after_bytes'] / 2**20:,.0f} MiB "
            f"| {r['after_over_before']:.3f} | {r['in_memory_after']:,.0f} | "
            f"{r['redis_bytes_per_session']:,.0f} |"
        )
    return "\n".join(lines)


def docs_block(result: dict[str, Any]) -> str:
    return f"{BEGIN}\n{report_tables(result)}\n{END}"


def write_docs(result: dict[str, Any], doc: Path = DOC) -> None:
    """Replace the generated block of docs/performance.md with these results' tables."""
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + docs_block(result) + text[end:])
