"""Transport-neutral core: models, sessions, the batching scheduler and the engine over them."""

from rnnstream.server.core._engine import Engine, OpenedSession, SessionSnapshot, discover_models
from rnnstream.server.core._errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RnnstreamError,
    Unauthenticated,
    Unavailable,
)
from rnnstream.server.core._forecast import FlushResult, ForecastResult
from rnnstream.server.core._models import ModelConfigError, ModelSpec, StateSpec, TensorSpec
from rnnstream.server.core._runtime import DeviceError, OrtModel, load_model
from rnnstream.server.core._scheduler import ModelScheduler
from rnnstream.server.core._sessions import FrameResult, Session, SessionManager
from rnnstream.server.core._state_pool import StatePool
from rnnstream.server.core._store import SessionRecord, StateStore, StepRecord

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeviceError",
    "Engine",
    "FailedPrecondition",
    "FlushResult",
    "ForecastResult",
    "FrameResult",
    "Internal",
    "InvalidArgument",
    "ModelConfigError",
    "ModelScheduler",
    "ModelSpec",
    "NotFound",
    "OpenedSession",
    "OrtModel",
    "ResourceExhausted",
    "RnnstreamError",
    "Session",
    "SessionManager",
    "SessionRecord",
    "SessionSnapshot",
    "StatePool",
    "StateSpec",
    "StateStore",
    "StepRecord",
    "TensorSpec",
    "Unauthenticated",
    "Unavailable",
    "discover_models",
    "load_model",
]
