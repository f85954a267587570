"""The `rnnstream-server` command: says which extra to install before anything else happens."""

from __future__ import annotations

import importlib.metadata
import sys

from rnnstream._extras import MissingExtra, require

__all__ = ["main"]

_RUNTIMES = ("onnxruntime", "onnxruntime-gpu")


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def main() -> None:
    if sys.argv[1:] == ["--version"]:  # says what is installed, with or without the extra
        from rnnstream import __version__

        print(f"rnnstream-server {__version__}")
        return
    try:
        require("server", "the server")
    except MissingExtra as exc:
        print(f"rnnstream-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if all(_installed(name) for name in _RUNTIMES):
        # Both install the `onnxruntime` package: whichever came last overwrote the other's files.
        print(
            "rnnstream-server: warning: both onnxruntime and onnxruntime-gpu are installed and "
            "overwrite each other; keep one: pip uninstall -y onnxruntime onnxruntime-gpu, then "
            "pip install 'rnnstream[cpu]' or 'rnnstream[cuda]'",
            file=sys.stderr,
        )
    from rnnstream.server.__main__ import main as serve

    serve()
