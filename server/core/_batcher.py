"""The ready queue: sessions with a runnable head, oldest head first, and blocks of frames that
arrived together, taken a batch at a time."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import deque
from collections.abc import Callable

from rnnstream.server.core._batch import Batch, BlockPart
from rnnstream.server.core._session import Session
from rnnstream.server.core._work import FrameBlock, FrameWork

__all__ = ["ReadyQueue"]


class ReadyQueue:
    """Ready sessions in a heap keyed by the arrival of their head item, and frame blocks in
    arrival order. A batch takes the oldest first, at most one frame per session, all with the
    same shapes (the oldest frame's T leads; the others wait for a later batch); a block larger
    than the room left is split over batches. Single frames holding more than `max_batch_bytes`
    together (inputs and outputs: ORT's buffers for a batch grow with them) wait for the next
    batch; one frame goes alone whatever its size (0: no limit)."""

    def __init__(self, max_batch_size: int, max_batch_bytes: int = 0) -> None:
        self.max_batch_size = max(1, max_batch_size)
        self.max_batch_bytes = max_batch_bytes
        self._heap: list[tuple[float, int, Session]] = []
        self._ties = itertools.count()
        self._queued: set[Session] = set()  # in the heap
        self._blocks: deque[FrameBlock] = deque()
        self._block_rows = 0  # rows of the queued blocks not yet taken
        self.wake = asyncio.Event()  # set when a session becomes ready

    def __len__(self) -> int:
        """Frames ready to run (a block counts its rows)."""
        return len(self._heap) + self._block_rows

    def mark_ready(self, session: Session) -> None:
        if session.runnable() and session not in self._queued:
            self._push(session, session.head_arrival())
            self.wake.set()

    def add_block(self, block: FrameBlock) -> None:
        self._blocks.append(block)
        self._block_rows += len(block)
        self.wake.set()

    def take_blocks(self) -> list[FrameBlock]:
        """Every queued block, gone from the queue (shutting down: their rows are refused)."""
        blocks = list(self._blocks)
        self._blocks.clear()
        self._block_rows = 0
        return blocks

    def _push(self, session: Session, arrived: float) -> None:
        self._queued.add(session)
        heapq.heappush(self._heap, (arrived, next(self._ties), session))

    def take(self, head: Callable[[Session], FrameWork | None]) -> Batch:
        """The next batch: `head` settles a session's head and returns its runnable frame."""
        batch = Batch()
        room = self.max_batch_size
        skipped: list[Session] = []
        heap, blocks = self._heap, self._blocks
        blocks_fit = True  # False once the head block's shapes differ from the batch's
        held = 0  # bytes of the single frames taken
        while room > 0:
            block = blocks[0] if blocks and blocks_fit else None
            if heap and (block is None or heap[0][0] <= block.enqueued_at):
                session = heapq.heappop(heap)[2]
                self._queued.discard(session)
                frame = head(session)
                if frame is None:
                    continue
                if batch.key is None:
                    batch.key = frame.key
                elif frame.key != batch.key:
                    skipped.append(session)  # a different T: it leads a later batch
                    continue
                elif self.max_batch_bytes and held + frame.cost > self.max_batch_bytes:
                    skipped.append(session)  # the batch is full by bytes: it leads the next one
                    break
                held += frame.cost
                session.start(frame)
                batch.add_frame(session, frame)
                room -= 1
            elif block is not None:
                if batch.key is None:
                    batch.key = block.key
                elif block.key != batch.key:
                    blocks_fit = False
                    continue
                start = block.taken
                stop = min(len(block), start + room)
                batch.add_part(BlockPart(block, slice(start, stop)))
                block.taken = stop
                self._block_rows -= stop - start
                room -= stop - start
                if stop == len(block):
                    blocks.popleft()
            else:
                break
        for session in skipped:
            self._push(session, session.head_arrival())
        return batch
