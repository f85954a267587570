"""Errors raised by the core, each with the core's own code; transports map codes onto the wire."""

from __future__ import annotations

import enum

__all__ = [
    "ErrorCode",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RnnstreamError",
    "Unauthenticated",
    "Unavailable",
    "quoted",
    "quoted_list",
]

# How much of a client's string (an id, a name) an error message repeats: a status message
# travels in trailing metadata, which gRPC caps at a few kilobytes.
QUOTE_LIMIT = 64


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text` as an error message shows it: its repr, cut short when it is long."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def quoted_list(texts: list[str], limit: int = 8) -> str:
    """A list of client strings as an error message shows it, each and the list cut short."""
    shown = ", ".join(quoted(t) for t in texts[:limit])
    return f"[{shown}, ... ({len(texts)} in all)]" if len(texts) > limit else f"[{shown}]"


class ErrorCode(enum.Enum):
    """Why a request was refused. The names match gRPC's status codes (transport/grpc/_status.py
    maps them) and label the rnnstream_frames metric."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    INTERNAL = "INTERNAL"


class RnnstreamError(Exception):
    """Base of every error a client can see; `code` says which kind."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        session_id: str = "",
        frame_index: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.session_id = session_id
        self.frame_index = frame_index
        self.retry_after = retry_after  # seconds after which the same request may succeed


class InvalidArgument(RnnstreamError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(RnnstreamError):
    code = ErrorCode.NOT_FOUND


class FailedPrecondition(RnnstreamError):
    code = ErrorCode.FAILED_PRECONDITION


class ResourceExhausted(RnnstreamError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(RnnstreamError):
    code = ErrorCode.UNAVAILABLE


class Unauthenticated(RnnstreamError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(RnnstreamError):
    code = ErrorCode.PERMISSION_DENIED


class Internal(RnnstreamError):
    code = ErrorCode.INTERNAL
