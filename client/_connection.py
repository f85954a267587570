"""How the `rnnstream` command reaches a server: target, TLS files, token and metadata."""

from __future__ import annotations

import argparse
import os
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_TARGET",
    "TOKEN_ENV",
    "CommandError",
    "Connection",
    "add_connection_arguments",
    "connection_from_args",
    "diagnose",
    "parse_metadata",
    "server_side_connection",
]

TOKEN_ENV = "RNNSTREAM_TOKEN"
DEFAULT_TARGET = "127.0.0.1:50051"


class CommandError(ValueError):
    """A bad flag or file: the `rnnstream` command reports it in one line and exits 2."""


@dataclass(frozen=True)
class Connection:
    """Everything needed to open a channel; plain values, so it can cross to other processes."""

    target: str = DEFAULT_TARGET
    tls: bool = False
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_server_name: str | None = None
    token: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def credentials(self) -> Any:
        """grpc.ChannelCredentials for TLS, or None for plaintext; reads the PEM files."""
        if not self.uses_tls:
            return None
        import grpc

        if (self.tls_cert is None) != (self.tls_key is None):
            raise CommandError("--tls-cert and --tls-key go together")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "--tls-ca"),
            private_key=_read(self.tls_key, "--tls-key"),
            certificate_chain=_read(self.tls_cert, "--tls-cert"),
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.uses_tls and self.tls_server_name:
            return [("grpc.ssl_target_name_override", self.tls_server_name)]
        return []

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of AsyncClient (and Client) for this connection."""
        from rnnstream._aio import DEFAULT_OPTIONS

        return {
            "credentials": self.credentials(),
            "token": self.token,
            "metadata": self.metadata,
            "options": [*DEFAULT_OPTIONS, *self.channel_options()],
        }

    def describe(self) -> str:
        return f"{self.target} ({'TLS' if self.uses_tls else 'plaintext'})"


def _read(path: Path | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CommandError(f"{flag} {path}: {exc.strerror or exc}") from None


def parse_metadata(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`-H key=value` or `-H 'key: value'` pairs; keys lowercased, as gRPC requires."""
    pairs: list[tuple[str, str]] = []
    for item in items:
        sep = min((i for i in (item.find("="), item.find(":")) if i > 0), default=-1)
        if sep < 0:
            raise CommandError(f"-H {item!r}: expected KEY=VALUE or 'KEY: VALUE'")
        pairs.append((item[:sep].strip().lower(), item[sep + 1 :].strip()))
    return tuple(pairs)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every subcommand shares: where the server is and how to talk to it."""
    group = parser.add_argument_group("connection")
    group.add_argument("--target", default=DEFAULT_TARGET, help="server HOST:PORT")
    group.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's CA certificates"
    )
    group.add_argument(
        "--tls-ca", type=Path, help="PEM CA bundle that signed the server's certificate (TLS)"
    )
    group.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    group.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    group.add_argument(
        "--tls-server-name",
        help="name the server's certificate must carry, when it is not the target's host",
    )
    group.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token sent with every call [env {TOKEN_ENV}]",
    )
    group.add_argument(
        "-H",
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="request metadata sent with every call (repeatable)",
    )


def connection_from_args(args: argparse.Namespace) -> Connection:
    return Connection(
        target=args.target,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=args.token,
        metadata=parse_metadata(args.metadata),
    )


def server_side_connection(target: str, env: Mapping[str, str]) -> Connection | None:
    """In the server's own environment (its container): how to reach it over its own TLS.

    Trusts RNNSTREAM_TLS_CA when set, else the server's own certificate chain; presents the
    server's certificate and key when the server asks clients for one; expects the name the
    certificate carries. None when the server's environment does not turn TLS on.
    """
    cert = env.get("RNNSTREAM_TLS_CERT")
    key = env.get("RNNSTREAM_TLS_KEY")
    if not cert or not key:
        return None
    mutual = bool(env.get("RNNSTREAM_TLS_CLIENT_CA"))
    return Connection(
        target=target,
        tls=True,
        tls_ca=Path(env.get("RNNSTREAM_TLS_CA") or cert),
        tls_cert=Path(cert) if mutual else None,
        tls_key=Path(key) if mutual else None,
        tls_server_name=env.get("RNNSTREAM_TLS_SERVER_NAME") or _certificate_name(Path(cert)),
    )


def _certificate_name(path: Path) -> str | None:
    """The first DNS name (else the common name) of the PEM certificate at `path`."""
    try:
        # The standard library's only certificate parser (private, but in every CPython 3).
        decoded: dict[str, Any] = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
    except (AttributeError, OSError, ssl.SSLError):
        return None
    for kind, value in decoded.get("subjectAltName", ()):
        if kind == "DNS":
            return str(value)
    for rdn in decoded.get("subject", ()):
        for field, value in rdn:
            if field == "commonName":
                return str(value)
    return None


def diagnose(connection: Connection, detail: str = "", timeout: float = 2.0) -> str | None:
    """What is wrong with reaching the server, when it can be told: the port refuses
    connections, the server and this client disagree about TLS, or the server's certificate
    does not fit. `detail` is gRPC's own message, if any. None when nothing can be told."""
    host, _, port = connection.target.rpartition(":")
    host = host.strip("[]")
    try:
        raw = socket.create_connection((host, int(port)), timeout=timeout)
    except ConnectionRefusedError:
        return f"connection refused by {connection.target}: is the server running on that port?"
    except (OSError, ValueError):
        return None
    with raw:
        found = _probe(raw, host, timeout)
    target = connection.target
    if found != "plaintext" and found != "unknown" and not connection.uses_tls:
        return (
            f"{target} speaks TLS and this client does not: "
            "pass --tls-ca CA.pem (or --tls for a publicly trusted certificate)"
        )
    if found == "plaintext" and connection.uses_tls:
        return f"TLS handshake with {target} failed: the server does not speak TLS"
    if found == "wants-certificate" and connection.tls_cert is None:
        return (
            f"{target} asks for a client certificate (mutual TLS): "
            "pass --tls-cert CERT.pem --tls-key KEY.pem"
        )
    if "Hostname Verification" in detail:
        return (
            f"TLS: the server's certificate does not name {host}: "
            "pass --tls-server-name with a name it carries"
        )
    if "CERTIFICATE_VERIFY_FAILED" in detail or "certificate verify failed" in detail:
        return f"TLS: the certificate of {target} is not signed by a trusted CA (--tls-ca)"
    return None


def _probe(sock: socket.socket, host: str, timeout: float) -> str:
    """What speaks on `sock`: "plaintext", "tls", "wants-certificate" (TLS that asks for a
    client certificate) or "unknown". The handshake verifies nothing: it only listens."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=host or None) as tls:
            # A server that wants a client certificate refuses only after the handshake
            # (TLS 1.3), by closing; one that does not starts HTTP/2 with its SETTINGS frame.
            return "tls" if tls.recv(1) else "wants-certificate"
    except ssl.SSLError as exc:
        reason = (exc.reason or "").upper()
        if "CERTIFICATE_REQUIRED" in reason or "HANDSHAKE_FAILURE" in reason:
            return "wants-certificate"
        if "ALERT" in reason:
            return "tls"
        return "plaintext"  # no TLS record came back (wrong version number, EOF)
    except (TimeoutError, ConnectionError):
        return "plaintext"
    except OSError:
        return "unknown"
