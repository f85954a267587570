"""Sessions: how many (server, principal, stream), idle TTL, output rings, frame and queue sizes."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import setting

__all__ = ["SessionSettings"]


@dataclass(frozen=True)
class SessionSettings:
    """Sessions: how many, how long they live, what one frame or forecast may hold."""

    max_sessions: int = setting(
        1_000_000,
        "Most sessions open at once across all models. An idle session holds its state and about "
        "700 bytes (a million idle gru sessions: about 1.2 GB); what sessions queue and keep is "
        "bounded by --max-buffered-bytes, whatever their number.",
        minimum=1,
    )
    session_ttl: float = setting(
        600.0, "Seconds an idle session lives; 0 turns expiry off.", minimum=0
    )
    max_sessions_per_principal: int = setting(
        0,
        "Most sessions one principal may hold at once, over all its streams (0: no limit but "
        "--max-sessions). At it, an open is refused, or with --evict-idle-when-full the "
        "principal's own longest-idle session is evicted; never another principal's.",
        minimum=0,
    )
    max_sessions_per_stream: int = setting(
        0,
        "Most sessions one stream may open; 0: no cap of its own, so a gateway's stream may carry "
        "any number (--max-sessions and --max-sessions-per-principal count them all).",
        minimum=0,
    )
    evict_idle_when_full: bool = setting(
        False,
        "At the session cap, evict an idle session instead of refusing the open: the longest-idle "
        "one of the principal holding the most sessions, never one of a principal holding fewer "
        "than the one opening.",
    )
    output_ring: int = setting(
        64,
        "Outputs kept per session to answer frames resent after a reconnect.",
        minimum=0,
        maximum=1_000_000,
    )
    output_ring_bytes: int = setting(
        4 * 2**20, "Most bytes of outputs one session's ring keeps (its newest always).", minimum=0
    )
    max_steps_per_frame: int = setting(4096, "Most time steps (T) one frame may carry.", minimum=1)
    max_forecast_steps: int = setting(4096, "Most steps one Forecast may roll forward.", minimum=1)
    max_pending_frames: int = setting(
        64,
        "Frames queued per session before the server stops reading that stream (back-pressure).",
        minimum=1,
    )
