"""`rnnstream sessions list|show|end`: see and end sessions (an admin principal: everyone's)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rnnstream._connection import CommandError, add_connection_arguments, connection_from_args

__all__ = ["add_sessions_command"]

_STATES = ("active", "idle", "spilled")
_COLUMNS: tuple[str, ...] = ("SESSION", "PRINCIPAL", "MODEL", "VERSION", "STATE", "NEXT")
_COLUMNS += ("PENDING", "IDLE_S", "MEMORY_B", "STORE_B")


def _client(args: argparse.Namespace) -> Any:
    from rnnstream._sync import Client

    connection = connection_from_args(args)
    return Client(connection.target, **connection.client_kwargs())


def _row(info: Any) -> tuple[str, ...]:
    return (
        info.session_id,
        info.principal,
        info.model,
        str(info.model_version),
        info.state,
        str(info.next_frame_index),
        str(info.pending_frames),
        f"{info.idle_seconds:.1f}",
        str(info.memory_bytes),
        str(info.store_bytes),
    )


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in [_COLUMNS, *rows]) for i in range(len(_COLUMNS))]
    for row in [_COLUMNS, *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


def _list(args: argparse.Namespace) -> int:
    if args.page_size < 0 or args.page_size > 1000:
        raise CommandError("--page-size must be within 0..1000 (0: the server's default, 100)")
    found: list[Any] = []
    token = args.page_token
    with _client(args) as client:
        while True:
            page = client.list_sessions(
                model=args.model,
                principal=args.principal,
                state=args.state,
                page_size=args.page_size,
                page_token=token,
            )
            found.extend(page.sessions)
            token = page.next_page_token
            if not token or not args.all:
                break
    if args.json:
        print(json.dumps({"sessions": [s.to_dict() for s in found], "next_page_token": token}))
    else:
        _print_table([_row(s) for s in found])
        if token:
            print(f"more sessions: --page-token {token} (or --all)", file=sys.stderr)
    return 0


def _show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.get_session(args.session_id, args.principal)
    if args.json:
        print(json.dumps(info.to_dict()))
    else:
        for name, value in info.to_dict().items():
            print(f"{name}: {value}")
    return 0


def _end(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ended = client.end_session(args.session_id, args.principal)
    print(f"ended session {ended.session_id} after {ended.next_frame_index} frames")
    return 0


def _principal_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--principal",
        default="",
        help=f"{what} (another principal's needs an admin principal: --admin-principals)",
    )


def add_sessions_command(sub: Any) -> None:
    sessions = sub.add_parser(
        "sessions",
        help="list, show or end sessions",
        description="See the sessions your principal holds, or with an admin principal "
        "(the server's --admin-principals) every principal's, and end them.",
    )
    actions = sessions.add_subparsers(dest="action", required=True)

    listing = actions.add_parser("list", help="list sessions, a page at a time")
    add_connection_arguments(listing)
    listing.add_argument("--model", default="", help="only sessions of this model")
    _principal_argument(listing, "only this principal's sessions")
    listing.add_argument("--state", default="", choices=("", *_STATES), help="only this state")
    listing.add_argument(
        "--page-size", type=int, default=0, help="sessions per page (0: 100; at most 1000)"
    )
    listing.add_argument("--page-token", default="", help="continue after an earlier page")
    listing.add_argument("--all", action="store_true", help="follow every page to the end")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(run=_list)

    show = actions.add_parser("show", help="show one session")
    add_connection_arguments(show)
    show.add_argument("session_id")
    _principal_argument(show, "the principal holding it")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(run=_show)

    end = actions.add_parser("end", help="end one session")
    add_connection_arguments(end)
    end.add_argument("session_id")
    _principal_argument(end, "the principal holding it")
    end.set_defaults(run=_end)
