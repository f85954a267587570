"""Who is calling: the principal that owns the sessions a call opens."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["ANONYMOUS", "Authenticator"]

ANONYMOUS = "anonymous"


class Authenticator:
    """Without configured tokens every caller is the same anonymous principal."""

    async def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return ANONYMOUS
