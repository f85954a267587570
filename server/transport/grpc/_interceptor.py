"""Every call is authenticated here, once, before any handler runs; an allow-list names the rest."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextvars import ContextVar
from typing import Any

import grpc

from rnnstream.server.core import Internal
from rnnstream.server.transport.grpc._auth import Authenticator
from rnnstream.server.transport.grpc._status import abort

__all__ = [
    "HEALTH_AND_REFLECTION",
    "READINESS",
    "AuthInterceptor",
    "call_is_admin",
    "call_principal",
]

Context = grpc.aio.ServicerContext[Any, Any]

# Open to anyone who can connect: probes and tools that never carry credentials. They say
# whether the server serves and what its services look like, nothing about models or sessions.
HEALTH_AND_REFLECTION = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    }
)
# Opened too by --readiness-without-auth: Triton-style probes. ModelReady stays closed (it
# tells whether a model exists), as does ServerMetadata (it tells the version).
READINESS = frozenset(
    {
        "/inference.GRPCInferenceService/ServerLive",
        "/inference.GRPCInferenceService/ServerReady",
    }
)

# The principal of the call being handled. Each RPC runs in a task of its own, which copies
# the context, so a value set for one call is never seen by another.
_PRINCIPAL: ContextVar[str] = ContextVar("rnnstream_principal")
_ADMIN: ContextVar[bool] = ContextVar("rnnstream_admin", default=False)


def call_principal() -> str:
    """The principal the interceptor established for the current call."""
    try:
        return _PRINCIPAL.get()
    except LookupError:
        # Fail closed: a handler reached without authentication is a wiring bug, not a guest.
        raise Internal("call was not authenticated (no principal established)") from None


def call_is_admin() -> bool:
    """Whether the current call's principal is an admin (--admin-principals)."""
    return _ADMIN.get()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates every call but those in `open_methods`; refuses with UNAUTHENTICATED
    before the handler sees the request, else makes the principal `call_principal()`."""

    def __init__(self, auth: Authenticator, open_methods: Iterable[str]) -> None:
        self._auth = auth
        self._open = frozenset(open_methods)

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method in self._open:
            return handler
        return self._guarded(handler)

    async def _authenticate(self, context: Context) -> str:
        try:
            principal = self._auth.principal(context.invocation_metadata(), context.auth_context())
        except Exception as exc:
            await abort(context, exc)
        _ADMIN.set(self._auth.is_admin(principal))
        return principal

    def _guarded(self, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        codec = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        authenticate = self._authenticate

        if handler.unary_unary is not None or handler.stream_unary is not None:
            # The stubs type handlers as synchronous; this server's are coroutines.
            single: Any = handler.unary_unary or handler.stream_unary

            async def answer(request: Any, context: Context) -> Any:
                _PRINCIPAL.set(await authenticate(context))
                return await single(request, context)

            if handler.unary_unary is not None:
                return grpc.unary_unary_rpc_method_handler(answer, **codec)
            return grpc.stream_unary_rpc_method_handler(answer, **codec)

        streaming: Any = handler.unary_stream or handler.stream_stream

        async def answers(request: Any, context: Context) -> AsyncIterator[Any]:
            _PRINCIPAL.set(await authenticate(context))
            async for response in streaming(request, context):
                yield response

        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(answers, **codec)
        return grpc.stream_stream_rpc_method_handler(answers, **codec)
