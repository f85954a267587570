"""`rnnstream loadtest`: flags in, live progress line, final table, JSON and plot out."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.live import Live
from rich.text import Text

from rnnstream.loadtest._options import OptionsError, from_args
from rnnstream.loadtest._plot import write_plot
from rnnstream.loadtest._report import print_report
from rnnstream.loadtest._runner import LoadtestError, Progress, run_loadtest

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_UNUSABLE", "command"]

EXIT_FAILED = 1  # the gate: error rate above --max-error-rate, or a verify mismatch
EXIT_UNUSABLE = 2  # bad options, unreachable server, unknown model
EXIT_INTERRUPTED = 130  # Ctrl-C: the table shows what was measured, but it gates nothing


def command(args: argparse.Namespace) -> int:
    err = Console(stderr=True, soft_wrap=True)  # an error is one line, however long
    try:
        options = from_args(args)
    except OptionsError as exc:
        err.print(f"rnnstream loadtest: {exc}", markup=False, highlight=False)
        return EXIT_UNUSABLE
    live = (
        Live(Text("opening sessions..."), console=err, transient=True, refresh_per_second=4)
        if options.progress and err.is_terminal
        else None
    )

    def show(progress: Progress) -> None:
        if live is not None:
            live.update(progress.text(options.warmup))

    try:
        if live is not None:
            live.start()
        try:
            # Without a live line nothing reads the progress, and working out its p99 twice a
            # second would take the GIL from the worker thread that sends the load.
            report = run_loadtest(options, show if live is not None else None)
        finally:
            if live is not None:
                live.stop()
    except (OptionsError, LoadtestError) as exc:
        err.print(f"rnnstream loadtest: {exc}", markup=False, highlight=False)
        return EXIT_UNUSABLE
    print_report(report, Console(file=sys.stdout, width=max(100, Console().width)))
    if options.json_path is not None:
        report.write_json(options.json_path)
    if options.plot_path is not None:
        try:
            write_plot(report, options.plot_path)
        except OptionsError as exc:
            err.print(f"rnnstream loadtest: {exc}", markup=False, highlight=False)
            return EXIT_UNUSABLE
    if report.interrupted:
        return EXIT_INTERRUPTED
    return 0 if report.passed else EXIT_FAILED
