"""Open loop: frames are due at fixed times whether or not the server has answered."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol

import numpy as np

__all__ = ["Arrivals", "arrival_times", "run_schedule"]

Arrivals = Literal["constant", "poisson"]
_BURST = 64  # due frames handed out back to back before the loop gets a turn


def arrival_times(start: float, rate: float, arrivals: Arrivals, seed: int) -> Iterator[float]:
    """Intended send times from `start` on: every 1/rate s, or exponential gaps of mean 1/rate."""
    if arrivals == "constant":
        n = 0
        while True:
            yield start + n / rate
            n += 1
    rng = np.random.default_rng(seed)
    t = start
    while True:
        for gap in rng.exponential(1.0 / rate, 1024):
            t += float(gap)
            yield t


class Target(Protocol):
    """A session that takes frames due at given times."""

    def due(self, intended: float) -> None: ...

    def full(self) -> bool:
        """True once the session has had all the frames it may send."""
        ...


async def run_schedule(
    targets: Sequence[Target],
    times: Iterator[float],
    until: float,
    clock: Callable[[], float],
    stopped: Callable[[], bool],
) -> None:
    """Hand due times to the targets round-robin until `until`, a stop, or all are full.

    A frame's latency is measured from its due time, not from when it actually went out, so a
    client or server that falls behind shows up as latency instead of as fewer frames.
    """
    live = list(targets)
    burst = 0
    for turn, intended in enumerate(times):
        if intended >= until or stopped():
            return
        while live and live[turn % len(live)].full():
            live.pop(turn % len(live))
        if not live:
            return
        target = live[turn % len(live)]
        wait = intended - clock()
        if wait > 0:
            burst = 0
            await asyncio.sleep(wait)
            if stopped():
                return
        elif burst >= _BURST:
            burst = 0
            await asyncio.sleep(0)
        burst += 1
        target.due(intended)
