"""The benchmark tables in docs/performance.md are what each bench/ script's --report-only makes
of its committed results file: a table is never pasted by hand or left behind its results."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import ModuleType

import pytest

from tests.conftest import REPO

BENCH = REPO / "bench"
DOC = REPO / "docs" / "performance.md"
# Every benchmark whose results are committed.
GENERATED = ("many", "batching", "pacing", "pacing_after", "workers", "redis_store")


def _bench(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))  # the scripts import their shared helpers as _common
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name", GENERATED)
def test_the_docs_table_is_the_committed_result(name: str) -> None:
    module = _bench(name)
    result = json.loads((BENCH / "results" / f"{name}.json").read_text())
    common = sys.modules["_common"]
    assert common.docs_section(DOC.read_text(), name) == module.report(result), (
        f"docs/performance.md's {name} table differs from bench/results/{name}.json: run "
        f"python bench/{name}.py --report-only bench/results/{name}.json --write-docs"
    )


@pytest.mark.parametrize("name", GENERATED)
def test_results_are_real_runs(name: str) -> None:
    """Every committed result ran at least 10 s a run and 5 rounds, and says how loaded the
    machine was."""
    result = json.loads((BENCH / "results" / f"{name}.json").read_text())
    options = result["options"]
    assert options["duration"] >= 10 and options["rounds"] >= 5
    assert "load_average_at_start" in result["quiet_machine"]


def test_the_readme_table_is_the_committed_result() -> None:
    module = _bench("many")
    result = json.loads((BENCH / "results" / "many.json").read_text())
    common = sys.modules["_common"]
    readme = (REPO / "README.md").read_text()
    assert common.docs_section(readme, "many_summary", "many") == module.summary(result), (
        "README.md's table differs from bench/results/many.json: run "
        "python bench/many.py --report-only bench/results/many.json --write-docs"
    )


def test_the_targets_table_is_the_committed_results() -> None:
    module = _bench("targets")
    common = sys.modules["_common"]
    assert common.docs_section(DOC.read_text(), "targets") == module.report(), (
        "docs/performance.md's targets table differs from bench/results/: run "
        "python bench/targets.py --report-only --write-docs"
    )
