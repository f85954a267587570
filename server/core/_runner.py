"""Runs a batch: gathers its states and inputs into ORT feeds, runs ORT in the executor thread,
and scatters the new states and each frame's outputs back."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._batch import Batch
from rnnstream.server.core._device_pool import DeviceStatePool
from rnnstream.server.core._results import BlockOutputs, FrameOutput
from rnnstream.server.core._runtime import OrtModel
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._validation import nonfinite_rows
from rnnstream.server.core._work import Arrays, inputs_digest

__all__ = ["BatchRunner", "Feeds", "Slots"]

Feeds = dict[str, npt.NDArray[Any]]
Slots = npt.NDArray[np.intp]


class BatchRunner:
    """One model's ORT calls, each in the executor thread (ORT releases the GIL): the event loop
    keeps reading and answering meanwhile."""

    def __init__(
        self,
        model: OrtModel,
        pool: StatePool,
        executor: Executor | None,
        host_states: bool = False,
    ) -> None:
        self.model = model
        self.spec = model.spec
        self._pool = pool
        # States on the device: a step gathers and scatters them there (_device_pool).
        self._device = pool if isinstance(pool, DeviceStatePool) else None
        self._host_states = host_states  # the state store needs each step's states on the host
        self._old_states: Arrays = []  # the last device step's states before it (with a store)
        self._executor = executor
        self._output_names = tuple(t.name for t in self.spec.outputs)
        self._input_axes = tuple(t.batch_axis for t in self.spec.inputs)
        self._output_axes = tuple(t.batch_axis for t in self.spec.outputs)

    def feeds(self, batch: Batch, slots: Slots) -> Feeds:
        feeds: Feeds = {}
        inputs = self.spec.inputs
        sole = batch.sole_block()
        if sole is not None:  # a whole block and nothing else: its inputs are the feeds
            for spec, array in zip(inputs, sole.inputs, strict=True):
                feeds[spec.name] = array
        else:
            parts = [part.inputs(self._input_axes) for part in batch.parts]
            frames = batch.frames
            for i, spec in enumerate(inputs):
                pieces = [p[i] for p in parts]
                if frames:
                    pieces.insert(0, np.stack([f.inputs[i] for f in frames], axis=spec.batch_axis))
                joined = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, spec.batch_axis)
                feeds[spec.name] = joined
        if self._device is None:
            for state, array in zip(self.spec.states, self._pool.gather(slots), strict=True):
                feeds[state.input_name] = array
        return feeds

    def old_states(self, feeds: Feeds) -> Arrays:
        """The states the last batch started from, on the host (to undo a failed store write)."""
        if self._device is not None:
            return self._old_states
        return [feeds[state.input_name] for state in self.spec.states]

    def nonfinite(self, rows: int, feeds: Feeds) -> dict[int, str]:
        """Batch row -> the input holding a NaN or infinity (it would poison the state for
        good); one vector check per batch, not one per frame."""
        return nonfinite_rows(self.spec, feeds, rows)

    async def run(self, feeds: Feeds, slots: Slots) -> tuple[Arrays, Arrays | None, float]:
        """(outputs, new states on the host (None: they stayed on the device), seconds) of one
        batch, run in the executor thread while the event loop reads on (with states on the
        device, writes to other slots wait for the step: DeviceStatePool)."""
        loop = asyncio.get_running_loop()
        device = self._device
        if device is None:
            return await loop.run_in_executor(self._executor, self._run_host, feeds)
        started = time.perf_counter()
        device.begin_step()
        done = None
        try:
            done = await loop.run_in_executor(
                self._executor, device.step, feeds, slots, self._host_states
            )
        finally:
            device.finish_step(done)
        self._old_states = done.old_states or []
        return done.outputs, done.new_states, time.perf_counter() - started

    def _run_host(self, feeds: Feeds) -> tuple[Arrays, Arrays, float]:
        started = time.perf_counter()
        outputs, states = self.model.run(feeds)
        return outputs, states, time.perf_counter() - started

    def scatter(
        self,
        slots: Slots,
        batch: Batch,
        outputs: Arrays,
        states: Arrays | None,
        seconds: float,
    ) -> tuple[list[FrameOutput], list[BlockOutputs]]:
        """Store the new states; each single frame's outputs, copied out of the batch, and each
        block part's outputs, left in the batch's arrays."""
        if self._device is None and states is not None:  # on the device: scattered there
            self._pool.scatter(slots, states)
        names = self._output_names
        frames = batch.frames
        singles: list[FrameOutput] = []
        if frames:
            per_output = [
                np.moveaxis(out, axis, 0)
                for out, axis in zip(outputs, self._output_axes, strict=True)
            ]
            singles = [
                FrameOutput(
                    frame.index,
                    [np.array(out[i]) for out in per_output],
                    names,
                    inputs_digest=inputs_digest(frame.inputs),
                )
                for i, frame in enumerate(frames)
            ]
        blocks: list[BlockOutputs] = []
        start = len(frames)
        axes = self._output_axes
        for part in batch.parts:
            stop = start + len(part)
            views = [
                out[(slice(None),) * axis + (slice(start, stop),)]
                for out, axis in zip(outputs, axes, strict=True)
            ]
            inputs = part.inputs(self._input_axes)
            blocks.append(
                BlockOutputs(views, axes, names, part.indices(), inputs, self._input_axes)
            )
            start = stop
        return singles, blocks
