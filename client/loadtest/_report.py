"""The load test's result: its numbers, the exit verdict, the JSON form and the printed table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from rnnstream.loadtest._options import LoadtestOptions
from rnnstream.loadtest._stats import SecondTotals
from rnnstream.loadtest._verify import TOLERANCE, VerifyStats

__all__ = ["Report", "print_report", "progress_text", "render_table"]


@dataclass
class Report:
    """Counts cover measured frames only (sent after the warm-up): sent = answered + failed."""

    options: LoadtestOptions
    sessions_opened: int
    sessions_failed: dict[str, int]
    open_latency_ms: dict[str, float | None]
    sent: int
    answered: int
    failed: dict[str, int]
    duration_s: float
    latency_ms: dict[str, float | None]
    timeline: list[SecondTotals]
    histograms: dict[str, str]  # encoded HDR histograms in microseconds, to merge elsewhere
    verify: VerifyStats | None = None
    interrupted: bool = False
    connections: int = 1
    errors: list[str] = field(default_factory=list)  # what kept (part of) the run from running
    # Frames answered after their spilled session was restored from the server's state store,
    # their latency, and the latency of the others (session in memory), from the same run.
    restores: int = 0
    restored_latency_ms: dict[str, float | None] = field(default_factory=dict)
    resident_latency_ms: dict[str, float | None] = field(default_factory=dict)

    @property
    def frames_failed(self) -> int:
        return sum(self.failed.values())

    @property
    def frames_per_second(self) -> float:
        return self.answered / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_rate(self) -> float:
        """Failed requests over requests, where session opens and frames are both requests."""
        requests = self.sent + self.options.sessions
        failures = self.frames_failed + sum(self.sessions_failed.values())
        return failures / requests if requests else 0.0

    @property
    def problems(self) -> list[str]:
        """Why the run fails its gate; empty when it passes."""
        out: list[str] = list(self.errors)
        if self.error_rate > self.options.max_error_rate:
            out.append(
                f"error rate {self.error_rate:.4%} exceeds --max-error-rate "
                f"{self.options.max_error_rate:.4%}"
            )
        if self.verify is not None and self.verify.mismatched_frames:
            out.append(
                f"{self.verify.mismatched_frames} frames in {self.verify.mismatched_sessions} "
                f"sessions differ from the local reference by more than {TOLERANCE:g}"
            )
        if self.verify is not None and self.verify.reference_error:
            out.append(f"--verify-model failed on the served frames: {self.verify.reference_error}")
        if self.verify is not None and self.answered and not self.verify.frames_checked:
            out.append("--verify checked no frame")
        return out

    @property
    def passed(self) -> bool:
        return not self.problems and not self.interrupted

    def to_dict(self) -> dict[str, Any]:
        o = self.options
        return {
            "target": o.target,
            "model": o.model,
            "mode": "open" if o.open_loop else "closed",
            "options": o.to_dict(),
            "connections": self.connections,
            "interrupted": self.interrupted,
            "sessions": {
                "requested": o.sessions,
                "opened": self.sessions_opened,
                "failed": dict(sorted(self.sessions_failed.items())),
                "open_latency_ms": self.open_latency_ms,
            },
            "frames": {
                "sent": self.sent,
                "answered": self.answered,
                "failed": self.frames_failed,
                "failed_by_code": dict(sorted(self.failed.items())),
            },
            "duration_s": self.duration_s,
            "frames_per_second": self.frames_per_second,
            "target_rate": o.total_rate,
            "latency_ms": self.latency_ms,
            "restores": {
                "frames": self.restores,
                "latency_ms": self.restored_latency_ms,
                "in_memory_latency_ms": self.resident_latency_ms,
            },
            "error_rate": self.error_rate,
            "verify": None
            if self.verify is None
            else {
                "frames_checked": self.verify.frames_checked,
                "mismatched_frames": self.verify.mismatched_frames,
                "mismatched_sessions": self.verify.mismatched_sessions,
                "unchecked_sessions": self.verify.unchecked_sessions,
                "max_abs_diff": self.verify.max_abs_diff,
                "reference_error": self.verify.reference_error or None,
                "tolerance": TOLERANCE,
            },
            "timeline": [s.to_dict() for s in self.timeline],
            "histograms": self.histograms,
            "passed": self.passed,
            "problems": self.problems,
            "errors": self.errors,
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _codes(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "0"


def render_table(report: Report) -> Table:
    o = report.options
    if o.session_rate is not None:
        mode = f"open loop, {o.session_rate:g} frames/s per session ({o.total_rate:g} in all)"
    elif o.rate is not None:
        mode = f"open loop, {o.rate:g} frames/s {o.arrivals}"
    elif o.sessions_per_message > 1:
        mode = f"closed loop, one message in flight per {o.sessions_per_message} sessions"
    else:
        mode = f"closed loop, {o.window} in flight per session"
    title = f"rnnstream loadtest: {o.model} @ {o.target}"
    if report.interrupted:
        title += " (interrupted)"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what", style="bold")
    table.add_column("value")
    table.add_row("mode", mode)
    table.add_row(
        "sessions",
        f"{report.sessions_opened} opened of {o.sessions} over "
        f"{report.connections} connections, {o.processes} processes",
    )
    if report.sessions_failed:
        table.add_row("sessions refused", _codes(report.sessions_failed))
    table.add_row(
        "session open",
        f"p50 {_ms(report.open_latency_ms['p50'])}, "
        f"p99 {_ms(report.open_latency_ms['p99'])}, "
        f"max {_ms(report.open_latency_ms['max'])}",
    )
    table.add_row(
        "duration",
        f"{report.duration_s:.2f} s measured"
        + (f" after {o.warmup:g} s warm-up" if o.warmup else ""),
    )
    table.add_row("frames sent", f"{report.sent}")
    table.add_row("frames answered", f"{report.answered}")
    table.add_row("frames failed", _codes(report.failed))
    table.add_row("throughput", f"{report.frames_per_second:,.1f} frames/s")
    lat = report.latency_ms
    for name in ("p50", "p90", "p99", "p99.9", "max"):
        table.add_row(f"latency {name}", _ms(lat[name]))
    if report.restores:
        restored, resident = report.restored_latency_ms, report.resident_latency_ms
        table.add_row(
            "restores",
            f"{report.restores} frames restored a spilled session: p50 "
            f"{_ms(restored.get('p50'))}, p99 {_ms(restored.get('p99'))}, max "
            f"{_ms(restored.get('max'))} (in memory: p99 {_ms(resident.get('p99'))})",
        )
    if report.verify is not None:
        v = report.verify
        table.add_row(
            "verify",
            f"{v.frames_checked} frames checked, {v.mismatched_frames} "
            f"mismatched in {v.mismatched_sessions} sessions "
            f"(max |diff| {v.max_abs_diff:.2e})",
        )
    table.add_row("error rate", f"{report.error_rate:.4%}")
    if report.interrupted:
        verdict = Text("INTERRUPTED: gates nothing", style="yellow")
    elif report.passed:
        verdict = Text("PASS", style="green")
    else:
        verdict = Text("FAIL: " + "; ".join(report.problems), style="red")
    table.add_row("result", verdict)
    return table


def print_report(report: Report, console: Console | None = None) -> None:
    (console or Console()).print(render_table(report))


def progress_text(
    elapsed: float | None,
    warmup: float,
    answered: int,
    failed: int,
    rate: float,
    p99_ms: float | None,
) -> Text:
    if elapsed is None:
        return Text("opening sessions...")
    if elapsed < 0:
        return Text(f"warming up: {-elapsed:.1f} s to go")
    p99 = "-" if p99_ms is None else f"{p99_ms:.2f} ms"
    return Text(
        f"{elapsed:6.1f} s  {answered:>10,} answered  {failed:>6,} failed  "
        f"{rate:>10,.0f} frames/s  p99 {p99}"
    )
