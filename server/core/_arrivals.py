"""When a model's scheduler starts a batch: gathering the frames that are arriving before it, and
polling for the next frame after it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

from rnnstream.server.core._session import Session

__all__ = ["ExpectedFrames", "Pacer"]

_ARRIVAL_TURNS = 64  # at low load, gathering lasts at most this many loop turns
_GATHER_SPELLS = 32  # under load, gathering lasts at most this many quiet spells
_ARRIVAL_PATIENCE = 2  # quiet loop turns in a row that end the gathering
_GATHER_SECONDS_PER_EXPECTED = 1e-6  # quiet spell a batch waits through per expected frame
_POLL_MAX_BATCH = 4  # busy polling follows only batches of at most this many frames
_POLL_MAX_SKIPS = 64


class ExpectedFrames:
    """Counts the sessions answered within the last `horizon` seconds that have sent nothing
    since: a streaming client answers an output with its next frame, so under load these are
    the frames about to arrive. Idle sessions drop out after `horizon`, so a lone active stream
    among many idle ones expects nothing from them."""

    def __init__(self, horizon: float = 0.1) -> None:
        self._horizon = horizon
        self._since: dict[Session, float] = {}  # session -> when its next frame became expected
        self._answered: deque[tuple[float, Session]] = deque()

    @property
    def count(self) -> int:
        return len(self._since)

    def expects(self, session: Session) -> bool:
        return session in self._since

    def answered(self, session: Session, now: float) -> None:
        """The session's last queued frame was just answered: its next one is expected."""
        self._since[session] = now
        self._answered.append((now, session))

    def arrived(self, session: Session) -> None:
        """The session sent something (or ended): nothing more is expected of it."""
        self._since.pop(session, None)

    def expire(self, now: float) -> None:
        limit = now - self._horizon
        answered, since = self._answered, self._since
        while answered and answered[0][0] < limit:
            at, session = answered.popleft()
            if since.get(session) == at:  # not answered again since then
                del since[session]


class Queue(Protocol):
    """What the pacer watches of a scheduler."""

    submitted: int  # items submitted so far: it grows as frames arrive
    max_batch_size: int

    def ready_count(self) -> int: ...

    def session_count(self) -> int: ...


class Pacer:
    """Decides, turn by turn of the event loop, when a scheduler starts its next batch."""

    def __init__(self, queue: Queue, busy_poll_seconds: float, gather_seconds: float) -> None:
        self._queue = queue
        self._busy_poll_seconds = busy_poll_seconds
        self._gather_seconds = gather_seconds
        self.expected = ExpectedFrames()
        self.last_batch_size = 0
        # Polls in a row that found nothing. From the second on, that many idle periods (1, 2,
        # 4, ... at most _POLL_MAX_SKIPS) pass without polling; a hit clears it.
        self._poll_misses = 0
        self._poll_skips = 0
        self.busy_polls = 0  # times the loop polled for the next frame after a batch
        self.busy_poll_hits = 0  # ... and a frame came within the window

    async def poll_for_work(self) -> bool:
        """Keep the event loop turning (never blocking in the kernel) for a short while after a
        batch, in case the next frame comes soon; True if one came.

        A thread that sleeps between frames wakes on a cold core and runs every step of the next
        frame several times slower, which at low load costs more latency than the work itself.
        So it polls only at low load: after a batch of a few frames (a larger one means frames
        are queueing, the loop has work, and spinning would take CPU from the transport and the
        clients), and, after two or more polls in a row that found nothing, only every 2nd, 3rd,
        5th, ... idle period (frames that come further apart than the window would make it spin
        in vain)."""
        if self._busy_poll_seconds <= 0 or not 0 < self.last_batch_size <= _POLL_MAX_BATCH:
            return False
        if self._poll_skips:
            self._poll_skips -= 1
            return False
        self.busy_polls += 1
        queue = self._queue
        until = time.perf_counter() + self._busy_poll_seconds
        while not queue.ready_count() and time.perf_counter() < until:
            await asyncio.sleep(0)
        if not queue.ready_count():
            self._poll_misses += 1
            if self._poll_misses > 1:  # one miss is jitter; two in a row, frames come slower
                self._poll_skips = min(2 ** (self._poll_misses - 2), _POLL_MAX_SKIPS)
            return False
        self.busy_poll_hits += 1
        self._poll_misses = 0
        return True

    async def gather_arrivals(self) -> None:
        """Let the loop read what has already arrived before a batch is taken: while frames keep
        coming, wait another loop turn (never a timer). It stops at once when every session of
        the model is ready (a lone stream waits for nothing), else after two loop turns in a row
        bring nothing and, under load, a quiet spell of 1 µs per expected frame (ExpectedFrames;
        at most --gather-us), or after _GATHER_SPELLS such spells in all.

        At hundreds of sessions the clients answer each batch's outputs in bursts; a server with
        CPU to spare would otherwise start a batch in every gap between them."""
        queue = self._queue
        self.expected.expire(time.perf_counter())
        window = min(self._gather_seconds, self.expected.count * _GATHER_SECONDS_PER_EXPECTED)
        started = last = time.perf_counter()
        arrived = queue.submitted
        quiet = 0
        turns = 0
        while window or turns < _ARRIVAL_TURNS:  # under load the time bound below ends it
            turns += 1
            if queue.ready_count() >= min(queue.max_batch_size, queue.session_count()):
                return
            await asyncio.sleep(0)
            now = time.perf_counter()
            if queue.submitted != arrived:
                arrived, quiet, last = queue.submitted, 0, now
            else:
                quiet += 1
                if quiet >= _ARRIVAL_PATIENCE and now - last >= window:
                    return
            if window and now - started >= _GATHER_SPELLS * window:
                return
