"""The `rnnstream-server` command: says which extra to install before anything else happens."""

from __future__ import annotations

import sys

from rnnstream._extras import MissingExtra, require

__all__ = ["main"]


def main() -> None:
    try:
        require("server", "the server")
    except MissingExtra as exc:
        print(f"rnnstream-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from rnnstream.server.__main__ import main as serve

    serve()
