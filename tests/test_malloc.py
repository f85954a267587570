"""The server process gives freed tensors back to the system: after give_back_large_buffers (which
serve() calls first), a buffer of a few MB freed after a larger one still gets its own mapping
instead of coming from the heap, which glibc does not give back (see server/_malloc.py)."""

from __future__ import annotations

import ctypes.util
import platform
import subprocess
import sys

import pytest

_PROBE = """
import ctypes, sys
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
