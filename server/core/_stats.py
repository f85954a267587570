"""A model's running totals and metrics: every frame is counted once, by status, where it is
answered; every batch adds its run time and its frames' waits."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rnnstream.server.core._batch import Batch
from rnnstream.server.core._errors import RnnstreamError
from rnnstream.server.core._instruments import CoreMetrics, Counter, Observer, observe_many
from rnnstream.server.core._results import ModelStats
from rnnstream.server.core._work import FrameWork

__all__ = ["BatchStats", "ModelCounters"]


@dataclass
class BatchStats:
    """Running totals, read by metrics and benchmarks."""

    batches: int = 0
    frames: int = 0
    # Per-frame totals: each frame counts its batch's run time and its own queue wait.
    failed_frames: int = 0
    frame_run_seconds: float = 0.0
    queue_seconds: float = 0.0
    last_batch_unix: float = 0.0  # wall-clock end of the latest successful batch
    by_size: dict[int, list[float]] = field(default_factory=dict)  # size -> [batches, seconds]


class ModelCounters:
    """One model's BatchStats and its metric series (None: no metrics)."""

    def __init__(self, model: str, metrics: CoreMetrics | None) -> None:
        self.stats = BatchStats()
        self._model = model
        self._metrics = metrics
        self._frame_counters: dict[str, Counter] = {}
        self._observe: tuple[Observer, Observer, Observer] | None = None
        if metrics is not None:
            self._observe = metrics.batch_observers(model)

    def count(self, status: str, frames: int = 1) -> None:
        """Frames answered with `status` (an error code name or OK): the rnnstream_frames metric."""
        if self._metrics is None:
            return
        counter = self._frame_counters.get(status)
        if counter is None:
            counter = self._frame_counters[status] = self._metrics.frame_counter(
                self._model, status
            )
        counter.inc(frames)

    def reject(self, work: FrameWork, error: RnnstreamError) -> None:
        """Answer a frame with an error (unless its caller stopped waiting) and count it."""
        if work.reply.done():  # cancelled by its caller (a deadline passed)
            self.count("CANCELLED")
            return
        work.reply.set_exception(error)
        self.count(error.code.name)

    def snapshot(self) -> ModelStats:
        stats = self.stats
        return ModelStats(
            batches=stats.batches,
            frames=stats.frames,
            failed_frames=stats.failed_frames,
            frame_run_seconds=stats.frame_run_seconds,
            queue_seconds=stats.queue_seconds,
            last_batch_unix=stats.last_batch_unix,
            by_size={size: (int(n), seconds) for size, (n, seconds) in stats.by_size.items()},
        )

    def batch_failed(self, frames: int) -> None:
        self.stats.failed_frames += frames

    def batch_done(self, batch: Batch, started: float, elapsed: float, done_at: float) -> None:
        """A batch's frames were answered: `started`/`done_at` on the perf_counter clock."""
        stats = self.stats
        frames, parts = batch.frames, batch.parts
        size = len(batch)
        stats.batches += 1
        stats.frames += size
        stats.frame_run_seconds += elapsed * size
        stats.queue_seconds += sum(started - f.enqueued_at for f in frames)
        stats.queue_seconds += sum((started - p.block.enqueued_at) * len(p) for p in parts)
        stats.last_batch_unix = time.time()
        by_size = stats.by_size.setdefault(size, [0, 0.0])
        by_size[0] += 1
        by_size[1] += elapsed
        if self._observe is not None:
            ort_run, batch_size, latency = self._observe
            ort_run.observe(elapsed)
            batch_size.observe(size)
            for frame in frames:
                latency.observe(done_at - frame.enqueued_at)
            for part in parts:  # a block's rows arrived together: one value, many frames
                observe_many(latency, done_at - part.block.enqueued_at, len(part))
