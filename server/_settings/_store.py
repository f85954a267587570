"""The state store (Redis) that lets sessions survive a replica, and spilling idle ones to it."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import setting

__all__ = ["StoreSettings"]


@dataclass(frozen=True)
class StoreSettings:
    """State store: where session state lives beyond this process."""

    state_store: str = setting(
        "",
        "Where session state lives: empty keeps it in this process; redis://HOST:PORT/DB keeps it "
        "in Redis so any replica can resume a session.",
        prefixes=("redis://", "rediss://", "unix://"),
    )
    spill_after: float = setting(
        0.0,
        "With --state-store: an idle session leaves memory after this many seconds, its state "
        "kept in the store; its next request, on any replica, brings it back. 0: never.",
        minimum=0,
    )
    store_ttl: float = setting(
        0.0,
        "Seconds a spilled session's state stays in the store before the session expires "
        "(0: its session TTL; that 0 too: for good).",
        minimum=0,
    )
    state_store_legacy_keys: str = setting(
        "refuse",
        "Sessions a Redis store holds under the old key layout (rnnstream:session:*, "
        "ambiguous across principals) are never read: refuse to start while any exist, ignore "
        "them (they expire), or delete them at start.",
        choices=("refuse", "ignore", "delete"),
    )
