"""`rnnstream loadtest --session-rate`: many sparse sessions, each on its own open-loop clock."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from rnnstream.loadtest import LoadtestOptions, run_loadtest
from rnnstream.loadtest._options import OptionsError
from rnnstream.loadtest._stats import decode_histogram
from tests.conftest import MODELS, RunningServer
from tests.services import RedisServer
from tests.test_loadtest import cli


def test_each_session_sends_at_its_own_rate(server: RunningServer) -> None:
    sessions, per_session, seconds = 40, 5.0, 2.0
    options = LoadtestOptions(
        model="gru",
        target=server.target,
        sessions=sessions,
        session_rate=per_session,
        duration=seconds,
        warmup=0.2,
        verify=True,
        verify_model=MODELS / "gru" / "model.onnx",
        progress=False,
    )
    sent: Counter[str] = Counter()
    original = server.engine.submit

    def counting(principal: str, session_id: str, *args: object, **kwargs: object) -> bool:
        sent[session_id] += 1
        return original(principal, session_id, *args, **kwargs)  # type: ignore[arg-type]

    groups = server.engine.groups
    original_group = groups.submit

    def counting_group(principal: str, model: str, ids: list[str], *args: object) -> list[str]:
        sent.update(ids)  # frames due together travel in one FrameGroup
        return original_group(principal, model, ids, *args)  # type: ignore[arg-type]

    server.engine.submit = counting  # type: ignore[method-assign]
    groups.submit = counting_group  # type: ignore[method-assign]
    try:
        report = run_loadtest(options)
    finally:
        del server.engine.submit
        del groups.submit
    assert report.frames_failed == 0 and report.sent == report.answered
    # Due times are origin + n / (sessions * rate), handed to the sessions in turn.
    assert abs(report.answered - sessions * per_session * seconds) <= 1
    assert len(sent) == sessions
    expected = per_session * (seconds + 0.2)  # the warm-up's frames are sent, not measured
    assert all(abs(n - expected) <= 1 for n in sent.values()), sent
    assert report.verify is not None and report.verify.frames_checked == sum(sent.values())
    assert report.verify.mismatched_frames == 0
    assert report.restores == 0  # no state store: nothing spilled, nothing restored
    assert report.to_dict()["target_rate"] == sessions * per_session


def test_session_rate_is_checked_and_reported(server: RunningServer, tmp_path: object) -> None:
    with pytest.raises(OptionsError, match="give one"):
        LoadtestOptions(model="gru", rate=10, session_rate=1).checked()
    with pytest.raises(OptionsError, match="--session-rate must be a positive number"):
        LoadtestOptions(model="gru", session_rate=0).checked()
    rc, stdout, _, stderr = cli(
        "--target", server.target, "--model", "gru", "--sessions", "4",
        "--session-rate", "10", "--duration", "0.5",
    )  # fmt: skip
    assert rc == 0, stderr + stdout
    assert "open loop, 10 frames/s per session (40 in all)" in stdout


def test_restores_are_counted_and_verified(make_server: Any, tmp_path: Path) -> None:
    store = RedisServer(tmp_path)
    try:
        server = make_server(
            state_store=store.url, spill_after=0.1, session_ttl=60, models=("gru",)
        )
        options = LoadtestOptions(
            model="gru",
            target=server.target,
            sessions=20,
            session_rate=2.0,  # a frame every 0.5 s: each session spills between its frames
            duration=3.0,
            warmup=0.5,
            verify=True,
            verify_model=MODELS / "gru" / "model.onnx",
            progress=False,
        )
        report = run_loadtest(options)
    finally:
        store.stop()
    assert report.frames_failed == 0 and report.answered == 120
    assert report.verify is not None and report.verify.mismatched_frames == 0
    assert report.restores > 0
    assert report.restores <= report.answered
    latency = report.to_dict()["restores"]
    assert latency["frames"] == report.restores
    assert latency["latency_ms"]["p50"] is not None
    restored = decode_histogram(report.histograms["restored_latency_us"])
    resident = decode_histogram(report.histograms["resident_latency_us"])
    assert restored.get_total_count() == report.restores
    assert restored.get_total_count() + resident.get_total_count() == report.answered
