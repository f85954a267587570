"""Batching benchmark: rnnstream with batching off and on against an echo server and ORT alone.

One command (about 3 minutes on 2 cores):

    python bench/batching.py --out bench/results/batching.json

Each server runs as its own process; `rnnstream loadtest` drives it from other processes over
loopback with C lock-step sessions (closed loop, one frame in flight per session). Servers:
`echo` (bench/echo_server.py: the same Stream protocol and message sizes on the same asyncio
gRPC stack, no model: the transport ceiling), `off` (rnnstream, --max-batch-size 1) and `on`
(rnnstream, default batching). Every (model, C) cell runs each server once per round, rounds
repeat, and the table shows medians over rounds; ratios are taken within a round, then their
median, so slow drift on a shared machine hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from prometheus_client.parser import text_string_to_metric_families

from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
KINDS = ("echo", "off", "on_single", "on")
LABELS = {
    "echo": "echo server",
    "off": "rnnstream, batching off",
    "on_single": "rnnstream, batching on, one message per frame",
    "on": "rnnstream, batching on",
}
# on_single is the batching server driven by a client that does not ask for packed outputs.
SERVER_OF = {"on_single": "on"}
SERVER_KINDS = tuple(kind for kind in KINDS if kind not in SERVER_OF)  # processes to start


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    kind: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def scrape(self, model: str) -> dict[str, float]:
        """Frames answered (any status) and the batch-size histogram's sum and count."""
        with contextlib.closing(socket.create_connection(("127.0.0.1", self.metrics_port))) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
            data = b"".join(iter(lambda: s.recv(65536), b""))
        text = data.split(b"\r\n\r\n", 1)[1].decode()
        out = {"frames": 0.0, "batch_sum": 0.0, "batch_count": 0.0}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("model") != model:
                    continue
                if sample.name == "rnnstream_frames_total":
                    out["frames"] += sample.value
                elif sample.name == "rnnstream_batch_size_sum":
                    out["batch_sum"] = sample.value
                elif sample.name == "rnnstream_batch_size_count":
                    out["batch_count"] = sample.value
        return out

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def server_command(kind: str, models: str, port: int, metrics_port: int) -> list[str]:
    if kind == "echo":
        script = str(REPO / "bench" / "echo_server.py")
        command = [sys.executable, script, "--models", models, "--port", str(port)]
        command += ["--metrics-port", str(metrics_port)]
        return [*command, "--model-repository", str(REPO / "models")]
    command = [sys.executable, "-m", "rnnstream.server", "--models", models, "--port", str(port)]
    command += ["--metrics-port", str(metrics_port), "--model-repository", str(REPO / "models")]
    # Per-session INFO log lines would be measured too; the benchmark is about the data path.
    command += ["--log-level", "WARNING", "--max-sessions-per-stream", "100000"]
    if kind == "off":
        command += ["--max-batch-size", "1"]
    return command


def start_server(kind: str, models: str) -> Server:
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(server_command(kind, models, port, metrics_port), cwd=REPO)
    server = Server(kind, process, port, metrics_port)
    deadline = time.monotonic() + 60
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.RnnstreamStub(channel)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{kind} server exited with status {process.returncode}")
            try:
                stub.GetModel(pb.GetModelRequest(name=models.split(",")[0]), timeout=1)
                return server
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{kind} server did not come up within 60 s") from None
                time.sleep(0.2)
    finally:
        channel.close()


def loadtest(
    server: Server, model: str, sessions: int, args: argparse.Namespace, pack: bool
) -> dict[str, Any]:
    """One `rnnstream loadtest` run in its own processes; its JSON report."""
    processes = 1 if sessions == 1 else min(args.client_processes, sessions)
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "rnnstream", "loadtest", "--target", server.target]
        command += ["--model", model, "--sessions", str(sessions), "--no-progress"]
        command += ["--duration", str(args.duration), "--warmup", str(args.warmup)]
        command += ["--processes", str(processes), "--connections", str(min(sessions, 8))]
        command += ["--inflight", "1", "--json", str(report), "--drain", "5"]
        if not pack:
            command += ["--no-pack-outputs"]
        subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=False, timeout=120)
        return dict(json.loads(report.read_text()))


