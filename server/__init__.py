"""rnnstream server: serves stateful recurrent ONNX models to streaming clients."""

from server._settings import Settings
from server.transport.grpc import GrpcServer

__all__ = ["GrpcServer", "Settings"]
