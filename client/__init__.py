"""rnnstream: stream frames through stateful recurrent ONNX models over gRPC.

The client library is the package itself (`from rnnstream import Client`); the server is
`rnnstream.server`, the load tester `rnnstream.loadtest` and the generated protocol code
`rnnstream.proto`. Names are imported on first use, so `import rnnstream` (and the `rnnstream`
command) stays cheap until a client is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from rnnstream._version import __version__

if TYPE_CHECKING:
    from rnnstream._aio import AsyncClient
    from rnnstream._errors import FrameGroupError, OpenManyError, RnnstreamError, SessionLost
    from rnnstream._frames import FrameInput, Outputs
    from rnnstream._info import (
        ModelInfo,
        ModelVersion,
        SessionEnded,
        SessionInfo,
        SessionPage,
        StateInfo,
        TensorInfo,
    )
    from rnnstream._mux import RetryPolicy
    from rnnstream._session import AsyncSession
    from rnnstream._sync import Client, Session

__all__ = [
    "AsyncClient",
    "AsyncSession",
    "Client",
    "FrameGroupError",
    "FrameInput",
    "ModelInfo",
    "ModelVersion",
    "OpenManyError",
    "Outputs",
    "RetryPolicy",
    "RnnstreamError",
    "Session",
    "SessionEnded",
    "SessionInfo",
    "SessionLost",
    "SessionPage",
    "StateInfo",
    "TensorInfo",
    "__version__",
]

_HOMES = {
    "AsyncClient": "rnnstream._aio",
    "AsyncSession": "rnnstream._session",
    "Client": "rnnstream._sync",
    "FrameGroupError": "rnnstream._errors",
    "OpenManyError": "rnnstream._errors",
    "FrameInput": "rnnstream._frames",
    "ModelInfo": "rnnstream._info",
    "ModelVersion": "rnnstream._info",
    "Outputs": "rnnstream._frames",
    "RetryPolicy": "rnnstream._mux",
    "RnnstreamError": "rnnstream._errors",
    "Session": "rnnstream._sync",
    "SessionEnded": "rnnstream._info",
    "SessionInfo": "rnnstream._info",
    "SessionLost": "rnnstream._errors",
    "SessionPage": "rnnstream._info",
    "StateInfo": "rnnstream._info",
    "TensorInfo": "rnnstream._info",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'rnnstream' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
