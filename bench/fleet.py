"""A fleet of sessions: memory per idle session and opening speed (1,000,000 idle gru sessions),
the first frame after a spill against a frame in memory (same run, local Redis), and the memory
100,000 spilled sessions leave behind.

    flock /tmp/rnnstream-bench.lock python bench/fleet.py --json bench/results/fleet.json
    python bench/fleet.py --report-only bench/results/fleet.json [--write-docs]

Targets (issue 19): an idle session costs at most 1.5 KB beyond its state; 1,000,000 idle
sessions within 1.5 GB of server RSS growth, opened at >= 20,000 sessions/s over a few streams;
the restored frames' p99 at most 2 ms above that of frames in memory (same run, local Redis);
after 100,000 sessions were opened and spilled, RSS within 10% of before they opened. Each case
runs --repeats times on a fresh server; the tables give the median and the range, and a target
counts as met only when every run met it. --write-docs puts the tables in docs/performance.md.
A million sessions take about 1.3 GB in the server and a few minutes in all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench._common import free_port, machine, stop_process  # noqa: E402
from bench._fleet_report import report_tables, write_docs  # noqa: E402
from rnnstream.proto.v1 import rnnstream_pb2 as pb  # noqa: E402

MODEL = "gru"
OPEN = pb.StreamRequest(open=pb.OpenSession(model=MODEL)).SerializeToString()
_STREAM = "/rnnstream.v1.Rnnstream/Stream"


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def metrics(port: int) -> dict[str, float]:
    """The server's rnnstream_sessions gauge by state, and spill and restore totals."""
    from prometheus_client.parser import text_string_to_metric_families

    with contextlib.closing(socket.create_connection(("127.0.0.1", port))) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b"".join(iter(lambda: s.recv(65536), b""))
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(data.split(b"\r\n\r\n", 1)[1].decode()):
        for sample in family.samples:
            if sample.name == "rnnstream_sessions":
                out[sample.labels["state"]] = sample.value
            elif sample.name in (
                "rnnstream_session_spills_total",
                "rnnstream_session_restores_total",
            ):
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


