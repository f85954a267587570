"""--plot: latency percentiles and throughput per second, drawn with matplotlib (extra `plot`)."""

from __future__ import annotations

from pathlib import Path

from rnnstream.loadtest._options import OptionsError
from rnnstream.loadtest._report import Report

__all__ = ["write_plot"]


def write_plot(report: Report, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
        from matplotlib.ticker import ScalarFormatter
    except ImportError:
        raise OptionsError("--plot needs matplotlib: pip install 'rnnstream[plot]'") from None
    seconds = [s.second for s in report.timeline]
    figure, (lat, thr) = plt.subplots(2, 1, sharex=True, figsize=(9, 6))
    for key, label in (("p50", "p50"), ("p99", "p99"), ("max", "max")):
        values = [s.latency_ms[key] for s in report.timeline]
        lat.plot(seconds, [float("nan") if v is None else v for v in values], label=label)
    lat.set_ylabel("latency (ms)")
    lat.set_yscale("log")
    lat.yaxis.set_major_formatter(ScalarFormatter())
    lat.legend(loc="upper left")
    lat.grid(True, alpha=0.3)
    thr.plot(seconds, [s.answered for s in report.timeline], label="answered")
    if any(s.failed for s in report.timeline):
        thr.plot(seconds, [s.failed for s in report.timeline], label="failed", color="red")
    if report.options.total_rate is not None:
        thr.axhline(report.options.total_rate, linestyle="--", color="gray", label="target rate")
    thr.set_ylabel("frames/s")
    thr.set_xlabel("second of the measured run")
    thr.legend(loc="lower left")
    thr.grid(True, alpha=0.3)
    o = report.options
    figure.suptitle(f"rnnstream loadtest: {o.model}, {o.sessions} sessions")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
