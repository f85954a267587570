"""How frames are gathered into batches: the batch size (the gathering bound is fixed, 1 ms)."""

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
