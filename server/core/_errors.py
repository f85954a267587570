"""Errors raised by the core, each carrying the gRPC status code it travels as."""

from __future__ import annotations

import grpc

__all__ = [
    "Aborted",
    "AlreadyExists",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "RnnstreamError",
    "Unauthenticated",
    "Unavailable",
]


class RnnstreamError(Exception):
    """Base of every error a client can see; `code` is its gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(
        self, message: str, *, session_id: str = "", frame_index: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.session_id = session_id
        self.frame_index = frame_index


class InvalidArgument(RnnstreamError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RnnstreamError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(RnnstreamError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(RnnstreamError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(RnnstreamError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(RnnstreamError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(RnnstreamError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(RnnstreamError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Internal(RnnstreamError):
    code = grpc.StatusCode.INTERNAL
