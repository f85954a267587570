"""Which batches run on the event loop: ORT run times measured before serving and while serving."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._models import ModelSpec

__all__ = ["BatchKey", "RunTimes", "single_step_feeds", "single_step_key"]

log = logging.getLogger("rnnstream.scheduler")

BatchKey = tuple[tuple[int, ...], ...]  # the frame shapes of a batch, one per model input
Feeds = dict[str, npt.NDArray[Any]]


def single_step_key(spec: ModelSpec) -> BatchKey | None:
    """The batching key of a single-step frame, or None where an input has another dynamic axis."""
    shapes = []
    for tensor in spec.inputs:
        shape = [1 if i == tensor.frame_time_axis else d for i, d in enumerate(tensor.frame_shape)]
        if any(d is None for d in shape):
            return None
        shapes.append(tuple(int(d) for d in shape if d is not None))
    return tuple(shapes)


def single_step_feeds(spec: ModelSpec, key: BatchKey, size: int) -> Feeds:
    """Zero inputs of `key`'s shapes and initial states, `size` sessions on the batch axis."""
    feeds: Feeds = {}
    for tensor, shape in zip(spec.inputs, key, strict=True):
        batched = list(shape)
        batched.insert(tensor.batch_axis, size)
        feeds[tensor.name] = np.zeros(batched, tensor.dtype)
    for state in spec.states:
        feeds[state.input_name] = np.stack([state.initial] * size, axis=state.batch_axis)
    return feeds


class RunTimes:
    """The fastest ORT run seen per (batch key, size), and the inline decision made from it.

    A batch expected to run in under `inline_seconds` runs on the event loop: handing it to the
    executor thread and back would cost more than the run. Only the fastest run counts because a
    run timed in the executor thread also counts its wait for the GIL, which under load can be
    longer than the run; a timing can only lower an estimate, never raise it.
    """

    def __init__(self, inline_seconds: float) -> None:
        self.inline_seconds = inline_seconds
        self._fastest: dict[tuple[BatchKey, int], float] = {}

    def record(self, key: BatchKey, size: int, seconds: float) -> None:
        known = self._fastest.get((key, size))
        if known is None or seconds < known:
            self._fastest[(key, size)] = seconds

    def runs_inline(self, key: BatchKey, size: int) -> bool:
        expected = self._fastest.get((key, size))
        return expected is not None and expected < self.inline_seconds

    def calibrate(
        self,
        spec: ModelSpec,
        max_batch_size: int,
        timed_run: Callable[[Feeds], float],
    ) -> list[tuple[int, float]]:
        """Time single-step batches of 1, 2, 4, ... sessions; stop after the first size that is
        over the inline threshold. Returns (size, seconds) per size timed.

        Run before serving, when nothing else holds the GIL, so the timings are the model's own;
        the first run also warms the model up. A size between two timed ones gets the larger
        one's time (a smaller batch is no slower), so every size up to the largest cheap one runs
        on the event loop from its first batch."""
        key = single_step_key(spec)
        if key is None:
            return []
        timed: list[tuple[int, float]] = []
        size, previous = 1, 0
        while True:
            feeds = single_step_feeds(spec, key, size)
            try:
                seconds = min(timed_run(feeds) for _ in range(3))
            except Exception as exc:
                # Zero inputs are only a stand-in for real frames; a model that refuses them is
                # still served, and the sizes not timed here are timed in the executor thread.
                log.warning(
                    "model %s: timing a batch of %d zero frames failed (%s); larger batches are "
                    "timed in the executor thread when they first run",
                    spec.name,
                    size,
                    exc,
                )
                return timed
            timed.append((size, seconds))
            for between in range(previous + 1, size + 1):
                self.record(key, between, seconds)
            if seconds >= self.inline_seconds or size >= max_batch_size:
                return timed
            previous, size = size, min(size * 2, max_batch_size)
