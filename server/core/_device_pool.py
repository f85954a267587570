"""Session states kept on the execution device between batches (ONNX Runtime OrtValues): a
batch step runs the model wrapped with the gather of its rows' states and the scatter of the new
ones (_device_graphs.step_graph), so only the frames' inputs and outputs cross to the host."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from rnnstream.server.core._device_graphs import (
    NEW_PREFIX,
    OLD_PREFIX,
    POOL_NEXT_PREFIX,
    POOL_PREFIX,
    SLOTS,
    gather_graph,
    scatter_graph,
    step_graph,
)
from rnnstream.server.core._models import ModelConfigError, ModelSpec
from rnnstream.server.core._runtime import CUDA, OrtModel
from rnnstream.server.core._state_pool import SlotIndex, StatePool

__all__ = ["DeviceStatePool", "DeviceStep", "state_pool"]

log = logging.getLogger("rnnstream.runtime")

Arrays = list[npt.NDArray[Any]]


class DeviceStep:
    """What one step leaves: the new pools (swapped in by finish_step), the data outputs on the
    host, and the batch's states before and after on the host when asked for."""

    __slots__ = ("new_states", "old_states", "outputs", "pools")

    def __init__(
        self,
        pools: list[ort.OrtValue],
        outputs: Arrays,
        old_states: Arrays | None,
        new_states: Arrays | None,
    ) -> None:
        self.pools = pools
        self.outputs = outputs
        self.old_states = old_states
        self.new_states = new_states


