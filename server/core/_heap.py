"""Giving memory back when many sessions leave: a dict never shrinks as entries go, and the C
allocator keeps freed memory for later unless asked to return it. The idle sweep calls both
after sessions spill, expire or end in numbers."""

from __future__ import annotations

import asyncio
import ctypes
import sys
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["PeakTable", "give_back_heap"]

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


def _malloc_trim() -> Callable[[int], Any] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], Any] = ctypes.CDLL(None).malloc_trim  # glibc; musl has none
    except (OSError, AttributeError):
        return None
    return trim


_TRIM = _malloc_trim()


async def give_back_heap() -> None:
    """Return the C heap's free pages to the operating system (glibc's malloc_trim), on a
    thread: on a heap of a gigabyte it takes some milliseconds, and the loop runs meanwhile."""
    if _TRIM is not None:
        await asyncio.to_thread(_TRIM, 0)
