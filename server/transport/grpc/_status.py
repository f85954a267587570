"""The one place where errors become gRPC statuses, in-band stream errors or aborts."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc

from rnnstream.proto.tensor_codec import TensorDecodeError
from rnnstream.proto.v1 import rnnstream_pb2 as pb
from rnnstream.server.core import ErrorCode, Internal, InvalidArgument, RnnstreamError

__all__ = [
    "GRPC_STATUS",
    "RETRY_PUSHBACK_KEY",
    "BadRequest",
    "abort",
    "as_rnnstream_error",
    "clipped",
    "stream_error",
    "tolerant",
    "tolerant_unary",
    "unary",
]

log = logging.getLogger("rnnstream.grpc")

T = TypeVar("T")
R = TypeVar("R")


# The core's error codes on the wire.
GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}


class BadRequest:
    """Stands in for a request whose bytes were not a valid message, so it can be answered."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.message = f"request is not a valid {type_name}: {error}"


def tolerant(parse: Callable[[bytes], T], type_name: str) -> Callable[[bytes], T | BadRequest]:
    """A request deserializer that reports garbage instead of failing the whole RPC."""

    def parse_or_flag(data: bytes) -> T | BadRequest:
        try:
            return parse(data)
        except Exception as exc:
            return BadRequest(type_name, exc)

    return parse_or_flag


def tolerant_unary(
    method: Any, request_type: Any, response_type: Any
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary method handler whose deserializer answers garbage bytes instead of failing."""
    return grpc.unary_unary_rpc_method_handler(
        method,
        request_deserializer=tolerant(request_type.FromString, request_type.DESCRIPTOR.full_name),
        response_serializer=response_type.SerializeToString,
    )


def as_rnnstream_error(exc: BaseException) -> RnnstreamError:
    """Classify any exception; only unexpected ones are logged with a traceback."""
    if isinstance(exc, RnnstreamError):
        return exc
    if isinstance(exc, TensorDecodeError):
        return InvalidArgument(str(exc))
    log.error("internal error", exc_info=exc)
    return Internal(f"internal error: {type(exc).__name__}: {exc}")


# The longest message a status carries: gRPC sends it in trailing metadata (percent-encoded),
# which a client refuses past a few kilobytes.
MAX_MESSAGE_CHARS = 2000


def clipped(message: str) -> str:
    if len(message) <= MAX_MESSAGE_CHARS:
        return message
    return message[: MAX_MESSAGE_CHARS - 40] + f"... ({len(message)} characters in all)"


def stream_error(
    exc: BaseException, session_id: str = "", frame_index: int | None = None
) -> pb.StreamResponse:
    error = as_rnnstream_error(exc)
    return pb.StreamResponse(
        error=pb.StreamError(
            code=GRPC_STATUS[error.code].value[0],
            message=clipped(error.message),
            session_id=error.session_id or session_id,
            frame_index=error.frame_index if error.frame_index is not None else frame_index,
        )
    )


# gRPC's own retry pushback (gRFC A6): a client's retry policy waits this long before retrying.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


async def abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    error = as_rnnstream_error(exc)
    trailing: tuple[tuple[str, str], ...] = ()
    if error.retry_after is not None:
        trailing = ((RETRY_PUSHBACK_KEY, str(max(1, round(error.retry_after * 1000)))),)
    await context.abort(GRPC_STATUS[error.code], clipped(error.message), trailing_metadata=trailing)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def unary(
    handler: Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]],
) -> Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[R]]:
    """Wrap a unary handler: garbage requests and core errors become clean statuses."""

    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> R:
        if isinstance(request, BadRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc)

    return wrapped
