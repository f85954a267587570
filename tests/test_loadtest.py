"""`rnnstream loadtest` against live servers: exact counts, open-loop rate, verify, refusals."""

from __future__ import annotations

import itertools
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from rnnstream.loadtest import LoadtestOptions, run_loadtest
from rnnstream.loadtest._plot import write_plot
from rnnstream.loadtest._schedule import arrival_times
from rnnstream.loadtest._stats import (
    Timeline,
    WorkerStats,
    decode_histogram,
    mean_us,
    new_histogram,
)
from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from tests import probe
from tests.conftest import MODELS, REPO, RunningServer

GRU = MODELS / "gru" / "model.onnx"


def cli(*args: str, timeout: float = 60) -> tuple[int, str, dict[str, Any] | None, str]:
    """Run `rnnstream loadtest` as a user would; returns exit code, stdout, JSON report, stderr."""
    out_dir = Path(args[args.index("--json") + 1]).parent if "--json" in args else None
    proc = subprocess.run(
        [sys.executable, "-m", "rnnstream", "loadtest", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )
    report = None
    if out_dir is not None:
        path = Path(args[args.index("--json") + 1])
        report = json.loads(path.read_text()) if path.exists() else None
    return proc.returncode, proc.stdout, report, proc.stderr


def perturbed_copy(source: Path, folder: Path) -> Path:
    """The same graph with one recurrent weight nudged: same shapes, different outputs."""
    model = onnx.load(str(source))
    weight = next(i for i in model.graph.initializer if i.name == "R")
    array = numpy_helper.to_array(weight).copy()
    array.flat[0] += 0.05
    weight.CopyFrom(numpy_helper.from_array(array, "R"))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_frames_bounded_counts_are_exact(server: RunningServer, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    rc, stdout, report, stderr = cli(
        "--target",
        server.target,
        "--model",
        "gru",
        "--sessions",
        "6",
        "--frames-per-session",
        "40",
        "--inflight",
        "3",
        "--connections",
        "2",
        "--json",
        str(report_path),
    )
    assert rc == 0, stderr + stdout
    assert report is not None
    assert report["sessions"] == {**report["sessions"], "requested": 6, "opened": 6, "failed": {}}
    assert report["frames"] == {"sent": 240, "answered": 240, "failed": 0, "failed_by_code": {}}
    assert report["connections"] == 2
    assert sum(s["answered"] for s in report["timeline"]) == 240
    assert decode_histogram(report["histograms"]["latency_us"]).get_total_count() == 240
    assert report["latency_ms"]["p50"] <= report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert report["passed"] is True
    for label in ("frames answered", "latency p99.9", "session open", "PASS"):
        assert label in stdout
    assert server.run(lambda: probe.session_count(server.engine)) == 0  # every session was ended


def test_processes_merge_exactly(server: RunningServer) -> None:
    options = LoadtestOptions(
        model="gru",
        target=server.target,
        sessions=5,
        frames_per_session=30,
        processes=2,
        connections=3,
        inflight=2,
        progress=False,
    )
    report = run_loadtest(options)
    assert (report.sent, report.answered, report.frames_failed) == (150, 150, 0)
    assert report.sessions_opened == 5
    assert decode_histogram(report.histograms["latency_us"]).get_total_count() == 150
    assert decode_histogram(report.histograms["open_latency_us"]).get_total_count() == 5
    assert report.connections == 3


@pytest.mark.parametrize("arrivals", ["constant", "poisson"])
def test_open_loop_holds_its_rate(server: RunningServer, arrivals: str) -> None:
    rate, seconds = 300.0, 2.0
    options = LoadtestOptions(
        model="gru",
        target=server.target,
        sessions=6,
        duration=seconds,
        warmup=0.3,
        rate=rate,
        arrivals=arrivals,  # type: ignore[arg-type]
        progress=False,
    )
    report = run_loadtest(options)
    assert report.frames_failed == 0
    assert report.sent == report.answered
    # Due times start at the warm-up's start; the measured ones fall in [warm-up, warm-up +
    # duration). A constant rate puts rate * seconds of them there; Poisson arrivals (seeded:
    # one process draws with seed * 1000) as many as that draw holds, 567 here, which is
    # itself 5.5 % under rate * seconds: measured against it, only lateness counts.
    due = itertools.takewhile(
        lambda t: t < options.warmup + seconds,
        arrival_times(0.0, rate, options.arrivals, options.seed * 1000),
    )
    expected = sum(1 for t in due if t >= options.warmup)
    assert abs(report.answered - expected) <= max(1, 0.03 * expected), (report.answered, expected)
    if arrivals == "constant":
        assert abs(report.answered - rate * seconds) <= 1
    # Over the time to the last answer, which a loaded machine stretches a little.
    assert report.frames_per_second == pytest.approx(expected / seconds, rel=0.10)


def test_verify_passes_against_the_served_model(server: RunningServer, tmp_path: Path) -> None:
    rows = np.random.default_rng(5).standard_normal((50, 16)).astype(np.float32)
    np.save(tmp_path / "frames.npy", rows)
    report_path = tmp_path / "report.json"
    rc, _, report, stderr = cli(
        "--target",
        server.target,
        "--model",
        "gru",
        "--sessions",
        "4",
        "--frames-per-session",
        "300",
        "--inflight",
        "4",
        "--warmup",
        "0.2",
        "--frames-file",
        str(tmp_path / "frames.npy"),
        "--verify",
        "--verify-model",
        str(GRU),
        "--json",
        str(report_path),
    )
    assert rc == 0, stderr
    assert report is not None
    verify = report["verify"]
    # Warm-up frames are verified too (they carry the state), so at least the measured ones.
    assert verify["frames_checked"] >= 1200
    assert verify["mismatched_frames"] == 0 and verify["mismatched_sessions"] == 0
    assert verify["max_abs_diff"] <= 1e-4


def test_verify_reports_a_perturbed_model(server: RunningServer, tmp_path: Path) -> None:
    wrong = perturbed_copy(GRU, tmp_path / "gru_perturbed")
    report_path = tmp_path / "report.json"
    rc, stdout, report, _ = cli(
        "--target",
        server.target,
        "--model",
        "gru",
        "--sessions",
        "3",
        "--frames-per-session",
        "50",
        "--verify",
        "--verify-model",
        str(wrong),
        "--json",
        str(report_path),
    )
    assert rc == 1
    assert report is not None
    assert report["frames"]["failed"] == 0  # the server did nothing wrong: only the check fails
    assert report["verify"]["mismatched_sessions"] == 3
    assert report["verify"]["mismatched_frames"] > 0
    assert report["passed"] is False
    assert "FAIL" in stdout


def test_verify_catches_a_model_served_under_another_name(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "rnn_relu").mkdir(parents=True)
    shutil.copy(MODELS / "rnn_tanh" / "model.onnx", repo / "rnn_relu" / "model.onnx")
    running = make_server(model_repository=repo)
    report_path = tmp_path / "report.json"
    rc, _, report, _ = cli(
        "--target",
        running.target,
        "--model",
        "rnn_relu",
        "--sessions",
        "2",
        "--frames-per-session",
        "30",
        "--verify",
        "--verify-model",
        str(MODELS / "rnn_relu" / "model.onnx"),
        "--json",
        str(report_path),
    )
    assert rc == 1
    assert report is not None and report["verify"]["mismatched_sessions"] == 2


def test_refused_sessions_are_counted_by_status(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    running = make_server(max_sessions=2)
    report_path = tmp_path / "report.json"
    args = (
        "--target",
        running.target,
        "--model",
        "gru",
        "--sessions",
        "5",
        "--frames-per-session",
        "20",
        "--json",
        str(report_path),
    )
    rc, stdout, report, stderr = cli(*args)
    assert rc == 1, stderr
    assert report is not None
    assert report["sessions"]["opened"] == 2
    assert report["sessions"]["failed"] == {"RESOURCE_EXHAUSTED": 3}
    assert report["frames"]["answered"] == 40
    assert report["error_rate"] == pytest.approx(3 / (40 + 5))
    assert "RESOURCE_EXHAUSTED 3" in stdout
    # The gate is the threshold: the same run passes when that error rate is allowed.
    rc, _, _, _ = cli(*args, "--max-error-rate", "0.1")
    assert rc == 0


def _frames_answered(target: str, model: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stats = oip_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(
            oip.ModelStatisticsRequest(name=model), timeout=10
        )
    return int(stats.model_stats[0].inference_count)


def test_ctrl_c_stops_cleanly_and_prints_the_table(server: RunningServer, tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    before = _frames_answered(server.target, "gru")
    # As a terminal's foreground job: Ctrl-C raises KeyboardInterrupt even when this test runs
    # in a background job, whose children inherit an ignored SIGINT (Python then installs no
    # handler, and the signal would do nothing).
    foreground = (
        "import runpy, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "sys.argv[0] = 'rnnstream'\n"
        "runpy.run_module('rnnstream', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            foreground,
            "loadtest",
            "--no-progress",
            "--target",
            server.target,
            "--model",
            "gru",
            "--sessions",
            "4",
            "--duration",
            "60",
            "--json",
            str(report_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    # Ctrl-C once frames flow (the server's OIP statistics count them), not after a fixed
    # sleep: on a busy machine the command may still be starting after any fixed time.
    deadline = time.monotonic() + 60
    while _frames_answered(server.target, "gru") < before + 20:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the load test sent no frames within 60 s"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout and "frames answered" in stdout
    report = json.loads(report_path.read_text())
    assert report["interrupted"] is True
    assert report["frames"]["answered"] > 0
    assert report["frames"]["sent"] == report["frames"]["answered"] + report["frames"]["failed"]


def test_unknown_model_is_a_clean_error(server: RunningServer) -> None:
    rc, _, _, stderr = cli(
        "--target", server.target, "--model", "nope", "--frames-per-session", "1"
    )
    assert rc == 2
    assert "nope" in stderr and "Traceback" not in stderr


def test_plot_draws_the_timeline(server: RunningServer, tmp_path: Path) -> None:
    options = LoadtestOptions(
        model="lstm", target=server.target, sessions=3, duration=1.5, progress=False
    )
    report = run_loadtest(options)
    assert report.answered > 0 and report.timeline
    write_plot(report, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_timeline_merges_histograms_exactly() -> None:
    rng = np.random.default_rng(3)
    workers = [WorkerStats(origin=100.0), WorkerStats(origin=100.0)]
    everything = new_histogram()
    for k, stats in enumerate(workers):
        for latency, at in zip(rng.exponential(0.01, 500), rng.uniform(100, 103, 500), strict=True):
            stats.answer(float(latency), float(at))
            everything.record_value(max(1, round(latency * 1e6)))
        stats.fail("UNAVAILABLE", 101.5 + k)
    timeline = Timeline(2)
    timeline.add(0, workers[0].take_seconds(102.0), final=False)  # seconds 0 and 1 are over
    timeline.add(1, workers[1].take_seconds(None), final=True)
    timeline.add(0, workers[0].take_seconds(None), final=True)
    seconds = timeline.finish()
    assert [s.second for s in seconds] == [0, 1, 2]
    assert sum(s.answered for s in seconds) == 1000 and sum(s.failed for s in seconds) == 2
    for p in (50.0, 99.0, 99.9, 100.0):
        assert timeline.total.get_value_at_percentile(p) == everything.get_value_at_percentile(p)


@pytest.mark.parametrize("scale_s", [1e-5, 3e-3, 2.0])
def test_the_mean_is_hdrh_own(scale_s: float) -> None:
    # mean_us reads only the non-empty buckets; hdrh's get_mean_value walks them all.
    histogram = new_histogram()
    for latency in np.random.default_rng(5).exponential(scale_s, 5000):
        histogram.record_value(max(1, round(float(latency) * 1e6)))
    assert mean_us(histogram) == histogram.get_mean_value()
    assert mean_us(new_histogram()) == 0.0
