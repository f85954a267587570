"""Who is calling: bearer-token authentication and the principal that owns a call's sessions."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from rnnstream.server.core import Unauthenticated

__all__ = ["ANONYMOUS", "Authenticator", "parse_tokens"]

ANONYMOUS = "anonymous"


def parse_tokens(entries: Iterable[str]) -> dict[str, str]:
    """token -> principal from 'principal=token' entries; a bare token is its own principal."""
    tokens: dict[str, str] = {}
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        principal, sep, token = entry.partition("=")
        if not sep:
            principal, token = f"token-{len(tokens) + 1}", entry
        tokens[token.strip()] = principal.strip()
    return tokens


class Authenticator:
    """Checks `authorization: Bearer <token>` metadata; with no tokens configured, all callers
    are one anonymous principal."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        self._tokens = [(t.encode(), p) for t, p in (tokens or {}).items()]

    @classmethod
    def from_settings(cls, tokens: Iterable[str], tokens_file: str) -> Authenticator:
        entries = list(tokens)
        if tokens_file:
            entries += Path(tokens_file).read_text().splitlines()
        return cls(parse_tokens(entries))

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        if not self._tokens:
            return ANONYMOUS
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value.decode() if isinstance(value, bytes) else str(value)
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated(
                "missing bearer token: send metadata 'authorization: Bearer <token>'"
            )
        candidate = presented.strip().encode()
        principal = None
        # Compare against every token, always, so timing says nothing about which one matched.
        for token, owner in self._tokens:
            if hmac.compare_digest(token, candidate):
                principal = owner
        if principal is None:
            raise Unauthenticated("invalid bearer token")
        return principal

    async def principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        return self.check(context.invocation_metadata())