def measure(
    server: Server, model: str, sessions: int, args: argparse.Namespace, pack: bool = True
) -> dict[str, Any]:
    before, cpu_before = server.scrape(model), server.cpu_seconds()
    report = loadtest(server, model, sessions, args, pack)
    after, cpu_after = server.scrape(model), server.cpu_seconds()
    frames = after["frames"] - before["frames"]
    batches = after["batch_count"] - before["batch_count"]
    latency = report["latency_ms"]
    return {
        "frames_per_s": report["frames_per_second"],
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        # Batch sizes and CPU cover the whole run (session opens and warm-up included), divided
        # by every frame the server answered in it.
        "mean_batch": (after["batch_sum"] - before["batch_sum"]) / batches if batches else None,
        "cpu_us_per_frame": (cpu_after - cpu_before) * 1e6 / frames if frames else None,
        "answered": report["frames"]["answered"],
        "failed": report["frames"]["failed"],
        "sessions_opened": report["sessions"]["opened"],
        "problems": report.get("problems", []),
    }


def ort_alone(model: str, sizes: list[int], seconds: float) -> list[dict[str, Any]]:
    """ONNX Runtime by itself (one intra-op thread, as the server runs it), batch B, T = 1."""
    from rnnstream.server.core._runtime import load_model

    loaded = load_model(model, REPO / "models" / model, "cpu", 1)
    spec = loaded.spec
    rows = []
    for size in sizes:
        feeds: dict[str, Any] = {}
        for t in spec.inputs:
            shape = [1 if d is None else d for d in t.frame_shape]
            if t.frame_time_axis is not None:
                shape[t.frame_time_axis] = 1
            shape.insert(t.batch_axis, size)
            feeds[t.name] = np.random.default_rng(0).standard_normal(shape).astype(t.dtype)
        for s in spec.states:
            shape = list(s.initial.shape)
            shape.insert(s.batch_axis, size)
            feeds[s.input_name] = np.zeros(shape, s.dtype)
        loaded.run(feeds)
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            loaded.run(feeds)
            calls += 1
        rows.append(
            {
                "model": model,
                "batch": size,
                "us_per_call": elapsed * 1e6 / calls,
                "frames_per_s": size * calls / elapsed,
            }
        )
    return rows


