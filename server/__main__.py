"""rnnstream-server console script."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rnnstream import __version__
from rnnstream.server._logging import configure_logging
from rnnstream.server._settings import Settings
from rnnstream.server._workers import serve, supervise


def main(argv: Sequence[str] | None = None) -> None:
    parser = Settings.parser()
    parser.add_argument(
        "--check-model",
        type=Path,
        default=None,
        metavar="PATH",
        help="Check a model instead of serving: load a model folder (or its model.onnx), print "
        "what was detected (data inputs and outputs, state pairs, axes) and self-test it, then "
        "exit: 0 if rnnstream-server can serve it. --device and --ort-threads apply.",
    )
    parser.add_argument("--version", action="version", version=f"rnnstream-server {__version__}")
    args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    if args.check_model is not None:
        from rnnstream.server._check_model import check_model

        settings = Settings.from_namespace(parser, args, paths=False)
        raise SystemExit(check_model(args.check_model, settings.device, settings.ort_threads))
    settings = Settings.from_namespace(parser, args)
    configure_logging(settings.log_level, settings.log_format)
    status = supervise(settings) if settings.workers > 1 else serve(settings)
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    main()
