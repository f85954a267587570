"""The server process gives freed memory back to the system (server/_malloc.py): after
give_back_large_buffers (which serve() calls first), a buffer of a few MB freed after a larger
one still gets its own mapping instead of coming from the heap, which glibc does not give back;
and the heap's free pages are handed back once a burst of work is over."""

from __future__ import annotations

import asyncio
import ctypes.util
import platform
import subprocess
import sys

import pytest

from rnnstream.server._malloc import TRIM_AFTER_BYTES, trim_after_bursts
from rnnstream.server.core import MemoryBudget

_PROBE = """
import ctypes, ctypes.util, sys
import numpy as np
from rnnstream.server._malloc import give_back_large_buffers

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "fixed":
    give_back_large_buffers()
large = np.ones(16 << 20, np.uint8)
del large  # glibc alone now raises its mmap threshold to 16 MB
mapped = libc.mallinfo2().hblkhd
tensor = np.ones(4 << 20, np.uint8)
print((libc.mallinfo2().hblkhd - mapped) >> 20)
"""


def _mapped_mb(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


def _glibc_with_mallinfo2() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc" or ctypes.util.find_library("c") is None:
        return False
    return tuple(int(part) for part in version.split(".")[:2]) >= (2, 33)


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33+ (mallinfo2)")
def test_a_freed_large_buffer_does_not_move_tensors_onto_the_heap() -> None:
    assert _mapped_mb("glibc-default") == 0  # what the server did before: heap, kept
    assert _mapped_mb("fixed") == 4


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33+ (malloc_trim)")
def test_the_heap_is_trimmed_once_a_burst_of_work_is_given_back() -> None:
    async def run() -> tuple[int, int]:
        budget = MemoryBudget(256 << 20, 0, 4 << 20)
        trimmer = asyncio.create_task(trim_after_bursts(budget, every=0.01))
        try:
            budget.take("p", 1 << 20)  # a small burst: not worth a trim
            budget.give("p", 1 << 20)
            await asyncio.sleep(0.1)
            small = budget.high_water
            budget.take("p", TRIM_AFTER_BYTES + (4 << 20))
            budget.give("p", TRIM_AFTER_BYTES)  # a large one, given back
            for _ in range(200):
                await asyncio.sleep(0.01)
                if budget.high_water == budget.work:
                    break
            return small, budget.high_water
        finally:
            trimmer.cancel()

    small, after = asyncio.run(run())
    assert small == 1 << 20  # left as it was: no trim
    assert after == 4 << 20  # trimmed: the high point starts again from what is held
