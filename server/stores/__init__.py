"""State stores behind the core's StateStore interface (Redis)."""

from rnnstream.server.stores._redis import RedisStore, open_store

__all__ = ["RedisStore", "open_store"]
