"""bench/fleet.py's committed results and the tables docs/performance.md shows of them agree
(the docs are generated: bench/fleet.py --report-only bench/results/fleet.json --write-docs)."""

from __future__ import annotations

import json
from pathlib import Path

from bench._fleet_report import DOC, docs_block, targets

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results" / "fleet.json"


def test_the_docs_table_is_the_committed_results() -> None:
    result = json.loads(RESULTS.read_text())
    assert docs_block(result) in DOC.read_text()


def test_every_target_is_reported_met_or_missed() -> None:
    result = json.loads(RESULTS.read_text())
    rows = targets(result)
    assert len(rows) == 5
    block = docs_block(result)
    for target, measured, met in rows:
        assert f"| {target} | {measured} | {'met' if met else '**missed**'} |" in block