class DeviceStatePool(StatePool):
    """A StatePool whose arrays live in the execution provider's memory: one OrtValue per state,
    slots first. Slot bookkeeping is StatePool's; the data moves only through ORT runs on the
    device. A step runs in the executor thread while the event loop may reset or write other
    sessions' slots: those writes wait (and reads of them are answered from what waits) until
    the step's new pools are in place, then apply."""

    def __init__(
        self,
        spec: ModelSpec,
        model_bytes: bytes,
        providers: Sequence[str],
        options: ort.SessionOptions,
        device: str,
        capacity: int = 64,
    ) -> None:
        self._spec = spec
        self._device = device  # OrtValue device type: "cuda" or "cpu"
        step = step_graph(model_bytes, spec)
        self._session = ort.InferenceSession(step, options, providers=list(providers))
        self._scatter = [
            ort.InferenceSession(scatter_graph(s), options, providers=list(providers))
            for s in spec.states
        ]
        self._gather = [
            ort.InferenceSession(gather_graph(s), options, providers=list(providers))
            for s in spec.states
        ]
        self._output_names = [t.name for t in spec.outputs]
        self._pools: list[ort.OrtValue] = []
        self._capacity = 0
        self._busy = False  # a step runs: writes wait in _held_writes
        self._held_writes: dict[int, Arrays] = {}
        self._grow_to = 0
        # StatePool's slot bookkeeping, without its host arrays.
        self._states = tuple(spec.states)
        self.slot_bytes = sum(s.initial.nbytes for s in self._states)
        self._min_capacity = max(1, capacity)
        self._arrays = []
        self._free = list(range(self._min_capacity - 1, -1, -1))
        self._live = 0
        self._set_capacity(self._min_capacity)

    # -- storage (StatePool's hooks) -------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return max(self._capacity, self._grow_to)

    def _resize(self, capacity: int) -> None:
        old = self._capacity
        if self._busy:  # the step in flight has the old buffers: grow once it is done
            self._grow_to = max(self._grow_to, capacity)
        else:
            self._set_capacity(capacity)
        if capacity > old:
            self._free = list(range(capacity - 1, old - 1, -1)) + self._free

    def _set_capacity(self, capacity: int) -> None:
        """New device buffers of `capacity` slots, the slots both hold copied over (a host round
        trip: growing and compacting are rare)."""
        pools = []
        for number, state in enumerate(self._states):
            host = np.broadcast_to(state.initial, (capacity, *state.initial.shape)).copy()
            if self._pools:
                keep = min(capacity, self._capacity)
                host[:keep] = self._pools[number].numpy()[:keep]
            pools.append(ort.OrtValue.ortvalue_from_numpy(host, self._device, 0))
        self._pools = pools
        self._capacity = capacity

    # -- single slots --------------------------------------------------------------------------
    def reset(self, slot: int) -> None:
        self.write(slot, [s.initial for s in self._states])

    def write(self, slot: int, values: Sequence[npt.NDArray[Any]]) -> None:
        copies = [np.array(v, dtype=s.dtype) for v, s in zip(values, self._states, strict=True)]
        if self._busy or slot >= self._capacity:
            self._held_writes[slot] = copies
            return
        self._scatter_rows(np.asarray([slot], np.int64), [c[None] for c in copies])

    def read(self, slot: int) -> list[npt.NDArray[Any]]:
        waiting = self._held_writes.get(slot)
        if waiting is not None:
            return [np.array(v) for v in waiting]
        return [rows[0] for rows in self._gather_rows(np.asarray([slot], np.int64))]

    def gather(self, slots: SlotIndex) -> list[npt.NDArray[Any]]:
        """The states of `slots` on the host, each on its state's batch axis (a copy)."""
        self._flush()
        rows = self._gather_rows(np.asarray(slots, np.int64))
        return [np.moveaxis(r, 0, s.batch_axis) for r, s in zip(rows, self._states, strict=True)]

    def scatter(self, slots: SlotIndex, values: Sequence[npt.NDArray[Any]]) -> None:
        """Write host states (each on its batch axis) into `slots` (an undo after a failed
        store write)."""
        rows = [
            np.ascontiguousarray(np.moveaxis(v, s.batch_axis, 0))
            for v, s in zip(values, self._states, strict=True)
        ]
        if self._busy:
            for i, slot in enumerate(slots):
                self._held_writes[int(slot)] = [r[i] for r in rows]
            return
        self._scatter_rows(np.asarray(slots, np.int64), rows)

    def compact(self, relocate: Callable[[int, int], None]) -> bool:
        """StatePool.compact's moves on a host copy of the pools (between batches: rare)."""
        capacity = self.capacity
        target = capacity // 2
        if self._busy or target < self._min_capacity or self._live > capacity // 4:
            return False
        self._flush()
        free = set(self._free)
        high_in_use = [s for s in range(target, capacity) if s not in free]
        low_free = [s for s in range(target) if s in free]
        hosts = [p.numpy() for p in self._pools]
        for old, new in zip(high_in_use, low_free, strict=False):
            for host in hosts:
                host[new] = host[old]
            relocate(old, new)
        self._pools = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(h[:target]), self._device, 0)
            for h in hosts
        ]
        self._capacity = target
        self._free = low_free[len(high_in_use) :][::-1]
        return True

    # -- a batch step ------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A step is about to run (in the executor): writes wait until finish_step."""
        self._flush()
        self._busy = True

    def step(
        self, feeds: Mapping[str, npt.NDArray[Any]], slots: SlotIndex, host_states: bool
    ) -> DeviceStep:
        """One batch: `feeds` are the model's data inputs, `slots` each row's slot. Runs on any
        thread; the pools are not touched until finish_step swaps the new ones in."""
        binding = self._session.io_binding()
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        binding.bind_cpu_input(SLOTS, np.asarray(slots, np.int64))
        for number, pool in enumerate(self._pools):
            binding.bind_ortvalue_input(f"{POOL_PREFIX}{number}", pool)
            binding.bind_output(f"{POOL_NEXT_PREFIX}{number}", self._device)
            if host_states:
                binding.bind_output(f"{OLD_PREFIX}{number}", "cpu")
                binding.bind_output(f"{NEW_PREFIX}{number}", "cpu")
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        values = binding.get_outputs()
        count = len(self._states)
        per_state = 3 if host_states else 1
        pools = [values[number * per_state] for number in range(count)]
        outputs = [v.numpy() for v in values[count * per_state :]]
        old = new = None
        if host_states:
            old = [self._batched(values[n * 3 + 1].numpy(), n) for n in range(count)]
            new = [self._batched(values[n * 3 + 2].numpy(), n) for n in range(count)]
        return DeviceStep(pools, outputs, old, new)

    def _batched(self, rows: npt.NDArray[Any], number: int) -> npt.NDArray[Any]:
        return np.moveaxis(rows, 0, self._states[number].batch_axis)

    def finish_step(self, done: DeviceStep | None) -> None:
        """The step is over (None: it failed, nothing changed): its pools take over, then the
        writes that waited apply."""
        self._busy = False
        if done is not None:
            self._pools = done.pools
        if self._grow_to > self._capacity:
            self._set_capacity(self._grow_to)
        self._grow_to = 0
        self._flush()

    # -- ORT runs on single slots -----------------------------------------------------------------
    def _flush(self) -> None:
        if self._held_writes and not self._busy:
            pending, self._held_writes = self._held_writes, {}
            slots = np.asarray(list(pending), np.int64)
            rows = [np.stack([v[i] for v in pending.values()]) for i in range(len(self._states))]
            self._scatter_rows(slots, rows)

    def _scatter_rows(self, slots: npt.NDArray[np.int64], rows: Arrays) -> None:
        index = slots.reshape(-1, 1)
        for number, (session, values) in enumerate(zip(self._scatter, rows, strict=True)):
            binding = session.io_binding()
            binding.bind_ortvalue_input("pool", self._pools[number])
            binding.bind_cpu_input("index", index)
            binding.bind_cpu_input("values", np.ascontiguousarray(values))
            binding.bind_output("pool_next", self._device)
            session.run_with_iobinding(binding)
            self._pools[number] = binding.get_outputs()[0]

    def _gather_rows(self, slots: npt.NDArray[np.int64]) -> Arrays:
        rows = []
        for number, session in enumerate(self._gather):
            binding = session.io_binding()
            binding.bind_ortvalue_input("pool", self._pools[number])
            binding.bind_cpu_input("index", slots)
            binding.bind_output("values", "cpu")
            session.run_with_iobinding(binding)
            rows.append(binding.get_outputs()[0].numpy())
        return rows


def state_pool(model: OrtModel, where: str) -> StatePool:
    """The pool of a model's session states. `where`: "host" (numpy arrays), "device" (ORT
    values on the device the model runs on; on the CPU provider it only exercises the path),
    "auto" (the device when that is a GPU). A model whose graph cannot be wrapped keeps its
    states on the host under auto (logged); under device it does not load."""
    cuda = model.provider == CUDA
    if where == "host" or (where == "auto" and not cuda):
        return StatePool(model.spec.states)
    try:
        options = model.session.get_session_options()
        return DeviceStatePool(
            model.spec,
            Path(model.spec.path).read_bytes(),
            model.session.get_providers(),
            options,
            "cuda" if cuda else "cpu",
        )
    except Exception as exc:
        if where == "device":
            raise ModelConfigError(
                f"model {model.spec.name!r}: --state-pool device: cannot keep its states on "
                f"the device: {exc}"
            ) from exc
        log.warning("model %s: states stay in host memory: %s", model.spec.name, exc)
        return StatePool(model.spec.states)
