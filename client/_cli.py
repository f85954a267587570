"""The `rnnstream` command: list models, stream files through a session, health-check a server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream._errors import RnnstreamError
from rnnstream._health import check_health
from rnnstream._sync import Client
from rnnstream.loadtest import add_arguments as add_loadtest_arguments
from rnnstream.loadtest import command as loadtest_command

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]


def _read_rows(path: Path) -> npt.NDArray[Any]:
    array: npt.NDArray[Any]
    if path.suffix == ".npy":
        array = np.load(path)
    elif path.suffix == ".csv":
        array = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
    else:
        raise SystemExit(f"rnnstream: {path}: expected a .npy or .csv file")
    if array.ndim < 2:
        raise SystemExit(f"rnnstream: {path}: expected shape [time, features], got {array.shape}")
    return array


def _models(args: argparse.Namespace) -> int:
    with Client(args.target) as client:
        for model in client.list_models():
            ins = ", ".join(f"{t.name}{list(t.shape)}" for t in model.inputs)
            outs = ", ".join(f"{t.name}{list(t.shape)}" for t in model.outputs)
            states = ", ".join(f"{s.input_name}->{s.output_name}" for s in model.states)
            print(
                f"{model.name}\t{model.execution_provider}\tin: {ins}\tout: {outs}\tstate: {states}"
            )
    return 0


def _stream(args: argparse.Namespace) -> int:
    rows = _read_rows(args.input)
    with Client(args.target) as client:
        info = client.get_model(args.model)
        dtype = {1: np.float32, 2: np.float16, 3: np.float64, 4: np.int32, 5: np.int64}.get(
            info.inputs[0].dtype, np.float32
        )
        rows = rows.astype(dtype, copy=False)
        session = client.open(args.model)
        collected: dict[str, list[npt.NDArray[Any]]] = {}
        for outputs in session.stream(iter(rows), inflight=args.inflight):
            for name, value in outputs.items():
                collected.setdefault(name, []).append(value)
        session.end()
    stacked = {name: np.stack(values) for name, values in collected.items()}
    if len(stacked) == 1:
        np.save(args.output, next(iter(stacked.values())))
    else:
        np.savez(args.output, **stacked)  # type: ignore[arg-type]
    print(f"streamed {len(rows)} frames through {args.model}; wrote {args.output}", file=sys.stderr)
    return 0


def _health(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        raise SystemExit("rnnstream: --timeout must be positive")
    result = check_health(args.target, args.service, args.timeout)
    print(result.message, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnstream", description="rnnstream client")
    sub = parser.add_subparsers(dest="command", required=True)
    models = sub.add_parser("models", help="list the server's models")
    models.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    models.set_defaults(run=_models)
    stream = sub.add_parser("stream", help="stream the rows of a file through one session")
    stream.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    stream.add_argument("--model", required=True)
    stream.add_argument("--input", type=Path, required=True, help=".npy or .csv, shape [time, ...]")
    stream.add_argument(
        "--output", type=Path, required=True, help=".npy (.npz for several outputs)"
    )
    stream.add_argument("--inflight", type=int, default=16, help="frames on the wire at once")
    stream.set_defaults(run=_stream)
    loadtest = sub.add_parser(
        "loadtest",
        help="open many sessions and stream frames through them; report latency and errors",
        description="Load test a server: closed loop (default) or open loop (--rate). Exit "
        "status 1 when the error rate exceeds --max-error-rate or --verify finds a mismatch.",
    )
    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(run=loadtest_command)
    health = sub.add_parser("health", help="gRPC health check: exit 0 when SERVING, 1 otherwise")
    health.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    health.add_argument("--service", default="", help="service name; empty checks the server")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    health.set_defaults(run=_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run: Command = args.run
    try:
        return run(args)
    except RnnstreamError as exc:
        print(f"rnnstream: {exc}", file=sys.stderr)
        return 1
