"""Ports for the servers the tests start, without a race: a port is bound to 0 here and read
back, and the binding is kept (bound, never listening) until the test run ends. The kernel hands
that port to no other bind(0) meanwhile, while a server that sets SO_REUSEADDR (gRPC,
http.server, uvicorn, redis-server and nginx all do) can still bind it and listen; stopped and
started again, it finds the port still free. Connecting to it while no server listens is refused.

rnnstream-server processes pick their own gRPC port (--port 0) and report it (--port-file):
tests/server_process.py. In-process servers bind port 0 and read it back (GrpcServer.port)."""

from __future__ import annotations

import socket

__all__ = ["reserved_port"]

_HELD: list[socket.socket] = []  # open until the test process exits


def reserved_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    _HELD.append(sock)
    port: int = sock.getsockname()[1]
    return port
