"""Builds the asyncio gRPC server: services, health checking, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rnnstream_pb.v1 import rnnstream_pb2 as pb

from server._settings import Settings
from server.core import Engine
from server.transport.grpc._auth import Authenticator
from server.transport.grpc._native import SERVICE, NativeServicer
from server.transport.grpc._oip import SERVICE as OIP_SERVICE
from server.transport.grpc._oip import OipServicer

__all__ = ["GrpcServer"]

log = logging.getLogger("rnnstream.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class GrpcServer:
    """An engine served over gRPC on one port."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = Engine(settings)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()

    async def start(self) -> int:
        await self.engine.start()
        limit = self.settings.max_message_bytes
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                ("grpc.so_reuseport", 0),
            ]
        )
        auth = Authenticator()
        server.add_generic_rpc_handlers([NativeServicer(self.engine, auth).handler()])
        server.add_generic_rpc_handlers([OipServicer(self.engine, auth).handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE, OIP_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
        address = f"{self.settings.host}:{self.settings.port}"
        self.port = server.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind {address}")
        await server.start()
        self._server = server
        for service in ("", SERVICE, OIP_SERVICE):
            await self.health.set(service, SERVING)
        log.info("serving %s on %s:%d", sorted(self.engine.models), self.settings.host, self.port)
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        """Refuse new sessions, answer what was received, then close within `grace` seconds."""
        if self._server is None:
            return
        await self.health.enter_graceful_shutdown()
        self.engine.sessions.accepting = False
        await self.engine.drain(grace / 2)
        await self._server.stop(grace / 2)
        await self.engine.stop()
        self._server = None
        self._stopped.set()

    async def wait(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self, grace: float) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.stop(grace)))


_ = pb  # the generated module registers the service descriptor used by reflection
