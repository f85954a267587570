"""Transport-neutral core. Its one way in is the Engine: calls that name sessions by (principal,
session_id) and answer with the typed results below or raise the errors below."""

from rnnstream.server.core._arrivals import MAX_GATHER_SECONDS
from rnnstream.server.core._budget import Holding, MemoryBudget
from rnnstream.server.core._engine import Engine, NamedArray
from rnnstream.server.core._engine_settings import EngineSettings
from rnnstream.server.core._errors import (
    ErrorCode,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RnnstreamError,
    Unauthenticated,
    Unavailable,
    quoted,
    quoted_list,
)
from rnnstream.server.core._instruments import CoreMetrics
from rnnstream.server.core._models import ModelConfigError, ModelSpec, StateSpec, TensorSpec
from rnnstream.server.core._results import (
    EMIT_MODES,
    SESSION_STATES,
    Emit,
    Ended,
    Flushed,
    Forecasted,
    FrameOutput,
    ModelInfo,
    ModelStats,
    Opened,
    Reset,
    SessionInfo,
    SessionPage,
    VersionState,
)
from rnnstream.server.core._runtime import DeviceError
from rnnstream.server.core._serving import GRAPH_LEVELS, ServingConfig, VersionPolicy
from rnnstream.server.core._store import (
    Gone,
    SessionRecord,
    SpecOf,
    SpilledSession,
    SpillRecord,
    StateStore,
    StepRecord,
)
from rnnstream.server.core._work import FrameReply

__all__ = [
    "EMIT_MODES",
    "GRAPH_LEVELS",
    "MAX_GATHER_SECONDS",
    "SESSION_STATES",
    "CoreMetrics",
    "DeviceError",
    "Emit",
    "Ended",
    "Engine",
    "EngineSettings",
    "ErrorCode",
    "FailedPrecondition",
    "Flushed",
    "Forecasted",
    "FrameOutput",
    "FrameReply",
    "Gone",
    "Holding",
    "Internal",
    "InvalidArgument",
    "MemoryBudget",
    "ModelConfigError",
    "ModelInfo",
    "ModelSpec",
    "ModelStats",
    "NamedArray",
    "NotFound",
    "Opened",
    "PermissionDenied",
    "Reset",
    "ResourceExhausted",
    "RnnstreamError",
    "ServingConfig",
    "SessionInfo",
    "SessionPage",
    "SessionRecord",
    "SpecOf",
    "SpillRecord",
    "SpilledSession",
    "StateSpec",
    "StateStore",
    "StepRecord",
    "TensorSpec",
    "Unauthenticated",
    "Unavailable",
    "VersionPolicy",
    "VersionState",
    "quoted",
    "quoted_list",
]
