"""Errors raised by the core, each with the core's own code; transports map codes onto the wire."""

from __future__ import annotations

import enum

__all__ = [
    "Aborted",
    "AlreadyExists",
    "ErrorCode",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "RnnstreamError",
    "Unauthenticated",
    "Unavailable",
]


class ErrorCode(enum.Enum):
    """Why a request was refused. The names match gRPC's status codes (transport/grpc/_status.py
    maps them) and label the rnnstream_frames metric."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    ABORTED = "ABORTED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"


class RnnstreamError(Exception):
    """Base of every error a client can see; `code` says which kind."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self, message: str, *, session_id: str = "", frame_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.session_id = session_id
        self.frame_index = frame_index


class InvalidArgument(RnnstreamError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(RnnstreamError):
    code = ErrorCode.NOT_FOUND


class AlreadyExists(RnnstreamError):
    code = ErrorCode.ALREADY_EXISTS


class FailedPrecondition(RnnstreamError):
    code = ErrorCode.FAILED_PRECONDITION


class Aborted(RnnstreamError):
    code = ErrorCode.ABORTED


class ResourceExhausted(RnnstreamError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(RnnstreamError):
    code = ErrorCode.UNAVAILABLE


class Unauthenticated(RnnstreamError):
    code = ErrorCode.UNAUTHENTICATED


class Internal(RnnstreamError):
    code = ErrorCode.INTERNAL
