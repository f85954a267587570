"""Who is calling: the principal named by a bearer token or a client certificate."""

from __future__ import annotations

import hmac
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rnnstream.server._settings import Settings
from rnnstream.server.core import Unauthenticated

__all__ = ["ANONYMOUS", "CERTIFICATE_FIELDS", "Authenticator", "parse_tokens"]

ANONYMOUS = "anonymous"

# --tls-client-principal: which verified name of the client certificate is the principal, as
# gRPC's auth context carries it (subject CN, or the SANs of one type).
CERTIFICATE_FIELDS = {
    "cn": ("x509_common_name", "subject common name"),
    "dns": ("peer_dns", "DNS subject alternative name"),
    "uri": ("peer_uri", "URI subject alternative name"),
    "email": ("peer_email", "email subject alternative name"),
}


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
    """The principal of a call, from its `authorization: Bearer <token>` metadata and, with
    mutual TLS, its client certificate. With tokens and a certificate field both in use, a call
    needs both and they must name the same principal. With neither, every caller is one
    anonymous principal."""

    def __init__(
        self,
        tokens: Mapping[str, str] | None = None,
        certificate_field: str = "none",
        admins: Iterable[str] = (),
    ) -> None:
        for token, principal in (tokens or {}).items():
            if not token.strip() or not principal:
                raise ValueError(f"principal {principal!r} has an empty auth token")
        if certificate_field != "none" and certificate_field not in CERTIFICATE_FIELDS:
            raise ValueError(
                f"--tls-client-principal {certificate_field!r}: choose from "
                f"{', '.join([*CERTIFICATE_FIELDS, 'none'])}"
            )
        self._tokens = [(t.encode(), p) for t, p in (tokens or {}).items()]
        self._certificate = CERTIFICATE_FIELDS.get(certificate_field)
        self._admins = frozenset(a.strip() for a in admins if a.strip())
        self._check_admins(set((tokens or {}).values()))

    def _check_admins(self, token_principals: set[str]) -> None:
        """An admin list must name principals a call can have: a typo would leave the
        operator locked out, and without credentials every caller is the same principal."""
        if not self._admins:
            return
        if not self._tokens and self._certificate is None:
            raise ValueError(
                "--admin-principals needs bearer tokens or client certificates: without them "
                "every caller is one anonymous principal, who already sees every session"
            )
        if self._certificate is None:
            unknown = sorted(self._admins - token_principals)
            if unknown:
                raise ValueError(
                    f"--admin-principals names {unknown[0]!r}, which no bearer token belongs to"
                )

    def is_admin(self, principal: str) -> bool:
        """May this principal see and end every principal's sessions?"""
        return principal in self._admins

    @classmethod
    def from_settings(cls, settings: Settings) -> Authenticator:
        entries = list(settings.auth_tokens)
        if settings.auth_tokens_file:
            entries += Path(settings.auth_tokens_file).read_text().splitlines()
        # Only verified certificates name principals: without --tls-client-ca there are none.
        field = settings.tls_client_principal if settings.tls_client_ca else "none"
        return cls(parse_tokens(entries), field, settings.admin_principals)

    @property
    def mode(self) -> str:
        """How principals are named, for the start-up log line."""
        parts = ["bearer tokens"] if self._tokens else []
        if self._certificate is not None:
            parts.append(f"client certificate {self._certificate[1]}")
        return " and ".join(parts) or "none (every caller is one anonymous principal)"

    def principal(
        self,
        metadata: Iterable[tuple[str, Any]] | None,
        auth_context: Mapping[str, Iterable[bytes]] | None = None,
    ) -> str:
        """The caller's principal; Unauthenticated saying what is missing or wrong."""
        named = self._from_certificate(auth_context or {})
        if not self._tokens:
            return ANONYMOUS if named is None else named
        principal = self.check(metadata)
        if named is not None and named != principal:
            raise Unauthenticated(
                f"the bearer token belongs to principal {principal!r} but the client "
                f"certificate names {named!r}: they must agree"
            )
        return principal

    def _from_certificate(self, auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
        if self._certificate is None:
            return None
        key, what = self._certificate
        # gRPC reports a certificate without a subject CN as one empty CN.
        values = [value for value in auth_context.get(key, ()) if value]
        if len(values) != 1:
            raise Unauthenticated(
                f"the client certificate must carry exactly one {what} (it names the principal); "
                f"it has {len(values)}"
            )
        try:
            name = values[0].decode()
        except UnicodeDecodeError:
            raise Unauthenticated(f"the client certificate's {what} is not UTF-8") from None
        return name

    def check(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The principal of the bearer token in `metadata` (anonymous when tokens are off)."""
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
