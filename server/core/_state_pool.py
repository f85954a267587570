"""Preallocated per-model state arrays: one slot per session, gathered and scattered in one call."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._models import StateSpec

__all__ = ["StatePool"]

SlotIndex = npt.NDArray[np.intp]


class StatePool:
    """Contiguous arrays, one per state tensor, with the slot axis where the model's batch axis is.

    Keeping slots on the batch axis means a gathered batch is already laid out as the model's
    state input, so feeding it to ONNX Runtime needs no transpose.
    """

    def __init__(self, states: Sequence[StateSpec], capacity: int = 64) -> None:
        self._states = tuple(states)
        self.slot_bytes = sum(s.initial.nbytes for s in self._states)  # one session's state
        self._min_capacity = max(1, capacity)
        self._arrays: list[npt.NDArray[Any]] = [self._alloc(s, self._min_capacity) for s in states]
        self._free: list[int] = list(range(self._min_capacity - 1, -1, -1))
        self._live = 0

    @staticmethod
    def _alloc(state: StateSpec, capacity: int) -> npt.NDArray[Any]:
        shape = list(state.initial.shape)
        shape.insert(state.batch_axis, capacity)
        return np.empty(shape, dtype=state.dtype)

    @property
    def capacity(self) -> int:
        return self._arrays[0].shape[self._states[0].batch_axis] if self._arrays else 0

    @property
    def live(self) -> int:
        return self._live

    def _index(self, state: StateSpec, slots: int | slice | SlotIndex) -> tuple[Any, ...]:
        return (slice(None),) * state.batch_axis + (slots,)

    def allocate(self) -> int:
        if not self._free:
            self._resize(self.capacity * 2)
        slot = self._free.pop()
        self._live += 1
        self.reset(slot)
        return slot

    def release(self, slot: int) -> None:
        self._free.append(slot)
        self._live -= 1

    def reset(self, slot: int) -> None:
        for state, array in zip(self._states, self._arrays, strict=True):
            array[self._index(state, slot)] = state.initial

    def read(self, slot: int) -> list[npt.NDArray[Any]]:
        """Copies of one session's states, each without its batch axis."""
        return [
            np.array(array[self._index(state, slot)])
            for state, array in zip(self._states, self._arrays, strict=True)
        ]

    def write(self, slot: int, values: Sequence[npt.NDArray[Any]]) -> None:
        for state, array, value in zip(self._states, self._arrays, values, strict=True):
            array[self._index(state, slot)] = value

    def gather(self, slots: SlotIndex) -> list[npt.NDArray[Any]]:
        """The states of `slots`, stacked on each state's batch axis (new arrays)."""
        return [
            np.take(array, slots, axis=state.batch_axis)
            for state, array in zip(self._states, self._arrays, strict=True)
        ]

    def scatter(self, slots: SlotIndex, values: Sequence[npt.NDArray[Any]]) -> None:
        for state, array, value in zip(self._states, self._arrays, values, strict=True):
            array[self._index(state, slots)] = value

    def compact(self, relocate: Callable[[int, int], None]) -> bool:
        """Halve the arrays when under a quarter full; `relocate(old, new)` renames moved slots.

        Must not run while a batch holds slot numbers: the scheduler calls it between batches.
        """
        capacity = self.capacity
        target = capacity // 2
        if target < self._min_capacity or self._live > capacity // 4:
            return False
        free = set(self._free)
        high_in_use = [s for s in range(target, capacity) if s not in free]
        low_free = [s for s in range(target) if s in free]
        # live <= capacity / 4 < target, so every high slot finds a low free one.
        for old, new in zip(high_in_use, low_free, strict=False):
            for state, array in zip(self._states, self._arrays, strict=True):
                array[self._index(state, new)] = array[self._index(state, old)]
            relocate(old, new)
        self._resize(target)
        self._free = low_free[len(high_in_use) :][::-1]
        return True

    def _resize(self, capacity: int) -> None:
        resized = []
        for state, array in zip(self._states, self._arrays, strict=True):
            new = self._alloc(state, capacity)
            keep = min(capacity, array.shape[state.batch_axis])
            new[self._index(state, slice(0, keep))] = array[self._index(state, slice(0, keep))]
            resized.append(new)
        old_capacity = self.capacity
        self._arrays = resized
        if capacity > old_capacity:
            self._free = list(range(capacity - 1, old_capacity - 1, -1)) + self._free
