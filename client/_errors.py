"""Errors the client raises, each with the gRPC status code the server sent."""

from __future__ import annotations

import grpc

__all__ = ["RnnstreamError", "SessionLost"]

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


class RnnstreamError(Exception):
    """The server refused a request; `code` says how, `message` says why."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        session_id: str = "",
        frame_index: int | None = None,
    ) -> None:
        where = f" [session {session_id}" if session_id else ""
        if where and frame_index is not None:
            where += f", frame {frame_index}"
        super().__init__(f"{code.name}: {message}{where + ']' if where else ''}")
        self.code = code
        self.message = message
        self.session_id = session_id
        self.frame_index = frame_index

    @classmethod
    def from_number(
        cls, number: int, message: str, session_id: str = "", frame_index: int | None = None
    ) -> RnnstreamError:
        code = _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)
        return cls(code, message, session_id=session_id, frame_index=frame_index)


class SessionLost(RnnstreamError):
    """The session can no longer be resumed: it expired, was evicted, or the retries ran out."""
