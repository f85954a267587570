"""Shared by the benchmarks: servers run as processes, `rnnstream loadtest` runs, the server's
metrics and CPU, ONNX Runtime alone, a quiet machine, spreads over rounds, and the docs tables
written from a results file (--report-only)."""

from __future__ import annotations

import argparse
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
from collections.abc import Callable, Iterable, Sequence
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
RESULTS = REPO / "bench" / "results"
PERFORMANCE_MD = REPO / "docs" / "performance.md"
README_MD = REPO / "README.md"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server process (rnnstream-server or the echo server) with its metrics port."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def processes(self) -> list[psutil.Process]:
        """The process and its children (--workers N runs N of them)."""
        main = psutil.Process(self.process.pid)
        return [main, *main.children(recursive=True)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for proc in self.processes():
            with contextlib.suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += float(times.user + times.system)
        return total

    def rss_bytes(self) -> int:
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def scrape(self, model: str, ports: Sequence[int] = ()) -> dict[str, float]:
        """Frames answered, batch-size histogram sum and count, Stream messages in and out."""
        out = {"frames": 0.0, "batch_sum": 0.0, "batch_count": 0.0, "requests": 0.0}
        out["responses"] = 0.0
        for port in ports or (self.metrics_port,):
            text = _metrics_text(port)
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    name, labels = sample.name, sample.labels
                    if name == "rnnstream_stream_requests_total":
                        out["requests"] += sample.value
                    elif name == "rnnstream_stream_responses_total":
                        out["responses"] += sample.value
                    if labels.get("model") != model:
                        continue
                    if name == "rnnstream_frames_total":
                        out["frames"] += sample.value
                    elif name == "rnnstream_batch_size_sum":
                        out["batch_sum"] += sample.value
                    elif name == "rnnstream_batch_size_count":
                        out["batch_count"] += sample.value
        return out

    def stop(self) -> None:
        stop_process(self.process, 15)


def stop_process(process: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM (a server's graceful shutdown), then SIGKILL after `grace` seconds."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _metrics_text(port: int) -> str:
    with contextlib.closing(socket.create_connection(("127.0.0.1", port))) as s:
        s.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b"".join(iter(lambda: s.recv(65536), b""))
    return data.split(b"\r\n\r\n", 1)[1].decode()


def server_command(kind: str, models: str, port: int, metrics_port: int, *flags: str) -> list[str]:
    """rnnstream-server (`kind` "rnnstream") or the echo server, with their metrics on."""
    if kind == "echo":
        script = str(REPO / "bench" / "echo_server.py")
        command = [sys.executable, script, "--models", models, "--port", str(port)]
        return [
            *command,
            "--metrics-port",
            str(metrics_port),
            "--model-repository",
            str(REPO / "models"),
        ]
    command = [sys.executable, "-m", "rnnstream.server", "--models", models, "--port", str(port)]
    command += ["--metrics-port", str(metrics_port), "--model-repository", str(REPO / "models")]
    # Per-session INFO log lines would be measured too; the benchmark is about the data path.
    command += ["--log-level", "WARNING", "--max-sessions-per-stream", "100000"]
    return [*command, *flags]


def export_revision(revision: str, folder: Path) -> Path:
    """rnnstream as it was at git `revision`, importable from the folder returned (put it on
    PYTHONPATH: it comes before the installed package); the packages laid out as pyproject.toml
    maps them."""
    source = folder / "source"
    source.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", revision, "client", "server", "proto"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    packages = folder / "packages"
    packages.mkdir()
    (source / "client").rename(packages / "rnnstream")
    (source / "server").rename(packages / "rnnstream" / "server")
    (source / "proto" / "rnnstream" / "proto").rename(packages / "rnnstream" / "proto")
    return packages


def start_server(
    name: str, kind: str, models: str, *flags: str, pythonpath: Path | None = None
) -> Server:
    """A server process, up and answering; `pythonpath`: run the rnnstream found there."""
    port, metrics_port = free_port(), free_port()
    command = server_command(kind, models, port, metrics_port, *flags)
    env = None
    if pythonpath is not None:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    process = subprocess.Popen(command, cwd=REPO, env=env)
    server = Server(name, process, port, metrics_port)
    deadline = time.monotonic() + 90
    channel = grpc.insecure_channel(server.target)
    stub = pb_grpc.RnnstreamStub(channel)
    try:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} server exited with status {process.returncode}")
            try:
                stub.GetModel(pb.GetModelRequest(name=models.split(",")[0]), timeout=1)
                _metrics_text(metrics_port)
                return server
            except (grpc.RpcError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} server did not come up within 90 s") from None
                time.sleep(0.2)
    finally:
        channel.close()


def histogram(port: int, name: str) -> dict[str, float]:
    """A histogram's cumulative bucket counts by upper bound ("+Inf" last), summed over labels."""
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(_metrics_text(port)):
        for sample in family.samples:
            if sample.name == f"{name}_bucket":
                bound = sample.labels["le"]
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
    return buckets


def loadtest(target: str, model: str, seconds: float, warmup: float, *flags: str) -> dict[str, Any]:
    """One `rnnstream loadtest` run in its own process(es); its JSON report."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.json"
        command = [sys.executable, "-m", "rnnstream", "loadtest", "--target", target]
        command += ["--model", model, "--no-progress", "--json", str(report), "--drain", "10"]
        command += ["--duration", str(seconds), "--warmup", str(warmup), *flags]
        timeout = warmup + seconds + 120
        subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL, check=False, timeout=timeout)
        return dict(json.loads(report.read_text()))


def measure(
    server: Server,
    model: str,
    seconds: float,
    warmup: float,
    flags: Sequence[str],
    metrics_ports: Sequence[int] = (),
) -> dict[str, Any]:
    """A load test against `server`, with the server's CPU time and counters over it."""
    before, cpu_before = server.scrape(model, metrics_ports), server.cpu_seconds()
    report = loadtest(server.target, model, seconds, warmup, *flags)
    after, cpu_after = server.scrape(model, metrics_ports), server.cpu_seconds()
    opened = report["sessions"]
    if opened["opened"] < opened["requested"]:
        # Fewer sessions than the row says would measure another workload, silently.
        raise RuntimeError(
            f"{server.name}: only {opened['opened']} of {opened['requested']} sessions opened "
            f"({opened['failed']})"
        )
    frames = after["frames"] - before["frames"]
    batches = after["batch_count"] - before["batch_count"]
    latency = report["latency_ms"]
    return {
        "frames_per_s": report["frames_per_second"],
        "p50_ms": latency.get("p50"),
        "p99_ms": latency.get("p99"),
        # Over the whole run (warm-up and session opens included), per frame the server answered.
        "mean_batch": (after["batch_sum"] - before["batch_sum"]) / batches if batches else None,
        "cpu_us_per_frame": (cpu_after - cpu_before) * 1e6 / frames if frames else None,
        "requests_per_frame": (after["requests"] - before["requests"]) / frames if frames else None,
        "responses_per_frame": (
            (after["responses"] - before["responses"]) / frames if frames else None
        ),
        "connections": report["connections"],
        "sessions": report["sessions"]["opened"],
        "answered": report["frames"]["answered"],
        "failed": report["frames"]["failed"],
        "problems": report.get("problems", []),
    }


def ort_alone(model: str, sizes: Iterable[int], seconds: float) -> list[dict[str, Any]]:
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
    }


def wait_for_quiet(limit: float, timeout: float) -> dict[str, Any]:
    """Wait until the 1-minute load average is under `limit` (other work on the machine would
    be measured too), at most `timeout` seconds; says how it went."""
    started = time.monotonic()
    while os.getloadavg()[0] >= limit and time.monotonic() - started < timeout:
        time.sleep(15)
    load = os.getloadavg()
    return {
        "waited_s": round(time.monotonic() - started),
        "limit": limit,
        "load_average_at_start": [round(x, 2) for x in load],
        "quiet": load[0] < limit,
    }


def load_now() -> list[float]:
    """The 1, 5 and 15-minute load averages (results note them at the start and the end)."""
    return [round(x, 2) for x in os.getloadavg()]


def spread(values: Iterable[float | None]) -> dict[str, float | None]:
    """Median, min and max of the known values."""
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_spread(cell: dict[str, float | None], digits: int = 1) -> str:
    """ "median (min-max)"."""
    if cell["median"] is None:
        return "-"
    return f"{fmt(cell['median'], digits)} ({fmt(cell['min'], digits)}-{fmt(cell['max'], digits)})"


def load_line(info: dict[str, Any]) -> str:
    quiet = info.get("quiet_machine", {})
    load = quiet.get("load_average_at_start")
    where = f"{info['machine']['cores']} cores ({info['machine']['cpu']})"
    text = f"{where}; 1-minute load average at the start {load[0] if load else '?'}"
    if info.get("load_average_at_end"):
        text += f", at the end {info['load_average_at_end'][0]}"
    if quiet and not quiet.get("quiet"):
        text += " (the machine never got quiet: other work ran during the measurement)"
    return text


# -- the docs tables ------------------------------------------------------------------------
def _markers(name: str, script: str | None = None) -> tuple[str, str]:
    return (
        f"<!-- bench:{name} (generated: python bench/{script or name}.py --report-only) -->",
        f"<!-- /bench:{name} -->",
    )


def docs_section(text: str, name: str, script: str | None = None) -> str:
    """The generated part of a document between the markers of benchmark `name` (made by
    bench/`script`.py, `name` by default)."""
    start, end = _markers(name, script)
    _head, found, rest = text.partition(start)
    if not found:
        raise KeyError(f"no {start} in the document")
    body, found, _ = rest.partition(end)
    if not found:
        raise KeyError(f"no {end} in the document")
    return body.strip("\n")


def write_docs_section(path: Path, name: str, table: str, script: str | None = None) -> None:
    start, end = _markers(name, script)
    text = path.read_text()
    head, found, rest = text.partition(start)
    if not found:
        raise SystemExit(f"{path} has no {start}: add it where the table belongs")
    _, found, tail = rest.partition(end)
    path.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def save(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")


def read(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def bench_parser(
    doc: str | None, name: str, *, clients: bool = True, quiet_timeout: float = 3600.0
) -> argparse.ArgumentParser:
    """The flags every load benchmark takes: where its results go, its rounds and their length,
    the load generator's processes (`clients`), waiting for a quiet machine, and
    --report-only / --write-docs. Each script adds its own."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)
    parser.add_argument("--out", type=Path, default=RESULTS / f"{name}.json")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds a run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds a run")
    if clients:
        default = max(1, min(4, os.cpu_count() or 1))
        parser.add_argument("--client-processes", type=int, default=default)
    parser.add_argument("--quiet-load", type=float, default=1.5, help="wait for a load under it")
    parser.add_argument("--quiet-timeout", type=float, default=quiet_timeout)
    parser.add_argument("--report-only", type=Path, help="print the tables of a results file")
    parser.add_argument("--write-docs", action="store_true", help="with --report-only: update docs")
    return parser


def reported_only(
    args: argparse.Namespace, name: str, report: Callable[[dict[str, Any]], str]
) -> dict[str, Any] | None:
    """With --report-only: print the results file's table (and with --write-docs put it into
    docs/performance.md) and return the results; None otherwise."""
    if args.report_only is None:
        return None
    result = read(args.report_only)
    table = report(result)
    print(table)
    if args.write_docs:
        write_docs_section(PERFORMANCE_MD, name, table)
    return result


def finish(
    args: argparse.Namespace,
    started: float,
    info: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
    **fields: Any,
) -> dict[str, Any]:
    """A run's results: the machine `info`, the load at its end, its date, options and length,
    and the script's own `fields`; saved to --out and its table printed."""
    options = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {
        **info,
        "load_average_at_end": load_now(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "options": {**options, **fields.pop("options", {})},
        "seconds": time.monotonic() - started,
        **fields,
    }
    save(result, args.out)
    print(report(result))
    print(f"\nwrote {args.out}")
    return result
