"""Load generator behind `rnnstream loadtest`; `run_loadtest(options)` drives it from Python."""

from client._loadtest._command import command
from client._loadtest._options import LoadtestOptions, OptionsError, add_arguments
from client._loadtest._report import Report
from client._loadtest._runner import LoadtestError, Progress, run_loadtest

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
