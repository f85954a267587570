"""rnnstream-server console script."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rnnstream.server._logging import configure_logging
from rnnstream.server._settings import Settings
from rnnstream.server._workers import serve, supervise


def main(argv: Sequence[str] | None = None) -> None:
    # --check-model PATH runs a one-off check instead of the server; other flags (--device,
    # --ort-threads) still apply to it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--check-model", type=Path, default=None)
    checked, rest = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if checked.check_model is not None:
        from rnnstream.server._check_model import check_model

        settings = Settings.from_args(rest)
        raise SystemExit(check_model(checked.check_model, settings.device, settings.ort_threads))
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    if settings.workers < 1:
        print(
            f"rnnstream-server: --workers must be at least 1, not {settings.workers}",
            file=sys.stderr,
        )
        raise SystemExit(2)
    status = supervise(settings) if settings.workers > 1 else serve(settings)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
