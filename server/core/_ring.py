"""A session's output ring: the outputs it keeps to answer resent frames, within a count and
the byte limits of the server's ledger (which may drop the oldest, here or in other rings)."""

from __future__ import annotations

from collections import deque

from rnnstream.server.core._budget import RingLedger
from rnnstream.server.core._errors import FailedPrecondition
from rnnstream.server.core._results import FrameOutput, Kept, kept_bytes, kept_index, kept_output

__all__ = ["OutputRing", "forgotten", "not_a_resend", "out_of_order"]


class OutputRing:
    """At most `size` outputs, oldest first; `held` counts their bytes for the ledger."""

    __slots__ = ("_entries", "_ledger", "_sizes", "held", "size")

    def __init__(self, size: int, ledger: RingLedger | None) -> None:
        self._entries: deque[Kept] = deque()
        self._sizes: deque[int] = deque()  # each entry's bytes, counted once when kept
        self._ledger = ledger
        self.size = size
        self.held = 0

    def keep(self, kept: Kept, size: int | None = None) -> None:
        """Keep an output of `size` bytes (None: kept_bytes); past `self.size` entries the
        oldest goes, in the same call to the ledger."""
        if size is None:
            size = kept_bytes(kept)
        entries = self._entries
        entries.append(kept)
        self._sizes.append(size)
        change = size
        if len(entries) > self.size:  # a full ring, the usual case: one in, one out
            entries.popleft()
            change -= self._sizes.popleft()
        self.held += change
        if self._ledger is not None:  # it may trim this ring (or others) to their byte limits
            self._ledger.appended(self, change)

    def ring_bytes(self) -> int:
        return self.held

    def ring_entries(self) -> int:
        return len(self._entries)

    def drop_oldest_output(self) -> bool:
        """Forget the oldest output kept; False when none is."""
        if not self._entries:
            return False
        self._entries.popleft()
        size = self._sizes.popleft()
        self.held -= size
        if self._ledger is not None:
            self._ledger.dropped(self, size)
        return True

    def find(self, index: int) -> FrameOutput | None:
        """Frame `index`'s output, marked as replayed, if it is still kept."""
        for kept in reversed(self._entries):
            if kept_index(kept) == index:
                result = kept_output(kept)
                return FrameOutput(index, result.outputs, result.names, True, result.inputs_digest)
        return None

    def forget(self) -> None:
        """Its session ended: everything kept goes."""
        if self._ledger is not None:
            self._ledger.forget(self)
        self._entries.clear()
        self._sizes.clear()
        self.held = 0


def not_a_resend(session_id: str, index: int, next_index: int) -> FailedPrecondition:
    """A frame resent with inputs other than those it was applied with."""
    return FailedPrecondition(
        f"frame {index} was already applied with other inputs: a resent frame must carry the "
        f"inputs it was first sent with; next expected frame is {next_index}",
        session_id=session_id,
        frame_index=index,
    )


def out_of_order(session_id: str, index: int, next_index: int) -> FailedPrecondition:
    """A frame sent ahead of the one its session expects."""
    return FailedPrecondition(
        f"frame {index} is out of order: session {session_id!r} expects frame {next_index}",
        session_id=session_id,
        frame_index=index,
    )


def forgotten(session_id: str, index: int, next_index: int, ring_size: int) -> FailedPrecondition:
    """A frame resent after its output left the ring."""
    return FailedPrecondition(
        f"frame {index} was already applied and its output is no longer kept (the ring "
        f"holds at most the last {ring_size}, within --output-ring-bytes per session and "
        f"a share of --max-buffered-bytes); next expected frame is {next_index}",
        session_id=session_id,
        frame_index=index,
    )