class Server:
    def __init__(self, *flags: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        command = [sys.executable, "-m", "rnnstream.server", "--models", MODEL]
        command += ["--port", str(self.port), "--metrics-port", str(self.metrics_port)]
        command += ["--log-level", "WARNING", *flags]
        self.process = subprocess.Popen(command, cwd=REPO)
        self.target = f"127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                metrics(self.metrics_port)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.2)
        time.sleep(1.0)  # let start-up allocations settle before the baseline

    @property
    def rss(self) -> int:
        return rss(self.process.pid)

    def stop(self) -> None:
        stop_process(self.process, 30)


class Redis:
    def __init__(self, folder: Path) -> None:
        binary = shutil.which("redis-server") or "/usr/sbin/redis-server"
        self.port = free_port()
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(folder)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self.url = f"redis://127.0.0.1:{self.port}/0"
        time.sleep(0.5)

    def used_memory(self) -> int:
        import redis

        with redis.Redis(port=self.port) as client:
            return int(client.info("memory")["used_memory"])

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(10)


@contextlib.contextmanager
def spilling_server(spill_after: float, ttl: int) -> Iterator[tuple[Server, Redis, Path]]:
    """A server spilling idle sessions to a Redis of its own, in a scratch folder; both
    stopped on the way out."""
    with tempfile.TemporaryDirectory() as folder:
        redis = Redis(Path(folder))
        try:
            server = Server(
                "--state-store", redis.url, "--spill-after", str(spill_after),
                "--session-ttl", str(ttl),
            )  # fmt: skip
            try:
                yield server, redis, Path(folder)
            finally:
                server.stop()
        finally:
            redis.stop()


# -- opening many sessions over raw streams (one client process per connection) ----------------
_PER_MESSAGE = 1000  # sessions per OpenSessions message


def _client(target: str, count: int, hold: Any, results: Any) -> None:
    """One client process: opens `count` sessions on one stream, 1,000 per OpenSessions message
    (the same request bytes each time: nothing to encode), writing ahead of the answers, and
    holds the stream open until `hold` is set."""
    whole = pb.OpenSessions(sessions=[pb.OpenSession(model=MODEL)] * _PER_MESSAGE)
    messages = [pb.StreamRequest(open_many=whole).SerializeToString()] * (count // _PER_MESSAGE)
    if count % _PER_MESSAGE:
        rest = pb.OpenSessions(sessions=[pb.OpenSession(model=MODEL)] * (count % _PER_MESSAGE))
        messages.append(pb.StreamRequest(open_many=rest).SerializeToString())

    async def run() -> None:
        identity = lambda b: b  # noqa: E731
        async with grpc.aio.insecure_channel(target) as channel:
            call = channel.stream_stream(_STREAM, identity, identity)()
            started = time.time()
            answered = 0
            errors: list[str] = []

            async def read() -> None:
                nonlocal answered
                async for reply in call:
                    for result in pb.StreamResponse.FromString(reply).opened_many.results:
                        if result.HasField("error"):
                            errors.append(result.error.message)
                        answered += 1
                    if answered >= count:
                        results.put(("opened", started, time.time(), errors))

            reader = asyncio.ensure_future(read())
            for message in messages:
                await call.write(message)
            while not hold.is_set():
                await asyncio.sleep(0.05)
            await call.done_writing()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    asyncio.run(run())


def open_sessions(target: str, total: int, streams: int) -> tuple[Any, list[Any], dict[str, Any]]:
    """Open `total` sessions over `streams` client processes (one stream each), all at once;
    the streams stay open until the returned event is set. Returns (event, processes, timing)."""
    ctx = multiprocessing.get_context("spawn")
    hold, results = ctx.Event(), ctx.Queue()
    shares = [total // streams + (1 if i < total % streams else 0) for i in range(streams)]
    workers = [ctx.Process(target=_client, args=(target, n, hold, results)) for n in shares]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=3600) for _ in workers]
    starts = [r[1] for r in reports]
    ends = [r[2] for r in reports]
    errors = [e for r in reports for e in r[3]]
    if errors:
        raise RuntimeError(f"opens refused: {errors[:3]}")
    seconds = max(ends) - min(starts)
    return hold, workers, {"sessions": total, "streams": streams, "seconds": seconds,
                           "sessions_per_s": total / seconds}  # fmt: skip


def close_streams(hold: Any, workers: list[Any]) -> None:
    hold.set()
    for worker in workers:
        worker.join(30)
        if worker.is_alive():
            worker.terminate()


# -- the cases ------------------------------------------------------------------------------------
def idle_sessions(count: int, streams: int) -> dict[str, Any]:
    """`count` idle gru sessions on one server: RSS growth and opening speed."""
    # The default caps: a million sessions, no cap per stream.
    caps = ["--max-sessions", str(count)] if count > 1_000_000 else []
    server = Server("--session-ttl", "0", *caps)
    try:
        before, cpu_before = server.rss, cpu(server.process.pid)
        hold, workers, timing = open_sessions(server.target, count, streams)
        time.sleep(5)  # the idle sweep runs; allocations settle
        after = server.rss
        gauge = metrics(server.metrics_port)
        result = {
            **timing,
            "server_cpu_s": cpu(server.process.pid) - cpu_before,
            "rss_before_bytes": before,
            "rss_after_bytes": after,
            "rss_growth_bytes": after - before,
            "bytes_per_session": (after - before) / count,
            "state_bytes_per_session": 128 * 4,
            "sessions_counted": gauge.get("idle", 0) + gauge.get("active", 0),
        }
        close_streams(hold, workers)
        return result
    finally:
        server.stop()


def restore_latency(hot: int, cold: int, seconds: float, spill_after: float) -> dict[str, Any]:
    """Two load tests at once against one server with a local Redis: `hot` sessions with a
    frame every spill_after / 4 (always in memory) and `cold` ones with a frame every
    3 x spill_after (spilled before each frame, so each frame brings its session back)."""
    with spilling_server(spill_after, 600) as (server, _redis, folder):
        runs = []
        for name, count, rate in (
            ("hot", hot, 4 / spill_after),
            ("cold", cold, 1 / (3 * spill_after)),
        ):
            report = Path(folder) / f"{name}.json"
            command = [sys.executable, "-m", "rnnstream", "loadtest", "--target", server.target]
            command += ["--model", MODEL, "--sessions", str(count), "--session-rate", str(rate)]
            command += ["--duration", str(seconds), "--warmup", str(4 * spill_after)]
            command += [
                "--verify",
                "--verify-model",
                str(REPO / "models" / MODEL / "model.onnx"),
            ]
            command += ["--no-progress", "--json", str(report), "--max-error-rate", "0"]
            runs.append(
                (name, report, subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL))
            )
        results: dict[str, Any] = {}
        for name, report, process in runs:
            process.wait(seconds + 600)
            data = json.loads(report.read_text())
            results[name] = {
                "sessions": data["sessions"]["opened"],
                "frames": data["frames"]["answered"],
                "failed": data["frames"]["failed"],
                "verified": data["verify"]["frames_checked"] if data["verify"] else 0,
                "mismatched": data["verify"]["mismatched_frames"] if data["verify"] else None,
                "restores": data["restores"]["frames"],
                "restored_ms": data["restores"]["latency_ms"],
                "in_memory_ms": data["restores"]["in_memory_latency_ms"],
                "frames_per_s": data["frames_per_second"],
            }
        gauge = metrics(server.metrics_port)
        results["server_restores"] = gauge.get("rnnstream_session_restores_total", 0)
        results["server_spills"] = gauge.get("rnnstream_session_spills_total", 0)
        results["spill_after_s"] = spill_after
        return results


