"""Every HTTP request is authenticated here, before any handler runs, by the same Authenticator
and allow-list as the gRPC transport: bearer tokens, and with mutual TLS the certificate."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from rnnstream.server.transport.grpc._auth import Authenticator
from rnnstream.server.transport.http._status import error_response

__all__ = ["READINESS_PATHS", "Authentication", "PeerCertificate", "certificate_names"]

# The REST side of the gRPC READINESS methods (ServerLive, ServerReady): open to callers without
# credentials only with --readiness-without-auth. Nothing else is ever open.
READINESS_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
PEER_KEY = "rnnstream.peer_certificate"  # scope["extensions"][PEER_KEY]: names of the client's


def certificate_names(certificate: Mapping[str, Any]) -> dict[str, list[bytes]]:
    """A verified client certificate (ssl's getpeercert()) as gRPC's auth context names it,
    so both transports take the same principal from the same certificate."""
    names: dict[str, list[bytes]] = {}
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.setdefault("x509_common_name", []).append(value.encode())
    kinds = {"DNS": "peer_dns", "URI": "peer_uri", "email": "peer_email"}
    for kind, value in certificate.get("subjectAltName", ()):
        if kind in kinds:
            names.setdefault(kinds[kind], []).append(value.encode())
    return names


class PeerCertificate:
    """Wraps the app for one TLS connection: each request's scope carries the names of the
    client certificate the handshake verified."""

    def __init__(self, app: ASGIApp, names: dict[str, list[bytes]]) -> None:
        self._app = app
        self._names = names

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope.setdefault("extensions", {})[PEER_KEY] = self._names
        await self._app(scope, receive, send)


class Authentication:
    """Sets scope["state"]["principal"], or answers 401 before any handler sees the request."""

    def __init__(self, app: ASGIApp, auth: Authenticator, open_paths: Iterable[str]) -> None:
        self._app = app
        self._auth = auth
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self._app(scope, receive, send)
            return
        metadata = [
            ("authorization", value.decode("latin-1"))
            for key, value in scope["headers"]
            if key == b"authorization"
        ]
        try:
            principal = self._auth.principal(metadata, scope.get("extensions", {}).get(PEER_KEY))
        except Exception as exc:
            await error_response(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self._app(scope, receive, send)
