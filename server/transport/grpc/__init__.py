"""gRPC transport: servicers that translate messages for the core engine."""

from rnnstream.server.transport.grpc._server import GrpcServer

__all__ = ["GrpcServer"]