def spilled_memory(count: int, streams: int, spill_after: float) -> dict[str, Any]:
    """RSS before `count` sessions open, and after they were spilled (their streams closed)."""
    with spilling_server(spill_after, 3600) as (server, redis, _folder):
        before = server.rss
        redis_before = redis.used_memory()
        hold, workers, timing = open_sessions(server.target, count, streams)
        peak = server.rss
        close_streams(hold, workers)
        deadline = time.monotonic() + 600
        while metrics(server.metrics_port).get("spilled", 0) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"not all spilled: {metrics(server.metrics_port)}")
            time.sleep(1)
        time.sleep(3 * spill_after + 5)  # the state pool shrinks between batches
        after = server.rss
        gauge = metrics(server.metrics_port)
        return {
            **timing,
            "spill_after_s": spill_after,
            "rss_before_bytes": before,
            "rss_opened_bytes": peak,
            "rss_after_bytes": after,
            "after_over_before": after / before,
            "in_memory_after": gauge.get("idle", 0) + gauge.get("active", 0),
            "spilled": gauge.get("spilled", 0),
            "redis_bytes_per_session": (redis.used_memory() - redis_before) / count,
        }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=1_000_000, help="idle sessions opened")
    parser.add_argument("--streams", type=int, default=4, help="streams (client processes)")
    parser.add_argument("--spilled", type=int, default=100_000, help="opened, then spilled")
    parser.add_argument("--hot", type=int, default=100, help="sessions kept in memory")
    parser.add_argument("--cold", type=int, default=300, help="sessions spilled before each frame")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured s of a latency run")
    parser.add_argument("--spill-after", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--report-only", type=Path, help="print the tables of a results file")
    parser.add_argument("--write-docs", action="store_true", help="and put them in the docs")
    args = parser.parse_args()
    if args.report_only is not None:
        saved = json.loads(args.report_only.read_text())
        print(report_tables(saved))
        if args.write_docs:
            write_docs(saved)
        return
    result: dict[str, Any] = {
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M"),
        "load_before": load_average(),
        "options": {k: v for k, v in vars(args).items() if not isinstance(v, Path)},
    }
    result["idle"] = [idle_sessions(args.sessions, args.streams) for _ in range(args.repeats)]
    result["restore"] = [
        restore_latency(args.hot, args.cold, args.seconds, args.spill_after)
        for _ in range(args.repeats)
    ]
    result["spilled"] = [
        spilled_memory(args.spilled, args.streams, args.spill_after) for _ in range(args.repeats)
    ]
    result["load_after"] = load_average()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(report_tables(result))


if __name__ == "__main__":
    main()
