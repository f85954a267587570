"""The one place errors become HTTP statuses and OIP error bodies ({"error": message})."""

from __future__ import annotations

import math

from starlette.responses import JSONResponse

from rnnstream.server.core import ErrorCode
from rnnstream.server.transport.grpc._status import as_rnnstream_error

__all__ = ["HTTP_STATUS", "error_response"]

# The core's error codes over HTTP, as Google's API design guide maps the gRPC codes.
HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.FAILED_PRECONDITION: 400,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.INTERNAL: 500,
}


def error_response(exc: BaseException) -> JSONResponse:
    """An OIP error object with the status of the error's code (only unexpected errors are
    logged, with their traceback); a rate-limited call says when to retry."""
    error = as_rnnstream_error(exc)
    headers = {}
    if error.retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
    if error.code is ErrorCode.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="rnnstream"'
    return JSONResponse({"error": error.message}, HTTP_STATUS[error.code], headers=headers)
