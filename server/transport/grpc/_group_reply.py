"""The answer to one FrameGroup of a stream: a GroupOutputs message once every row is done."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from rnnstream.proto.tensor_codec import encode_into
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.core import FrameOutput
from rnnstream.server.transport.grpc._status import as_rnnstream_error, stream_error

if TYPE_CHECKING:
    from rnnstream.server.transport.grpc._native_stream import StreamCall

__all__ = ["GroupAnswer", "OutputLayout"]

Arrays = list[npt.NDArray[Any]]
Rows = slice | npt.NDArray[np.intp]
# What a row's error repeats at most: a session id as long as a real one, a message clipped.
_ID_CHARS = 128
_MESSAGE_CHARS = 200
# Per data output of a model: (name, batch axis).
OutputLayout = tuple[tuple[str, int], ...]


class GroupAnswer:
    """Collects a frame group's rows (the core's GroupReply). Rows that ran as one block come
    whole; when every row came in one block, in order, the batch's arrays are sent as they are,
    else rows are copied into arrays of K rows. Failed rows add a StreamError and stay zero."""

    __slots__ = (
        "_buffers",
        "_call",
        "_errors",
        "_ids",
        "_indices",
        "_layout",
        "_left",
        "_request_id",
        "_rows",
        "_whole",
    )

    def __init__(
        self,
        call: StreamCall,
        request_id: int,
        session_ids: Sequence[str],
        indices: Sequence[int],
        layout: OutputLayout,
    ) -> None:
        self._call = call
        self._request_id = request_id
        self._ids = session_ids
        self._indices = indices
        self._layout = layout
        self._rows = self._left = len(session_ids)
        self._whole: Arrays | None = None
        self._buffers: Arrays | None = None
        self._errors: list[pb.StreamError] = []

    # -- the core's GroupReply ------------------------------------------------------------------
    def done(self) -> bool:
        return self._left <= 0

    def rows_applied(self, rows: Rows, outputs: Arrays, /) -> None:
        if isinstance(rows, slice):
            count = rows.stop - rows.start
            if count == self._rows:  # every row in one block, in order: nothing to copy
                self._whole = outputs
                self._rows_done(count)
                return
        else:
            count = len(rows)
        buffers = self._buffers_like(outputs, batched=True)
        for buffer, out, (_, axis) in zip(buffers, outputs, self._layout, strict=True):
            buffer[(slice(None),) * axis + (rows,)] = out
        self._rows_done(count)

    def row_reply(self, row: int, /) -> _RowReply:
        return _RowReply(self, row)

    def row_failed(self, row: int, error: BaseException, /) -> None:
        classified = as_rnnstream_error(error)  # logs an internal error once
        self._errors.append(self._error(classified, row))
        self._rows_done(1)

    def fail_all(self, error: BaseException) -> None:
        """The group was refused as a whole: every row fails with `error`."""
        classified = as_rnnstream_error(error)
        self._errors = [self._error(classified, r) for r in range(self._rows)]
        self._rows_done(self._left)

    def _error(self, error: BaseException, row: int) -> pb.StreamError:
        """A row's error, small enough that every row's fits beside the outputs (the server
        sized the answer with room for one per row): its id and message clipped."""
        message = stream_error(error, self._ids[row][:_ID_CHARS], self._index(row)).error
        message.session_id = message.session_id[:_ID_CHARS]
        if len(message.message) > _MESSAGE_CHARS:
            message.message = message.message[: _MESSAGE_CHARS - 3] + "..."
        return message

    def _index(self, row: int) -> int | None:
        """The row's frame index (None where a malformed group lacks it)."""
        return self._indices[row] if row < len(self._indices) else None

    # -- rows answered one by one ----------------------------------------------------------------
    def row_result(self, row: int, result: FrameOutput | None) -> None:
        if result is not None:  # None: an emit-last session, its row stays zero
            buffers = self._buffers_like(result.outputs, batched=False)
            for buffer, out, (_, axis) in zip(buffers, result.outputs, self._layout, strict=True):
                buffer[(slice(None),) * axis + (row,)] = out
        self._rows_done(1)

    def _buffers_like(self, outputs: Arrays, batched: bool) -> Arrays:
        if self._buffers is None:
            buffers = []
            for out, (_, axis) in zip(outputs, self._layout, strict=True):
                shape = list(out.shape)
                if batched:
                    shape[axis] = self._rows
                else:
                    shape.insert(axis, self._rows)
                buffers.append(np.zeros(shape, out.dtype))
            self._buffers = buffers
        return self._buffers

    def _rows_done(self, count: int) -> None:
        self._left -= count
        if self._left > 0:
            return
        response = pb.StreamResponse()
        answer = response.group_outputs
        answer.request_id = self._request_id
        arrays = self._whole if self._whole is not None else self._buffers
        call = self._call
        for array, (name, _) in zip(arrays or (), self._layout, strict=False):
            encode_into(answer.outputs.add(), array, name)
            call.count_bytes_out(array.nbytes)
        answer.errors.extend(self._errors)
        call.answer(response)


class _RowReply:
    """One row of a group queued as a frame of its own (a FrameReply)."""

    __slots__ = ("_answered", "_group", "_row")

    def __init__(self, group: GroupAnswer, row: int) -> None:
        self._group = group
        self._row = row
        self._answered = False

    def done(self) -> bool:
        return self._answered

    def set_result(self, result: FrameOutput | None, /) -> None:
        self._answered = True
        try:
            self._group.row_result(self._row, result)
        except Exception as exc:  # never let one answer break the scheduler's turn
            self._group.row_failed(self._row, exc)

    def set_exception(self, exception: BaseException, /) -> None:
        self._answered = True
        self._group.row_failed(self._row, exception)
