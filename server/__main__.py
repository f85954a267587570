"""rnnstream-server console script."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

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
    settings = Settings.from_args(argv)
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(_serve(settings))
    except (DeviceError, ModelConfigError, OSError, ValueError) as exc:
        print(f"rnnstream-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
