"""HttpServer: uvicorn serving the REST app as a task on the gRPC server's event loop, with the
same TLS (and client certificates) as gRPC; stopped by the server's own shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from rnnstream.server._settings import Settings
from rnnstream.server.transport.http._auth import PeerCertificate, certificate_names

__all__ = ["HttpServer"]

log = logging.getLogger("rnnstream.http")


class _Protocol(H11Protocol):
    """h11; on a TLS connection, every request's scope names the verified client certificate."""

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        certificate = ssl_object.getpeercert() if ssl_object is not None else None
        if certificate:
            self.app = PeerCertificate(self.app, certificate_names(certificate))


class _Uvicorn(uvicorn.Server):
    """uvicorn inside the server's event loop: the server's own handlers take the signals and
    stop it (uvicorn's would take SIGTERM and SIGINT from the gRPC server)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # --workers: every worker listens on the one port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            f"cannot serve HTTP on {host}:{port}: {exc.strerror or exc}; choose another port "
            "with --http-port (RNNSTREAM_HTTP_PORT), or 0 to turn HTTP off"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class HttpServer:
    def __init__(self, settings: Settings, app: ASGIApp) -> None:
        self._settings = settings
        self._app = app
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        settings = self._settings
        sock = _listen(settings.host, settings.http_port, settings.workers > 1)
        tls: dict[str, Any] = {}
        if settings.tls_cert:
            tls = {"ssl_certfile": settings.tls_cert, "ssl_keyfile": settings.tls_key}
            if settings.tls_client_ca:
                tls |= {"ssl_ca_certs": settings.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            self._app,
            http=_Protocol,
            lifespan="off",
            log_config=None,  # the server's logging stays as configured
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, int(settings.grace)),
            **tls,
        )
        self._server = _Uvicorn(config)
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.get_running_loop().create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"HTTP on {settings.host}:{self.port} stopped while starting")
            await asyncio.sleep(0.005)
        return self.port

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (up to --grace), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await asyncio.gather(self._task, return_exceptions=True)
        self._server = self._task = None
