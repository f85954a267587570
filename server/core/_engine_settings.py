"""The knobs of the core, built by whoever starts an Engine (the server's settings, the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["EngineSettings"]


@dataclass(frozen=True)
class EngineSettings:
    """Every value the core reads; the server's Settings documents and validates each one."""

    model_repository: Path  # one folder per model, each holding model.onnx
    models: tuple[str, ...]  # load only these; empty loads every model found
    device: str  # auto, cpu or cuda
    ort_threads: int  # ONNX Runtime intra-op threads per model; 0 lets ORT decide
    max_batch_size: int  # most sessions stepped in one ORT call
    max_sessions: int  # across every model
    session_ttl: float  # seconds an idle session lives; 0: forever
    output_ring: int  # outputs kept per session to answer resent frames
    max_steps_per_frame: int  # most time steps one frame may carry
    max_forecast_steps: int  # most steps one forecast may roll forward
    max_message_bytes: int  # a frame whose outputs would not fit is refused before it runs
    max_pending_frames: int  # frames queued per session before submit says it is full
    evict_idle_when_full: bool  # at a session cap, end an idle session to open one
    max_sessions_per_principal: int  # per principal, over all its streams; 0: no quota
    skip_bad_models: bool  # a model that cannot be loaded is left out (else the start fails)
    rate_limit_frames: float  # frames a second per principal; 0: no limit
    rate_limit_burst: float  # frames at once above the rate; 0: one second's worth
    # How the served models follow the repository (Triton's names): none loads every model at
    # start; poll also rescans every repository_poll_seconds; explicit loads load_model at start
    # and what clients load. A rescan (SIGHUP) reloads changed models in every mode.
    model_control_mode: str = "none"
    load_model: tuple[str, ...] = ()  # explicit mode: loaded at start ("*": every model)
    repository_poll_seconds: float = 15.0
    # Where session states live between batches: auto (the GPU's memory when a model runs on
    # CUDA, else host arrays), host, or device (ORT values on the provider's device).
    state_pool: str = "auto"
    drain_timeout: float = 600.0  # a retired version's sessions end after this long; 0: never
    # With a state store: an idle session leaves memory after spill_after seconds (0: never)
    # and its state stays in the store store_ttl seconds more (0: its session TTL).
    spill_after: float = 0.0
    store_ttl: float = 0.0
    # The memory budget (_budget.py): tensors held for clients, server-wide and per principal
    # (0: the server's), and the bytes of outputs one session's ring keeps.
    max_buffered_bytes: int = 256 * 1024 * 1024
    max_buffered_bytes_per_principal: int = 0
    output_ring_bytes: int = 4 * 1024 * 1024
