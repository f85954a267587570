"""rnnstream client: typed sync and asyncio sessions over the native gRPC API."""

from client._aio import AsyncClient, AsyncSession
from client._errors import RnnstreamError, SessionLost
from client._frames import FrameInput, Outputs
from client._sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "FrameInput",
    "Outputs",
    "RnnstreamError",
    "Session",
    "SessionLost",
]
