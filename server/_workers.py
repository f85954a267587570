"""`--workers N`: N server processes sharing one port (SO_REUSEPORT), each with its own sessions."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import socket
import sys
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from types import FrameType

from rnnstream.server._logging import configure_logging
from rnnstream.server._loop import loop_name, run_event_loop
from rnnstream.server._malloc import give_back_large_buffers, trim_after_bursts
from rnnstream.server._settings import Settings
from rnnstream.server.core import DeviceError, ModelConfigError
from rnnstream.server.transport.grpc import GrpcServer

__all__ = ["serve", "supervise", "worker_settings"]

log = logging.getLogger("rnnstream.workers")

# Seconds a worker may take past the grace before it is killed.
_KILL_MARGIN = 5.0


async def _serve(settings: Settings) -> None:
    server = GrpcServer(settings)
    await server.start()
    server.install_signal_handlers()
    trimmer = asyncio.create_task(trim_after_bursts(server.engine.budget))
    try:
        await server.wait()
    finally:
        trimmer.cancel()


def serve(settings: Settings) -> int:
    """Run one server until SIGTERM/SIGINT; returns the process exit status."""
    log.debug("event loop: %s", loop_name())
    give_back_large_buffers()
    # SIGHUP rescans the repository once the server serves; until then (models loading) its
    # default action would end the process: a rescan asked for at start has nothing to do.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        run_event_loop(_serve(settings))
    except (DeviceError, ModelConfigError, OSError, ValueError) as exc:
        print(f"rnnstream-server: {exc}", file=sys.stderr)
        return 2
    return 0


def worker_settings(settings: Settings, index: int, port: int) -> Settings:
    """Worker `index`'s settings: the shared port, and a metrics port of its own."""
    metrics = settings.metrics_port + index if settings.metrics_port else 0
    return replace(settings, port=port, metrics_port=metrics)


def _worker(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(serve(settings))


def _reserve_port(host: str) -> socket.socket:
    """A bound, not listening, SO_REUSEPORT socket: holds a free port for the workers to share.

    A socket that does not listen receives no connections; it only keeps the port from being
    handed to another program while the workers bind it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, 0))
    return sock


def supervise(settings: Settings) -> int:
    """Start `settings.workers` server processes, forward SIGTERM/SIGINT, wait for them all.

    A worker that exits on its own (a bad model, a port in use) stops the others too, so the
    whole server fails visibly instead of serving at reduced capacity.
    """
    reserved = _reserve_port(settings.host) if settings.port == 0 else None
    port = reserved.getsockname()[1] if reserved is not None else settings.port
    context = multiprocessing.get_context("spawn")  # gRPC's threads do not survive a fork
    workers: list[BaseProcess] = [
        context.Process(
            target=_worker,
            args=(worker_settings(settings, i, port),),
            name=f"rnnstream-worker-{i}",
        )
        for i in range(settings.workers)
    ]
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for worker in workers:
            if worker.is_alive():
                worker.terminate()  # SIGTERM: the worker shuts down gracefully

    def rescan(signum: int, frame: FrameType | None) -> None:
        for worker in workers:  # SIGHUP: each worker rescans the model repository
            if worker.pid is not None and worker.is_alive():
                os.kill(worker.pid, signal.SIGHUP)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, rescan)
    try:
        for worker in workers:
            worker.start()
        log.info("%d workers serving on %s:%d", len(workers), settings.host, port)
        status = 0
        running = list(workers)
        while running:
            wait([w.sentinel for w in running])
            for worker in [w for w in running if not w.is_alive()]:
                running.remove(worker)
                code = worker.exitcode or 0
                if not stopping:
                    log.error("%s exited with status %d; stopping the others", worker.name, code)
                    forward(signal.SIGTERM, None)
                    status = code or 1
                elif code not in (0, -signal.SIGTERM):
                    status = status or 1
        return status
    finally:
        for worker in workers:
            worker.join(settings.grace + _KILL_MARGIN)
            if worker.is_alive():
                worker.kill()
        if reserved is not None:
            reserved.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
