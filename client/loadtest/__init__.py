"""Load generator behind `rnnstream loadtest`; `run_loadtest(options)` drives it from Python."""

from rnnstream.loadtest._command import command
from rnnstream.loadtest._options import LoadtestOptions, OptionsError, add_arguments
from rnnstream.loadtest._report import Report
from rnnstream.loadtest._runner import LoadtestError, Progress, run_loadtest

__all__ = [
    "LoadtestError",
    "LoadtestOptions",
    "OptionsError",
    "Progress",
    "Report",
    "add_arguments",
    "command",
    "run_loadtest",
]
