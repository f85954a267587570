"""Errors the client raises, each with the gRPC status code the server sent."""

from __future__ import annotations

from typing import Any

import grpc

__all__ = ["FrameGroupError", "OpenManyError", "RnnstreamError", "SessionLost"]

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


class FrameGroupError(RnnstreamError):
    """Some frames of a `step_many` (or `step_stacked`) failed; the others were applied.
    `errors` holds each failed session's error (the first one's code and message are this
    error's); `outputs` the answered sessions' outputs by session (step_stacked: the stacked
    arrays, failed rows zero)."""

    def __init__(self, outputs: dict[Any, Any], errors: dict[Any, RnnstreamError]) -> None:
        first = next(iter(errors.values()))
        super().__init__(
            first.code,
            f"{len(errors)} frames failed; the first: {first.message}",
            session_id=first.session_id,
            frame_index=first.frame_index,
        )
        self.outputs = outputs
        self.errors = errors


class OpenManyError(RnnstreamError):
    """Some sessions of an `open_many` were refused; the others are open. `sessions` holds the
    opened ones and `errors` each refused one's error by its position in the request (the
    first one's code and message are this error's)."""

    def __init__(self, sessions: list[Any], errors: dict[int, RnnstreamError]) -> None:
        first = errors[min(errors)]
        total = len(sessions) + len(errors)
        super().__init__(
            first.code,
            f"{len(errors)} of {total} sessions were refused; the first: {first.message}",
            session_id=first.session_id,
        )
        self.sessions = sessions
        self.errors = errors
