"""How frames are gathered into batches: batch size, waits, where ORT runs."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import setting

__all__ = ["BatchingSettings"]


@dataclass(frozen=True)
class BatchingSettings:
    """Batching: how frames of many sessions share one ONNX Runtime call."""

    max_batch_size: int = setting(
        256, "Most sessions stepped in one ONNX Runtime call; 1 disables batching.", minimum=1
    )
    inline_run_us: float = setting(
        250.0,
        "Batches whose ONNX Runtime run takes less than this many microseconds (timed at startup "
        "and while serving) run on the event loop instead of the executor thread; 0 sends every "
        "batch to the thread.",
        minimum=0,
        maximum=1_000_000,
    )
    busy_poll_us: float = setting(
        500.0,
        "After a batch, keep the event loop polling (not sleeping) this many microseconds for the "
        "next frame: lower latency at low load for CPU while frames flow; 0 turns it off.",
        minimum=0,
        maximum=1_000_000,
    )
    gather_us: float = setting(
        200.0,
        "Under load, the longest quiet spell a batch waits through for more frames: 1 µs per "
        "session whose next frame is expected (answered in the last 100 ms, nothing sent since), "
        "up to this; a lone stream never waits; 0: a batch starts after two idle loop turns.",
        minimum=0,
        maximum=1_000_000,
    )
