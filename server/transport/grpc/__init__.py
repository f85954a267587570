"""gRPC transport: servicers that translate messages for the core engine."""

from server.transport.grpc._server import GrpcServer

__all__ = ["GrpcServer"]
