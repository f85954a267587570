"""Soak test (by hand, not CI): a server under ~70% of its measured capacity for minutes, with
sessions opening and ending all the time; reports server RSS growth after warm-up and errors.

    .venv/bin/python bench/soak.py --minutes 10 --json soak.json

1. Starts `rnnstream-server` (one model) as a child process on 127.0.0.1.
2. Measures capacity: a closed-loop `rnnstream loadtest` run (frames/s answered).
3. Runs open loop at --load x capacity: --sessions slots, each opening a session, sending
   --session-frames frames on schedule (latency counts from each frame's due time), ending it
   and opening the next. RSS of the server is sampled every --sample seconds.
4. Passes when no request failed and RSS grew less than 5% from the end of the warm-up to the
   end of the run; prints and (with --json) writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rnnstream import AsyncClient, AsyncSession, RnnstreamError  # noqa: E402
from rnnstream._health import check_health  # noqa: E402
from rnnstream.loadtest import LoadtestOptions, run_loadtest  # noqa: E402
from rnnstream.loadtest._stats import new_histogram, record_seconds  # noqa: E402

GROWTH_LIMIT = 0.05


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@dataclass
class SoakStats:
    sent: int = 0
    answered: int = 0
    sessions_opened: int = 0
    sessions_ended: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)


async def _slot(
    client: AsyncClient,
    model: str,
    frames: np.ndarray,
    slot: int,
    slots: int,
    rate: float,
    session_frames: int,
    start: float,
    until: float,
    stats: SoakStats,
    latency: Any,
) -> None:
    """One of `slots` session slots: its frames fall due every slots/rate s, offset by slot."""
    gap = slots / rate
    n = 0  # frames this slot has sent so far (all sessions)
    loop = asyncio.get_running_loop()
    while True:
        due = start + (slot + n * slots) / rate
        if due >= until:
            return
        try:
            session: AsyncSession = await client.open(model)
        except RnnstreamError as exc:
            stats.errors[f"open {exc.code.name}"] += 1
            await asyncio.sleep(gap)
            n += 1
            continue
        stats.sessions_opened += 1
        pending: list[asyncio.Future[Any]] = []
        for k in range(session_frames):
            due = start + (slot + n * slots) / rate
            if due >= until:
                break
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            row = frames[(slot * 7919 + n) % len(frames)]
            n += 1
            try:
                future = await session.send(row)
            except RnnstreamError as exc:
                stats.errors[f"frame {exc.code.name}"] += 1
                continue
            stats.sent += 1

            def done(f: asyncio.Future[Any], due: float = due) -> None:
                if f.cancelled():
                    stats.errors["frame CANCELLED"] += 1
                elif (exc := f.exception()) is not None:
                    name = exc.code.name if isinstance(exc, RnnstreamError) else type(exc).__name__
                    stats.errors[f"frame {name}"] += 1
                else:
                    stats.answered += 1
                    record_seconds(latency, loop.time() - due)

            future.add_done_callback(done)
            pending.append(future)
            if k % 64 == 63:
                pending = [f for f in pending if not f.done()]
        if pending:
            await asyncio.wait(pending)
        try:
            await session.end()
            stats.sessions_ended += 1
        except RnnstreamError as exc:
            stats.errors[f"end {exc.code.name}"] += 1


async def _sample_rss(pid: int, start: float, until: float, every: float, stats: SoakStats) -> None:
    loop = asyncio.get_running_loop()
    while loop.time() < until:
        stats.rss.append((round(loop.time() - start, 1), _rss_bytes(pid)))
        await asyncio.sleep(every)
    stats.rss.append((round(loop.time() - start, 1), _rss_bytes(pid)))


async def _soak(args: argparse.Namespace, target: str, pid: int, rate: float) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    async with AsyncClient(target) as probe:
        info = await probe.get_model(args.model)
    shape = [d if d > 0 else 1 for d in info.inputs[0].shape]
    del shape[info.inputs[0].batch_axis]
    frames = rng.standard_normal((1024, *shape)).astype(np.float32)
    stats = SoakStats()
    latency = new_histogram()
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.5
    until = start + args.minutes * 60
    clients = [AsyncClient(target) for _ in range(args.connections)]
    try:
        sampler = asyncio.ensure_future(_sample_rss(pid, start, until, args.sample, stats))
        slots = [
            _slot(
                clients[i % len(clients)],
                args.model,
                frames,
                i,
                args.sessions,
                rate,
                args.session_frames,
                start,
                until,
                stats,
                latency,
            )
            for i in range(args.sessions)
        ]
        await asyncio.gather(*slots)
        await sampler
    finally:
        for client in clients:
            await client.close()
    warm = [b for t, b in stats.rss if t >= args.warmup]
    baseline, final = warm[0], warm[-1]
    times = np.array([t for t, _ in stats.rss if t >= args.warmup])
    values = np.array(warm, dtype=np.float64)
    slope = float(np.polyfit(times, values, 1)[0]) * 60 if len(values) > 2 else 0.0
    seconds = args.minutes * 60
    return {
        "rate_target_fps": round(rate, 1),
        "frames_sent": stats.sent,
        "frames_answered": stats.answered,
        "achieved_fps": round(stats.answered / seconds, 1),
        "sessions_opened": stats.sessions_opened,
        "sessions_ended": stats.sessions_ended,
        "errors": dict(stats.errors),
        "latency_ms": {
            p: round(latency.get_value_at_percentile(q) / 1000, 3)
            for p, q in (("p50", 50), ("p99", 99), ("p99.9", 99.9))
        }
        | {"max": round(latency.get_max_value() / 1000, 3)},
        "rss_start_mb": round(stats.rss[0][1] / 2**20, 1),
        "rss_after_warmup_mb": round(baseline / 2**20, 1),
        "rss_final_mb": round(final / 2**20, 1),
        "rss_max_after_warmup_mb": round(max(warm) / 2**20, 1),
        "rss_growth_after_warmup": round((final - baseline) / baseline, 4),
        "rss_trend_mb_per_min": round(slope / 2**20, 3),
        "rss_samples": [(t, round(b / 2**20, 2)) for t, b in stats.rss],
    }


def _metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = {}
    for line in text.splitlines():
        if line.startswith("rnnstream_") and "_created" not in line and "_bucket" not in line:
            name, _, value = line.rpartition(" ")
            wanted[name] = float(value)
    return wanted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", default="gru")
    add("--minutes", type=float, default=10.0, help="soak length (default 10)")
    add("--load", type=float, default=0.7, help="fraction of measured capacity (default 0.7)")
    add("--rate", type=float, help="frames/s to soak at instead of measuring capacity")
    add("--capacity-seconds", type=float, default=20.0, help="measured seconds of the capacity run")
    add("--sessions", type=int, default=64, help="sessions open at once (default 64)")
    add("--session-frames", type=int, default=200, help="frames per session before it ends")
    add("--connections", type=int, default=1)
    add("--warmup", type=float, default=60.0, help="seconds before the RSS baseline (default 60)")
    add("--sample", type=float, default=5.0, help="seconds between RSS samples")
    add("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    port, metrics_port = _free_port(), _free_port()
    target = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "rnnstream.server", "--host", "127.0.0.1", "--port", str(port),
         "--model-repository", str(REPO / "models"), "--models", args.model,
         "--metrics-port", str(metrics_port), "--log-level", "WARNING"],
        cwd=REPO,
    )  # fmt: skip
    try:
        ready = check_health(target, timeout=60)
        if not ready.ok:
            print(f"server did not come up: {ready.message}", file=sys.stderr)
            return 2
        capacity = None
        if args.rate is None:
            report = run_loadtest(
                LoadtestOptions(
                    model=args.model,
                    target=target,
                    sessions=args.sessions,
                    inflight=4,
                    duration=args.capacity_seconds,
                    warmup=3,
                    progress=False,
                )
            )
            capacity = report.frames_per_second
            rate = capacity * args.load
            print(f"capacity {capacity:.0f} frames/s (closed loop, {args.sessions} sessions)")
        else:
            rate = args.rate
        print(f"soaking {args.minutes:g} min at {rate:.0f} frames/s ...", flush=True)
        result = asyncio.run(_soak(args, target, server.pid, rate))
        result = {"capacity_fps": capacity and round(capacity, 1), "load": args.load} | result
        after = _metrics(metrics_port)
        result["server_metrics"] = {
            k: v
            for k, v in after.items()
            if k.startswith(("rnnstream_frames_total", "rnnstream_sessions", "rnnstream_active"))
        }
        result["options"] = {k: str(v) for k, v in vars(args).items()}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    errors = sum(result["errors"].values())
    growth = result["rss_growth_after_warmup"]
    result["passed"] = errors == 0 and growth < GROWTH_LIMIT
    shown = {k: v for k, v in result.items() if k != "rss_samples"}
    print(json.dumps(shown, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
