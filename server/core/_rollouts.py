"""Forecast rollouts, a few steps at a time between batches: a long forecast holds up no other
session's frames (a batch waits for at most one slice of it), and many forecasts share the ORT
thread in turn."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import Executor
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._forecast import Rollout, check_fed, last_step
from rnnstream.server.core._runtime import OrtModel

__all__ = ["SLICE_SECONDS", "RolloutQueue", "Stepper"]

Arrays = list[npt.NDArray[Any]]

# The ORT time one turn of a rollout may take before the next batch runs.
SLICE_SECONDS = 0.002


class Stepper:
    """One rollout: `steps` one-step calls on copies of a session's states, run `advance` by
    `advance` (in the executor thread)."""

    def __init__(self, model: OrtModel, states: Arrays, first: Arrays, steps: int) -> None:
        spec = model.spec
        self._model = model
        self._steps = steps
        self._done = 0
        self._states = [
            np.expand_dims(s, st.batch_axis) for s, st in zip(states, spec.states, strict=True)
        ]
        self._current = list(first)
        self._collected: list[Arrays] = [[] for _ in spec.outputs]
        self._final: Arrays = []

    def advance(self, seconds: float) -> bool:
        """Run steps for about `seconds` (one at least); True once every step has run."""
        spec = self._model.spec
        until = time.perf_counter() + seconds
        while self._done < self._steps:
            step = self._done + 1
            feeds: dict[str, npt.NDArray[Any]] = {}
            for i, (inp, value) in enumerate(zip(spec.inputs, self._current, strict=True)):
                check_fed(spec, i, value, step)
                time_axis = inp.frame_time_axis
                frame = value if time_axis is None else np.expand_dims(value, time_axis)
                feeds[inp.name] = np.expand_dims(frame, inp.batch_axis)
            for st, array in zip(spec.states, self._states, strict=True):
                feeds[st.input_name] = array
            outputs, self._states = self._model.run(feeds)
            self._final = [
                np.take(out, 0, axis=o.batch_axis)
                for out, o in zip(outputs, spec.outputs, strict=True)
            ]
            for bucket, frame in zip(self._collected, self._final, strict=True):
                bucket.append(frame)
            for i, o in spec.feedback:
                self._current[i] = last_step(spec.outputs[o], self._final[o])
            self._done = step
            if time.perf_counter() >= until:
                break
        return self._done >= self._steps

    def result(self) -> Rollout:
        spec = self._model.spec
        joined = [
            np.concatenate(parts, axis=o.frame_time_axis)
            if o.frame_time_axis is not None
            else np.stack(parts, axis=0)
            for parts, o in zip(self._collected, spec.outputs, strict=True)
        ]
        final = [
            np.take(s, 0, axis=st.batch_axis)
            for s, st in zip(self._states, spec.states, strict=True)
        ]
        return Rollout(joined, final, self._final)


class RolloutQueue:
    """The rollouts under way on one model, each run a slice at a time, in turn, by the model's
    batch loop between its batches."""

    def __init__(self, executor: Executor | None, wake: asyncio.Event) -> None:
        self._executor = executor
        self._wake = wake  # the batch loop's: it sleeps when nothing is ready
        self._active: deque[tuple[Stepper, asyncio.Future[Rollout]]] = deque()

    def __len__(self) -> int:
        return len(self._active)

    def run(self, stepper: Stepper) -> asyncio.Future[Rollout]:
        """Resolves with the rollout once its last slice has run."""
        future: asyncio.Future[Rollout] = asyncio.get_running_loop().create_future()
        self._active.append((stepper, future))
        self._wake.set()
        return future

    async def step(self) -> None:
        """Run one slice of the rollout whose turn it is."""
        stepper, future = self._active.popleft()
        if future.done():  # its forecast was cancelled (the server is stopping)
            return
        loop = asyncio.get_running_loop()
        try:
            done = await loop.run_in_executor(self._executor, stepper.advance, SLICE_SECONDS)
        except Exception as exc:
            if not future.done():
                future.set_exception(exc)
            return
        if future.done():
            return
        if done:
            future.set_result(stepper.result())
        else:
            self._active.append((stepper, future))
