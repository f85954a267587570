"""The C allocator's part in giving memory back: large buffers freed go back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["give_back_large_buffers"]

log = logging.getLogger("rnnstream.server")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_THRESHOLD = 128 * 1024


def give_back_large_buffers() -> None:
    """glibc raises its mmap threshold to the size of the largest buffer freed (up to 32 MB),
    after which tensors of a few MB come from the heap, which is not given back: a burst of
    large frames left the server holding what it had freed. Fixing the threshold at 128 KiB
    (glibc's default start) keeps every buffer larger than that in its own mapping, returned to
    the system when freed. No-op elsewhere than glibc, or where MALLOC_MMAP_THRESHOLD_ is set."""
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    if not mallopt(_M_MMAP_THRESHOLD, _THRESHOLD):
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay with the heap")
