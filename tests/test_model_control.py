"""--model-control-mode: poll follows the repository (a copied folder within two poll periods, a
removed one unloaded), explicit loads only what it is told, SIGHUP rescans a running process."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc
from tests import probe
from tests.conftest import RunningServer
from tests.server_process import ServerProcess
from tests.streaming import RawStream
from tests.versions import inputs, reference, write_version

PERIOD = 0.2


def _states(server: RunningServer, model: str) -> list[tuple[int, str, str]]:
    index = server.run(lambda: server.engine.repository_index())
    return [(s.version, s.state, s.reason) for s in index if s.model == model]


async def _wait_for(check: Callable[[], bool], seconds: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "gave up waiting"
        await asyncio.sleep(0.02)


async def test_poll_loads_a_copied_folder_within_two_periods_and_unloads_a_removed_one(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    repo.mkdir()
    server = make_server(
        model_repository=repo, model_control_mode="poll", repository_poll_secs=PERIOD
    )
    assert server.run(lambda: server.engine.model_names()) == []
    staged = tmp_path / "staging"
    write_version(staged, "late", 1, seed=11)
    write_version(staged, "late", 2, seed=22)
    shutil.copytree(staged / "late", repo / "late")
    copied_at = server.run(lambda: probe.polls_started(server.engine))
    await _wait_for(lambda: server.run(lambda: server.engine.model_names()) == ["late"])
    # Counted in polls, not seconds: the rescan that loaded it started at most two polls after
    # the copy ended (one to see the folder whole, one to find it unchanged, then load).
    assert server.run(lambda: probe.polls_started(server.engine)) - copied_at <= 2
    assert [(v, s) for v, s, _ in _states(server, "late")] == [(1, "UNAVAILABLE"), (2, "READY")]
    x = inputs(5, seed=3)
    async with RawStream(server.target) as raw:
        opened = await raw.open("late")
        y = np.concatenate([await raw.frame(opened.session_id, t, x[t : t + 1]) for t in range(5)])
        np.testing.assert_allclose(y, reference(22, x), rtol=0, atol=1e-5)
        # The folder goes: the model is unloaded; its live session still finishes on v2.
        shutil.rmtree(repo / "late")
        await _wait_for(lambda: server.run(lambda: server.engine.model_names()) == [])
        assert await raw.frame(opened.session_id, 5, x[:1]) is not None
        refused = await raw.error(pb.StreamRequest(open=pb.OpenSession(model="late")))
        assert refused.code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_explicit_loads_only_what_it_is_told(
    make_server: Callable[..., RunningServer], tmp_path: Path
) -> None:
    repo = tmp_path / "models"
    write_version(repo, "a", None, seed=1)
    write_version(repo, "b", None, seed=2)
    server = make_server(model_repository=repo, model_control_mode="explicit", load_model=("a",))
    assert server.run(lambda: server.engine.model_names()) == ["a"]
    assert _states(server, "b") == [(1, "UNAVAILABLE", "not loaded")]
    async with grpc.aio.insecure_channel(server.target) as channel:
        native = pb_grpc.RnnstreamStub(channel)
        with_ready = await native.ListRepository(pb.ListRepositoryRequest(ready=True))
        assert [(v.model, v.version) for v in with_ready.versions] == [("a", 1)]
        loaded = await native.LoadModel(pb.LoadModelRequest(name="b"))
        assert [(v.version, v.state) for v in loaded.versions] == [(1, "READY")]
        try:
            await native.LoadModel(pb.LoadModelRequest(name="nope"))
            raise AssertionError("an unknown model loaded")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            assert "no model folder 'nope'" in (exc.details() or "")


def test_sighup_rescans_a_running_server(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_version(repo, "gru", 1, seed=101)
    server = ServerProcess("--model-repository", str(repo))
    try:
        write_version(repo, "gru", 2, seed=202)
        server.signal(signal.SIGHUP)
        server.wait_for_line(re.compile(r"model gru: versions \[2\] take new sessions"), 60)
        with grpc.insecure_channel(server.target) as channel:
            info = pb_grpc.RnnstreamStub(channel).GetModel(pb.GetModelRequest(name="gru"))
        assert info.version == 2
    finally:
        server.close()


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_version(repo, "gru", 1, seed=101)
    server = ServerProcess("--model-repository", str(repo), "--workers", "2")
    try:
        serving = re.compile(r"rnnstream.server serving \['gru'\]")
        deadline = time.monotonic() + 60
        while sum(bool(serving.search(line)) for line in list(server.lines)) < 2:
            assert time.monotonic() < deadline, "\n".join(server.lines)
            time.sleep(0.05)
        write_version(repo, "gru", 2, seed=202)
        server.signal(signal.SIGHUP)  # to the supervisor, which passes it on
        reloaded = re.compile(r"model gru: versions \[2\] take new sessions")
        while sum(bool(reloaded.search(line)) for line in list(server.lines)) < 2:
            assert time.monotonic() < deadline, "\n".join(server.lines)
            time.sleep(0.05)
        server.signal(signal.SIGTERM)  # passed on too: every worker stops
        assert server.wait(30) == 0
    finally:
        server.close()


def test_a_sighup_while_models_load_does_not_end_the_server(tmp_path: Path) -> None:
    """SIGHUP's default action ends a process: until the server handles it (once it serves),
    it is ignored."""
    repo = tmp_path / "models"
    write_version(repo, "gru", 1, seed=101, hidden=512)
    (repo / "gru" / "config.toml").write_text("[serving]\nwarmup = " + str([256] * 40) + "\n")
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [sys.executable, "-m", "rnnstream.server", "--host", "127.0.0.1", "--port", "0",
         "--port-file", str(port_file), "--metrics-port", "0", "--model-repository", str(repo)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stderr is not None
        for line in process.stderr:  # the graph is loaded; timing and warm-up go on
            if "loaded model gru" in line:
                break
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert process.poll() is None, "the server ended on SIGHUP"
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        assert port_file.read_text().strip().isdigit()
    finally:
        process.terminate()
        process.communicate(timeout=30)
