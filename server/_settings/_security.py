"""Who may call: TLS, client certificates, bearer tokens, admin principals, open probes."""

from __future__ import annotations

from dataclasses import dataclass

from rnnstream.server._settings._field import FILE, setting

__all__ = ["SecuritySettings"]


@dataclass(frozen=True)
class SecuritySettings:
    """Security: TLS, who a caller is, and what needs no credentials."""

    tls_cert: str = setting("", "PEM server certificate chain; with --tls-key enables TLS.", **FILE)
    tls_key: str = setting("", "PEM private key of --tls-cert.", **FILE)
    tls_client_ca: str = setting(
        "", "PEM CA bundle; when set, clients must present a certificate.", **FILE
    )
    tls_client_principal: str = setting(
        "cn",
        "With --tls-client-ca, the client certificate's name that is its principal: the subject "
        "common name, or its one DNS, URI or email SAN; none: certificates only admit the "
        "connection. With bearer tokens too, a call needs both, naming the same principal.",
        choices=("cn", "dns", "uri", "email", "none"),
    )
    auth_tokens: tuple[str, ...] = setting(
        (), "Bearer tokens, comma-separated, each 'principal=token' or a bare token."
    )
    auth_tokens_file: str = setting(
        "", "File of bearer tokens, one per line: 'principal=token' or a bare token.", **FILE
    )
    admin_principals: tuple[str, ...] = setting(
        (),
        "Principals (named by a bearer token or a client certificate) that may list, read and "
        "end every principal's sessions (ListSessions, GetSession, EndSession), comma-separated.",
    )
    readiness_without_auth: bool = setting(
        False,
        "Let the Open Inference Protocol ServerLive and ServerReady answer callers without "
        "credentials (for probes that cannot send any); gRPC health always does.",
    )
