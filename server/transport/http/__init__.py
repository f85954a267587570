"""HTTP transport: the Open Inference Protocol's REST API (KServe v2) on --http-port, over the
same engine, principals and allow-list as the gRPC transport."""

from rnnstream.server.transport.http._app import rest_app
from rnnstream.server.transport.http._server import HttpServer

__all__ = ["HttpServer", "rest_app"]
