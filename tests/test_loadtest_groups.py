"""`rnnstream loadtest --sessions-per-message K`: K sessions' frames per message, closed loop per
group, every output checked by --verify, exact counts, and a wrong model still caught."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests import probe
from tests.conftest import RunningServer
from tests.server_process import free_port
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


def test_frames_are_packed_unless_told_not_to(make_server: Callable[..., RunningServer]) -> None:
    """Sessions of one connection whose frames are ready together share a message by default;
    --no-pack-frames sends each in its own (what a one-request-per-message client does)."""
    port = free_port()
    running = make_server(models=("gru",), metrics_port=port)
    counts = {}
    for flag in ((), ("--no-pack-frames",)):
        before = _requests(port)
        rc, stdout, _, stderr = cli(
            *("--target", running.target, "--model", "gru", "--sessions", "8"),
            *("--frames-per-session", "20", "--connections", "1", *flag),
        )
        assert rc == 0, stderr + stdout
        counts[flag] = _requests(port) - before
    # the opens travel in one OpenSessions message (up to 256 a message), then each frame and end
    assert counts[("--no-pack-frames",)] == 1 + 160 + 8
    assert counts[()] < 1 + 160 // 2 + 8


def _requests(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "rnnstream_stream_requests_total":
                return sample.value
    raise AssertionError("no rnnstream_stream_requests_total")
