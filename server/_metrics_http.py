"""The /metrics endpoint: one path, an optional bearer token, no version banner."""

from __future__ import annotations

import hmac
import ipaddress
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from rnnstream.server._settings import Settings

__all__ = ["MetricsEndpoint", "check_metrics_exposure", "metrics_host", "metrics_token"]


def metrics_host(settings: Settings) -> str:
    return settings.metrics_host or settings.host


def metrics_token(settings: Settings) -> str:
    """The token scrapes must send ('' for none), from --metrics-token or --metrics-token-file."""
    if not settings.metrics_token_file:
        return settings.metrics_token
    if settings.metrics_token:
        raise ValueError("give the metrics token by --metrics-token or by its file, not both")
    token = Path(settings.metrics_token_file).read_text().strip()
    if not token:
        raise ValueError(f"--metrics-token-file {settings.metrics_token_file}: the file is empty")
    return token


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_metrics_exposure(settings: Settings) -> None:
    """Refuse (ValueError) to serve metrics to the network without a token while the API itself
    requires credentials: they tell per-model session counts and traffic to anyone."""
    if not settings.metrics_port or metrics_token(settings):
        return
    secured = settings.auth_tokens or settings.auth_tokens_file or settings.tls_client_ca
    host = metrics_host(settings)
    if secured and not _is_loopback(host):
        raise ValueError(
            f"metrics would be open to anyone reaching {host}:{settings.metrics_port} while the "
            "API requires credentials: set --metrics-token (RNNSTREAM_METRICS_TOKEN), bind them "
            "to a private address with --metrics-host, or turn them off with --metrics-port 0"
        )


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def version_string(self) -> str:
        return "rnnstream"  # the default banner names the Python version

    def do_GET(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def _answer(self, *, with_body: bool) -> None:
        if urlsplit(self.path).path != "/metrics":
            self._reply(404, b"not found: metrics are at /metrics\n", with_body=with_body)
            return
        if not self._authorized():
            self._reply(
                401,
                b"metrics need 'Authorization: Bearer <metrics token>'\n",
                with_body=with_body,
                extra={"WWW-Authenticate": 'Bearer realm="rnnstream metrics"'},
            )
            return
        encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
        self._reply(200, encoder(self.server.registry), content_type, with_body=with_body)

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        scheme, _, presented = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token)

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        *,
        with_body: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (extra or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not events worth a log line


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], family: int, registry: CollectorRegistry, token: str
    ) -> None:
        self.address_family = family
        self.registry = registry
        self.token = token.encode() if token else None
        super().__init__(address, _Handler)


class MetricsEndpoint:
    """Serves a registry at http://HOST:PORT/metrics from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int, token: str) -> None:
        family, _, _, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._server = _Server((str(address[0]), port), family, registry, token)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="metrics-http", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
