"""Builds the asyncio gRPC server: services, health checking, reflection, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rnnstream.server._metrics import Metrics
from rnnstream.server._metrics_http import check_metrics_exposure, metrics_host, metrics_token
from rnnstream.server._settings import Settings
from rnnstream.server.core import Engine
from rnnstream.server.stores import open_store
from rnnstream.server.transport.grpc._auth import Authenticator
from rnnstream.server.transport.grpc._grpc_logs import quiet_client_cancels
from rnnstream.server.transport.grpc._interceptor import (
    HEALTH_AND_REFLECTION,
    READINESS,
    AuthInterceptor,
)
from rnnstream.server.transport.grpc._native import SERVICE, NativeServicer
from rnnstream.server.transport.grpc._oip import SERVICE as OIP_SERVICE
from rnnstream.server.transport.grpc._oip import OipServicer

if TYPE_CHECKING:
    from rnnstream.server.transport.http import HttpServer

__all__ = ["GrpcServer"]

log = logging.getLogger("rnnstream.server")

SERVING = health_pb2.HealthCheckResponse.SERVING


def _server_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Keepalive pings find dead clients whose sessions would otherwise hold a stream open.
        ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
        # Only --workers shares the port; otherwise a second server on it must fail to start.
        ("grpc.so_reuseport", 1 if settings.workers > 1 else 0),
    ]


def _credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert and not settings.tls_key:
        if settings.tls_client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())
    ca = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


def _why(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "the port is in use (another server?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "the address is not one of this machine's"
    return exc.strerror or str(exc)


def _bind(server: grpc.aio.Server, settings: Settings, credentials: Any) -> int:
    """The port bound; a refusal names the address and why (gRPC itself only says it failed)."""
    address = f"{settings.host}:{settings.port}"
    try:
        if credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, credentials)
    except RuntimeError:
        reason = "gRPC could not bind it"
        try:  # ask the kernel why
            family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.bind((settings.host, settings.port))
        except OSError as exc:
            reason = _why(exc)
        raise OSError(
            f"cannot listen for gRPC on {address}: {reason}; choose another port with --port "
            "(RNNSTREAM_PORT), or 0 for a free one"
        ) from None


def _write_port_file(path: Path, port: int) -> None:
    """Written whole or not at all: a reader polling for the file never sees half a number."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # workers write it too
    partial.write_text(f"{port}\n")
    partial.replace(path)


def _transport(settings: Settings, tls: bool) -> str:
    if not tls:
        return "plaintext"
    return "mutual TLS" if settings.tls_client_ca else "TLS"


