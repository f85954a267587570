"""What the core reads of the server's settings (the core knows nothing of flags)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rnnstream.server._examples import example_models
from rnnstream.server.core import EngineSettings

if TYPE_CHECKING:
    from rnnstream.server._settings import Settings

__all__ = ["core_settings"]


def core_settings(s: Settings) -> EngineSettings:
    """The EngineSettings of `s`, in the core's units (seconds, not microseconds)."""
    return EngineSettings(
        model_repository=example_models() if s.example_models else s.model_repository,
        models=s.models,
        device=s.device,
        ort_threads=s.ort_threads,
        state_pool=s.state_pool,
        max_batch_size=s.max_batch_size,
        max_sessions=s.max_sessions,
        session_ttl=s.session_ttl,
        output_ring=s.output_ring,
        max_steps_per_frame=s.max_steps_per_frame,
        max_forecast_steps=s.max_forecast_steps,
        max_message_bytes=s.max_message_bytes,
        max_pending_frames=s.max_pending_frames,
        evict_idle_when_full=s.evict_idle_when_full,
        max_sessions_per_principal=s.max_sessions_per_principal,
        rate_limit_frames=s.rate_limit_frames,
        rate_limit_burst=s.rate_limit_burst,
        skip_bad_models=s.bad_models == "skip",
        model_control_mode=s.model_control_mode,
        load_model=s.load_model,
        repository_poll_seconds=s.repository_poll_secs,
        drain_timeout=s.drain_timeout,
        spill_after=s.spill_after,
        store_ttl=s.store_ttl,
        max_buffered_bytes=s.max_buffered_bytes,
        max_buffered_bytes_per_principal=s.max_buffered_bytes_per_principal,
        output_ring_bytes=s.output_ring_bytes,
    )
