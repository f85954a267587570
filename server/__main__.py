"""rnnstream-server console script."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server._settings import Settings
from server.core import DeviceError, ModelConfigError
from server.transport.grpc import GrpcServer

GRACE_SECONDS = 10.0


async def _serve(settings: Settings) -> None:
    server = GrpcServer(settings)
    await server.start()
    server.install_signal_handlers(GRACE_SECONDS)
    await server.wait()


def main(argv: Sequence[str] | None = None) -> None:
    settings = Settings.from_args(argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        asyncio.run(_serve(settings))
    except (DeviceError, ModelConfigError, OSError) as exc:
        print(f"rnnstream-server: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