async def _until(done: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class GrpcServer:
    """An engine served over gRPC on one port, with metrics on another."""

    def __init__(self, settings: Settings) -> None:
        self._rescans: set[asyncio.Task[None]] = set()
        self.settings = settings
        quiet_client_cancels()
        # Credentials first: a bad token list fails before anything else is built.
        self.auth = Authenticator.from_settings(settings)
        check_metrics_exposure(settings)
        self.metrics = Metrics(per_principal=settings.metrics_per_principal)
        self.engine = Engine(settings.engine_settings(), self.metrics)
        self.health = health.aio.HealthServicer()
        self.native = NativeServicer(self.engine, settings, self.metrics)
        self.oip = OipServicer(self.engine, settings)
        self.port = 0
        self.metrics_port = 0
        self.http_port = 0
        self._http: HttpServer | None = None
        self._services = [SERVICE, OIP_SERVICE]
        self._server: grpc.aio.Server | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        """Load the models, then listen: metrics first, then gRPC. Whatever fails is named in
        one line (OSError, ValueError, ModelConfigError) after what started is stopped again."""
        settings = self.settings
        credentials = _credentials(settings)
        store = None
        if settings.state_store:
            store = await open_store(
                settings.state_store,
                settings.session_ttl,
                settings.output_ring,
                settings.state_store_legacy_keys,
            )
        try:
            await self.engine.start(store)
        except BaseException:
            await self.engine.stop()  # closes the store
            raise
        try:
            if settings.metrics_port:
                self.metrics_port = self._serve_metrics()
            self._server = self._build()
            self.port = _bind(self._server, settings, credentials)
            await self._server.start()
            if settings.http_port:
                self.http_port = await self._serve_http()
        except BaseException:
            await self._abandon()
            raise
        for service in ("", *self._services):
            await self.health.set(service, SERVING)
        log.info(
            "serving %s on %s:%d (%s; principals from %s)%s",
            self.engine.model_names(),
            settings.host,
            self.port,
            _transport(settings, credentials is not None),
            self.auth.mode,
            (f", metrics on :{self.metrics_port}" if self.metrics_port else "")
            + (f", HTTP (OIP REST) on :{self.http_port}" if self.http_port else ""),
        )
        if settings.port_file:
            _write_port_file(Path(settings.port_file), self.port)
        return self.port

    async def _serve_http(self) -> int:
        """The OIP REST API, on this loop, behind the same principals and allow-list."""
        # Imported here: the REST side imports this transport's OIP adapter.
        from rnnstream.server.transport.http import HttpServer, rest_app

        self._http = HttpServer(
            self.settings, rest_app(self.engine, self.oip, self.settings, self.auth)
        )
        return await self._http.start()

    def _serve_metrics(self) -> int:
        settings = self.settings
        host = metrics_host(settings)
        try:
            return self.metrics.serve(host, settings.metrics_port, metrics_token(settings))
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {host}:{settings.metrics_port}: {_why(exc)}; choose "
                "another port with --metrics-port (RNNSTREAM_METRICS_PORT), or 0 to turn "
                "metrics off"
            ) from None

    def _build(self) -> grpc.aio.Server:
        open_methods = HEALTH_AND_REFLECTION
        if self.settings.readiness_without_auth:
            open_methods |= READINESS
        server = grpc.aio.server(
            interceptors=[AuthInterceptor(self.auth, open_methods)],
            options=_server_options(self.settings),
        )
        server.add_generic_rpc_handlers([self.native.handler(), self.oip.handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [*self._services, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        return server

    async def _abandon(self) -> None:
        """Start failed after the engine started: stop what did start, quietly."""
        if self._server is not None:
            await self._server.stop(None)
            self._server = None
        if self._http is not None:
            await self._http.stop()
        self.metrics.close()
        await self.engine.stop()

    def stop(self, grace: float | None = None) -> asyncio.Task[None]:
        """Start a graceful shutdown (idempotent); await the returned task to wait for it."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(
                self._stop(self.settings.grace if grace is None else grace)
            )
        return self._stopping

    async def _stop(self, grace: float) -> None:
        """Health says NOT_SERVING at once; new sessions and frames are refused; frames already
        received are answered, or refused in-band with UNAVAILABLE once the grace is spent;
        attached streams get a notice after their last answer, then UNAVAILABLE."""
        if self._server is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        log.info("shutting down within %.1f s", grace)
        # Refuse first, then tell health: a client that sees NOT_SERVING can count on it.
        self.engine.stop_accepting()
        await self.health.enter_graceful_shutdown()
        # Frames read are answered, or refused in-band, before any stream closes, whatever the
        # grace: the batch that runs gets at least half a second, and the answers a second to
        # reach clients that read them.
        left = max(0.0, deadline - loop.time())
        await self.engine.drain(left * 0.6, max(0.5, left * 0.2))
        streams = (self.native, self.oip)
        await _until(lambda: all(s.settled() for s in streams), max(0.5, deadline - loop.time()))
        for service in streams:
            service.shutdown_streams("server is shutting down; resume your sessions elsewhere")
        flush = max(1.0, deadline - loop.time())
        await _until(lambda: not any(s.open_streams() for s in streams), flush)
        await self._server.stop(max(0.0, deadline - loop.time()))
        if self._http is not None:
            await self._http.stop()
        await self.engine.stop()
        self.metrics.close()
        self._server = None
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.rescan)

    def rescan(self) -> None:
        """SIGHUP: follow the repository now (new, changed and removed models), in any mode."""
        task = asyncio.get_running_loop().create_task(self._rescan())
        self._rescans.add(task)
        task.add_done_callback(self._rescans.discard)

    async def _rescan(self) -> None:
        log.info("rescanning the model repository (SIGHUP)")
        try:
            await self.engine.rescan()
        except Exception as exc:  # a bad repository must not take the server down
            log.error("rescan failed: %s", exc)
