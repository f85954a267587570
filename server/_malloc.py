"""The C allocator's part in giving memory back: freed tensors go back to the system."""

from __future__ import annotations

import asyncio
import logging
import os
import time

from rnnstream.server.core import MemoryBudget
from rnnstream.server.core._heap import give_back_heap, glibc

__all__ = ["give_back_large_buffers", "trim_after_bursts"]

log = logging.getLogger("rnnstream.server")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Above glibc's starting 128 KiB: a batch's tensors of a few hundred KiB (512 sessions' states
# and outputs) reuse the heap's free chunks instead of faulting in fresh pages on every copy,
# which took a fifth of the frames/s of 512 sessions a message. The heap they come back to is
# trimmed after bursts (trim_after_bursts).
_THRESHOLD = 1024 * 1024
# Work the budget held and has given back since the last trim that makes the next one worth it.
TRIM_AFTER_BYTES = 32 * 1024 * 1024


def give_back_large_buffers() -> None:
    """glibc raises its mmap threshold to the size of the largest buffer freed (up to 32 MB),
    after which tensors of a few MB come from the heap, which is not given back: a burst of
    large frames left the server holding what it had freed. Fixing the threshold at 1 MiB keeps
    every buffer larger than that in its own mapping, returned to the system when freed.
    No-op elsewhere than glibc, or where MALLOC_MMAP_THRESHOLD_ is set."""
    libc = glibc()
    if libc is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    if not libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay with the heap")


async def trim_after_bursts(budget: MemoryBudget, every: float = 1.0) -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim, off the event loop)
    once the work the budget holds has fallen by TRIM_AFTER_BYTES from its high point since the
    last trim: what a burst of many small allocations (messages, gRPC's buffers, every thread's
    arena) left free in the heap, which glibc keeps otherwise. At most once every `every` s;
    returns at once elsewhere than glibc."""
    if glibc() is None:
        return
    while True:
        await asyncio.sleep(every)
        if budget.high_water - budget.work < TRIM_AFTER_BYTES:
            continue
        budget.high_water = budget.work
        started = time.perf_counter()
        await give_back_heap()
        log.debug("heap trimmed in %.1f ms", (time.perf_counter() - started) * 1e3)
