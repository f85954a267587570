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
    """token -> principal from 'principal=token' entries; a bare token is its own principal.

    Refuses (ValueError naming the principal) an empty token or principal, and a token listed
    twice: an unset shell variable in `alice=$TOKEN` must not open the server to everyone, and
    one token must never stand for two principals.
    """
    tokens: dict[str, str] = {}
    explicit: set[str] = set()
    bare: list[str] = []
    for raw in entries:
        entry = raw.strip()
        if not entry or entry.startswith("#"):
            continue
        principal, sep, token = (part.strip() for part in entry.partition("="))
        if not sep:
            principal, token = f"token-{len(tokens) + 1}", entry
            bare.append(principal)
        elif not principal:
            raise ValueError("auth token entry '=...' names no principal: write principal=token")
        else:
            explicit.add(principal)
        if not token:
            raise ValueError(f"principal {principal!r} has an empty auth token")
        if token in tokens:
            raise ValueError(
                f"principals {tokens[token]!r} and {principal!r} are given the same auth token; "
                "every token must be unique"
                if tokens[token] != principal
                else f"principal {principal!r} lists the same auth token twice"
            )
        tokens[token] = principal
    clash = sorted(explicit.intersection(bare))
    if clash:
        raise ValueError(
            f"principal {clash[0]!r} is both named and given to a bare token: name every token"
        )
    return tokens


class Authenticator:
    """Checks `authorization: Bearer <token>` metadata; with no tokens configured, all callers
    are one anonymous principal."""

    def __init__(self, tokens: dict[str, str] | None = None) -> None:
        for token, principal in (tokens or {}).items():
            if not token.strip() or not principal:
                raise ValueError(f"principal {principal!r} has an empty auth token")
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
        candidate = presented.strip().encode()
        if scheme.lower() != "bearer" or not candidate:
            raise Unauthenticated(
                "missing bearer token: send metadata 'authorization: Bearer <token>'"
            )
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
