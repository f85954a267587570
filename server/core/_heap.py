"""Giving memory back when many sessions leave: a dict never shrinks as entries go, and the C
allocator keeps freed memory for later unless asked to return it. The idle sweep calls both
after sessions spill, expire or end in numbers."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import gc
import sys
from typing import Any, TypeVar

__all__ = ["PeakTable", "give_back_heap", "glibc"]

K = TypeVar("K")
V = TypeVar("V")

_SMALL = 1024  # tables that never held more entries are left as they are


class PeakTable:
    """How many entries a dict has held at most since it was last copied: once it holds under a
    quarter of that, `shrunk` copies it to a table sized for what it holds now."""

    __slots__ = ("peak",)

    def __init__(self) -> None:
        self.peak = 0

    def grew(self, size: int) -> None:
        if size > self.peak:
            self.peak = size

    def shrunk(self, table: dict[K, V]) -> dict[K, V]:
        """A compact copy of `table` if it is worth making, else `table` itself."""
        size = len(table)
        if self.peak < _SMALL or size >= self.peak // 4:
            return table
        self.peak = size
        return dict(table)


@functools.cache
def glibc() -> Any | None:
    """The C library when it is glibc (it has mallopt and malloc_trim; musl has neither), on
    Linux; None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def clear_free_lists() -> None:
    """Empty the interpreter's free lists (tuples, floats, ... kept for reuse): thousands of
    them, spread over the small-object arenas, keep arenas whose sessions left from being
    freed. A full collection clears them; with every object frozen first it has nothing to
    traverse, so it costs microseconds however many sessions are held, and frees no garbage."""
    gc.freeze()
    try:
        gc.collect()
    finally:
        gc.unfreeze()


async def give_back_heap() -> None:
    """Return freed memory to the operating system: the free lists, then the C heap's free
    pages (glibc's malloc_trim) on a thread, since on a heap of a gigabyte that takes some
    milliseconds, and the loop runs meanwhile."""
    clear_free_lists()
    libc = glibc()
    if libc is not None:
        await asyncio.to_thread(libc.malloc_trim, 0)
