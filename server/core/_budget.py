"""The server's memory budget: the bytes of tensors it holds for clients, server-wide and per
principal. Work (frames read and not yet answered, answers not yet taken by their client,
unary calls under way) and the output rings draw from it."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Protocol

from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import ResourceExhausted
from rnnstream.server.core._instruments import CoreMetrics

__all__ = ["Holding", "MemoryBudget", "RingLedger"]

# The output rings keep at most this share of the budget: the rest is always there for work.
RINGS_SHARE = 4
# One stream may hold at most this share of the budget before it stops reading, so one client
# that does not read cannot take a principal's whole share.
STREAM_SHARE = 8


class Holding:
    """What one stream holds of the budget; the stream stops reading while it holds its share."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held = 0


class RingOwner(Protocol):
    """A session's output ring, as the ledger sees it: its bytes and entries, and its oldest
    entry to drop."""

    held: int  # the ring's bytes

    def ring_entries(self) -> int: ...

    def drop_oldest_output(self) -> bool: ...


class RingLedger:
    """The bytes of every session's output ring. Past `limit` the oldest entries server-wide go
    (of the session that added to its ring longest ago); past `per_session` a session's own
    oldest entries go, its newest always kept."""

    def __init__(self, limit: int, per_session: int) -> None:
        self.limit = limit
        self.per_session = per_session
        self.held = 0
        self._order: OrderedDict[RingOwner, None] = OrderedDict()  # by last append

    def appended(self, ring: RingOwner, nbytes: int) -> None:
        """`nbytes`: what the ring grew by (less what it dropped to keep its count)."""
        self.held += nbytes
        order = self._order
        order[ring] = None
        order.move_to_end(ring)
        while ring.held > self.per_session and ring.ring_entries() > 1:
            ring.drop_oldest_output()
        while self.held > self.limit and order:
            oldest = next(iter(order))
            if not oldest.drop_oldest_output():
                del order[oldest]

    def dropped(self, ring: RingOwner, nbytes: int) -> None:
        self.held -= nbytes
        if not ring.ring_entries():
            self._order.pop(ring, None)

    def forget(self, ring: RingOwner) -> None:
        """Its session ended: the ring is gone."""
        self.held -= ring.held
        self._order.pop(ring, None)


class MemoryBudget:
    """`limit` bytes for the whole server (`--max-buffered-bytes`), `per_principal` for what one
    principal's work holds (`--max-buffered-bytes-per-principal`; 0: the server's limit).

    Unary work claims its bytes up front or is refused (RESOURCE_EXHAUSTED); a stream takes
    what it reads and stops reading while the server, its principal or the stream itself holds
    its share, until its client takes the answers."""

    def __init__(self, limit: int, per_principal: int, ring_per_session: int) -> None:
        self.limit = limit
        self.per_principal = per_principal or limit
        self.stream_share = max(1, limit // STREAM_SHARE)
        self.rings = RingLedger(limit // RINGS_SHARE, ring_per_session)
        self.work = 0
        self.high_water = 0  # the most work held since a reader last set it (server/_malloc.py)
        self._by_owner: dict[str, int] = {}
        self._waiters: list[asyncio.Future[None]] = []

    @classmethod
    def from_settings(cls, settings: EngineSettings, metrics: CoreMetrics | None) -> MemoryBudget:
        budget = cls(
            settings.max_buffered_bytes,
            settings.max_buffered_bytes_per_principal,
            settings.output_ring_bytes,
        )
        if metrics is not None:
            metrics.watch_buffered_bytes(
                lambda: budget.work, lambda: budget.rings.held, budget.limit
            )
        return budget

    def held(self) -> int:
        return self.work + self.rings.held

    def held_by(self, owner: str) -> int:
        return self._by_owner.get(owner, 0)

    def claim(self, owner: str, nbytes: int) -> None:
        """Take `nbytes` for unary work, or refuse it: RESOURCE_EXHAUSTED naming the limit."""
        self.check(owner, nbytes)
        self.take(owner, nbytes)

    def check(self, owner: str, nbytes: int) -> None:
        """RESOURCE_EXHAUSTED, naming the limit, unless `nbytes` more fit."""
        if self.held() + nbytes > self.limit:
            raise ResourceExhausted(
                f"the server holds {self.held()} bytes for clients and this call needs {nbytes} "
                f"more, over its limit of {self.limit} (--max-buffered-bytes); try again shortly"
            )
        if self.held_by(owner) + nbytes > self.per_principal:
            raise ResourceExhausted(
                f"principal {owner!r} holds {self.held_by(owner)} bytes and this call needs "
                f"{nbytes} more, over its limit of {self.per_principal} "
                "(--max-buffered-bytes-per-principal); try again shortly"
            )

    def take(self, owner: str, nbytes: int, holding: Holding | None = None) -> None:
        self.work += nbytes
        if self.work > self.high_water:
            self.high_water = self.work
        self._by_owner[owner] = self._by_owner.get(owner, 0) + nbytes
        if holding is not None:
            holding.held += nbytes

    def give(self, owner: str, nbytes: int, holding: Holding | None = None) -> None:
        if not nbytes:
            return
        self.work -= nbytes
        left = self._by_owner[owner] - nbytes
        if left:
            self._by_owner[owner] = left
        else:
            del self._by_owner[owner]  # principals come and go: no entry per past one
        if holding is not None:
            holding.held -= nbytes
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def has_room(self, owner: str, holding: Holding) -> bool:
        """Whether a stream may read another message."""
        return (
            self.held() < self.limit
            and self.held_by(owner) < self.per_principal
            and holding.held < self.stream_share
        )

    async def wait_for_room(self, owner: str, holding: Holding) -> None:
        """Return once a stream may read again (its client has taken answers, or others'
        work is done)."""
        while not self.has_room(owner, holding):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
