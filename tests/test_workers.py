"""`rnnstream-server --workers 2`: two server processes on one port, shut down by one SIGTERM."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from rnnstream import AsyncClient
from rnnstream._aio import DEFAULT_OPTIONS
from tests.conftest import MODELS, REPO
from tests.streaming import assert_matches_references, sequence

GRACE = 2.0


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSTREAM_")}
    log = tmp_path / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "rnnstream.server", "--workers", "2", "--port", "0"),
                *("--metrics-port", "0", "--model-repository", str(MODELS), "--models", "gru"),
                *("--grace", str(GRACE)),
            ],
            cwd=REPO,
            env=env,
            stderr=sink,
        )
    try:
        port = 0
        deadline = time.monotonic() + 60
        while not port and process.poll() is None and time.monotonic() < deadline:
            found = re.search(r"2 workers serving on 127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else 0
            time.sleep(0.05)
        assert port, f"the supervisor never said where it serves:\n{log.read_text()}"
        yield process, port
    finally:
        if process.poll() is None:
            # Workers outlive a killed supervisor: ask it to stop them first, then kill them all.
            workers = psutil.Process(process.pid).children()
            process.terminate()
            try:
                process.wait(GRACE + 10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            for worker in workers:
                if worker.is_running():
                    worker.kill()


async def _stream_everywhere(port: int) -> None:
    """Sessions on eight connections (so both workers get some), each checked by reference."""
    options = [*DEFAULT_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
    clients = [AsyncClient(f"127.0.0.1:{port}", options=options) for _ in range(8)]
    try:
        deadline = time.monotonic() + 60
        while True:  # both workers load the model before they listen
            try:
                await clients[0].get_model("gru")
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

        async def run(k: int) -> None:
            session = await clients[k].open("gru")
            x = sequence("gru", 8, seed=400 + k)
            ys = [(await session.step(row))["y"] for row in x]
            await session.end()
            assert_matches_references("gru", x, np.stack(ys))

        await asyncio.gather(*(run(k) for k in range(len(clients))))
    finally:
        await asyncio.gather(*(c.close() for c in clients))


def test_two_workers_share_one_port_and_stop_on_sigterm(
    workers: tuple[subprocess.Popen[bytes], int],
) -> None:
    process, port = workers
    children = psutil.Process(process.pid).children()  # the workers (and spawn's helper)

    def listening() -> set[int]:
        return {
            c.pid
            for c in children
            for conn in c.net_connections("tcp")
            if conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
        }

    # Each worker listens once it has loaded its models: the supervisor's line can come first.
    deadline = time.monotonic() + 60
    while len(listening()) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    asyncio.run(_stream_everywhere(port))
    listeners = listening()
    assert len(listeners) == 2  # two worker processes, each listening on the shared port
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(GRACE + 10) == 0
    assert time.monotonic() - started < GRACE + 5
    gone, alive = psutil.wait_procs(children, timeout=5)
    assert not alive and listeners <= {p.pid for p in gone}


def test_workers_must_be_positive() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "rnnstream.server",
            "--workers",
            "0",
            "--model-repository",
            str(MODELS),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == "rnnstream-server: --workers (RNNSTREAM_WORKERS): 0 must be at least 1\n"
