"""Frame groups: one frame for each of many sessions, queued without an object per frame where
the sessions allow it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from rnnstream.server.core._errors import InvalidArgument, RnnstreamError, Unavailable, quoted
from rnnstream.server.core._loading import Served
from rnnstream.server.core._model_registry import ModelRegistry
from rnnstream.server.core._reach import SessionReach
from rnnstream.server.core._registry import SessionManager
from rnnstream.server.core._session import Session
from rnnstream.server.core._validation import NamedArray
from rnnstream.server.core._work import BatchKey, FrameBlock, FrameWork, GroupReply

__all__ = ["FrameGroups"]

Arrays = list[npt.NDArray[Any]]


class FrameGroups:
    """The engine's door for frame groups (Engine.groups)."""

    def __init__(
        self,
        sessions: SessionManager,
        models: ModelRegistry,
        max_pending: int,
        accepting: Callable[[], bool],
    ) -> None:
        self._sessions = sessions
        self._models = models
        self._max_pending = max_pending
        self._accepting = accepting
        self.reach: SessionReach | None = None  # with spilling: brings spilled sessions back

    def submit(
        self,
        principal: str,
        model: str,
        session_ids: Sequence[str],
        indices: Sequence[int],
        tensors: Sequence[NamedArray],
        reply: GroupReply,
    ) -> list[str]:
        """Queue one frame for each of K sessions of `model` (row k of each stacked tensor is
        session_ids[k]'s frame, numbered indices[k]); `reply` hears of every row. Each row is
        applied as that session's frame alone would be, and one bad row never fails the others.
        Raises when the group as a whole is refused (no row queued). Returns the sessions whose
        queue is now full: Engine.wait_for_space on each before the next message."""
        found = self._sessions.find_many(session_ids, principal)
        # The rows' copy of the model: the first named session's (a copy is a loaded version).
        first = next((s for s in found if s is not None and s.model == model), None)
        copy = self._models.served(first.instance) if first else self._models.pick(model)
        rows = len(session_ids)
        try:
            if not self._accepting():
                raise Unavailable("server is shutting down; resume the sessions on another replica")
            if not rows:
                raise InvalidArgument("frame group names no sessions")
            if len(indices) != rows:
                raise InvalidArgument(
                    f"frame group names {rows} sessions but {len(indices)} frame indices"
                )
            arrays, key = copy.validator.validate_group(tensors, rows)
        except RnnstreamError as exc:
            copy.scheduler.count(exc.code.name, rows)
            raise
        return self._queue(copy, principal, found, session_ids, indices, arrays, key, reply)

    def refuse(self, model: str, rows: int, error: RnnstreamError) -> None:
        """Count a group's rows the transport refused before submit took them (undecodable);
        submit counts the rows it refuses itself."""
        try:
            self._models.pick(model).scheduler.count(error.code.name, rows)
        except RnnstreamError:
            return  # no such model: nothing to count them on

    def _queue(
        self,
        copy: Served,
        principal: str,
        found: list[Session | None],
        session_ids: Sequence[str],
        indices: Sequence[int],
        arrays: Arrays,
        key: BatchKey,
        reply: GroupReply,
    ) -> list[str]:
        """Rows whose session has nothing queued or running and expects exactly that index
        form one FrameBlock (no object per frame; it may run as one batch, its inputs as they
        came). The others (a resend, a frame sent early, a session busy with earlier work, one
        on another version) go into their session's queue as frames of their own and get the
        usual answers: from the output ring, out of order, and so on. A row that names no
        session of the principal on this model is refused alone."""
        scheduler, model, instance = copy.scheduler, copy.name, copy.key
        rows = len(found)
        sessions = Session.claim_block(found, indices, instance)
        if sessions is not None:
            block_indices = np.fromiter(indices, dtype=np.int64, count=rows)
            scheduler.submit_block(FrameBlock(sessions, block_indices, arrays, key, reply, None))
            return []  # the usual case: every row runs in the block
        clean: list[int] = []
        clean_sessions: list[Session] = []
        queued: list[tuple[int, Session, int]] = []
        seen: set[Session] = set()
        for row, (session, index) in enumerate(zip(found, indices, strict=True)):
            clean_row = session is not None and session not in seen
            if clean_row and Session.claim_block([session], [index], instance):  # in flight now
                assert session is not None
                seen.add(session)
                clean.append(row)
                clean_sessions.append(session)
                continue
            session_id = session_ids[row]
            if session is None and self.reach is not None and self.reach.spilling:
                self._later(copy, principal, session_id, row, index, arrays, key, reply)
                continue
            try:
                if session is None:
                    session = self._sessions.get(session_id, principal)  # NotFound: why
                if session.model != model:
                    raise InvalidArgument(
                        f"session {quoted(session_id)} runs model {session.model!r}, not the "
                        f"group's {model!r}"
                    )
                if session in seen:
                    raise InvalidArgument(
                        f"session {quoted(session_id)} appears twice in one frame group; send "
                        "its second frame in a later message"
                    )
            except RnnstreamError as exc:
                exc.session_id, exc.frame_index = session_id, index
                scheduler.count(exc.code.name)
                reply.row_failed(row, exc)
                continue
            seen.add(session)
            queued.append((row, session, index))
        axes = [t.batch_axis for t in scheduler.spec.inputs]
        if clean:
            taken = np.asarray(clean, dtype=np.intp)
            inputs = [np.take(a, taken, axis=axis) for a, axis in zip(arrays, axes, strict=True)]
            block_indices = np.asarray([indices[r] for r in clean], dtype=np.int64)
            scheduler.submit_block(
                FrameBlock(clean_sessions, block_indices, inputs, key, reply, taken)
            )
        full: list[str] = []
        for row, session, index in queued:
            frame = [
                a[(slice(None),) * axis + (row,)] for a, axis in zip(arrays, axes, strict=True)
            ]
            if not self._queue_row(copy, session, row, index, frame, key, reply):
                continue
            if session.frames_queued >= self._max_pending:
                full.append(session.id)
        return full

    def _later(
        self,
        copy: Served,
        principal: str,
        session_id: str,
        row: int,
        index: int,
        arrays: Arrays,
        key: BatchKey,
        reply: GroupReply,
    ) -> None:
        """A row whose session is not in memory: queued once it is back from the store (it was
        spilled), or refused alone."""
        assert self.reach is not None
        axes = [t.batch_axis for t in copy.scheduler.spec.inputs]
        frame = [a[(slice(None),) * axis + (row,)] for a, axis in zip(arrays, axes, strict=True)]

        def use(session: Session, _: bool) -> None:
            if session.model != copy.name:
                raise InvalidArgument(
                    f"session {quoted(session_id)} runs model {session.model!r}, not the "
                    f"group's {copy.name!r}"
                )
            self._queue_row(copy, session, row, index, frame, key, reply)

        def fail(exc: RnnstreamError) -> None:
            exc.session_id, exc.frame_index = session_id, index
            reply.row_failed(row, exc)

        self.reach.reach(principal, session_id, use, fail)

    def _queue_row(
        self,
        copy: Served,
        session: Session,
        row: int,
        index: int,
        frame: Arrays,
        key: BatchKey,
        reply: GroupReply,
    ) -> bool:
        """One row into its session's queue, on the session's own copy of the model (another
        version is checked against its own inputs first). False if refused."""
        if session.instance != copy.key:
            own = self._models.served(session.instance)
            named = [(t.name, a) for t, a in zip(copy.scheduler.spec.inputs, frame, strict=True)]
            try:
                frame, key, _ = own.validator.validate(named)
            except RnnstreamError as exc:
                exc.session_id, exc.frame_index = session.id, index
                own.scheduler.count(exc.code.name)
                reply.row_failed(row, exc)
                return False
            copy = own
        work = FrameWork(index, frame, key, reply.row_reply(row), session.emit != "last")
        copy.scheduler.submit(session, work)
        return True
