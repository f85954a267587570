"""docs/production.md's table of hostile clients is what `bench/hostile.py --report-only` makes
of the committed bench/results/hostile.json: never pasted by hand or left behind its results."""

from __future__ import annotations

import importlib.util
import json
from types import ModuleType
from typing import Any

from tests.conftest import REPO

RESULTS = REPO / "bench" / "results" / "hostile.json"


def _hostile() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_hostile", REPO / "bench" / "hostile.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(RESULTS.read_text())
    return result


def test_the_docs_table_is_the_committed_result() -> None:
    hostile = _hostile()
    text = (REPO / "docs" / "production.md").read_text()
    table = text.split(hostile.START, 1)[1].split(hostile.END, 1)[0].strip("\n")
    assert table == hostile.markdown(_results()), (
        "docs/production.md's hostile-client table differs from bench/results/hostile.json: run "
        "python bench/hostile.py --report-only bench/results/hostile.json"
    )


def test_the_result_is_a_whole_run() -> None:
    """Every case the issue names, each memory case at least 3 runs, the forecast case at least 5
    rounds, and how loaded the machine was."""
    result = _results()
    assert [row["case"] for row in result["memory"]] == ["10", "11", "12", "13"]
    assert all(len(row["runs"]) >= 3 for row in result["memory"])
    assert len(result["latency"]["rounds"]) >= 5
    machine = result["machine"]
    assert "load_average_at_start" in machine and "load_average_at_end" in machine
