"""The state store interface: where session state is persisted between steps, so another replica
can resume a session."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy.typing as npt

from rnnstream.server.core._models import ModelSpec
from rnnstream.server.core._results import Emit, FrameOutput

__all__ = ["SessionRecord", "SpecOf", "StateStore", "StepRecord"]

Arrays = list[npt.NDArray[Any]]
SpecOf = Callable[[str, int], ModelSpec]


@dataclass(frozen=True)
class StepRecord:
    """One session after one batch step: written before the step's outputs are sent."""

    owner: str
    session_id: str
    model: str
    emit: Emit
    next_index: int
    states: Arrays  # per session: each state without its batch axis
    result: FrameOutput | None  # the step's outputs, for the output ring
    version: int = 1  # the model version the session is pinned to
    ttl: float | None = None  # seconds the stored session lives idle (its model's; 0: forever)


@dataclass(frozen=True)
class SessionRecord:
    """A stored session, as loaded to resume it."""

    model: str
    emit: Emit
    next_index: int
    states: Arrays
    ring: list[FrameOutput]  # oldest first
    version: int = 1  # records stored before versions existed are version 1


class StateStore(Protocol):
    """Persistence of session state. A call raises Unavailable when the store cannot be reached
    (the client may try again later); any other exception is a fault (INTERNAL)."""

    async def save(self, spec: ModelSpec, steps: Sequence[StepRecord]) -> None:
        """Write every step in one round trip."""

    async def load(self, specs: SpecOf, owner: str, session_id: str) -> SessionRecord | None:
        """The stored session, or None when the store has none under that owner and id.
        `specs(model, version)` describes the stored model version, or raises (an
        RnnstreamError) when this server does not serve it."""

    async def delete(self, owner: str, session_id: str) -> None: ...

    async def close(self) -> None: ...
