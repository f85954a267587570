"""A stream's responses waiting to be written, with back-pressure on its reader; packs consecutive
frame outputs for streams that accept FrameOutputs."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from rnnstream.proto.v1 import rnnstream_pb2 as pb

__all__ = ["Outbox"]

# Room kept under the message limit for the FrameOutputs wrapper's own tag and length.
_PACKING_OVERHEAD = 16


class Outbox:
    """Responses (and the writer's sentinels) in the order they are to be written.

    With `pack_limit_bytes`, the writer takes every frame output queued back to back (up to that
    many bytes) as one FrameOutputs message: the outputs of one batch become ready together, and
    one message costs gRPC a fraction of what one per frame does. Nothing waits to be packed: a
    lone output goes out alone, at once.
    """

    def __init__(
        self,
        pack_limit_bytes: int | None = None,
        on_written: Callable[[int], None] | None = None,
    ) -> None:
        self._items: deque[object] = deque()
        # The bytes each item holds (of the memory budget) until the writer has sent it, and
        # who hears they are free: put_nowait's charge, given back by wrote().
        self._charges: deque[int] = deque()
        self._taken = 0
        self._on_written = on_written
        self._waiter: asyncio.Future[None] | None = None  # the writer, waiting for an item
        self._room_waiter: asyncio.Future[None] | None = None  # the reader, waiting for room
        self._pack_limit = pack_limit_bytes
        if pack_limit_bytes is not None:
            self._pack_limit = pack_limit_bytes - _PACKING_OVERHEAD

    def put_nowait(self, item: object, charge: int = 0) -> None:
        self._items.append(item)
        self._charges.append(charge)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def drop_all(self) -> int:
        """The call is over: forget what waits; returns the bytes it held."""
        held = self._taken + sum(self._charges)
        self._items.clear()
        self._charges.clear()
        self._taken = 0
        return held

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def wrote(self) -> None:
        """The writer sent what it took: its bytes are free, and a reader waiting for room may
        go on."""
        if self._taken and self._on_written is not None:
            self._on_written(self._taken)
        self._taken = 0
        waiter = self._room_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_for_room(self, limit: int) -> None:
        """Return once fewer than `limit` items wait. Answers a client does not read pile up
        here; its stream's reader waits, so flow control pushes back on the client instead of
        the server's memory growing."""
        while len(self._items) >= limit:
            self._room_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._room_waiter
            finally:
                self._room_waiter = None

    async def get(self) -> object:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.get_nowait()

    def get_nowait(self) -> object:
        """The next item, frame outputs queued behind it packed in where allowed (IndexError if
        there is none)."""
        item = self._items.popleft()
        self._taken += self._charges.popleft()
        if self._pack_limit is None or not self._items or not _is_output(item):
            return item
        if not _is_output(self._items[0]):
            return item
        assert isinstance(item, pb.StreamResponse)
        packed = pb.StreamResponse()
        outputs = packed.outputs.outputs
        outputs.append(item.output)
        size = item.ByteSize()  # an output's size as a packed element is the same
        while self._items and _is_output(head := self._items[0]):
            assert isinstance(head, pb.StreamResponse)
            size += head.ByteSize()
            if size > self._pack_limit:
                break
            self._items.popleft()
            self._taken += self._charges.popleft()
            outputs.append(head.output)
        return packed


def _is_output(item: object) -> bool:
    return isinstance(item, pb.StreamResponse) and item.HasField("output")
