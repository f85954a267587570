"""GPU benchmark: proves the CUDA execution provider runs the model (no silent CPU fallback), times
ONNX Runtime alone on the CPU and on CUDA for LSTMs of hidden 512 and 1024 at batch 1..1024, and
runs rnnstream-server on CUDA (states kept on the GPU) and on the CPU at 512 and 4,096 sessions
with 512 sessions a message, all in one command:

    pip install -e '.[cuda,dev]' && python bench/gpu.py      # bench/results/gpu.json

On a machine without a usable CUDA provider it says so and exits 0. `--cpu-half` runs every part
that needs no GPU (building the models, ORT on the CPU, the server on the CPU); the tests run it
with small sizes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    REPO,
    RESULTS,
    fmt,
    load_line,
    machine,
    measure,
    save,
    start_server,
    wait_for_quiet,
)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
INPUT_SIZE = 256


def build_models(folder: Path, hiddens: list[int]) -> dict[int, Path]:
    """lstm_h<H>: an LSTM of input 256 and hidden H, random weights (models/build_models.py)."""
    spec = importlib.util.spec_from_file_location(
        "build_models", REPO / "models" / "build_models.py"
    )
    assert spec is not None and spec.loader is not None
    builder = importlib.util.module_from_spec(spec)
    sys.modules["build_models"] = builder
    spec.loader.exec_module(builder)
    import onnx

    paths = {}
    for hidden in hiddens:
        name = f"lstm_h{hidden}"
        model = builder.build_model(
            builder.ModelSpec(name, "LSTM", INPUT_SIZE, hidden, 2000 + hidden, f"LSTM {hidden}")
        )
        (folder / name).mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(folder / name / "model.onnx"))
        paths[hidden] = folder / name / "model.onnx"
    return paths


def cuda_available() -> tuple[bool, str]:
    providers = ort.get_available_providers()
    if CUDA not in providers:
        return False, f"onnxruntime {ort.__version__} offers {providers}, not {CUDA}"
    return True, ""


def _options(threads: int, strict: bool = False, profile: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if strict:  # a node the CUDA provider cannot run fails the session instead of moving to CPU
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    options.enable_profiling = profile
    return options


def prove_cuda(path: Path) -> dict[str, Any]:
    """Which provider ran each node: a session that may not fall back to the CPU, profiled."""
    session = ort.InferenceSession(str(path), _options(1, True, True), providers=[CUDA])
    feeds = _feeds(session, 4)
    session.run(None, feeds)
    profile = Path(session.end_profiling())
    counts: dict[str, int] = {}
    for event in json.loads(profile.read_text()):
        provider = event.get("args", {}).get("provider")
        if event.get("cat") == "Node" and provider:
            counts[provider] = counts.get(provider, 0) + 1
    profile.unlink(missing_ok=True)
    first = session.get_providers()[0]
    return {
        "session_provider": first,
        "nodes_by_provider": counts,
        "ok": first == CUDA and set(counts) == {CUDA},
    }


def _feeds(session: ort.InferenceSession, batch: int) -> dict[str, np.ndarray]:
    feeds = {}
    for arg in session.get_inputs():
        shape = [
            batch if i == 1 else (d if isinstance(d, int) else 1) for i, d in enumerate(arg.shape)
        ]
        feeds[arg.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    return feeds


def ort_alone(
    path: Path, provider: str, batches: list[int], seconds: float
) -> list[dict[str, Any]]:
    """Frames/s of the model alone at each batch (T = 1): on the CPU with every core; on CUDA
    with the states kept on the GPU between calls (as the server keeps them), inputs and
    outputs crossing to the host."""
    threads = (os.cpu_count() or 1) if provider == CPU else 1
    session = ort.InferenceSession(str(path), _options(threads), providers=[provider])
    rows = []
    for batch in batches:
        run = _caller(session, provider, _feeds(session, batch))
        run()
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            run()
            calls += 1
        rows.append({"provider": provider, "batch": batch, "frames_per_s": batch * calls / elapsed})
    return rows


def _caller(
    session: ort.InferenceSession, provider: str, feeds: dict[str, np.ndarray]
) -> Callable[[], object]:
    """One step of the model: a plain run on the CPU; on CUDA the states stay on the GPU."""
    if provider == CPU:
        return lambda: session.run(None, feeds)
    state_in = [a.name for a in session.get_inputs() if a.name != "x"]
    state_out = [o.name for o in session.get_outputs() if o.name != "y"]
    binding = session.io_binding()
    states = {n: ort.OrtValue.ortvalue_from_numpy(feeds[n], "cuda", 0) for n in state_in}

    def run() -> None:
        binding.bind_cpu_input("x", feeds["x"])
        for name in state_in:
            binding.bind_ortvalue_input(name, states[name])
        binding.bind_output("y", "cpu")
        for name in state_out:
            binding.bind_output(name, "cuda")
        session.run_with_iobinding(binding)
        for name, value in zip(state_in, binding.get_outputs()[1:], strict=True):
            states[name] = value

    return run


def server_runs(
    repository: Path, model: str, device: str, counts: list[int], args: argparse.Namespace
) -> list[dict[str, Any]]:
    flags = (
        "--model-repository",
        str(repository),
        "--device",
        device,
        "--max-batch-size",
        str(max(counts)),
    )
    server = start_server(device, "rnnstream", model, *flags)
    rows = []
    try:
        for sessions in counts:
            per_message = min(args.per_message, sessions)
            groups = max(1, sessions // per_message)
            load = ["--sessions", str(sessions), "--sessions-per-message", str(per_message)]
            load += [
                "--connections",
                str(groups),
                "--processes",
                str(min(groups, args.client_processes)),
            ]
            run = measure(server, model, args.seconds, args.warmup, load)
            rows.append({"device": device, "sessions": sessions, "per_message": per_message, **run})
            print(
                f"server on {device}, {sessions} sessions: {run['frames_per_s']:,.0f} frames/s",
                flush=True,
            )
    finally:
        server.stop()
    return rows


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The GPU targets, where a GPU ran: CUDA / CPU at the largest hidden and batch, and the
    server on CUDA against ORT alone on CUDA at the server's mean batch."""
    if not result["cuda"]:
        return []
    hidden = max(result["ort_alone"], key=int)
    rows = result["ort_alone"][hidden]
    biggest = max(r["batch"] for r in rows)
    cpu = next(r["frames_per_s"] for r in rows if (r["provider"], r["batch"]) == (CPU, biggest))
    gpu = next(r["frames_per_s"] for r in rows if (r["provider"], r["batch"]) == (CUDA, biggest))
    out = [
        _target(f"lstm hidden {hidden}, batch {biggest}: CUDA / CPU frames/s >= 10", gpu / cpu, 10)
    ]
    alone = {r["batch"]: r["frames_per_s"] for r in rows if r["provider"] == CUDA}
    for run in (r for r in result["server"] if r["device"] == "cuda"):
        batch = min(alone, key=lambda b: abs(b - (run["mean_batch"] or 1)))
        name = f"server on CUDA, {run['sessions']} sessions / ORT alone at batch {batch} >= 0.5"
        out.append(_target(name, run["frames_per_s"] / alone[batch], 0.5))
    return out