async def _open_many(target: str, total: int, streams: int) -> int:
    channel = grpc.aio.insecure_channel(target)
    stub = pb_grpc.RnnstreamStub(channel)

    async def one_stream(count: int) -> int:
        call = stub.Stream()
        request = pb.StreamRequest(open=pb.OpenSession(model="gru"))
        for _ in range(count):
            await call.write(request)
        opened = 0
        for _ in range(count):
            response = await call.read()
            opened += response.WhichOneof("kind") == "opened"
        await call.done_writing()
        return opened

    try:
        share = [total // streams + (i < total % streams) for i in range(streams)]
        return sum(await asyncio.gather(*(one_stream(n) for n in share)))
    finally:
        await channel.close()


def memory(sessions: int) -> dict[str, Any]:
    """Server RSS before and after opening `sessions` idle gru sessions over a few streams.

    The streams end once the sessions are open; the sessions stay (they would wait for a
    resume) until the server stops.
    """
    server = start_server("on", "gru")
    try:
        time.sleep(0.5)
        before = server.rss_bytes()
        started = time.perf_counter()
        opened = asyncio.run(_open_many(server.target, sessions, streams=4))
        seconds = time.perf_counter() - started
        time.sleep(0.5)
        after = server.rss_bytes()
    finally:
        server.stop()
    grown = after - before
    return {
        "sessions": sessions,
        "opened": opened,
        "rss_before_mb": before / 1e6,
        "rss_after_mb": after / 1e6,
        "total_mb": grown / 1e6,
        "bytes_per_session": grown / opened if opened else None,
        "open_seconds": seconds,
    }


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians per (model, C, kind), and per-round ratios to the same round's echo and off."""
    cells: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for run in runs:
        cells.setdefault((run["model"], run["sessions"], run["kind"]), []).append(run)
    rows = []
    for (model, sessions, kind), group in cells.items():
        row: dict[str, Any] = {"model": model, "sessions": sessions, "kind": kind}
        for key in ("frames_per_s", "p50_ms", "p99_ms", "mean_batch", "cpu_us_per_frame"):
            row[key] = median([g[key] for g in group])
        # What one fully busy server core would answer at this CPU cost per frame.
        cpu = row["cpu_us_per_frame"]
        row["frames_per_core_s"] = 1e6 / cpu if cpu else None
        row["failed_runs"] = sum(1 for g in group if not g["answered"])
        for base in ("echo", "off"):
            ratios_fps, ratios_p50, ratios_cpu = [], [], []
            for g in group:
                other = next(
                    (
                        r
                        for r in runs
                        if (r["model"], r["sessions"], r["kind"], r["round"])
                        == (model, sessions, base, g["round"])
                    ),
                    None,
                )
                if other is None:
                    continue
                if other["frames_per_s"] and g["frames_per_s"]:
                    ratios_fps.append(g["frames_per_s"] / other["frames_per_s"])
                if g["cpu_us_per_frame"] and other["cpu_us_per_frame"]:
                    ratios_cpu.append(other["cpu_us_per_frame"] / g["cpu_us_per_frame"])
                if g["p50_ms"] is not None and other["p50_ms"]:
                    ratios_p50.append(g["p50_ms"] / other["p50_ms"])
            row[f"fps_vs_{base}"] = median(list(ratios_fps))
            row[f"p50_vs_{base}"] = median(list(ratios_p50))
            row[f"per_core_vs_{base}"] = median(list(ratios_cpu))
        rows.append(row)
    order = {k: i for i, k in enumerate(KINDS)}
    rows.sort(key=lambda r: (r["model"], r["sessions"], order[r["kind"]]))
    return rows


def _row(rows: list[dict[str, Any]], model: str, sessions: int, kind: str) -> dict[str, Any]:
    return next(
        (r for r in rows if (r["model"], r["sessions"], r["kind"]) == (model, sessions, kind)), {}
    )


def targets(rows: list[dict[str, Any]], mem: dict[str, Any] | None) -> list[dict[str, Any]]:
    def check(name: str, value: float | None, limit: float, at_least: bool) -> dict[str, Any]:
        met = value is not None and (value >= limit if at_least else value <= limit)
        return {"target": name, "value": value, "limit": limit, "met": met}

    big = max((r["sessions"] for r in rows), default=0)
    out = [
        check(
            f"gru C={big}: on / echo frames/s >= 0.85",
            _row(rows, "gru", big, "on").get("fps_vs_echo"),
            0.85,
            True,
        ),
        check(
            f"lstm C={big}: on / off frames/s >= 1.5",
            _row(rows, "lstm", big, "on").get("fps_vs_off"),
            1.5,
            True,
        ),
    ]
    for model in sorted({r["model"] for r in rows}):
        out.append(
            check(
                f"{model} C=1: on p50 / echo p50 <= 1.3",
                _row(rows, model, 1, "on").get("p50_vs_echo"),
                1.3,
                False,
            )
        )
        out.append(
            check(
                f"{model} C={big}: mean batch size >= 32",
                _row(rows, model, big, "on").get("mean_batch"),
                32,
                True,
            )
        )
    if mem is not None:
        out.append(
            check(
                f"{mem['sessions']:,} idle gru sessions: server RSS growth <= 300 MB",
                mem["total_mb"],
                300,
                False,
            )
        )
    return out


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(
    rows: list[dict[str, Any]], ort: list[dict[str, Any]], mem: dict[str, Any] | None, goals: Any
) -> str:
    lines = [
        "| model | C | server | frames/s | vs echo | vs off | p50 ms | p99 ms | mean batch "
        "| server CPU µs/frame | frames/s per server core | per core vs echo | per core vs off |",
        "| --- | ---: | --- |" + " ---: |" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['sessions']} | {LABELS[r['kind']]} | {_fmt(r['frames_per_s'], 0)}"
            f" | {_fmt(r['fps_vs_echo'], 2) if r['kind'] != 'echo' else ''}"
            f" | {_fmt(r['fps_vs_off'], 2) if r['kind'].startswith('on') else ''}"
            f" | {_fmt(r['p50_ms'], 2)} | {_fmt(r['p99_ms'], 2)} | {_fmt(r['mean_batch'])}"
            f" | {_fmt(r['cpu_us_per_frame'], 0)} | {_fmt(r['frames_per_core_s'], 0)}"
            f" | {_fmt(r['per_core_vs_echo'], 2) if r['kind'] != 'echo' else ''}"
            f" | {_fmt(r['per_core_vs_off'], 2) if r['kind'].startswith('on') else ''} |"
        )
    lines += ["", "ONNX Runtime alone (one thread, T = 1):", ""]
    lines += ["| model | batch | µs per call | frames/s |", "| --- | ---: | ---: | ---: |"]
    for o in ort:
        lines.append(
            f"| {o['model']} | {o['batch']} | {_fmt(o['us_per_call'], 0)} "
            f"| {_fmt(o['frames_per_s'], 0)} |"
        )
    if mem is not None:
        lines += [
            "",
            f"Memory: {mem['opened']:,} idle gru sessions grew the server's RSS by "
            f"{mem['total_mb']:.0f} MB ({_fmt(mem['bytes_per_session'], 0)} bytes per session; "
            f"{mem['rss_before_mb']:.0f} MB before, {mem['rss_after_mb']:.0f} MB after).",
        ]
    lines += ["", "| target | value | met |", "| --- | ---: | --- |"]
    for g in goals:
        lines.append(f"| {g['target']} | {_fmt(g['value'], 2)} | {'yes' if g['met'] else 'NO'} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 1e9, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


@contextlib.contextmanager
def servers(models: str) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for kind in SERVER_KINDS:
            started[kind] = start_server(kind, models)
        yield started
    finally:
        for server in started.values():
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="rnnstream batching benchmark")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "batching.json")
    parser.add_argument("--models", default="gru,lstm")
    parser.add_argument("--sessions", default="1,64,512", help="C values, comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="runs per cell (median taken)")
    parser.add_argument("--duration", type=float, default=1.5, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per run")
    parser.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(4, os.cpu_count() or 1)),
        help="loadtest processes for C > 1 (default: cores, at most 4)",
    )
    parser.add_argument("--memory-sessions", type=int, default=100_000, help="0 skips it")
    parser.add_argument(
        "--report-only", type=Path, help="re-render the table of an earlier --out file; no runs"
    )
    args = parser.parse_args()
    if args.report_only is not None:
        saved = json.loads(args.report_only.read_text())
        rows = summarize(saved["runs"])
        print(markdown(rows, saved["ort_alone"], saved["memory"], targets(rows, saved["memory"])))
        return
    models = [m for m in args.models.split(",") if m]
    counts = [int(c) for c in args.sessions.split(",")]
    started = time.monotonic()
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load_average_at_start']}")
    ort = [row for m in models for row in ort_alone(m, counts, 0.3)]
    runs: list[dict[str, Any]] = []
    with servers(",".join(models)) as running:
        for round_ in range(args.rounds):
            for model in models:
                for sessions in counts:
                    for kind in KINDS:
                        server = running[SERVER_OF.get(kind, kind)]
                        run = measure(server, model, sessions, args, kind != "on_single")
                        run.update(model=model, sessions=sessions, kind=kind, round=round_)
                        runs.append(run)
                        print(
                            f"round {round_ + 1} {model} C={sessions} {kind}: "
                            f"{run['frames_per_s']:,.0f} frames/s, p50 {run['p50_ms']} ms, "
                            f"batch {_fmt(run['mean_batch'])}, "
                            f"{_fmt(run['cpu_us_per_frame'], 0)} µs/frame",
                            flush=True,
                        )
    mem = memory(args.memory_sessions) if args.memory_sessions else None
    rows = summarize(runs)
    goals = targets(rows, mem)
    table = markdown(rows, ort, mem, goals)
    print()
    print(table)
    result = {
        "machine": info,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.monotonic() - started,
        "summary": rows,
        "ort_alone": ort,
        "memory": mem,
        "targets": goals,
        "runs": runs,
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{time.monotonic() - started:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
