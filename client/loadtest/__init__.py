"""Load generator behind `rnnstream loadtest`; `run_loadtest(options)` drives it from Python.

The run and its report need the extra `loadtest` (rich, hdrhistogram): they are imported on
first use, and say so when it is missing. `LoadtestOptions` and `add_arguments` need nothing.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rnnstream.loadtest._options import LoadtestOptions, OptionsError, add_arguments

if TYPE_CHECKING:
    from rnnstream.loadtest._command import command
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

_HOMES = {
    "LoadtestError": "rnnstream.loadtest._runner",
    "Progress": "rnnstream.loadtest._runner",
    "Report": "rnnstream.loadtest._report",
    "command": "rnnstream.loadtest._command",
    "run_loadtest": "rnnstream.loadtest._runner",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rnnstream._extras import require

    require("loadtest", "rnnstream.loadtest")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
