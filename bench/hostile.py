"""Hostile clients against a real server process: memory and latency, measured from outside.

One command (about 4 minutes on 2 cores; run it alone, under the bench lock):

    flock /tmp/rnnstream-bench.lock python bench/hostile.py

Each run of a memory case (--repeats, 3 by default) starts a fresh `rnnstream-server` (default
limits, --max-buffered-bytes 256 MiB) and samples its RSS every 20 ms (psutil): before (after
start-up and a warm-up frame), the peak while the client does its worst, and after the client
has left (its calls cancelled, its channel closed, 3 s later). The cases replay what a hostile
client found:

  10  one stream, 200 sessions, T=1024 frames written and no answer ever read
  11  6 sessions each send 64 frames of T=4096, read their answers, then sit idle
  12  300 stateless Infer calls of T=4096 at once
  13  one OIP ModelInfer, stateless, with a batch of 100,000

Targets: RSS growth (peak - before) under 300 MB (1 GB for 12), and what stays after the client
left (after - before) under 100 MB (idle sessions' rings may keep up to a quarter of the
budget). The forecast case measures the p99 latency of 200 sessions' frames (co2_forecaster,
closed loop) without and with another client rolling 4,096-step forecasts back to back, in
--rounds (5); target: the p99 with forecasts within 2x of the p99 without, median over rounds.

Results go to bench/results/hostile.json (--out), with the machine and its load average at the
start and the end. `--report-only FILE` re-renders the table of an earlier run into
docs/production.md (between its hostile-table markers) without running anything; a run does
the same with its own figures. tests/test_hostile_docs.py checks that the two agree.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil

from rnnstream.proto.inference import grpc_service_pb2 as oip
from rnnstream.proto.inference import grpc_service_pb2_grpc as oip_grpc
from rnnstream.proto.tensor_codec import encode
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.proto.v1 import rnnstream_pb2_grpc as pb_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO, free_port, stop_process
from _common import machine as common_machine

DOCS = REPO / "docs" / "production.md"
START, END = "<!-- hostile-table:start -->", "<!-- hostile-table:end -->"
MB = 1e6
GROWTH_TARGET_MB = {"10": 300, "11": 300, "12": 1000, "13": 300}
KEPT_TARGET_MB = 100
LATENCY_TARGET = 2.0
CASES = {
    "10": "one stream, 200 sessions, T=1024 frames written, no answer read",
    "11": "6 sessions x 64 frames of T=4096, answers read, then idle",
    "12": "300 stateless Infer calls of T=4096 at once",
    "13": "one stateless OIP ModelInfer with a batch of 100,000",
}


class Server:
    """rnnstream-server as a child process, its RSS sampled on a thread."""

    def __init__(self, models: str, *flags: str) -> None:
        self.port = free_port()
        command = [sys.executable, "-m", "rnnstream.server", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--models", models, "--metrics-port", "0"]
        command += ["--log-level", "WARNING", *flags]
        self.process = subprocess.Popen(command, cwd=REPO)
        self.target = f"127.0.0.1:{self.port}"
        self._ps = psutil.Process(self.process.pid)
        self.peak = 0
        self._sampling = False
        self._sampler: threading.Thread | None = None
        self._wait_ready(models.split(",")[0])

    def _wait_ready(self, model: str) -> None:
        deadline = time.monotonic() + 60
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.RnnstreamStub(channel)
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"server exited with {self.process.returncode}")
                try:
                    stub.GetModel(pb.GetModelRequest(name=model), timeout=1)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise RuntimeError("server did not come up within 60 s") from None
                    time.sleep(0.2)

    def rss(self) -> int:
        return int(self._ps.memory_info().rss)

    def cpu_seconds(self) -> float:
        times = self._ps.cpu_times()
        return float(times.user + times.system)

    @contextlib.contextmanager
    def sampling(self) -> Iterator[None]:
        """Track the peak RSS while the block runs."""
        self.peak = self.rss()
        self._sampling = True

        def sample() -> None:
            while self._sampling:
                self.peak = max(self.peak, self.rss())
                time.sleep(0.02)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        try:
            yield
        finally:
            self._sampling = False
            self._sampler.join(5)
            self.peak = max(self.peak, self.rss())

    def stop(self) -> None:
        stop_process(self.process, 20)


def _x(steps: int, features: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((steps, features)).astype(np.float32)


async def _open(call: Any, model: str, count: int) -> list[str]:
    """Open `count` sessions on a raw Stream call, one message each way at a time."""
    sids = []
    for _ in range(count):
        await call.write(pb.StreamRequest(open=pb.OpenSession(model=model)))
        sids.append((await call.read()).opened.session_id)
    return sids


async def _warm(target: str, model: str, features: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        tensor = encode(_x(1, features), "x")
        for _ in range(3):
            await stub.Infer(pb.InferRequest(model=model, inputs=[tensor]), timeout=30)


async def _never_reads(target: str) -> dict[str, Any]:
    """Case 10: write T=1024 frames to 200 sessions on one stream; read nothing."""
    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
    stub = pb_grpc.RnnstreamStub(channel)
    call = stub.Stream()
    sids = await _open(call, "gru", 200)
    tensor = encode(_x(1024), "x")
    written = 0

    async def write_all() -> None:
        nonlocal written
        for index in range(8):
            for sid in sids:
                frame = pb.Frame(session_id=sid, frame_index=index, inputs=[tensor])
                await call.write(pb.StreamRequest(frame=frame))
                written += 1

    writer = asyncio.create_task(write_all())
    previous, still = -1, 0.0
    while not writer.done() and still < 3.0:  # until the writes stall for 3 s
        await asyncio.sleep(0.1)
        still = still + 0.1 if written == previous else 0.0
        previous = written
    writer.cancel()
    call.cancel()
    await channel.close()
    return {"frames_written": written, "frames_offered": 8 * len(sids)}


async def _idle_rings(target: str) -> dict[str, Any]:
    """Case 11: 6 sessions x 64 frames of T=4096 (2 MB of output each), answers read."""
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", -1)]
    ) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        call = stub.Stream()
        tensor = encode(_x(4096), "x")
        sids = await _open(call, "gru", 6)
        answered = 0
        for index in range(64):
            for sid in sids:
                frame = pb.Frame(session_id=sid, frame_index=index, inputs=[tensor])
                await call.write(pb.StreamRequest(frame=frame))
            for _ in sids:
                if (await call.read()).WhichOneof("kind") == "output":
                    answered += 1
        call.cancel()
    return {"frames_answered": answered}


async def _unary_flood(target: str) -> dict[str, Any]:
    """Case 12: 300 stateless Infer calls of T=4096 at once."""
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_receive_message_length", -1)]
    ) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        request = pb.InferRequest(model="gru", inputs=[encode(_x(4096), "x")])
        results = await asyncio.gather(
            *(stub.Infer(request, timeout=120) for _ in range(300)), return_exceptions=True
        )
    codes: dict[str, int] = {}
    for result in results:
        name = result.code().name if isinstance(result, grpc.aio.AioRpcError) else "OK"
        codes[name] = codes.get(name, 0) + 1
    return {"answers": codes}


async def _huge_batch(target: str) -> dict[str, Any]:
    """Case 13: one stateless OIP request with a batch of 100,000 (6.4 MB)."""
    request = oip.ModelInferRequest(model_name="gru")
    request.inputs.add(name="x", datatype="FP32", shape=[100_000, 16])
    request.raw_input_contents.append(_x(100_000).tobytes())
    started = time.monotonic()
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.max_send_message_length", -1)]
    ) as channel:
        try:
            await oip_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
            answer = "OK"
        except grpc.aio.AioRpcError as exc:
            answer = f"{exc.code().name}: {exc.details()}"
    return {"answer": answer[:160], "seconds": round(time.monotonic() - started, 3)}


MEMORY_CASES: dict[str, Callable[[str], Any]] = {
    "10": _never_reads,
    "11": _idle_rings,
    "12": _unary_flood,
    "13": _huge_batch,
}


def memory_run(case: str) -> dict[str, Any]:
    """One fresh server, one hostile client: RSS before, peak and after (bytes -> MB)."""
    server = Server("gru")
    try:
        asyncio.run(_warm(server.target, "gru", 16))
        time.sleep(0.5)
        before = server.rss()
        cpu = server.cpu_seconds()
        with server.sampling():
            seen = asyncio.run(MEMORY_CASES[case](server.target))
        cpu = server.cpu_seconds() - cpu
        time.sleep(3.0)  # the client has left: let the server give back what it held
        after = server.rss()
    finally:
        server.stop()
    return {
        "rss_before_mb": round(before / MB, 1),
        "rss_peak_mb": round(server.peak / MB, 1),
        "rss_after_mb": round(after / MB, 1),
        "growth_mb": round((server.peak - before) / MB, 1),
        "kept_mb": round((after - before) / MB, 1),
        "server_cpu_s": round(cpu, 2),
        "seen": seen,
    }


def memory_case(case: str, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        runs.append(memory_run(case))
        print(f"case {case}: {runs[-1]}", flush=True)
    growth = max(r["growth_mb"] for r in runs)
    kept = max(r["kept_mb"] for r in runs)
    return {
        "case": case,
        "client": CASES[case],
        "runs": runs,
        "growth_target_mb": GROWTH_TARGET_MB[case],
        "kept_target_mb": KEPT_TARGET_MB,
        # every run must meet both targets
        "met": growth < GROWTH_TARGET_MB[case] and kept < KEPT_TARGET_MB,
    }


# -- item 9: other sessions' latency while a long forecast runs --------------------------------
async def _frames(
    call: Any, sids: list[str], next_index: dict[str, int], seconds: float
) -> list[float]:
    """Closed loop on one stream, one frame in flight per session: each frame's latency (s)."""
    latencies: list[float] = []
    tensor = encode(np.array([[340.0]], np.float32), "x")
    sent: dict[str, float] = {}

    async def send(sid: str) -> None:
        frame = pb.Frame(session_id=sid, frame_index=next_index[sid], inputs=[tensor])
        next_index[sid] += 1
        sent[sid] = time.perf_counter()
        await call.write(pb.StreamRequest(frame=frame))

    for sid in sids:
        await send(sid)
    deadline = time.monotonic() + seconds
    waiting = len(sids)
    while waiting:
        response = await call.read()
        kind = response.WhichOneof("kind")
        if kind != "output":
            raise RuntimeError(f"unexpected answer: {response}")
        sid = response.output.session_id
        latencies.append(time.perf_counter() - sent.pop(sid))
        if time.monotonic() < deadline:
            await send(sid)
        else:
            waiting -= 1
    return latencies