def _target(name: str, value: float, limit: float) -> dict[str, Any]:
    return {"target": name, "value": value, "limit": limit, "met": value >= limit}


def report(result: dict[str, Any]) -> str:
    lines = [f"Measured {result['date']} on {load_line(result)}."]
    proof = result.get("proof")
    if proof:
        verdict = "every node" if proof["ok"] else "NOT every node"
        lines += [
            "",
            f"CUDA runs {verdict}: session provider {proof['session_provider']}, nodes by "
            f"provider {proof['nodes_by_provider']} (CPU fallback disabled, profiled).",
        ]
    lines += ["", "ONNX Runtime alone, T = 1 (CPU: every core; CUDA: states kept on the GPU):"]
    lines += ["", "| hidden | batch | CPU frames/s | CUDA frames/s | CUDA / CPU |"]
    lines += ["| ---: | ---: | ---: | ---: | ---: |"]
    for hidden, rows in result["ort_alone"].items():
        cpu = {r["batch"]: r["frames_per_s"] for r in rows if r["provider"] == CPU}
        gpu = {r["batch"]: r["frames_per_s"] for r in rows if r["provider"] == CUDA}
        for batch in sorted(cpu):
            ratio = gpu[batch] / cpu[batch] if batch in gpu else None
            lines.append(
                f"| {hidden} | {batch} | {fmt(cpu[batch], 0)} | {fmt(gpu.get(batch), 0)} "
                f"| {fmt(ratio, 1)} |"
            )
    per_message = result["options"]["per_message"]
    lines += [
        "",
        f"rnnstream-server, {result['server_model']}, closed loop, {per_message} sessions a "
        "message:",
        "",
        "| device | sessions | connections | frames/s | p50 ms | p99 ms | mean batch |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["server"]:
        lines.append(
            f"| {r['device']} | {r['sessions']} | {r['connections']} | {fmt(r['frames_per_s'], 0)} "
            f"| {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} | {fmt(r['mean_batch'])} |"
        )
    goals = targets(result)
    if goals:
        lines += ["", "| target | value | met |", "| --- | ---: | --- |"]
        for g in goals:
            lines.append(
                f"| {g['target']} | {fmt(g['value'], 2)} | {'yes' if g['met'] else 'NO'} |"
            )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    parser.add_argument("--cpu-half", action="store_true", help="run what needs no GPU")
    parser.add_argument("--hidden", default="512,1024")
    parser.add_argument("--batches", default=",".join(str(2**i) for i in range(11)))
    parser.add_argument("--sessions", default="512,4096")
    parser.add_argument("--per-message", type=int, default=512)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--ort-seconds", type=float, default=1.0)
    parser.add_argument(
        "--client-processes", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2))
    )
    parser.add_argument("--quiet-load", type=float, default=1.5)
    parser.add_argument("--quiet-timeout", type=float, default=0.0)
    args = parser.parse_args()
    has_cuda, why = cuda_available()
    if not has_cuda:
        print(f"no GPU here: {why}; the CUDA measurements are skipped.", flush=True)
        if not args.cpu_half:
            return 0
    hiddens = [int(h) for h in args.hidden.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(c) for c in args.sessions.split(",")]
    info = {
        "machine": machine(),
        "quiet_machine": wait_for_quiet(args.quiet_load, args.quiet_timeout),
    }
    with tempfile.TemporaryDirectory() as folder:
        paths = build_models(Path(folder), hiddens)
        largest = max(hiddens)
        result: dict[str, Any] = {
            **info,
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "cuda": has_cuda,
            "why_no_cuda": why,
        }
        result["proof"] = prove_cuda(paths[largest]) if has_cuda else None
        if result["proof"] is not None and not result["proof"]["ok"]:
            print(f"CUDA does not run every node: {result['proof']}", flush=True)
        providers = [CPU, CUDA] if has_cuda else [CPU]
        result["ort_alone"] = {
            h: [r for p in providers for r in ort_alone(paths[h], p, batches, args.ort_seconds)]
            for h in hiddens
        }
        result["server_model"] = f"lstm_h{largest}"
        devices = ["cpu", "cuda"] if has_cuda else ["cpu"]
        result["server"] = [
            r
            for d in devices
            for r in server_runs(Path(folder), f"lstm_h{largest}", d, counts, args)
        ]
    save(result, args.out)
    print(report(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
