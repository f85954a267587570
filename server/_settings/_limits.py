"""The memory budget and per-principal frame rates: what one client or tenant may hold and send."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import setting

__all__ = ["LimitSettings"]


@dataclass(frozen=True)
class LimitSettings:
    """Limits: the memory held for clients and the rate each principal may send at."""

    max_buffered_bytes: int = setting(256 * 2**20, "Most bytes held for clients.", minimum=2**20)
    max_buffered_bytes_per_principal: int = setting(
        0, "Of --max-buffered-bytes, most one principal's work holds; 0: all of it.", minimum=0
    )
    rate_limit_frames: float = setting(
        0.0,
        "Frames a second each principal may send, over all its calls (0: no limit): streams "
        "beyond it are read more slowly, unary calls refused with RESOURCE_EXHAUSTED and a retry "
        "hint (trailing metadata grpc-retry-pushback-ms). A forecast of k steps counts k frames.",
        minimum=0,
    )
    rate_limit_burst: float = setting(
        0.0,
        "Frames a principal may send at once above its rate (0: one second's worth).",
        minimum=0,
    )