async def _forecaster(stub: Any, sid: str, stop: asyncio.Event) -> int:
    rolled = 0
    while not stop.is_set():
        await stub.Forecast(pb.ForecastRequest(session_id=sid, steps=4096), timeout=120)
        rolled += 1
    return rolled


async def _latency_round(target: str, seconds: float) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.RnnstreamStub(channel)
        call = stub.Stream()
        sids = await _open(call, "co2_forecaster", 201)
        forecasting, others = sids[0], sids[1:]
        seed = encode(np.array([[340.0]], np.float32), "x")
        await stub.Infer(pb.InferRequest(session_id=forecasting, inputs=[seed]), timeout=30)
        next_index = dict.fromkeys(others, 0)
        await _frames(call, others, next_index, 1.0)  # warm-up
        alone = await _frames(call, others, next_index, seconds)
        stop = asyncio.Event()
        rolling = asyncio.create_task(_forecaster(stub, forecasting, stop))
        await asyncio.sleep(0.2)
        beside = await _frames(call, others, next_index, seconds)
        stop.set()
        forecasts = await rolling
        call.cancel()
    p99_alone = float(np.percentile(alone, 99)) * 1e3
    p99_beside = float(np.percentile(beside, 99)) * 1e3
    return {
        "p99_ms_alone": round(p99_alone, 2),
        "p99_ms_with_forecasts": round(p99_beside, 2),
        "ratio": round(p99_beside / p99_alone, 2),
        "frames_alone": len(alone),
        "frames_with_forecasts": len(beside),
        "forecasts_rolled": forecasts,
    }


