"""`rnnstream loadtest --sessions-per-message K`: K sessions' frames per message, closed loop per
group, every output checked by --verify, exact counts, and a wrong model still caught."""

from __future__ import annotations

from pathlib import Path

from tests import probe
from tests.conftest import RunningServer
from tests.test_loadtest import GRU, cli, perturbed_copy


def test_groups_of_sessions_verified_and_counted(server: RunningServer, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    before = server.run(lambda: server.engine.model_stats("gru").frames)
    rc, stdout, report, stderr = cli(
        *("--target", server.target, "--model", "gru", "--sessions", "20"),
        *("--sessions-per-message", "8", "--frames-per-session", "30", "--processes", "2"),
        *("--connections", "2", "--verify", "--verify-model", str(GRU)),
        *("--json", str(report_path)),
    )
    assert rc == 0, stderr + stdout
    assert report is not None
    # 20 sessions, 10 a process, in groups of 8 and 2: 30 messages each group.
    assert (report["frames"]["sent"], report["frames"]["answered"]) == (600, 600)
    assert report["frames"]["failed"] == 0
    assert report["verify"]["frames_checked"] == 600
    assert report["verify"]["mismatched_frames"] == 0
    assert "one message in flight per 8 sessions" in stdout
    assert server.run(lambda: server.engine.model_stats("gru").frames) - before == 600
    assert server.run(lambda: probe.queued_frames(server.engine)) == 0


def test_verify_still_catches_a_different_model(server: RunningServer, tmp_path: Path) -> None:
    other = perturbed_copy(GRU, tmp_path / "other")
    rc, stdout, report, stderr = cli(
        *("--target", server.target, "--model", "gru", "--sessions", "6"),
        *("--sessions-per-message", "6", "--frames-per-session", "10"),
        *("--verify", "--verify-model", str(other), "--json", str(tmp_path / "r.json")),
    )
    assert rc == 1, stderr + stdout
    assert report is not None
    assert report["verify"]["mismatched_sessions"] == 6


def test_groups_do_not_go_with_a_rate(server: RunningServer) -> None:
    rc, stdout, _, stderr = cli(
        *("--target", server.target, "--model", "gru", "--sessions", "4"),
        *("--sessions-per-message", "4", "--rate", "100", "--duration", "1"),
    )
    assert rc == 2, stderr + stdout
    assert "--sessions-per-message drives each group" in stderr + stdout
