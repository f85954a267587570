"""The `rnnstream` command: list models, stream files through a session, see and end sessions,
load test, health-check.

Imports stay lazy: `rnnstream health` (a container's health check, run every few seconds) loads
gRPC and nothing of numpy or the load tester.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rnnstream._connection import (
    CommandError,
    Connection,
    add_connection_arguments,
    connection_from_args,
    diagnose,
    server_side_connection,
)
from rnnstream._extras import MissingExtra, require
from rnnstream._sessions_cli import add_sessions_command
from rnnstream._version import __version__
from rnnstream.loadtest._options import add_arguments as add_loadtest_arguments

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]


def _models(args: argparse.Namespace) -> int:
    import json

    from rnnstream._sync import Client

    connection = connection_from_args(args)
    with Client(connection.target, **connection.client_kwargs()) as client:
        models = client.list_models()
    if args.json:
        print(json.dumps([model.to_dict() for model in models], indent=2))
        return 0
    for model in models:
        ins = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in model.inputs)
        outs = ", ".join(f"{t.name} {t.dtype}{list(t.shape)}" for t in model.outputs)
        states = ", ".join(
            f"{s.input_name}->{s.output_name} {s.dtype}{list(s.shape)}" for s in model.states
        )
        print(f"{model.name}\t{model.execution_provider}\tin: {ins}\tout: {outs}\tstate: {states}")
    return 0


def _stream(args: argparse.Namespace) -> int:
    from rnnstream._stream_files import read_rows, stream_file

    rows, skipped = read_rows(args.input, args.skip_header)
    connection = connection_from_args(args)
    count = stream_file(connection, args.model, rows, args.output, args.inflight)
    header = " (header row skipped)" if skipped else ""
    print(
        f"streamed {count} frames of {args.input}{header} through {args.model}; "
        f"wrote {args.output}",
        file=sys.stderr,
    )
    return 0


def _loadtest(args: argparse.Namespace) -> int:
    require("loadtest", "rnnstream loadtest")
    if args.plot_path is not None:
        require("plot", "--plot")
    if args.verify:
        require("verify", "--verify")
    from rnnstream.loadtest._command import command

    return command(args)


def _health(args: argparse.Namespace) -> int:
    from rnnstream._health import check_health

    if args.timeout <= 0:
        raise CommandError("--timeout must be positive")
    connection = connection_from_args(args)
    if not connection.uses_tls:
        # Run inside the server's container (its HEALTHCHECK): speak the server's own TLS.
        connection = server_side_connection(connection.target, os.environ) or connection
    result = check_health(connection, args.service, args.timeout)
    message = result.message
    if not result.ok and result.unreachable:
        message = diagnose(connection, message) or message
    print(message, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rnnstream", description="rnnstream client")
    parser.add_argument("--version", action="version", version=f"rnnstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list the server's models")
    add_connection_arguments(models)
    models.add_argument("--json", action="store_true", help="print the models as JSON")
    models.set_defaults(run=_models)

    stream = sub.add_parser("stream", help="stream the rows of a file through one session")
    add_connection_arguments(stream)
    stream.add_argument("--model", required=True)
    stream.add_argument(
        "--input", type=Path, required=True, help=".npy or .csv, one frame per row [time, ...]"
    )
    stream.add_argument(
        "--skip-header",
        action="store_true",
        help="the .csv's first row is a header (one that is not numbers is found by itself)",
    )
    stream.add_argument(
        "--output",
        type=Path,
        required=True,
        help=".npy (one output), .npz (every output by name) or .csv (one output, a row per frame)",
    )
    stream.add_argument("--inflight", type=int, default=16, help="frames on the wire at once")
    stream.set_defaults(run=_stream)

    add_sessions_command(sub)

    loadtest = sub.add_parser(
        "loadtest",
        help="open many sessions and stream frames through them; report latency and errors",
        description="Load test a server: closed loop (default) or open loop (--rate). Exit "
        "status 1 when the error rate exceeds --max-error-rate or --verify finds a mismatch.",
    )
    add_loadtest_arguments(loadtest)
    loadtest.set_defaults(run=_loadtest)

    health = sub.add_parser(
        "health",
        help="gRPC health check: exit 0 when SERVING, 1 otherwise",
        description="gRPC health check. Without TLS flags, in an environment where the "
        "server's RNNSTREAM_TLS_CERT and RNNSTREAM_TLS_KEY are set (the server's container), "
        "it speaks the server's TLS: it trusts RNNSTREAM_TLS_CA, else the server's own "
        "certificate, expects the name in that certificate (or RNNSTREAM_TLS_SERVER_NAME) and, "
        "when RNNSTREAM_TLS_CLIENT_CA is set, presents the server's certificate as its own.",
    )
    add_connection_arguments(health)
    health.add_argument("--service", default="", help="service name; empty checks the server")
    health.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer")
    health.set_defaults(run=_health)
    return parser


def _unreachable_message(args: argparse.Namespace, error: Exception) -> str:
    try:
        connection: Connection = connection_from_args(args)
    except CommandError:
        return str(error)
    return diagnose(connection, str(error)) or str(error)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gRPC's C core logs failed TLS handshakes itself; the command says what went wrong.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    run: Command = args.run
    from rnnstream._errors import RnnstreamError

    try:
        return run(args)
    except RnnstreamError as exc:
        message = str(exc)
        if exc.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
            message = _unreachable_message(args, exc)
        print(f"rnnstream: {message}", file=sys.stderr)
        return 1
    except (CommandError, MissingExtra) as exc:
        print(f"rnnstream: {exc}", file=sys.stderr)
        return 2