def latency_case(rounds: int, seconds: float) -> dict[str, Any]:
    server = Server("co2_forecaster")
    try:
        asyncio.run(_warm(server.target, "co2_forecaster", 1))
        runs = [asyncio.run(_latency_round(server.target, seconds)) for _ in range(rounds)]
    finally:
        server.stop()
    ratio = statistics.median(r["ratio"] for r in runs)
    return {"rounds": runs, "median_ratio": ratio, "target": LATENCY_TARGET, "met": ratio <= 2}


# -- report -------------------------------------------------------------------------------------
def _seen(case: str, run: dict[str, Any]) -> str:
    seen = run["seen"]
    if case == "10":
        return f"{seen['frames_written']} of {seen['frames_offered']} frames written, then stalled"
    if case == "11":
        return f"{seen['frames_answered']} frames answered"
    if case == "12":
        return ", ".join(f"{n} {code}" for code, n in sorted(seen["answers"].items()))
    return f"{seen['answer']} ({seen['seconds']} s, server CPU {run['server_cpu_s']} s)"


def _spread(runs: list[dict[str, Any]], key: str) -> str:
    """Median MB over the runs, and their range when there are several."""
    values = [r[key] for r in runs]
    text = f"{statistics.median(values):.0f}"
    if len(values) > 1:
        text += f" ({min(values):.0f}-{max(values):.0f})"
    return text


