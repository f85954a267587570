"""rnnstream-server console script."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from server._logging import configure_logging
from server._settings import Settings
from server.core import DeviceError, ModelConfigError
from server.transport.grpc import GrpcServer


async def _serve(settings: Settings) -> None:
    server = GrpcServer(settings)
    await server.start()
    server.install_signal_handlers()
    await server.wait()


def main(argv: Sequence[str] | None = None) -> None:
    # --check-model PATH runs a one-off check instead of the server; other flags (--device,
    # --ort-threads) still apply to it.
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--check-model", type=Path, default=None)
    checked, rest = pre.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if checked.check_model is not None:
        from server._check_model import check_model

        settings = Settings.from_args(rest)
        raise SystemExit(check_model(checked.check_model, settings.device, settings.ort_threads))
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(_serve(settings))
    except (DeviceError, ModelConfigError, OSError, ValueError) as exc:
        print(f"rnnstream-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
