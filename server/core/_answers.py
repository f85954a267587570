"""How a batch's frames are answered: applied (each session advanced, its reply told), refused
before the run (NaN or infinity), or failed as a whole (nothing applied)."""

from __future__ import annotations

import time

from rnnstream.server.core._batch import Batch, BlockPart
from rnnstream.server.core._batcher import ReadyQueue
from rnnstream.server.core._errors import InvalidArgument, RnnstreamError
from rnnstream.server.core._results import BlockOutputs, FrameOutput
from rnnstream.server.core._session import Session
from rnnstream.server.core._stats import ModelCounters
from rnnstream.server.core._work import FrameBlock

__all__ = ["BatchAnswers"]


class BatchAnswers:
    """One model's answers to its batches; a session done with its row goes back to the ready
    queue when it has more work."""

    def __init__(self, model: str, counters: ModelCounters, ready: ReadyQueue) -> None:
        self._model = model
        self._counters = counters
        self._ready = ready

    def applied(
        self,
        batch: Batch,
        singles: list[FrameOutput],
        blocks: list[BlockOutputs],
        started: float,
        elapsed: float,
    ) -> None:
        """The batch is applied (and stored, with a store): advance and answer its sessions."""
        done_at = time.perf_counter()
        now = time.monotonic()
        cancelled = 0
        ready = self._ready
        for session, frame, result in zip(
            batch.single_sessions, batch.frames, singles, strict=True
        ):
            session.applied(result, now)
            if frame.reply.done():
                cancelled += 1  # its caller stopped waiting; the frame is applied all the same
            else:
                frame.reply.set_result(result if frame.emit else None)
            if session.has_work():
                ready.mark_ready(session)
        for part, outputs in zip(batch.parts, blocks, strict=True):
            busy = Session.apply_block(part.sessions(), outputs, now)
            reply = part.block.reply
            if reply.done():
                cancelled += len(part)
            else:
                reply.rows_applied(part.group_rows(), outputs.outputs)
            for session in busy:
                ready.mark_ready(session)
        self._counters.count("OK", len(batch) - cancelled)
        if cancelled:
            self._counters.count("CANCELLED", cancelled)
        self._counters.batch_done(batch, started, elapsed, done_at)

    def refuse_nonfinite(self, batch: Batch, bad: dict[int, str]) -> Batch:
        """Answer the rows holding a NaN or infinity before the batch runs; the rest go on."""
        kept = Batch()
        kept.key = batch.key
        for row, (session, frame) in enumerate(
            zip(batch.single_sessions, batch.frames, strict=True)
        ):
            if row not in bad:
                kept.add_frame(session, frame)
                continue
            session.released()
            self._counters.reject(frame, self._nonfinite(session, frame.index, bad[row]))
            self._ready.mark_ready(session)
        offset = len(batch.frames)
        for part in batch.parts:
            size = len(part)
            drop = {row - offset for row in bad if offset <= row < offset + size}
            if drop:
                sessions, indices = part.sessions(), part.indices()
                for i in drop:
                    error = self._nonfinite(sessions[i], int(indices[i]), bad[offset + i])
                    self.fail_row(part, i, sessions[i], error)
            left = part.without(drop) if drop else part
            if left is not None:
                kept.add_part(left)
            offset += size
        return kept

    def _nonfinite(self, session: Session, index: int, name: str) -> InvalidArgument:
        message = f"model {self._model!r} input {name!r} contains NaN or infinity"
        return InvalidArgument(message, session_id=session.id, frame_index=index)

    def fail(self, batch: Batch, error: RnnstreamError) -> None:
        """A failed run leaves every state as it was: the frames may be sent again."""
        for session, frame in zip(batch.single_sessions, batch.frames, strict=True):
            session.released()
            self._counters.reject(
                frame, type(error)(error.message, session_id=session.id, frame_index=frame.index)
            )
            self._ready.mark_ready(session)
        for part in batch.parts:
            self.fail_part(part, error)

    def fail_part(self, part: BlockPart, error: RnnstreamError) -> None:
        for i, (session, index) in enumerate(zip(part.sessions(), part.indices(), strict=True)):
            row_error = type(error)(error.message, session_id=session.id, frame_index=int(index))
            self.fail_row(part, i, session, row_error)

    def fail_block(self, block: FrameBlock, error: RnnstreamError) -> None:
        """A queued block's rows not yet taken into a batch (shutting down)."""
        if block.taken < len(block):
            self.fail_part(BlockPart(block, slice(block.taken, len(block))), error)

    def fail_row(self, part: BlockPart, i: int, session: Session, error: RnnstreamError) -> None:
        session.released()
        reply = part.block.reply
        if reply.done():
            self._counters.count("CANCELLED")
        else:
            reply.row_failed(part.group_row(i), error)
            self._counters.count(error.code.name)
        self._ready.mark_ready(session)