def markdown(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if result["memory"]:
        repeats = sorted({len(row["runs"]) for row in result["memory"]})
        lines += [
            f"RSS in MB, median of {'/'.join(map(str, repeats))} runs (lowest-highest); growth "
            "(peak - before) and kept (after - before): the highest run.",
            "",
            "| case | the client | RSS before | peak | after | growth (target) | kept (target) "
            "| met | what it saw (last run) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
    for row in result["memory"]:
        runs = row["runs"]
        growth = max(r["growth_mb"] for r in runs)
        kept = max(r["kept_mb"] for r in runs)
        lines.append(
            f"| {row['case']} | {row['client']} | {_spread(runs, 'rss_before_mb')} "
            f"| {_spread(runs, 'rss_peak_mb')} | {_spread(runs, 'rss_after_mb')} "
            f"| {growth:.0f} (< {row['growth_target_mb']}) "
            f"| {kept:.0f} (< {row['kept_target_mb']}) "
            f"| {'yes' if row['met'] else 'NO'} | {_seen(row['case'], runs[-1])} |"
        )
    latency = result["latency"]
    if latency is not None:
        rounds = latency["rounds"]
        alone = ", ".join(f"{r['p99_ms_alone']:.1f}" for r in rounds)
        beside = ", ".join(f"{r['p99_ms_with_forecasts']:.1f}" for r in rounds)
        ratios = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
        lines += [
            *([""] if lines else []),
            "| case | p99 of 200 sessions' frames, ms, per round | with 4,096-step forecasts "
            "rolled beside them | ratio per round | median ratio (target) | met |",
            "| --- | --- | --- | --- | ---: | --- |",
            f"| 9 | {alone} | {beside} | {ratios} | {latency['median_ratio']:.2f} "
            f"(<= {latency['target']:g}) | {'yes' if latency['met'] else 'NO'} |",
        ]
    machine = result["machine"]
    start, end = machine["load_average_at_start"][0], machine["load_average_at_end"][0]
    lines += [
        "",
        f"Measured {result['date']} on {machine['cpu']}, {machine['cores']} cores, load average "
        f"{start:.2f} at the start and {end:.2f} at the end (`bench/results/hostile.json`; other "
        "work on the machine may add noise).",
    ]
    return "\n".join(lines)


def write_docs(table: str, docs: Path = DOCS) -> None:
    """Replace the table between the markers in docs/production.md."""
    text = docs.read_text()
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    docs.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def machine() -> dict[str, Any]:
    return {**common_machine(), "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description="rnnstream against hostile clients")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "hostile.json")
    parser.add_argument("--cases", default="10,11,12,13,9", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each memory case")
    parser.add_argument("--rounds", type=int, default=5, help="latency rounds (case 9)")
    parser.add_argument("--seconds", type=float, default=3.0, help="measured s per latency run")
    parser.add_argument("--report-only", type=Path, help="re-render an earlier --out file")
    args = parser.parse_args()
    if args.report_only is not None:
        table = markdown(json.loads(args.report_only.read_text()))
        write_docs(table)
        print(table)
        return
    cases = [c for c in args.cases.split(",") if c]
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "options": {k: str(v) for k, v in vars(args).items()},
        "memory": [],
        "latency": None,
    }
    for case in cases:
        if case == "9":
            result["latency"] = latency_case(args.rounds, args.seconds)
            print(f"case 9: {result['latency']}", flush=True)
        else:
            result["memory"].append(memory_case(case, args.repeats))
    result["machine"]["load_average_at_end"] = os.getloadavg()
    table = markdown(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    write_docs(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
