"""A native stream's answer to one frame, given from within the scheduler's turn."""

from __future__ import annotations

from typing import Protocol

from rnnstream.proto.tensor_codec import encode_into
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.core import FrameOutput
from rnnstream.server.transport.grpc._status import as_rnnstream_error, stream_error

__all__ = ["Answering", "FrameReply"]


class Answering(Protocol):
    """The stream a FrameReply answers on (a StreamCall)."""

    def answer(self, response: pb.StreamResponse | None, nbytes: int = 0) -> None: ...

    def count_bytes_out(self, count: int) -> None: ...


class FrameReply:
    """Answers one frame of a stream from within the scheduler's turn (a FrameReply)."""

    __slots__ = ("_call", "_done", "_index", "_session_id")

    def __init__(self, call: Answering, session_id: str, index: int) -> None:
        self._call = call
        self._session_id = session_id
        self._index = index
        self._done = False

    def done(self) -> bool:
        return self._done

    def set_result(self, result: FrameOutput | None) -> None:
        self._done = True
        call = self._call
        if result is None:  # an emit-last session: answered by flush or end, not frame by frame
            call.answer(None)
            return
        nbytes = 0
        try:
            response = pb.StreamResponse()
            output = response.output
            output.session_id = self._session_id
            output.frame_index = result.index
            if result.restored:
                output.restored = True
            for array, name in zip(result.outputs, result.names, strict=True):
                encode_into(output.outputs.add(), array, name)
                nbytes += array.nbytes
            call.count_bytes_out(nbytes)
        except Exception as exc:  # never let one answer break the scheduler's turn
            response = stream_error(as_rnnstream_error(exc), self._session_id, self._index)
        call.answer(response, nbytes)

    def set_exception(self, exception: BaseException) -> None:
        self._done = True
        classified = as_rnnstream_error(exception)  # logs an internal error once
        self._call.answer(stream_error(classified, self._session_id, self._index))
