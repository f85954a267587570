"""A session: its queue of frames and controls, the rules its frame indices keep, and where its
state lives. Only this module writes a session's fields; everyone else asks it."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

from rnnstream.server.core._budget import RingLedger
from rnnstream.server.core._errors import RnnstreamError
from rnnstream.server.core._results import BlockOutputs, Emit, FrameOutput, Kept, kept_output
from rnnstream.server.core._ring import OutputRing, forgotten, not_a_resend, out_of_order
from rnnstream.server.core._work import (
    AUTO_INDEX,
    ControlWork,
    EndListener,
    FrameWork,
    inputs_digest,
)

__all__ = ["CONTROL", "FRAME", "SPILL", "Answers", "Session"]

# What a session has in flight (Session.in_flight): nothing else of it runs meanwhile.
FRAME = 1  # a frame in a batch
CONTROL = 2  # a forecast, or a control whose new state is being stored
SPILL = 3  # being marked spilled in the store: what arrives meanwhile waits, and keeps it here


class Answers(Protocol):
    """How the queue answers the frames it drops; every frame is counted once, by status."""

    def count(self, status: str, frames: int = 1) -> None: ...

    def reject(self, work: FrameWork, error: RnnstreamError) -> None: ...


class Session:
    """A client's stream of frames through one model, and where its state lives (its slot)."""

    __slots__ = (
        "_last",
        "_pending",
        "_space_waiters",
        "closed",
        "emit",
        "frames_queued",
        "id",
        "in_flight",
        "instance",
        "last_active",
        "ledger",
        "listener",
        "model",
        "next_index",
        "owner",
        "ring",
        "ring_size",
        "seq",
        "slot",
        "ttl",
        "version",
    )

    def __init__(
        self,
        session_id: str,
        model: str,
        owner: str,
        ring_size: int,
        emit: Emit = "every",
        *,
        version: int = 1,
        instance: int = 0,
        ttl: float = 0.0,
        ledger: RingLedger | None = None,
    ) -> None:
        self.id = session_id
        self.model = model
        self.version = version  # pinned: the session runs on it until it ends
        self.instance = instance  # the loaded copy of that version that holds its state
        self.ttl = ttl  # seconds idle before it expires; 0: never
        self.owner = owner
        self.emit: Emit = emit  # "last": frames are answered by flush and end only
        self.slot = -1
        self.seq = -1  # registration number: listings page in this order
        self.next_index = 0
        # Its queue, made when work arrives and dropped once idle (shrink): an idle session holds
        # no queue, ring or waiter list, only its fields and its state slot.
        self._pending: deque[FrameWork | ControlWork] | None = None
        self.frames_queued = 0
        self.in_flight = 0  # 0, FRAME or CONTROL
        self.closed = False
        self.ring: OutputRing | None = None  # made on first output: idle ones stay small
        self.ring_size = ring_size
        self.ledger = ledger  # the server's account of ring bytes, which may trim the ring
        self._last: Kept | None = None  # the latest output since open or reset
        self.last_active = time.monotonic()
        # Told when the server ends the session (expired, evicted, shutdown): its stream.
        self.listener: EndListener | None = None
        # Readers stopped while its queue is full (one per stream feeding it; all are woken).
        self._space_waiters: list[asyncio.Future[None]] | None = None

    # -- where it lives and who hears of its end ----------------------------------------------
    def place(self, slot: int) -> None:
        """Its state is (now) in this slot of the model's pool."""
        self.slot = slot

    def numbered(self, seq: int) -> None:
        """Its place in the order sessions were registered (listings page in it)."""
        self.seq = seq

    def listen(self, listener: EndListener | None) -> None:
        self.listener = listener

    def unlisten(self, listener: EndListener) -> None:
        if self.listener == listener:
            self.listener = None

    def touch(self) -> None:
        self.last_active = time.monotonic()

    def restore(self, next_index: int, ring: list[FrameOutput]) -> None:
        """Take up where a stored copy of the session left off."""
        self.next_index = next_index
        for result in ring:
            self.remember(result)
        if ring and ring[-1].index == next_index - 1:
            self._last = ring[-1]

    # -- the queue ---------------------------------------------------------------------------
    def push(self, work: FrameWork | ControlWork) -> None:
        if isinstance(work, FrameWork):
            self.frames_queued += 1
        pending = self._pending
        if pending is None:
            pending = self._pending = deque()
        pending.append(work)
        self.last_active = time.monotonic()

    def shrink(self) -> None:
        """Idle: give back the empty queue (about 700 bytes; the next work makes a new one)."""
        if not self._pending:
            self._pending = None

    def has_work(self) -> bool:
        return bool(self._pending)

    def busy(self) -> bool:
        """Work queued or running: the session is active, not idle."""
        return bool(self._pending) or bool(self.in_flight)

    def held_bytes(self) -> int:
        """Bytes of queued inputs and kept outputs (its state lives in the model's pool)."""
        pending = self._pending or ()
        queued = sum(a.nbytes for w in pending if isinstance(w, FrameWork) for a in w.inputs)
        return queued + self.ring_bytes()

    def ring_bytes(self) -> int:
        """Bytes of the outputs its ring keeps (a block row counts its share of the block)."""
        return self.ring.held if self.ring is not None else 0

    def runnable(self) -> bool:
        """Work waits and nothing of the session is in flight: it belongs in the ready queue."""
        return bool(self._pending) and not self.in_flight

    def head_arrival(self) -> float:
        """When the item at the head arrived: the oldest head runs first."""
        assert self._pending
        return self._pending[0].enqueued_at

    def next_frame(
        self, apply_control: Callable[[Session, ControlWork], None], answers: Answers
    ) -> FrameWork | None:
        """Apply the controls and answer the stale, early and cancelled frames at the head;
        return the frame that runs next (still queued: `start` takes it), or None."""
        pending = self._pending
        while pending:
            work = pending[0]
            if isinstance(work, ControlWork):
                pending.popleft()
                apply_control(self, work)
                if self.closed or self.in_flight:  # in flight: a forecast or a store write
                    return None
                continue
            if work.index == AUTO_INDEX and not work.reply.done():
                work.index = self.next_index  # numbered now: nothing before it can leave a gap
            if work.index == self.next_index and not work.reply.done():
                return work
            pending.popleft()
            self._dequeued()
            if work.reply.done():  # cancelled before it ran (deadline passed): its index stays free
                answers.count("CANCELLED")
            elif work.index < self.next_index:
                replayed = self.replay(work.index)
                if replayed is None:
                    lost = forgotten(self.id, work.index, self.next_index, self.ring_size)
                    answers.reject(work, lost)
                elif replayed.inputs_digest and replayed.inputs_digest != inputs_digest(
                    work.inputs
                ):
                    answers.reject(work, not_a_resend(self.id, work.index, self.next_index))
                else:
                    work.reply.set_result(replayed if work.emit else None)
                    answers.count("OK")
            else:
                answers.reject(work, out_of_order(self.id, work.index, self.next_index))
        return None

    def start(self, frame: FrameWork) -> None:
        """The head frame joins a batch."""
        assert self._pending
        self._pending.popleft()
        self._dequeued()
        self.in_flight = FRAME

    def applied(self, result: FrameOutput, now: float) -> None:
        """The running frame is applied (and stored, with a store)."""
        self.next_index += 1
        self.remember(result)
        self.in_flight = 0
        self.last_active = now

    @staticmethod
    def apply_block(sessions: list[Session], outputs: BlockOutputs, now: float) -> list[Session]:
        """Row i of `outputs` (a block's) is sessions[i]'s, applied (and stored): one loop, no
        object per session but its ring entry. Returns those with more work queued."""
        busy = []
        size = outputs.row_bytes
        for row, session in enumerate(sessions):
            session.next_index += 1
            kept = (outputs, row)
            session._last = kept
            if session.ring_size > 0:
                ring = session.ring
                if ring is None:
                    ring = session.ring = OutputRing(session.ring_size, session.ledger)
                ring.keep(kept, size)
            session.in_flight = 0
            session.last_active = now
            if session._pending:
                busy.append(session)
        return busy

    @staticmethod
    def claim_block(
        found: Sequence[Session | None], indices: Sequence[int], instance: int
    ) -> list[Session] | None:
        """Each found, idle, on copy `instance`, emit every, index next, named once: all in flight
        (a FrameBlock's, until applied) and returned. Else None, none of them touched."""
        claimed: list[Session] = []
        for s, i in zip(found, indices, strict=True):
            if (
                s is None or s._pending or s.in_flight or i != s.next_index
                or s.emit != "every" or s.instance != instance
            ):  # fmt: skip
                for session in claimed:
                    session.in_flight = 0
                return None
            s.in_flight = FRAME
            claimed.append(s)
        return claimed

    def released(self) -> None:
        """The running frame failed or was refused: nothing was applied."""
        self.in_flight = 0

    def start_control(self) -> None:
        self.in_flight = CONTROL

    def start_spill(self) -> None:
        self.in_flight = SPILL

    def spill_done(self) -> None:
        """The spill write is over (whatever came of it); idle time goes on counting."""
        self.in_flight = 0

    def control_done(self) -> None:
        self.in_flight = 0
        self.last_active = time.monotonic()

    def close(self) -> list[FrameWork | ControlWork]:
        """Ended: returns what was still queued, for the caller to refuse."""
        self.closed = True
        if self.ring is not None:
            self.ring.forget()
            self.ring = None
        return self.take_queued()

    def take_queued(self) -> list[FrameWork | ControlWork]:
        """Everything still waiting (not what runs), in order, for the caller to refuse."""
        pending, self._pending = self._pending or deque(), None
        dropped = list(pending)
        pending.clear()  # next_frame may be looping over it
        self.frames_queued -= sum(isinstance(work, FrameWork) for work in dropped)
        self._wake_waiters()
        return dropped

    def _dequeued(self) -> None:
        self.frames_queued -= 1
        if self._space_waiters:
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        waiters, self._space_waiters = self._space_waiters or [], None
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_for_space(self, limit: int) -> None:
        """Return once fewer than `limit` frames wait, or the session is closed."""
        while self.frames_queued >= limit and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            if self._space_waiters is None:
                self._space_waiters = []
            self._space_waiters.append(waiter)
            try:
                await waiter
            finally:
                waiters = self._space_waiters
                if waiters is not None and waiter in waiters:  # cancelled: its stream is gone
                    waiters.remove(waiter)

    # -- outputs -------------------------------------------------------------------------------
    def remember(self, result: FrameOutput) -> None:
        self._last = result
        if self.ring_size > 0:
            if self.ring is None:
                self.ring = OutputRing(self.ring_size, self.ledger)
            self.ring.keep(result)

    def replay(self, index: int) -> FrameOutput | None:
        return self.ring.find(index) if self.ring is not None else None

    @property
    def last(self) -> FrameOutput | None:
        """The latest output since open or reset."""
        kept = self._last
        if kept is None or isinstance(kept, FrameOutput):
            return kept
        self._last = result = kept_output(kept)  # read once, kept as a frame's own
        return result

    def set_last(self, last: FrameOutput | None) -> None:
        """Its latest output, as a reset (None), a committed forecast or an undo leaves it."""
        self._last = last
