"""When a model's scheduler starts a batch: it first lets the event loop read the frames that
are already arriving, within a hard bound, and records how long that took."""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from rnnstream.server.core._instruments import Observer

__all__ = ["MAX_GATHER_SECONDS", "Pacer"]

# A batch that could start waits at most this long for frames that are arriving (the worst-case
# wait batching adds; ModelConfig reports it as max_queue_delay_microseconds), and at most
# _ARRIVAL_TURNS loop turns; two turns in a row that bring nothing end it sooner.
MAX_GATHER_SECONDS = 0.001
_ARRIVAL_TURNS = 64
_ARRIVAL_PATIENCE = 2


class Queue(Protocol):
    """What the pacer watches of a scheduler."""

    submitted: int  # items submitted so far: it grows as frames arrive
    max_batch_size: int

    def ready_count(self) -> int: ...

    def session_count(self) -> int: ...


class Pacer:
    """Gathering before each batch. There is no waiting for frames that have not arrived: the
    loop only turns while frames keep coming (a stream delivers one message per turn, and a
    frame read off the socket in one turn is queued in the next), so a batch takes what is
    already in the sockets. Every session of the model ready, two idle turns, 64 turns or
    MAX_GATHER_SECONDS end it. The time it takes goes to `waits` (a histogram, or None)."""

    def __init__(self, queue: Queue, waits: Observer | None = None) -> None:
        self._queue = queue
        self._waits = waits
        self.longest_wait = 0.0  # seconds: the longest gathering so far (tests, benchmarks)

    async def gather_arrivals(self) -> None:
        queue = self._queue
        started = time.perf_counter()
        arrived = queue.submitted
        quiet = 0
        for _ in range(_ARRIVAL_TURNS):
            if queue.ready_count() >= min(queue.max_batch_size, queue.session_count()):
                break
            await asyncio.sleep(0)
            if queue.submitted != arrived:
                arrived, quiet = queue.submitted, 0
            else:
                quiet += 1
                if quiet >= _ARRIVAL_PATIENCE:
                    break
            if time.perf_counter() - started >= MAX_GATHER_SECONDS:
                break
        waited = time.perf_counter() - started
        self.longest_wait = max(self.longest_wait, waited)
        if self._waits is not None:
            self._waits.observe(waited)
