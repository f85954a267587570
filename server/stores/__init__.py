"""State stores behind the core's StateStore interface (Redis, installed by the extra `redis`)."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rnnstream.server.core._store import StateStore
    from rnnstream.server.stores._redis import RedisStore

__all__ = ["RedisStore", "open_store"]


async def open_store(
    url: str, ttl_seconds: float, ring_size: int, legacy_keys: str = "refuse"
) -> StateStore:
    """The store at `url`; ValueError naming the extra when its client library is missing.
    `legacy_keys`: what to do with sessions stored under the old key layout (refuse to start,
    ignore or delete them)."""
    if importlib.util.find_spec("redis") is None:
        raise ValueError(f"--state-store {url} needs redis: pip install 'rnnstream[redis]'")
    from rnnstream.server.stores._redis import open_store as open_redis

    return await open_redis(url, ttl_seconds, ring_size, legacy_keys)


def __getattr__(name: str) -> Any:
    # Imported on first use: the server runs without redis installed when it keeps no store.
    if name == "RedisStore":
        return importlib.import_module("rnnstream.server.stores._redis").RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
