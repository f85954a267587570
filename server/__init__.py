"""rnnstream server: serves stateful recurrent ONNX models to streaming clients."""

from rnnstream.server._settings import Settings
from rnnstream.server.transport.grpc import GrpcServer

__all__ = ["GrpcServer", "Settings"]
