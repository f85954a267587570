"""Runs a batch: gathers its states and inputs into ORT feeds, runs ORT on the event loop or in
the executor thread, and scatters the new states and each frame's outputs back."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._results import FrameOutput
from rnnstream.server.core._run_timing import RunTimes
from rnnstream.server.core._runtime import OrtModel
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._validation import nonfinite_rows
from rnnstream.server.core._work import Arrays, BatchKey, FrameWork, inputs_digest

__all__ = ["BatchRunner", "Feeds", "Slots"]

Feeds = dict[str, npt.NDArray[Any]]
Slots = npt.NDArray[np.intp]


class BatchRunner:
    """One model's ORT calls. A batch whose run is known to take under `inline_run_seconds`
    runs on the event loop (a hand-off to the executor thread would cost more than the run);
    0 sends every batch to the executor."""

    def __init__(
        self,
        model: OrtModel,
        pool: StatePool,
        executor: Executor | None,
        inline_run_seconds: float,
    ) -> None:
        self.model = model
        self.spec = model.spec
        self._pool = pool
        self._executor = executor
        self.run_times = RunTimes(inline_run_seconds)
        self._output_names = tuple(t.name for t in self.spec.outputs)

    def feeds(self, frames: list[FrameWork], slots: Slots) -> Feeds:
        feeds: Feeds = {}
        for i, spec in enumerate(self.spec.inputs):
            feeds[spec.name] = np.stack([f.inputs[i] for f in frames], axis=spec.batch_axis)
        for state, array in zip(self.spec.states, self._pool.gather(slots), strict=True):
            feeds[state.input_name] = array
        return feeds

    def nonfinite(self, frames: list[FrameWork], feeds: Feeds) -> dict[int, str]:
        """Batch row -> the input holding a NaN or infinity (it would poison the state for
        good); one vector check per batch, not one per frame."""
        return nonfinite_rows(self.spec, feeds, len(frames))

    def runs_inline(self, key: BatchKey, size: int) -> bool:
        return self.run_times.runs_inline(key, size)

    def run_inline(self, feeds: Feeds) -> tuple[Arrays, Arrays, float]:
        """(outputs, new states, seconds) of one ORT call on this thread."""
        started = time.perf_counter()
        outputs, states = self.model.run(feeds)
        return outputs, states, time.perf_counter() - started

    async def run_in_executor(self, feeds: Feeds) -> tuple[Arrays, Arrays, float]:
        """run_inline in the executor thread, the event loop reading on meanwhile."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_inline, feeds)

    def calibrate(self, max_batch_size: int) -> list[tuple[int, float]]:
        """Time the model at growing batch sizes before serving (RunTimes.calibrate)."""
        return self.run_times.calibrate(
            self.spec, max_batch_size, lambda feeds: self.run_inline(feeds)[2]
        )

    def scatter(
        self,
        slots: Slots,
        frames: list[FrameWork],
        outputs: Arrays,
        states: Arrays,
        seconds: float,
    ) -> list[FrameOutput]:
        """Store the new states; each frame's outputs, copied out of the batch."""
        self.run_times.record(frames[0].key, len(frames), seconds)
        self._pool.scatter(slots, states)
        per_output = [
            np.moveaxis(out, spec.batch_axis, 0)
            for out, spec in zip(outputs, self.spec.outputs, strict=True)
        ]
        names = self._output_names
        return [
            FrameOutput(
                frame.index,
                [np.array(out[i]) for out in per_output],
                names,
                inputs_digest=inputs_digest(frame.inputs),
            )
            for i, frame in enumerate(frames)
        ]

    def rollout_in_executor(self, work: Any, *args: Any) -> asyncio.Future[Any]:
        """Run `work(model, *args)` in the executor thread (forecast rollouts)."""
        loop = asyncio.get_running_loop()
        return loop.run_in_executor(self._executor, work, self.model, *args)
